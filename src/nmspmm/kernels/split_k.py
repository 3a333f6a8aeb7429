"""Split-K inside one launch: the programs of one output tile each sum a share of the reduction into their own
fp32 slice of a workspace; the last of them to finish (counted on a per-tile counter) adds the slices in a fixed
order, so the result is deterministic, writes it, and resets the counter for the next launch. No second kernel
and no memset: a call costs one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def split_k_total(acc, partial_ptrs, stride_split, counter_ptr, pid_k, mask, SPLIT_K: tl.constexpr):
    """Store ``acc`` as share ``pid_k`` of the tile; returns (whether this program finished the tile last, the sum
    of the tile's ``SPLIT_K`` shares in split order, valid only for that program)."""
    tl.store(partial_ptrs + pid_k * stride_split, acc, mask=mask)
    # Every thread's share is stored before one thread announces the program's arrival (release); the last
    # program's loads follow its acquire and bypass L1, which may hold lines of an earlier launch.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for split in tl.static_range(SPLIT_K):
            total += tl.load(partial_ptrs + split * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last, total


# (device index, stream) -> (fp32 workspace, int32 counters). Buffers only grow, and a replaced buffer is kept:
# a captured CUDA graph may still point into it.
_BUFFERS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []


def split_k_buffers(
    device: torch.device, splits: int, tokens: int, rows: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 workspace ``[splits, tokens, rows]`` and ``tiles`` zeroed int32 counters for one split-K launch on
    the current stream of ``device``. Shared by every launch on that stream (launches on one stream run one after
    another, and each leaves its counters at zero); launches of one stream must not run concurrently with
    themselves on another stream through a captured graph."""
    key = (-1, 0)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index))
    workspace, counters = _BUFFERS.get(key, (None, None))
    elements = splits * tokens * rows
    if workspace is None or workspace.numel() < elements:
        if workspace is not None:
            _RETIRED.append(workspace)
        size = max(elements, 0 if workspace is None else 2 * workspace.numel())
        workspace = torch.empty(size, dtype=torch.float32, device=device)
    if counters is None or counters.numel() < tiles:
        if counters is not None:
            _RETIRED.append(counters)
        counters = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    _BUFFERS[key] = (workspace, counters)
    return workspace[:elements].view(splits, tokens, rows), counters
