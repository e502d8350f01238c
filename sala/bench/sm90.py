"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU, and read their resource use.

`triton.compile` with an explicit sm_90 target runs the whole NVIDIA pipeline (TTGIR, LLVM, ptxas) on the CPU, so a
kernel that would fail to compile, or would need more shared memory than an H100/H200 block may use, shows here
instead of on the borrowed GPU; cuobjdump (shipped with Triton) reads registers and stack (spill) bytes from the
cubin. Results depend on the installed Triton. Used by `tests/ops/test_triton_sm90_compile.py` and
`experiments/profiling/lightning_sm90_resources.py`; timing still needs the GPU.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90
FLOAT_ARGS = {"scale_log2", "scale", "eps"}


def compile_sm90(kernel, ptrs: dict[str, str], consts: dict, *, num_warps: int, num_stages: int | None = None,
                 aligned_ints: tuple[str, ...] = ()):
    """Compile a @triton.jit kernel for sm_90: pointer args typed by `ptrs` (16-byte aligned, as torch allocates),
    other non-constexpr args int32 (fp32 for scales), those in `aligned_ints` divisible by 16 (as Triton specializes
    strides such as 4096: loads become asynchronous copies the software pipeliner schedules). Returns the kernel."""
    names = list(inspect.signature(kernel.fn).parameters)
    missing = [n for n in names if n.endswith("_ptr") and n not in ptrs]
    assert not missing, f"pointer types missing for {missing}"
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else ("fp32" if n in FLOAT_ARGS else "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*ptrs, *aligned_ints)}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def lightning_output_kernel_sm90(chunk: int, block_v: int, warps: int, stages: int, *, factored: bool, reverse: bool,
                                 dtype: str = "bf16", head_dim: int = 128, heads: int = 32):
    """The lightning output kernel as a [T, heads, head_dim] launch specializes it (pointers and strides divisible
    by 16), compiled for sm_90."""
    from sala.ops import lightning_triton as lt

    ptrs = {**{f"{n}_ptr": f"*{dtype}" for n in "qkvo"}, "s_in_ptr": "*fp32", "final_ptr": "*fp32",
            "log2_decay_ptr": "*fp32", **{f"seg_{n}_ptr": "*i64" for n in ("start", "end", "seq", "final")}}
    consts = dict(H=heads, DK=head_dim, DV=head_dim, BV=block_v, C=chunk, REVERSE=reverse, WANT_FINAL=True,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, INTRA_FACTORED=factored)
    strides = tuple(f"stride_{t}{d}" for t in "qkvo" for d in "th")
    return compile_sm90(lt._segment_output_kernel, ptrs, consts, num_warps=warps, num_stages=stages,
                        aligned_ints=strides)


def cubin_resources(compiled) -> dict:
    """reg (per thread), stack (bytes: spills), shared (static bytes), local from cuobjdump -res-usage, plus the
    dynamic shared memory Triton allocates."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()} | {"dynamic_shared": compiled.metadata.shared}
