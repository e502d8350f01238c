"""InfLLM-V2 settings, the Triton launch settings and the length arithmetic every other module of the package
shares (a leaf: imports no other module of the package)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseParams:
    """InfLLM-V2 settings (released: block 64, kernel 32, stride 16, topk 64, init 1, window 2048)."""

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    topk: int = 64
    init_blocks: int = 1
    window_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("block_size", "kernel_size", "kernel_stride", "topk", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SparseParams.{name} must be a positive int, got {value!r}")
        if not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            raise ValueError(f"SparseParams.init_blocks must be an int >= 0, got {self.init_blocks!r}")
        if self.block_size % self.kernel_stride:
            raise ValueError(f"SparseParams: block_size {self.block_size} must be a multiple of "
                             f"kernel_stride {self.kernel_stride}")
        if self.kernel_size % self.kernel_stride:
            raise ValueError(f"SparseParams: kernel_size {self.kernel_size} must be a multiple of "
                             f"kernel_stride {self.kernel_stride}")
        if self.window_size % self.block_size:
            raise ValueError(f"SparseParams: window_size {self.window_size} must be a multiple of "
                             f"block_size {self.block_size}")
        if self.topk < self.init_blocks + 1:
            raise ValueError(f"SparseParams: topk {self.topk} must be >= init_blocks + 1 = {self.init_blocks + 1} "
                             f"so the forced blocks (init + local window + own block) fit in the selection")
        if self.k2_kernel > self.dense_positions:
            raise ValueError(f"SparseParams: 4 * kernel_size = {self.k2_kernel} exceeds the dense positions "
                             f"{self.dense_positions} (= (topk + window_size/block_size) * block_size): sparse "
                             f"queries would have no coarse key to score with")

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def total_blocks(self) -> int:
        """Blocks attended per query: topk + local_blocks."""
        return self.topk + self.local_blocks

    @property
    def k2_kernel(self) -> int:
        return 4 * self.kernel_size

    @property
    def k2_stride(self) -> int:
        return 4 * self.kernel_stride

    @property
    def dense_positions(self) -> int:
        """Positions below this keep every block (exact dense causal attention)."""
        return self.total_blocks * self.block_size


def compressed_lengths(T: int, params: SparseParams) -> tuple[int, int]:
    """(n1, n2): numbers of K1 and K2 windows among T keys."""
    n1 = (T - params.kernel_size) // params.kernel_stride + 1 if T >= params.kernel_size else 0
    n2 = (T - params.k2_kernel) // params.k2_stride + 1 if T >= params.k2_kernel else 0
    return n1, n2


def n_windows(length: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Number of full windows in `length` keys (elementwise, integer tensors)."""
    return torch.where(length >= kernel, torch.div(length - kernel, stride, rounding_mode="floor") + 1,
                       torch.zeros_like(length))


def softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    """The attention scale: head_dim ** -0.5 of q [..., D] unless given."""
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """One-line errors for q [B, T, Hq, D], k (and v) [B, Tk, Hkv, D] that do not fit together."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{fn}: q and k must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{fn}: v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: batch and head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} must match")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{fn}: query heads {q.shape[2]} (q {tuple(q.shape)}) not a multiple of KV heads "
                         f"{k.shape[2]} (k {tuple(k.shape)})")


# paged K/V (sala.ops.infllmv2.paged)
def check_no_grad(fn: str, *tensors: torch.Tensor | None) -> None:
    """Paged K/V is inference only: refuse inputs that require grad while grad is enabled."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{fn}: paged K/V is inference only, but an input requires grad (call it under "
                         f"torch.no_grad() or torch.inference_mode())")


def check_pages(fn: str, pages: torch.Tensor, block_size: int | None = None, name: str = "pages") -> None:
    """pages [P, BS, Hkv, D] (BS == block_size when given)."""
    if pages.dim() != 4:
        raise ValueError(f"{fn}: {name} must be [P, BS, Hkv, D], got {tuple(pages.shape)}")
    if block_size is not None and pages.shape[1] != block_size:
        raise ValueError(f"{fn}: {name} {tuple(pages.shape)} has pages of {pages.shape[1]} keys; the page size must "
                         f"be params.block_size = {block_size}")


def check_block_table(fn: str, table: torch.Tensor, dims: tuple[int, ...], name: str = "block_table",
                      pages: torch.Tensor | None = None) -> None:
    """An int32 block table of one of the allowed numbers of dimensions ([NB] one row, [R, NB] rows)."""
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be an int32 tensor, got {type(table).__name__}")
    if table.dtype != torch.int32:
        raise ValueError(f"{fn}: {name} must be int32, got {table.dtype} {tuple(table.shape)}")
    if table.dim() not in dims:
        want = " or ".join({1: "[NB]", 2: "[R, NB]"}[d] for d in dims)
        raise ValueError(f"{fn}: {name} must be {want}, got {tuple(table.shape)}")
    if pages is not None and table.device != pages.device:
        raise ValueError(f"{fn}: {name} is on {table.device} but the pages are on {pages.device}")


def check_page_pair(fn: str, k_pages: torch.Tensor, v_pages: torch.Tensor, block_size: int) -> None:
    """k_pages [P, block_size, Hkv, D] and v_pages of the same shape."""
    check_pages(fn, k_pages, block_size, "k_pages")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"{fn}: v_pages {tuple(v_pages.shape)} must have the shape of k_pages "
                         f"{tuple(k_pages.shape)}")


