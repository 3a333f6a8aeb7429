"""The main job: prune a realistic layer, run it sparse and dense, report the error (and on a GPU the
time and the speedup)."""

from __future__ import annotations

import torch

from .ops import linear
from .prune import prune


def run_demo(
    out_features: int = 4096, in_features: int = 4096, tokens: int = 2048, pattern: str = "8:32", vector: int = 64
) -> None:
    """Print the relative error of the sparse layer against the dense masked product, and on CUDA the
    median times of both and the speedup."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        print("No CUDA GPU found: running the CPU reference path (no timing).")
        if tokens > 256:
            print(f"tokens: {tokens} capped at 256 on the CPU, where the dense reference is slow.")
            tokens = 256
    dense_weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features**0.5
    weight = prune(dense_weight, pattern, vector)
    masked = weight.to_dense()
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    y = linear(x, weight)
    reference = x.double() @ masked.double().t()
    error = float((y.double() - reference).norm() / reference.norm())
    print(
        f"layer {out_features}x{in_features}, {tokens} tokens, pattern {pattern}, V={vector}, {dtype}, {device}\n"
        f"weight bytes: dense {masked.numel() * masked.element_size():,}, sparse {weight.nbytes:,}\n"
        f"relative error vs float64 reference: {error:.2e}"
    )
    if on_gpu:
        from .bench.runner import median_ms

        inputs = [torch.randn_like(x) for _ in range(8)]
        sparse_ms = median_ms([lambda x=x: linear(x, weight) for x in inputs])
        dense_ms = median_ms([lambda x=x: x @ masked.t() for x in inputs])
        print(
            f"{torch.cuda.get_device_name()}: sparse {sparse_ms:.3f} ms, dense (torch.matmul) {dense_ms:.3f} ms, "
            f"speedup {dense_ms / sparse_ms:.2f}x (ideal {weight.m / weight.n:.2f}x)"
        )
