"""Every import of a `sala` module anywhere in the tree resolves, the ones inside functions included (a lazy import
of a moved module fails only when its command runs, e.g. on the GPU)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sala_imports():
    for folder in ("sala", "tests", "experiments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sala":
                    yield path, node.lineno, node.module, [a.name for a in node.names if a.name != "*"]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] == "sala":
                            yield path, node.lineno, a.name, []


def test_every_sala_import_resolves():
    missing = []
    for path, line, module, names in _sala_imports():
        where = f"{path.relative_to(ROOT)}:{line}"
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == "sala":
                missing.append(f"{where}: no module {module}")
            continue                       # an optional third-party dependency that is not installed
        for name in names:
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ModuleNotFoundError:
                    missing.append(f"{where}: {module} has no {name}")
    assert not missing, "\n".join(missing)
