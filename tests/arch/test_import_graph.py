"""The import graph of `sala/`: no cycle, and no layer imports a layer above it.

Layers, lowest first (a module may import its own layer and the layers below it, never one above):

    0    sala.ops               kernels and their plain-PyTorch references (no nn.Module)
    1    sala.modeling, sala    config, model, cache: the only forward (`sala/__init__.py` re-exports it)
    2    sala.engine            scheduler, caches, runner, sampling, output
    3.x  the applications of the model, one level in the standards, ordered inside it so that the
         dependencies they need run one way:
    3.0  sala.data              data preparation and loading (train, eval, convert, bench read packed data)
    3.1  sala.eval              evaluation (training and conversion measure with it)
    3.2  sala.train             the trainer (conversion hands over to it for continual training)
    3.3  sala.convert           HALO conversion
    3.4  sala.serve             the server
    3.5  sala.bench             benchmarks (may drive any application, the server included)
    4    sala.commands          one module per CLI command
    5    sala.cli               the entry point

`sala.utils` sits below everything: any layer may import it, and it imports nothing else from `sala`.

Every import counts, wherever it stands (an import inside a function is still a dependency, and only hides a
cycle), except those under `if TYPE_CHECKING:`. Edges go to the module named: `from sala.a import b` is an edge to
`sala.a.b` when that is a module, else to `sala.a`. A module's import of its own package's `__init__` (an ancestor)
is not an edge: Python has that package initialised first.

KNOWN_VIOLATIONS lists what main has today, each with the violation it is; the test fails on anything new, and
also on an entry that no longer happens (so the list only shrinks: remove an entry when its fix lands).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sala"

RANK = {"utils": -1, "ops": 0, "modeling": 1, "": 1, "engine": 2, "data": 3.0, "eval": 3.1, "train": 3.2,
        "convert": 3.3, "serve": 3.4, "bench": 3.5, "commands": 4, "cli": 5}

# (importer, imported) module pairs that break the rules on main today, each with what it breaks. The lead removes
# an entry when the change that fixes it is merged; a stale entry fails test_known_violations_still_happen.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

# Import cycles on main today, as the sorted tuple of their modules, each with what it is.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of the package; sala/assets holds data (a model folder's transformers shims), not layers."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "assets" not in p.relative_to(PACKAGE).parts}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `sala` modules that module `name` (file `path`) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:   # `import sala.a.b.C`-style names: the module that holds them
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):   # not itself, not an ancestor
            out.add(target)

    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sala" or alias.name.startswith("sala."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: from the module's package (a package's own name for its __init__)
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "sala" and not source.startswith("sala."):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violation(src: str, dst: str) -> str | None:
    """Why the edge src -> dst breaks the layering, or None."""
    a, b = _layer(src), _layer(dst)
    if a == b:
        return None
    if a not in RANK or b not in RANK:
        return f"{src} -> {dst}: a layer missing from RANK ({a!r} or {b!r})"
    if b == "utils":
        return None
    if a == "utils":
        return f"{src} -> {dst}: sala.utils imports only sala.utils"
    if RANK[b] > RANK[a]:
        return f"{src} -> {dst}: {a or 'sala'} (layer {RANK[a]}) imports {b} (layer {RANK[b]}), a layer above it"
    return None


def _violations() -> dict[tuple[str, str], str]:
    return {(src, dst): why for src, dsts in _graph().items() for dst in sorted(dsts)
            if (why := _violation(src, dst))}


def _cycles(graph: dict[str, set[str]] | None = None) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan) of `graph` (default: sala's), each as a
    sorted tuple."""
    graph = _graph() if graph is None else graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_is_read():
    """The parser finds the package's real edges (a test that found no import at all would pass everything)."""
    graph = _graph()
    assert "sala.modeling" in graph["sala"]
    assert any(dst.startswith("sala.ops") for src, dsts in graph.items() if src.startswith("sala.modeling")
               for dst in dsts)
    assert any(dst.startswith("sala.commands") for dst in graph["sala.cli"])


def test_cycles_are_found_in_a_constructed_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert _cycles(g) == [("a", "b", "c"), ("e", "f")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    new = {c: "" for c in _cycles() if c not in KNOWN_CYCLES}
    assert not new, "import cycles in sala/: " + "; ".join(" <-> ".join(c) for c in new)


def test_no_layer_imports_a_layer_above_it():
    new = {k: v for k, v in _violations().items() if k not in KNOWN_VIOLATIONS}
    assert not new, "layering violations:\n" + "\n".join(new.values())


def test_known_violations_still_happen():
    """An allow-list entry whose violation is gone must be removed, so the list only shrinks."""
    gone = [k for k in KNOWN_VIOLATIONS if k not in _violations()]
    gone += [c for c in KNOWN_CYCLES if c not in _cycles()]
    assert not gone, f"fixed: remove these entries from KNOWN_VIOLATIONS / KNOWN_CYCLES: {gone}"


@pytest.mark.parametrize("src,dst,bad", [("sala.ops.a", "sala.modeling.b", True),
                                         ("sala.modeling.b", "sala.ops.a", False),
                                         ("sala.train.t", "sala.data.d", False),
                                         ("sala.data.d", "sala.eval.e", True),
                                         ("sala.eval.e", "sala.train.t", True),
                                         ("sala.convert.c", "sala.train.t", False),
                                         ("sala.train.t", "sala.convert.c", True),
                                         ("sala.bench.b", "sala.serve.s", False),
                                         ("sala.engine.e", "sala.data.d", True),
                                         ("sala", "sala.modeling", False),
                                         ("sala.utils.u", "sala.ops.a", True),
                                         ("sala.ops.a", "sala.utils.u", False),
                                         ("sala.commands.c", "sala.serve.s", False),
                                         ("sala.engine.e", "sala", False),
                                         ("sala.ops.a", "sala", True),
                                         ("sala.cli", "sala.commands.c", False)])
def test_the_rules(src, dst, bad):
    assert (_violation(src, dst) is not None) == bad
