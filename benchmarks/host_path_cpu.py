"""The Python part of an eager ``SparseLinear`` call, measured on a machine without a GPU: CUDA's device and
stream queries and Triton's launcher are replaced by no-ops, so what is timed is nmspmm's own host path (checks,
plan lookup, output allocation, argument handling), the part a GPU host adds its launch cost to. Prints the best
time per call over repeats, without and with gradient, and cProfile's top functions. For ``docs/perf-notes.md``;
not a benchmark of any GPU."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import types
from collections.abc import Callable

import torch

import nmspmm
import nmspmm.kernels.nm_vector as nm_vector
import nmspmm.ops.backend as backend
import nmspmm.ops.nm as nm_ops
from nmspmm.kernels import launch as launch_module


def _stub_the_gpu() -> None:
    """CUDA queries return device 0 and stream 0; launches record nothing and run nothing."""
    torch._C._cuda_getDevice = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda index: 0
    torch.cuda.is_current_stream_capturing = lambda: False
    backend.use_triton = nm_ops.use_triton = lambda name, device: True
    nm_vector.multiprocessors = lambda device: 132
    handle = types.SimpleNamespace(launch=lambda *args: None, prefix=(), tail=())
    launch_module._generic = lambda *args, **kwargs: None
    launch_module._handle = lambda *args, **kwargs: handle


def best_us(call: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """The best wall time per call over ``repeats`` batches of ``calls``, in us."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--pattern", default="8:32")
    parser.add_argument("--vector", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    if torch.cuda.is_available():
        raise SystemExit("host_path_cpu.py stubs CUDA out: run it on a machine without a GPU")
    _stub_the_gpu()
    weight = nmspmm.prune(torch.randn(4096, 4096, dtype=torch.bfloat16), args.pattern, args.vector)
    layer = nmspmm.SparseLinear(weight).eval()
    x = torch.randn(1, args.tokens, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        if not layer._launch_weight().launch_plans:
            raise SystemExit("no launch plan was kept: the stubs no longer reach the plan path")
        print(f"SparseLinear, no grad: {best_us(lambda: layer(x), args.calls):.2f} us/call")
        allocation = best_us(lambda: x.new_empty((args.tokens, 4096)), args.calls)
        print(f"  of which the output's allocation: {allocation:.2f} us")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            layer(x)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    layer.values.requires_grad_(True)
    layer(x)
    print(f"SparseLinear, grad enabled: {best_us(lambda: layer(x), args.calls // 2):.2f} us/call")


if __name__ == "__main__":
    main()
