"""experiments/profiling/profile_selection.py: --variant NAME=KEY:VALUE,... parses into SparseKernelConfig fields,
bad ones are refused."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")


def test_variant_parses_into_tuning_flips(load_script):
    ps = load_script("profile_selection")
    assert ps.parse_variant("small=select_rows:64,select_warps:4") == (
        "small", {"select_rows": 64, "select_warps": 4})
    assert ps.parse_variant("rows=select_rows:256") == ("rows", {"select_rows": 256})


@pytest.mark.parametrize("text, message", [("noequals", "NAME=KEY:VALUE"), ("x=", "NAME=KEY:VALUE"),
                                           ("x=nokey:1", "'nokey' is not a SparseKernelConfig field"),
                                           ("x=select_rows:big", "'big' of select_rows is not an integer")])
def test_bad_variant_is_refused_with_the_reason(load_script, text, message):
    ps = load_script("profile_selection")
    with pytest.raises(SystemExit, match=message):
        ps.parse_variant(text)
