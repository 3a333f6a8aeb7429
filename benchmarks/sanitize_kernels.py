"""Every Triton kernel family of nmspmm once or twice at small odd shapes, each result checked against a float64
dense reference: the workload for compute-sanitizer (issue 15, point 7). Run it under each tool with the caching
allocator off, so that an access past a tensor's end is past an allocation's end too::

    for tool in memcheck racecheck initcheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 1 \\
        .venv/bin/python benchmarks/sanitize_kernels.py || break
    done

Exits 1 if a result is wrong; the sanitizer's exit code reports its own findings. Without a GPU the same cases
check the dense reference path (the bandwidth probes are left out)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

import nmspmm
from nmspmm.kernels import L2_PROBE_BLOCK, VectorConfig, l2_read, touch
from nmspmm.kernels.nm_element import bitmap_matmul

# The GPU runs the kernels; elsewhere the same cases check the dense reference path (so that CI runs the script).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_TOLERANCE = 1.5e-2
FP32_TOLERANCE = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm of the difference over the norm of ``expected``, in float64 (inf for a non-finite ``actual``)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _product_and_gradients(weight: object, tokens: int, dtype: torch.dtype) -> list[tuple[str, float]]:
    """The forward product and the gradients of x and the kept values of one weight, against float64."""
    features = weight.shape[1]
    x = torch.randn(tokens, features, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(weight.shape[0], device=DEVICE, dtype=dtype)
    values = weight.values.requires_grad_()
    y = nmspmm.linear(x, weight, bias)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    x_ref = x.detach().double().requires_grad_()
    y_ref = x_ref @ weight.to_dense().double().t() + bias.double()
    grad_x, grad_values = torch.autograd.grad(y_ref, (x_ref, values), grad_y.double())
    values.requires_grad_(False)
    return [("forward", relative_error(y, y_ref)), ("grad x", relative_error(x.grad, grad_x)),
            ("grad values", relative_error(values.grad, grad_values))]


def cases() -> list[tuple[str, Callable[[], list[tuple[str, float]]], float]]:
    """(name, run, tolerance): each run returns (what, relative error) pairs."""
    bf16, fp32 = torch.bfloat16, torch.float32

    def nm(pattern: str, vector: int, rows: int, cols: int, tokens: int, dtype: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE, dtype=dtype), pattern, vector)
            return _product_and_gradients(weight, tokens, dtype)
        return run

    def quantized(pattern: str, vector: int, rows: int, cols: int, tokens: int, values: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE, dtype=bf16), pattern, vector)
            weight = weight.quantize(values)
            x = torch.randn(tokens, cols, device=DEVICE, dtype=bf16, requires_grad=True)
            y = nmspmm.linear(x, weight)
            grad_y = torch.randn_like(y)
            y.backward(grad_y)
            dense = weight.dequantized_values(torch.float64)
            reference = torch.zeros(rows, cols, dtype=torch.float64, device=DEVICE)
            reference[weight.mask()] = dense.flatten()
            return [("forward", relative_error(y, x.detach().double() @ reference.t())),
                    ("grad x", relative_error(x.grad, grad_y.double() @ reference))]
        return run

    def csr(tokens: int, dtype: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune.prune_csr(torch.randn(96, 200, device=DEVICE, dtype=dtype), sparsity=0.8)
            return _product_and_gradients(weight, tokens, dtype)
        return run

    def bitmap(sparsity: float, rows: int, cols: int, tokens: int, dtype: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            dense = torch.randn(rows, cols, device=DEVICE, dtype=dtype)
            return _product_and_gradients(nmspmm.prune.prune_bitmap(dense, sparsity), tokens, dtype)
        return run

    def bitmap_split(split_k: int, block_k: int, rows: int, cols: int, tokens: int, dtype: torch.dtype) -> Callable:
        # The kernel's launcher with a config of its own: split_k shares of the blocks of 128 inputs, block_k a step.
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune.prune_bitmap(torch.randn(rows, cols, device=DEVICE, dtype=dtype), sparsity=0.6)
            x = torch.randn(tokens, cols, device=DEVICE, dtype=dtype)
            bias = torch.randn(rows, device=DEVICE, dtype=dtype)
            if DEVICE == "cuda":
                config = VectorConfig(block_m=16, block_n=64, block_k=block_k, num_warps=4, num_stages=3,
                                      split_k=split_k, weight_first=True)
                y = torch.empty(tokens, rows, device=DEVICE, dtype=dtype)
                bitmap_matmul(x.t(), weight.values, weight.bitmap, weight.block_offsets, y, bias, config)
            else:
                y = nmspmm.linear(x, weight, bias)
            expected = x.double() @ weight.to_dense().double().t() + bias.double()
            return [("forward", relative_error(y, expected))]
        return run

    def bitmap_nonfinite(sparsity: float, tokens: int, dtype: torch.dtype) -> Callable:
        # NaN and Inf inputs at features some outputs prune: the tiles they reach are recomputed over kept inputs
        # (by the kernel itself, or after a product on the dense expansion by the repair launch).
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune.prune_bitmap(torch.randn(45, 333, device=DEVICE, dtype=dtype), sparsity)
            mask = weight.mask()
            kept_by = mask.sum(0)
            features = ((kept_by > 0) & (kept_by < mask.shape[0])).nonzero()[:2, 0]
            x = torch.randn(tokens, 333, device=DEVICE, dtype=dtype)
            x[1, features[0]], x[3, features[1]] = float("nan"), float("inf")
            y = nmspmm.linear(x, weight)
            clean = x.clone()
            clean[1, features[0]] = clean[3, features[1]] = 0.0
            expected = clean.double() @ weight.to_dense().double().t()
            # The outputs each poisoned input reaches.
            reached = torch.zeros(tokens, 45, dtype=torch.bool, device=DEVICE)
            reached[1], reached[3] = mask[:, features[0]], mask[:, features[1]]
            return [("outputs that prune the feature", relative_error(y[~reached], expected[~reached])),
                    ("outputs that keep it non-finite", float(bool(torch.isfinite(y[reached]).any())))]
        return run

    def block(tokens: int, dtype: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            dense = torch.randn(128, 192, device=DEVICE, dtype=dtype)
            weight = nmspmm.prune.prune_block_shuffled(dense, 0.5, (32, 32), search=False)
            return _product_and_gradients(weight, tokens, dtype)
        return run

    def sddmm(depth: int, dtype: torch.dtype) -> Callable:
        def run() -> list[tuple[str, float]]:
            weight = nmspmm.prune.prune_csr(torch.randn(96, 200, device=DEVICE, dtype=dtype), sparsity=0.7)
            a = torch.randn(96, depth, device=DEVICE, dtype=dtype)
            b = torch.randn(200, depth, device=DEVICE, dtype=dtype)
            sampled = nmspmm.sddmm(a, b, weight).to_dense()
            expected = (a.double() @ b.double().t()) * weight.mask()
            return [("sddmm", relative_error(sampled, expected))]
        return run

    def probes() -> list[tuple[str, float]]:
        out = torch.zeros(7, dtype=torch.int32, device=DEVICE)
        touch(out, 7)
        buffer = torch.randn(3 * L2_PROBE_BLOCK, device=DEVICE)
        sums = torch.zeros(2 * L2_PROBE_BLOCK, device=DEVICE)
        l2_read(buffer, 2, 3, sums)
        return [("touch", float(not torch.equal(out.cpu(), torch.arange(7, dtype=torch.int32))))]

    return [
        ("N:M 8:32 V=64, 7 tokens (transpose + vector kernel), bf16", nm("8:32", 64, 192, 416, 7, bf16),
         BF16_TOLERANCE),
        ("N:M 2:4 V=64, 1 token, long rows (split-K in the launch), bf16", nm("2:4", 64, 128, 4104, 1, bf16),
         BF16_TOLERANCE),
        ("N:M 6:8 V=16, 3 tokens (row-major x), fp32", nm("6:8", 16, 48, 200, 3, fp32), FP32_TOLERANCE),
        ("N:M 2:4 V=1, 333 tokens (element-wise kernel), fp32", nm("2:4", 1, 40, 104, 333, fp32), FP32_TOLERANCE),
        ("N:M 2:4 V=1, 300 tokens (dense expansion + cuBLAS), bf16", nm("2:4", 1, 40, 104, 300, bf16),
         BF16_TOLERANCE),
        ("N:M 8:32 V=32, 333 tokens, bf16", nm("8:32", 32, 96, 224, 333, bf16), BF16_TOLERANCE),
        ("N:M 8:32 V=64 float8_e4m3fn values, 5 tokens (split-K), bf16",
         quantized("8:32", 64, 128, 4128, 5, torch.float8_e4m3fn), BF16_TOLERANCE),
        ("N:M 2:4 V=1 int8 values, 37 tokens (gathered tile expansion), bf16",
         quantized("2:4", 1, 40, 200, 37, torch.int8), BF16_TOLERANCE),
        ("CSR 80%, 7 tokens, bf16", csr(7, bf16), BF16_TOLERANCE),
        ("CSR 80%, 600 tokens (transposed write), fp32", csr(600, fp32), FP32_TOLERANCE),
        ("bitmap 60% kept (gathered tile expansion), 45x333, 7 tokens, bf16", bitmap(0.4, 45, 333, 7, bf16),
         BF16_TOLERANCE),
        ("bitmap 20% kept (masked tile expansion), 45x333, 333 tokens, fp32", bitmap(0.8, 45, 333, 333, fp32),
         FP32_TOLERANCE),
        ("bitmap 30% kept, 40x1100, 3 tokens, long rows (split-K in the launch), bf16",
         bitmap(0.7, 40, 1100, 3, bf16), BF16_TOLERANCE),
        ("bitmap split-K config (split_k=3, block_k=64), 45x333, 5 tokens, fp32",
         bitmap_split(3, 64, 45, 333, 5, fp32), FP32_TOLERANCE),
        ("bitmap 25% kept, NaN and Inf inputs (kept-only recompute), 5 tokens, bf16",
         bitmap_nonfinite(0.75, 5, bf16), BF16_TOLERANCE),
        ("bitmap 25% kept, NaN and Inf inputs (dense expansion, then the repair), 333 tokens, bf16",
         bitmap_nonfinite(0.75, 333, bf16), BF16_TOLERANCE),
        ("bitmap 40% kept, 45x333, 333 tokens (dense expansion + cuBLAS), bf16", bitmap(0.6, 45, 333, 333, bf16),
         BF16_TOLERANCE),
        ("block 32x32 50%, 5 tokens (split-K), bf16", block(5, bf16), BF16_TOLERANCE),
        ("block 32x32 50%, 333 tokens, fp32", block(333, fp32), FP32_TOLERANCE),
        ("SDDMM depth 13 (per nonzero), fp32", sddmm(13, fp32), FP32_TOLERANCE),
        ("SDDMM depth 96 (tiled), bf16", sddmm(96, bf16), BF16_TOLERANCE),
        *([("probes (touch, l2_read)", probes, 0.5)] if DEVICE == "cuda" else []),
    ]


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for name, run, tolerance in cases():
        for what, error in run():
            ok = error < tolerance
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {what} relative error {error:.2e}")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"{failures} wrong results ({DEVICE})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
