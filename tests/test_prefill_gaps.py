"""scripts/prefill_gaps.py: the GPU busy time is the union of device intervals (overlaps counted once)."""
from __future__ import annotations

from types import SimpleNamespace


def _ev(start: float, end: float, device: str = "DeviceType.CUDA"):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device)


def test_busy_time_is_the_union_of_device_intervals(load_script):
    gaps = load_script("prefill_gaps")
    events = [_ev(0, 1000), _ev(500, 1500), _ev(3000, 3500), _ev(3100, 3200),   # overlaps counted once
              _ev(0, 9000, "DeviceType.CPU"),                                    # host events ignored
              _ev(4000, 4000)]                                                   # empty interval ignored
    assert gaps.busy_ms(events) == 2.0        # (1500 - 0) + (3500 - 3000) µs = 2 ms
    assert gaps.busy_ms([]) == 0.0
