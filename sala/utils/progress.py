"""Progress bars for long waits: tqdm on stderr, shown only once a wait passes `delay` seconds, so short runs
and the stdout of every command stay clean."""
from __future__ import annotations

import sys

# Seconds before a bar appears: waits shorter than this show nothing.
DEFAULT_DELAY_S = 2.0


def progress(total: float | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             delay: float | None = None, **kw):
    """A tqdm bar on stderr (`disable=not enabled`), shown after `delay` seconds (default DEFAULT_DELAY_S); use as
    a context manager, `.update(n)`."""
    from tqdm.auto import tqdm

    delay = DEFAULT_DELAY_S if delay is None else delay
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, delay=delay, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kw)
