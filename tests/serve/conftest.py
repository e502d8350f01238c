"""Fixtures of the serving tests (skipped as a whole without the serve extra)."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from tests.serve.live import serving


@pytest.fixture(scope="module")
def server():
    with serving() as s:
        yield s
