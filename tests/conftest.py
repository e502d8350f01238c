import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# One intra-op thread per test process (and, through the environment, per subprocess), unless OMP_NUM_THREADS says
# otherwise. The tests' tensors are small: on a machine whose few cores are busy with other work (CI), torch's
# OpenMP threads wait for each other on every small op and tests ran up to ~6x slower than with one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

# Reference ops by default on CPU; kernel tests set SALA_KERNELS themselves.
os.environ.setdefault("SALA_KERNELS", "auto")
# The one way Triton kernels run on a machine without a GPU: Triton's interpreter for the whole session. Triton
# decides at decoration time (its own helpers such as tl.cdiv when triton is imported) whether a kernel is
# interpreted, so this is set here, before any test module imports triton. With SALA_KERNELS=auto, CPU tensors
# still take the references; tests select the kernels with the `triton_module` fixture (SALA_KERNELS=triton).
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def interpreted(fn) -> bool:
    """Whether a @triton.jit kernel was built for Triton's interpreter."""
    return type(fn).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def triton_module(request):
    """The module named by the test module's TRITON_MODULE (one of its kernels named by TRITON_PROBE) with
    SALA_KERNELS=triton: compiled kernels on a GPU, the interpreter on a CPU-only machine (set for the session
    above). If it has an `_empty` output allocator, that is NaN-poisoned, so any element a kernel forgets to write
    shows up. Everything is restored afterwards."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SALA_KERNELS", "triton")
    module = importlib.import_module(request.module.TRITON_MODULE)
    if not ON_GPU:
        assert interpreted(getattr(module, request.module.TRITON_PROBE)), (
            f"{request.module.TRITON_MODULE}: Triton kernels are not interpreted on this CPU-only machine "
            f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}; unset it or set it to 1)")
    if hasattr(module, "_empty"):
        mp.setattr(module, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))
    yield module
    mp.undo()


def _script_path(name: str) -> Path:
    """scripts/<name> or experiments/<experiment>/<name> (the one file of that name; they are not packages)."""
    root = Path(__file__).resolve().parents[1]
    found = [p for p in [root / "scripts" / name, *sorted((root / "experiments").glob(f"*/{name}"))] if p.is_file()]
    assert len(found) == 1, f"{name}: expected one script under scripts/ or experiments/*/, found {found}"
    return found[0]


@pytest.fixture
def load_script():
    """load_script(name) imports <name>.py from scripts/ or experiments/<experiment>/ as a module, with its folder
    on sys.path (where an experiment's helper modules live)."""
    import sys

    def load(name: str):
        path = _script_path(f"{name}.py")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def run_script():
    """run_script(argv, cwd, **env) runs <argv[0]> from scripts/ or experiments/<experiment>/ (python or bash by its
    suffix) in a subprocess with the
    repository on PYTHONPATH, this interpreter first on PATH, TRITON_INTERPRET unset and `env` added; it fails the
    test with the script's output tail unless it exits 0, and returns its stdout."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(argv: list[str], cwd: Path, **env: str) -> str:
        script = _script_path(argv[0])
        full_env = {**os.environ, "PYTHONPATH": str(root),
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env}
        full_env.pop("TRITON_INTERPRET", None)
        runner = ["bash"] if script.suffix == ".sh" else [sys.executable]
        done = subprocess.run([*runner, str(script), *argv[1:]], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return run


@pytest.fixture(scope="session")
def prepare_in():
    """prepare_in(root, out, sources, **kw): `sala.data.prepare` run from inside `root` with `out` and `sources`
    relative to it. The held-out split is drawn by hashing "<source>/<file>", so relative sources keep it the
    same whatever pytest's temporary folder is called (absolute ones made it, and the tests that need held-out
    windows, depend on that name). Returns the PrepareReport."""
    from sala.data import prepare

    def run(root, out: str, sources: list[str], **kw):
        cwd = os.getcwd()
        os.chdir(root)
        try:
            return prepare(out, sources, log=lambda s: None, **kw)
        finally:
            os.chdir(cwd)

    return run