def flat_pages(fn: str, pages: torch.Tensor) -> torch.Tensor:
    """pages [P, BS, Hkv, D] as a view [P * BS, Hkv, D] (no copy: writes go to the pool; the kernels read it)."""
    P, BS, H, D = pages.shape
    if pages.stride(-1) != 1 or pages.stride(0) != BS * pages.stride(1):
        raise ValueError(f"{fn}: pages {tuple(pages.shape)} with strides {pages.stride()} cannot be viewed as "
                         f"[P * BS, Hkv, D] rows with contiguous head_dim")
    return pages.view(P * BS, H, D)


FWD_QUERY_TILES = (1, 4)   # the per-token walk and the union walk of 4 queries (8 lost on an H100)


@dataclass(frozen=True)
class SparseKernelConfig:
    """Launch settings of the InfLLM-V2 Triton kernels (GPU). Pass one as `kernel_config=` to the ops; None means
    these defaults, tuned on the H100/H200 at the released shape (docs/results.md). They change speed and memory,
    never the result (the selection up to the tie rule, which every setting keeps). Triton's interpreter uses
    small fixed tiles instead of the tile sizes here.

    Stage-1 selection: `select_rows` query rows (tokens x padded group heads) per program, `select_k1_tile` K1
    windows per iteration (a multiple of block_size / kernel_stride), `select_warps`, `select_stages`;
    `select_chunk_bytes` bounds the pooled-score buffer of one query chunk (fp32), hence the selection's peak
    memory. Top-k: rows of up to `topk_max_cols` blocks use the one-kernel Triton top-k; wider rows the Triton
    top-k of every `topk_max_cols`-column tile and then of their candidates (H100, k 96, 8,192 rows of 8K-32K
    columns: 9.8-11.1x faster than the chunked torch.topk reference, same indices;
    bench/results/topk_wide_h100.json), or the reference when `topk_max_cols` < k. Attention: per-token
    forward / dq walk with `fwd_warps`, `fwd_stages` and `fwd_blocks_per_iter` selected blocks per
    iteration; the forced blocks (init + local band) as dense tiles of `band_rows` queries
    (`band_warps`, `band_stages`) in the forward and `band_dq_rows` (`band_dq_warps`, `band_dq_stages`) in dq.
    Decode: split-K attention with at least `decode_min_programs` programs and split-N selection with at least
    `decode_select_programs` (when the selection / the cache is large enough). A stages value of None leaves
    the choice to Triton.

    `fwd_query_tile` (1 or 4; default 4): 4 walks each query's free selected blocks (those outside the forced
    init blocks and local band) per tile of 4 consecutive queries x one KV head (4 * G rows, `fwd_tile_warps`,
    `fwd_tile_stages`), visiting the union of the 4 queries' blocks once (a 4-way merge of their slot lists), so
    a block that neighbours share is loaded once for all of them; 1 walks them per token (`fwd_warps`, ...).
    Measured on an H100 at 128K tokens with correlated queries (bench/results/sparse_union_walk_smooth16_h100.json):
    attention forward 90.6 ms per token, 65.9 ms with 4 (1.38x), 96.5 ms with 8 (not accepted). Only the forward
    of the band split (`forced_blocks=True`, the path of `infllmv2_attention`) takes it; the backward and the
    one-walk forward stay per token."""

    select_rows: int = 128
    select_k1_tile: int = 64
    select_warps: int = 8
    select_stages: int | None = 3
    select_chunk_bytes: int = 256 << 20
    topk_max_cols: int = 4096
    band_rows: int = 128
    band_warps: int = 8
    band_stages: int | None = 3
    band_dq_rows: int = 64
    band_dq_warps: int = 4
    band_dq_stages: int | None = 2
    fwd_warps: int = 4
    fwd_stages: int | None = 2
    fwd_blocks_per_iter: int = 2
    fwd_query_tile: int = 4
    fwd_tile_warps: int = 4
    fwd_tile_stages: int | None = 2
    decode_min_programs: int = 64
    decode_select_programs: int = 256

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is None and name.endswith("_stages"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SparseKernelConfig.{name} must be a positive int, got {value!r}")
        for name in ("select_rows", "select_k1_tile", "band_rows", "band_dq_rows"):
            value = getattr(self, name)
            if value & (value - 1) or value < 16:
                raise ValueError(f"SparseKernelConfig.{name} must be a power of two >= 16, got {value}")
        if self.fwd_query_tile not in FWD_QUERY_TILES:
            raise ValueError(f"SparseKernelConfig.fwd_query_tile must be one of {FWD_QUERY_TILES} (1: the per-token "
                             f"walk, 4: the union walk; 8 measured slower), got {self.fwd_query_tile}")


DEFAULT_KERNEL_CONFIG = SparseKernelConfig()


def kernel_config_or_default(config: SparseKernelConfig | None) -> SparseKernelConfig:
    """`config`, or the defaults when None; anything else is refused with a one-line error."""
    if config is None:
        return DEFAULT_KERNEL_CONFIG
    if not isinstance(config, SparseKernelConfig):
        raise TypeError(f"kernel_config must be a SparseKernelConfig or None, got {type(config).__name__}")
    return config
