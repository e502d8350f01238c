"""FP8 asked for where it cannot run: one line from `sala serve` and `sala generate`, before any weight loads."""
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.mark.parametrize("argv", [["serve", "--quantization", "fp8", "--port", "8765"],
                                  ["generate", "--prompt", "hi", "--max-new-tokens", "1", "--quantization", "fp8"]])
def test_fp8_on_cpu_is_one_line(argv):
    done = subprocess.run([sys.executable, "-m", "sala.cli", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in done.stderr
    assert "FP8" in lines[-1] and "cpu" in lines[-1] and "compute capability" in lines[-1]
