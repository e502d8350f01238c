"""experiments/profiling/prefill_gaps.py: the GPU busy time is the union of device intervals (overlaps counted once)."""
from __future__ import annotations

from types import SimpleNamespace


def _ev(start: float, end: float, device: str = "DeviceType.CUDA", name: str = "k"):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device, name=name)


def test_busy_time_is_the_union_of_device_intervals(load_script):
    gaps = load_script("prefill_gaps")
    events = [_ev(0, 1000), _ev(500, 1500), _ev(3000, 3500), _ev(3100, 3200),   # overlaps counted once
              _ev(0, 9000, "DeviceType.CPU"),                                    # host events ignored
              _ev(4000, 4000)]                                                   # empty interval ignored
    assert gaps.busy_ms(events) == 2.0        # (1500 - 0) + (3500 - 3000) µs = 2 ms
    assert gaps.busy_ms([]) == 0.0


def test_kernel_breakdown_groups_device_time_by_family(load_script):
    gaps = load_script("prefill_gaps")
    events = [_ev(0, 2000, name="_block_scores_kernel"), _ev(0, 500, name="_topk_blocks_kernel"),
              _ev(0, 3000, name="nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN"),
              _ev(0, 1000, name="nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN"),
              _ev(0, 700, name="_segment_output_kernel"), _ev(0, 100, name="mystery"),
              _ev(0, 9000, "DeviceType.CPU", name="_block_scores_kernel")]     # host events ignored
    out = gaps.kernel_breakdown(events, top=2)
    assert out["families_ms"] == {"gemm": 4.0, "sparse_selection": 2.5, "lightning": 0.7, "other": 0.1}
    assert [k["name"] for k in out["top_kernels"]] == ["nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN",
                                                       "_block_scores_kernel"]
    assert out["top_kernels"][0]["calls"] == 2
