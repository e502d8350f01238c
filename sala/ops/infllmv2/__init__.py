"""InfLLM-V2 trainable sparse attention (docs/sparse.md).

Modules: `params` (settings and lengths), `compression`, `selection` (stage 1 + top-k), `sparse_attention`
(block-sparse attention), `attention` (the whole op), `varlen` (packed documents), `decode`, `paged` (K/V in a
page pool, inference); `reference` (plain PyTorch, the ground truth) and the Triton kernels `triton_*` beside
them. Triton launch settings are a `SparseKernelConfig` passed as `kernel_config=` (None: the defaults).
"""
from sala.ops.infllmv2.attention import infllmv2_attention
from sala.ops.infllmv2.compression import compress_keys, compress_window_range, update_compressed_keys
from sala.ops.infllmv2.decode import infllmv2_decode
from sala.ops.infllmv2.paged import (
    gather_paged,
    gather_paged_range,
    infllmv2_attention_paged,
    paged_rows,
    write_paged,
    write_paged_positions,
    write_paged_rows,
)
from sala.ops.infllmv2.params import SparseKernelConfig, SparseParams, compressed_lengths
from sala.ops.infllmv2.selection import select_blocks
from sala.ops.infllmv2.sparse_attention import block_sparse_attention

__all__ = [
    "SparseKernelConfig", "SparseParams", "block_sparse_attention", "compress_keys", "compress_window_range",
    "compressed_lengths", "gather_paged", "gather_paged_range", "infllmv2_attention", "infllmv2_attention_paged",
    "infllmv2_decode", "paged_rows", "select_blocks", "update_compressed_keys", "write_paged", "write_paged_positions",
    "write_paged_rows",
]
