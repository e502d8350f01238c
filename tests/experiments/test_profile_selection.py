"""experiments/profiling/profile_selection.py: --variant NAME=KEY:VALUE,... parses into TUNING flips, bad ones are refused."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")


def test_variant_parses_into_tuning_flips(load_script):
    ps = load_script("profile_selection")
    assert ps.parse_variant("old=select_split_k2:0,select_mask_after_sum:0") == (
        "old", {"select_split_k2": 0, "select_mask_after_sum": 0})
    assert ps.parse_variant("rows=select_rows:256") == ("rows", {"select_rows": 256})


@pytest.mark.parametrize("text, message", [("noequals", "NAME=KEY:VALUE"), ("x=", "NAME=KEY:VALUE"),
                                           ("x=nokey:1", "'nokey' is not a TUNING key"),
                                           ("x=select_rows:big", "'big' of select_rows is not an integer")])
def test_bad_variant_is_refused_with_the_reason(load_script, text, message):
    ps = load_script("profile_selection")
    with pytest.raises(SystemExit, match=message):
        ps.parse_variant(text)
