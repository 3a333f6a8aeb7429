"""Split-K inside one launch: the programs of one output tile each sum a share of the reduction into their own
fp32 slice of a workspace; the last of them to finish (counted on a per-tile counter) adds the slices in a fixed
order, so the result is deterministic, writes it, and resets the counter for the next launch. No second kernel
and no memset: a call costs one launch."""

from __future__ import annotations

import threading
from typing import Any

import torch
import triton
import triton.language as tl

from .launch import Launcher


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


# (device index, stream) -> (fp32 workspace, int32 counters) for that stream's launches. They are allocated by a
# thread of nmspmm's own, so that they come from the default memory pool even while torch.compile's CUDA graphs
# route this thread's allocations into their pool (which refuses live allocations that no output holds).
# Buffers only grow; a replaced one is kept, since a captured graph may point into it.
_BUFFERS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []


def split_k_buffers(
    device: torch.device, splits: int, tokens: int, rows: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 workspace ``[splits, tokens, rows]`` and at least ``tiles`` zeroed int32 counters for one split-K
    launch on the current stream of ``device``. Shared by every launch on that stream (launches on one stream run
    one after another, and each leaves its counters at zero), so a call allocates nothing once they are large
    enough. A launch in CUDA-graph capture that finds none large enough allocates its own from the graph's pool,
    and the counters' zeroing becomes part of the graph."""
    if device.type != "cuda":
        return torch.empty((splits, tokens, rows), device=device), torch.zeros(tiles, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    workspace, counters = _BUFFERS.get(key, (None, None))
    elements = splits * tokens * rows
    if workspace is None or workspace.numel() < elements or counters.numel() < tiles:
        if torch.cuda.is_current_stream_capturing():
            workspace = torch.empty((splits, tokens, rows), dtype=torch.float32, device=device)
            return workspace, torch.zeros(tiles, dtype=torch.int32, device=device)
        workspace, counters = _grown(index, workspace, counters, elements, tiles)
        _BUFFERS[key] = (workspace, counters)
    return workspace[:elements].view(splits, tokens, rows), counters


def _grown(
    index: int, workspace: torch.Tensor | None, counters: torch.Tensor | None, elements: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers at least this large, allocated and zeroed by a short-lived thread on its own stream of device
    ``index`` (see ``_BUFFERS``), ready before the caller's stream uses them."""
    grown: dict[str, torch.Tensor] = {}
    failure: list[BaseException] = []

    def allocate() -> None:
        try:
            torch.cuda.set_device(index)
            stream = torch.cuda.Stream(index)
            with torch.cuda.stream(stream):
                if workspace is None or workspace.numel() < elements:
                    size = max(elements, 0 if workspace is None else 2 * workspace.numel())
                    grown["workspace"] = torch.empty(size, dtype=torch.float32, device=f"cuda:{index}")
                if counters is None or counters.numel() < tiles:
                    grown["counters"] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=f"cuda:{index}")
            stream.synchronize()
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=allocate, name="nmspmm-split-k-buffers")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    replaced = ((workspace, "workspace"), (counters, "counters"))
    _RETIRED.extend(old for old, name in replaced if name in grown and old is not None)
    return grown.get("workspace", workspace), grown.get("counters", counters)


class StreamBuffers:
    """The split-K buffers of one prepared launch (:func:`split_k_buffers`), asked for again only when the
    current stream changes: a call on the stream of the last one costs one stream query."""

    __slots__ = ("_device", "_index", "_sizes", "_stream", "_buffers")

    def __init__(self, device: torch.device, splits: int, tokens: int, rows: int, tiles: int) -> None:
        self._device = device
        self._index = -1
        if device.type == "cuda":
            self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._sizes = (splits, tokens, rows, tiles)
        self._stream = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(workspace, counters) for a launch on the current stream."""
        if self._index < 0:
            return split_k_buffers(self._device, *self._sizes)
        stream = torch._C._cuda_getCurrentRawStream(self._index)
        if stream == self._stream:
            return self._buffers
        buffers = split_k_buffers(self._device, *self._sizes)
        shared = _BUFFERS.get((self._index, stream))
        # Buffers allocated for one launch in CUDA-graph capture are not kept: the next call needs its own.
        if shared is not None and buffers[1] is shared[1]:
            self._stream, self._buffers = stream, buffers
        return buffers


class SplitKLaunch:
    """The prepared launch (:class:`Launcher`) of a kernel that may split K and reduce the shares inside the launch
    (:func:`split_k_total`): its leading parameters are x, out, the fp32 workspace and the counters, then
    ``weight`` (the trailing arguments). A call passes x and out; split, the current stream's buffers
    (:class:`StreamBuffers`) follow, unsplit the kernel reads neither and the weight's first tensor stands in."""

    __slots__ = ("_launch", "_buffers")

    def __init__(
        self, kernel: Any, grid: tuple[int, int, int], weight: tuple, constexprs: dict[str, Any], num_warps: int,
        num_stages: int, split_k: int, tokens: int, rows: int, tiles: int,
    ) -> None:
        self._buffers = None
        if split_k > 1:
            self._buffers = StreamBuffers(weight[0].device, split_k, tokens, rows, tiles)
        else:
            weight = (weight[0], weight[0], *weight)
        self._launch = Launcher(kernel, grid, weight, constexprs, num_warps, num_stages)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self._buffers is None:
            self._launch(x, out)
        else:
            self._launch(x, out, *self._buffers.get())
