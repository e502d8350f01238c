"""Resumable stage folders: each stage writes into a temporary folder renamed into place when complete,
with a `done.json` recording the options it ran with, so a rerun skips finished stages."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sala.utils.errors import ResumeMismatchError

DONE = "done.json"


class StageDir:
    """`root/name` holds one finished stage; `begin()` gives a temp folder, `commit(tmp, info)` publishes it."""

    def __init__(self, root: Path, name: str, options: dict[str, Any]) -> None:
        self.root, self.name, self.options = root, name, options
        self.path = root / name

    def done(self) -> bool:
        """True when the stage finished with the same options; ValueError when it finished with others."""
        f = self.path / DONE
        if not f.is_file():
            return False
        prev = json.loads(f.read_text()).get("options") or {}
        now = json.loads(json.dumps(self.options))
        if prev != now:
            changed = [f"{k}: {prev.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(prev) | set(now))
                       if prev.get(k) != now.get(k)]
            raise ResumeMismatchError(f"stage {self.name!r} in {self.path} finished with other options "
                                      f"({'; '.join(changed)}); pass --restart to redo the conversion, or use "
                                      f"another --out")
        return True

    def begin(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-", dir=self.root))

    def commit(self, tmp: Path, info: dict[str, Any] | None = None) -> None:
        (tmp / DONE).write_text(json.dumps({"options": self.options, **(info or {})}, indent=1))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(tmp, self.path)
