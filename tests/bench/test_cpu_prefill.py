"""`sala bench cpu-prefill` (sala.bench.cpu_prefill): the JSON it writes and the baseline path it switches to."""
import json

import torch

from sala.bench import cpu_prefill
from sala.ops.infllmv2 import blockwise_reference as bw
from sala.ops.infllmv2 import selection, sparse_attention


def test_previous_path_is_the_flat_reference_and_is_restored():
    gen = torch.Generator().manual_seed(0)
    B, Tq, off, Hq, Hkv, D, bs = 2, 40, 24, 4, 2, 8, 8
    q = torch.randn(B, Tq, Hq, D, generator=gen)
    k = torch.randn(B, off + Tq, Hkv, D, generator=gen)
    v = torch.randn(B, off + Tq, Hkv, D, generator=gen)
    own = ((off + torch.arange(Tq)) // bs).to(torch.int32)
    idx = torch.stack([torch.zeros_like(own), own], dim=-1)[None, None].expand(B, Hkv, Tq, 2).contiguous()
    want = bw.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, 0.3)
    with cpu_prefill.previous_sparse_path():
        assert sparse_attention.sparse_attention_blockwise_ref is not bw.sparse_attention_blockwise_ref
        assert selection.select_blocks_blockwise is not bw.select_blocks_blockwise
        got = sparse_attention.sparse_attention_blockwise_ref(q, k, v, idx, off, bs, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sparse_attention.sparse_attention_blockwise_ref is bw.sparse_attention_blockwise_ref
    assert selection.select_blocks_blockwise is bw.select_blocks_blockwise


def test_cli_writes_seconds_and_the_ratio(tmp_path):
    out = tmp_path / "cpu.json"
    assert cpu_prefill.main(["--lengths", "300,2200", "--out", str(out), "--repeats", "1",
                             "--baseline-max", "300"]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "cpu_prefill" and payload["dtype"] == "float32"
    assert payload["meta"]["command"] and payload["meta"]["torch"]
    first, second = payload["rows"]
    assert (first["tokens"], second["tokens"]) == (300, 2200)
    assert first["seconds"] > 0 and first["tokens_per_s"] == 300 / first["seconds"]
    assert first["speedup_vs_previous"] == first["previous_seconds"] / first["seconds"]
    assert "previous_seconds" not in second                # above --baseline-max
