"""Metrics log: one JSON object per line in `{out_dir}/metrics.jsonl`."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL log. On resume, lines of steps after the checkpoint (from the interrupted run)
    are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_name(".tmp-" + self.path.name)
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.is_file():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
