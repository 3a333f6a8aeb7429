"""Launch helpers shared by the kernel files: the interpreter switch, the SM count, and :func:`launch`, which
runs a compiled kernel through its handle instead of Triton's generic launcher."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
import triton

# Triton's runtime settings (launch hooks), where this Triton has them (3.4 on).
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)

def interpreter_requested() -> bool:
    """True when the environment asks for Triton's CPU interpreter (``TRITON_INTERPRET=1``) now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter. Read once: Triton decides it for each kernel when
    the kernel is defined, and launches ask on every call (reading the environment cost 1-2 us there)."""
    return interpreter_requested()


# Up to this many tokens a product is bound by its weight bytes (decode): the config rules of the kernels and
# the benchmarks' graph-replayed timings switch here.
FEW_TOKENS = 64


def upcasts_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel's bf16 tiles must be cast to fp32 before ``tl.dot``: under Triton's CPU interpreter a bf16
    dot returns garbage (relative error ~7e9, 2026-11-22), so the kernels take a constexpr switch for it."""
    return dtype == torch.bfloat16 and interpreter_active()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints. Launchers call this, not ``triton.cdiv``: from Python that is a constexpr
    function whose call cost 3-4 us of host time on the H200's host, twice per launch."""
    return -(-a // b)


def next_power_of_2(value: int) -> int:
    """The least power of two >= ``value`` (1 for values <= 1), in plain Python (see :func:`cdiv`)."""
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


# Element offsets from one pointer must stay below this for a kernel's int32 index arithmetic.
INT32_OFFSETS = 2**31


def max_offset(shape: Sequence[int], strides: Sequence[int]) -> int:
    """The largest element offset a tensor of ``shape`` and ``strides`` reaches from its first element (0 when
    empty)."""
    largest = 0
    for size, stride in zip(shape, strides):  # plain loops: torch.compile traces this (shapes may be symbolic)
        if size == 0:
            return 0
        largest += (size - 1) * abs(stride)
    return largest


def wide_offsets(*layouts: tuple[Sequence[int], Sequence[int]], extents: Sequence[int] = ()) -> bool:
    """Whether a kernel's offsets into tensors of these ``(shape, strides)`` layouts, or into contiguous operands of
    ``extents`` elements, reach :data:`INT32_OFFSETS`: it must then index in int64 (its ``WIDE`` switch, off for
    every smaller product, which thus runs the same code as without it)."""
    largest = 0
    for shape, strides in layouts:
        largest = max(largest, max_offset(shape, strides))
    for extent in extents:
        largest = max(largest, extent)
    return largest >= INT32_OFFSETS


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The number of SMs of a CUDA device (launch rules size grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# (kernel, device, constexprs, warps, stages, specialization of the runtime arguments) -> _Compiled, or None
# where the compiled kernel cannot be launched through its handle. Cleared when it reaches _MAX_COMPILED (ints
# are keyed by value, so prefill token counts add entries).
_COMPILED: dict[tuple, _Compiled | None] = {}
_MAX_COMPILED = 4096
# Argument types keyed by value; anything else is a tensor (or fails loudly on .dtype).
_PLAIN = frozenset({int, bool, float, str, type(None)})


class _Compiled:
    """A compiled kernel's launch handle with the constexpr values it appends to the runtime arguments."""

    __slots__ = ("launch", "prefix", "tail")

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


def _specialization(args: Sequence[Any]) -> list:
    """What Triton compiles a kernel for, per runtime argument, or more: a tensor's dtype and whether its data is
    16-byte aligned; any other argument (ints, flags) as its value."""
    return [(arg.dtype, arg.data_ptr() % 16 == 0) if type(arg) not in _PLAIN else arg for arg in args]


def _hooked(hook: Any) -> bool:
    """Whether a Triton launch hook is set: a function (older Triton) or a non-empty ``HookChain`` (3.5 on)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch(
    kernel: Any, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
    num_stages: int | None = None,
) -> _Compiled | None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`` with less host time; returns the
    handle kept for this specialization (None where there is none).

    Triton's generic launcher binds, specializes and hashes every argument on every call (15-19 us of host time
    per launch on the H200's host, more than ``F.linear``'s whole call). Here the first call of each
    specialization (see :func:`_specialization`) goes through it and keeps the compiled kernel; later calls launch
    that kernel's handle directly on the current stream. The interpreter and launch hooks (profilers) always take
    the generic launcher. A grid without programs launches nothing."""
    if 0 in grid:  # no programs: nothing to run (CUDA refuses an empty grid)
        return None
    if interpreter_active() or _RUNTIME is None:
        _generic(kernel, grid, args, constexprs, num_warps, num_stages)
        return None
    device = torch._C._cuda_getDevice()
    key = (kernel, device, *constexprs.values(), num_warps, num_stages, *_specialization(args))
    try:
        entry = _COMPILED.get(key, False)
    except TypeError:  # an unhashable argument
        _generic(kernel, grid, args, constexprs, num_warps, num_stages)
        return None
    if entry and not _hooked(_RUNTIME.launch_enter_hook) and not _hooked(_RUNTIME.launch_exit_hook):
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        entry.launch(grid[0], grid_y, grid_z, stream, *entry.prefix, *args, *entry.tail)
        return entry
    compiled = _generic(kernel, grid, args, constexprs, num_warps, num_stages)
    if entry is False:
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        entry = _COMPILED[key] = _handle(kernel, compiled, len(args), constexprs)
    return entry


class Launcher:
    """One kernel launch prepared once: grid, constexprs, warps, stages and the trailing runtime arguments are
    fixed; a call passes the leading tensor arguments (those that change between calls: activations, outputs,
    workspaces) and launches. Only their data pointers are read, so any view of the right storage will do.

    Where every leading tensor is 16-byte aligned, the first call goes through :func:`launch` and keeps the
    compiled kernel's handle it returns, and later calls launch that handle on the current stream: no per-call
    key, no argument binding. Misaligned tensors, the interpreter, launch hooks and another current device go
    through :func:`launch` on every call."""

    __slots__ = ("kernel", "grid", "trailing", "constexprs", "num_warps", "num_stages", "_handle", "_device")

    def __init__(
        self, kernel: Any, grid: tuple[int, int, int], trailing: tuple, constexprs: dict[str, Any], num_warps: int,
        num_stages: int | None = None,
    ) -> None:
        self.kernel, self.grid, self.trailing, self.constexprs = kernel, grid, trailing, constexprs
        self.num_warps, self.num_stages = num_warps, num_stages
        self._handle: _Compiled | None = None
        self._device = -1  # the device of the handle; -1 until a call has tried to take one

    def __call__(self, *leading: torch.Tensor) -> None:
        grid = self.grid
        if 0 in grid:  # no programs: nothing to run (CUDA refuses an empty grid)
            return
        handle = self._handle
        if handle is not None and not _hooked(_RUNTIME.launch_enter_hook) and not _hooked(_RUNTIME.launch_exit_hook):
            device = torch._C._cuda_getDevice()
            aligned = True
            for tensor in leading:
                aligned = aligned and not tensor.data_ptr() & 15
            if aligned and device == self._device:
                stream = torch._C._cuda_getCurrentRawStream(device)
                handle.launch(*grid, stream, *handle.prefix, *leading, *self.trailing, *handle.tail)
                return
        # Through the one-off path, whose cache also serves the prepared launches built for one call.
        entry = launch(self.kernel, grid, (*leading, *self.trailing), self.constexprs, self.num_warps, self.num_stages)
        if self._device == -1 and entry is not None and all(not tensor.data_ptr() & 15 for tensor in leading):
            self._handle, self._device = entry, torch._C._cuda_getDevice()


def _generic(
    kernel: Any, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any], num_warps: int,
    num_stages: int | None,
) -> Any:
    """Launch through Triton's own launcher; returns what it returns (the compiled kernel)."""
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return kernel[grid](*args, **constexprs, **options)


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
