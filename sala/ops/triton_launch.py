"""Direct launches of already compiled Triton kernels (the host cost of a call).

Decode steps run once per layer and token, and a forward call's host time before its first kernel is GPU idle time,
so launch cost matters. Triton's launcher binds and specialises every argument on each call. `launch` keeps the
compiled kernel of a launch whose pointers are all 16-byte aligned under everything Triton specialises on (the
function, dtypes, device, the exact integer arguments, the constexprs, warps and stages); later calls with the
same key launch it directly. Registered Triton launch hooks (profilers) turn the direct path off, and a Triton whose
launcher takes other arguments turns it off for the rest of the process.
"""
from __future__ import annotations

import logging

import torch
import triton
from torch import Tensor

log = logging.getLogger(__name__)

_CACHE: dict[tuple, object] = {}
_BROKEN = False    # this Triton's launcher rejected a direct launch: Triton's own launch from now on
_TRITON_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)   # where launch hooks are registered


def _no_launch_hooks() -> bool:
    """No launch hooks registered (a profiler's would be skipped by a direct launch): None or an empty HookChain."""
    if _TRITON_RUNTIME is None:
        return False
    hooks = (getattr(_TRITON_RUNTIME, "launch_enter_hook", None), getattr(_TRITON_RUNTIME, "launch_exit_hook", None))
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def clear_cache() -> None:
    _CACHE.clear()


def launch(fn, grid: tuple[int, ...], args: tuple, consts: dict, num_warps: int, num_stages: int | None = None, *,
           fast: bool = True):
    """`fn[grid](*args, **consts, num_warps=, num_stages=)`, through the cache of compiled kernels where it may serve
    (`fast`, CUDA, every pointer 16-byte aligned, no launch hooks). `consts` holds the constexprs in the kernel's
    signature order. Returns the compiled kernel."""
    global _BROKEN
    ptrs = [a for a in args if isinstance(a, Tensor)]
    fast = fast and not _BROKEN and ptrs[0].is_cuda and not any(p.data_ptr() & 15 for p in ptrs)
    if fast:
        key = (fn, num_warps, num_stages, ptrs[0].get_device(), tuple(p.dtype for p in ptrs),
               tuple(a for a in args if isinstance(a, int)), tuple(consts.items()))
        kernel = _CACHE.get(key)
        if kernel is not None and _no_launch_hooks():
            try:
                kernel.run(*grid, torch.cuda.current_stream(ptrs[0].device).cuda_stream, kernel.function,
                           kernel.packed_metadata, None, None, None, *args, *consts.values())
                return kernel
            except TypeError:
                log.warning("direct Triton launches disabled: this Triton's launcher takes other arguments")
                _BROKEN = True
                _CACHE.clear()
    opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    kernel = fn[grid](*args, **consts, **opts)
    if (fast and not _BROKEN and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))
            and list(getattr(fn, "arg_names", []))[len(args):] == list(consts)):   # positional order = signature
        _CACHE[key] = kernel
    return kernel
