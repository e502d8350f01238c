"""FP8 asked for where it cannot run: one line from `sala serve` and `sala generate`, before any weight loads
(`sala.cli.main`, the console script's entry point, in this process)."""
import pytest
import torch

from sala.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.mark.parametrize("argv", [["serve", "--quantization", "fp8", "--port", "8765"],
                                  ["generate", "--prompt", "hi", "--max-new-tokens", "1", "--quantization", "fp8"]])
def test_fp8_on_cpu_is_one_line(argv, capsys, monkeypatch):
    import uvicorn

    def serve_instead_of_refusing(*args, **kw):
        raise AssertionError("sala serve --quantization fp8 started serving on the CPU instead of refusing")

    monkeypatch.setattr(uvicorn, "run", serve_instead_of_refusing)   # a failure ends here, not in a served port
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert "FP8" in lines[-1] and "cpu" in lines[-1] and "compute capability" in lines[-1]
