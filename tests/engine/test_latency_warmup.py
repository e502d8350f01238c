"""sala.bench.latency: the untimed warm-up request covers one full prefill chunk and part of a second."""
from __future__ import annotations

import pytest

from sala.bench.latency import warmup_tokens


@pytest.mark.parametrize("chunk", [1024, 16384, 32768, 65536])
def test_warmup_request_spans_a_full_chunk_and_a_partial_one(chunk):
    n = warmup_tokens(chunk)
    assert n >= 12288
    assert n > chunk and n % chunk != 0          # a full chunk, then a partial one
