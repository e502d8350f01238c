"""The small SALA model that ships inside the package: the default of `sala demo`, `generate` and `eval`."""
from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


def bundled_model_dir() -> Path | None:
    """The bundled model folder, or None when this installation has none."""
    return BUNDLED_MODEL_DIR if (BUNDLED_MODEL_DIR / "config.json").is_file() else None
