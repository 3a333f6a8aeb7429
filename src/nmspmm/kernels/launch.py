"""Launch helpers shared by the kernel files: the interpreter switch, the SM count, and :func:`launch`, which
runs a compiled kernel through its handle instead of Triton's generic launcher."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The number of SMs of a CUDA device (launch rules size grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# (kernel, device, constexprs, warps, stages, specialization of the runtime arguments) -> _Compiled, or None
# where the compiled kernel cannot be launched through its handle.
_COMPILED: dict[tuple, _Compiled | None] = {}
_INT32 = range(-(2**31), 2**31)


class _Compiled:
    """A compiled kernel's launch handle with the constexpr values it appends to the runtime arguments."""

    __slots__ = ("launch", "prefix", "tail", "hooks")

    def __init__(self, compiled: Any, tail: tuple) -> None:
        runner = compiled.run
        scratch = getattr(runner, "global_scratch_size", 1) or getattr(runner, "profile_scratch_size", 1)
        if hasattr(runner, "launch") and not scratch:
            # The C launcher itself: it takes the cooperative/PDL flags and the (absent) scratch buffers.
            self.launch = runner.launch
            self.prefix = (runner.launch_cooperative_grid, runner.launch_pdl, None, None)
        else:
            self.launch = runner
            self.prefix = ()
        self.prefix = (compiled.function, *self.prefix, compiled.packed_metadata, None, None, None)
        self.tail = tail


def _specialization(args: Sequence[Any]) -> tuple | None:
    """What Triton compiles a kernel for, per runtime argument (a superset: a dtype and 16-byte alignment per
    tensor; per int whether it is 1, a multiple of 16, and fits int32), or None for an argument of another type."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or arg is None:
            key.append(arg)
        elif isinstance(arg, int):
            key.append(1 if arg == 1 else (arg % 16 == 0, arg in _INT32))
        else:
            return None
    return tuple(key)


def launch(
    kernel: Any, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
    num_stages: int | None = None,
) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` with less host time.

    Triton's generic launcher binds, specializes and hashes every argument on every call (15-19 us of host time
    per launch on the H200's host, more than ``F.linear``'s whole call). Here the first call of each
    specialization (the argument properties Triton compiles for, see :func:`_specialization`) goes through it and
    keeps the compiled kernel; later calls launch that kernel's handle directly on the current stream. The
    interpreter, launch hooks (profilers) and arguments of other types always take the generic launcher."""
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    if interpreter_active():
        kernel[grid](*args, **constexprs, **options)
        return
    from triton import knobs

    specialization = _specialization(args)
    device = torch.cuda.current_device()
    key = (kernel, device, tuple(constexprs.values()), num_warps, num_stages, specialization)
    entry = _COMPILED.get(key, False)
    if entry and knobs.runtime.launch_enter_hook is None and knobs.runtime.launch_exit_hook is None:
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        entry.launch(grid[0], grid_y, grid_z, stream, *entry.prefix, *args, *entry.tail)
        return
    compiled = kernel[grid](*args, **constexprs, **options)
    if entry is False and specialization is not None:
        _COMPILED[key] = _handle(kernel, compiled, len(args), constexprs)


def _handle(kernel: Any, compiled: Any, positional: int, constexprs: dict[str, Any]) -> _Compiled | None:
    """The launch handle of ``compiled``, or None where this Triton's compiled kernels do not expose one or the
    kernel has parameters beyond the runtime arguments and the constexprs given (defaults)."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not all(hasattr(compiled, field) for field in ("run", "function", "packed_metadata")):
        return None
    rest = names[positional:]
    if set(rest) != set(constexprs):
        return None
    return _Compiled(compiled, tuple(constexprs[name] for name in rest))
