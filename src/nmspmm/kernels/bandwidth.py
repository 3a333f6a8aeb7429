"""Probes for the performance model: many programs read chunks of a buffer small enough to stay in L2, so the
rate measured is the L2-to-SM bandwidth that gathers from cached activations run into; and a kernel that does
nothing, whose time is the fixed cost of a launch that every kernel pays."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _l2_read_kernel(buffer_ptr, out_ptr, CHUNKS, READS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for step in range(READS):
        # Scattered chunks, so consecutive reads of one program hit different L2 slices.
        chunk = (pid * 7 + step * 13) % CHUNKS
        acc += tl.load(buffer_ptr + chunk * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


L2_PROBE_BLOCK = 4096


def l2_read(buffer: torch.Tensor, programs: int, reads: int, out: torch.Tensor) -> int:
    """Sum ``reads`` chunks of ``L2_PROBE_BLOCK`` elements of the 1-D ``buffer`` in each of ``programs`` programs
    into ``out`` [programs * L2_PROBE_BLOCK] (fp32); returns the bytes read, for a rate."""
    chunks = buffer.numel() // L2_PROBE_BLOCK
    if chunks == 0 or out.numel() < programs * L2_PROBE_BLOCK:
        raise ValueError(
            f"buffer, out: need at least {L2_PROBE_BLOCK} buffer elements and {programs * L2_PROBE_BLOCK} out "
            f"elements, got {buffer.numel()} and {out.numel()}"
        )
    _l2_read_kernel[(programs,)](buffer, out, chunks, READS=reads, BLOCK=L2_PROBE_BLOCK, num_warps=8)
    return programs * reads * L2_PROBE_BLOCK * buffer.element_size()


@triton.jit
def _touch_kernel(out_ptr):
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


def touch(out: torch.Tensor, programs: int) -> None:
    """Each of ``programs`` programs stores its index into ``out[program]`` and does nothing else: the least
    work a kernel can do, so its graph-replayed time is the fixed cost of a launch."""
    if out.dtype != torch.int32 or out.numel() < programs:
        raise ValueError(f"out: need an int32 tensor of at least {programs} elements, got {out.dtype} of {out.numel()}")
    _touch_kernel[(programs,)](out, num_warps=1)
