"""Registers and stack (spill) bytes of the lightning output kernel compiled for sm_90, on a machine without a GPU.

`triton.compile` with an sm_90 target runs the whole NVIDIA pipeline (ptxas included) on the CPU; cuobjdump, which
ships with Triton, reads the resource use from the cubin. This is how the factored intra-chunk decay and the
reverse walk's mask were chosen before a GPU run (timing still needs the GPU: `scripts/gpu_check.sh lightning`).
The result depends on the installed Triton (the H200 has 3.6: `pip install --target DIR triton==3.6.0` and put DIR
first on PYTHONPATH to match it).

    python scripts/lightning_sm90_resources.py                      # default launch settings, both directions
    python scripts/lightning_sm90_resources.py --configs 128,128,8,2 64,64,4,2
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sala.ops import lightning_triton as lt  # noqa: E402


def compile_output_kernel(chunk: int, block_v: int, warps: int, stages: int, factored: bool, reverse: bool,
                          dtype: str = "bf16", head_dim: int = 128):
    """The output kernel as a [T, 32, head_dim] launch specializes it (pointers and strides divisible by 16)."""
    kernel = lt._segment_output_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    ptrs = {**{f"{n}_ptr": f"*{dtype}" for n in "qkvo"}, "s_in_ptr": "*fp32", "final_ptr": "*fp32",
            "log2_decay_ptr": "*fp32", **{f"seg_{n}_ptr": "*i64" for n in ("start", "end", "seq", "final")}}
    consts = dict(H=32, DK=head_dim, DV=head_dim, BV=block_v, C=chunk, REVERSE=reverse, WANT_FINAL=True,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, INTRA_FACTORED=factored)
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else ("fp32" if n == "scale" else "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in ptrs or n.startswith("stride")}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resources(compiled) -> dict:
    """REG (per thread), STACK (bytes: spills), SHARED (static bytes) from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()} | {"dynamic_shared": compiled.metadata.shared}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=None, help="chunk,block_v,warps,stages (default: CONFIG's)")
    args = ap.parse_args()
    c = lt.CONFIG
    configs = [tuple(int(x) for x in s.split(",")) for s in args.configs] if args.configs else \
        [(c.chunk, c.block_v, c.num_warps, c.num_stages)]
    print(f"triton {triton.__version__}")
    for chunk, bv, warps, stages in configs:
        for factored in (False, True):
            for reverse in (False, True):
                tag = f"C={chunk} BV={bv} warps={warps} stages={stages} {'factored' if factored else 'table':8s} " \
                      f"{'reverse' if reverse else 'forward'}"
                try:
                    print(tag, resources(compile_output_kernel(chunk, bv, warps, stages, factored, reverse)))
                except Exception as exc:  # a setting that does not compile
                    print(tag, "FAILED:", str(exc).splitlines()[0][:160])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
