"""The performance model: FLOPs and the fewest bytes a product must move, the device's measured ceilings,
the bound times of the dense and the sparse products, the ideal speedup, and the kernel config chosen
from the model and a small table (no tuning on sample inputs at run time)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from .kernels import VectorConfig, interpreter_config
from .kernels.launch import interpreter_active

PRECISIONS = ("bfloat16", "float16", "float32", "tf32")


@dataclass(frozen=True)
class DeviceCeilings:
    """Measured rates of one device: dense matmul TFLOP/s per precision and copy bandwidth (read + write)."""

    device: str
    matmul_tflops: dict[str, float]
    copy_tbps: float
    torch_version: str


def precision_of(dtype: torch.dtype) -> str:
    """The arithmetic a product in ``dtype`` runs at: fp32 is tf32 when torch's matmul precision allows it."""
    if dtype == torch.float32:
        return "float32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return str(dtype).removeprefix("torch.")


def measure_ceilings(device: torch.device | str = "cuda") -> DeviceCeilings:
    """Time a large matmul per precision and a large device copy (median of ``triton.testing.do_bench``)."""
    import triton.testing

    device = torch.device(device)
    rates = {}
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in PRECISIONS:
            dtype = torch.float32 if precision in ("float32", "tf32") else getattr(torch, precision)
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            size = 8192 if precision in ("bfloat16", "float16") else 4096
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
            rates[precision] = 2 * size**3 / ms / 1e9
    finally:
        torch.set_float32_matmul_precision(previous)
    source = torch.randn(256 * 2**20, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    copy_tbps = 2 * source.numel() * 4 / ms / 1e9
    return DeviceCeilings(torch.cuda.get_device_name(device), rates, copy_tbps, torch.__version__)


def device_ceilings(device: torch.device | str = "cuda", refresh: bool = False) -> DeviceCeilings:
    """The device's ceilings, measured once and cached in ``$NMSPMM_CACHE`` (default ``~/.cache/nmspmm``)."""
    name = torch.cuda.get_device_name(torch.device(device))
    cache = Path(os.environ.get("NMSPMM_CACHE", Path.home() / ".cache" / "nmspmm")) / "ceilings.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{name}|torch {torch.__version__}"
    if key in known and not refresh:
        return DeviceCeilings(**known[key])
    ceilings = measure_ceilings(device)
    known[key] = asdict(ceilings)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known, indent=1))
    return ceilings


@dataclass(frozen=True)
class CaseModel:
    """Counts and bound times (ms) of one case, dense against sparse: ``Y[M, N] = X[M, K] @ W[N, K].T`` with W
    sparse (the op level adds x's transpose where the kernel needs one), or a sampled product."""

    dense_flops: float
    sparse_flops: float
    dense_bytes: float
    kernel_bytes: float
    op_bytes: float
    dense_ms: float
    kernel_ms: float
    op_ms: float

    @property
    def ideal_speedup(self) -> float:
        """Dense bound over the sparse kernel's bound: m/n when both are arithmetic-bound."""
        return self.dense_ms / self.kernel_ms

    @property
    def ideal_op_speedup(self) -> float:
        """Dense bound over the op's bound (the op also transposes x: two more passes over it)."""
        return self.dense_ms / self.op_ms


def model_case(
    tokens: int, rows: int, cols: int, n: int, m: int, vector: int, dtype: torch.dtype, precision: str,
    ceilings: DeviceCeilings,
) -> CaseModel:
    """FLOPs and fewest bytes (x, values, offsets, y; the op adds x's transpose) and the time bounds they
    give at the device's measured matmul rate and copy bandwidth."""
    size = torch.finfo(dtype).bits // 8
    kept = cols // m * n
    offsets = rows // vector * kept if vector > 1 else rows * kept
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * rows * kept, rows * kept * size + offsets,
        ceilings.matmul_tflops[precision], ceilings.matmul_tflops[precision], ceilings, transposes_x=True,
    )


def model_csr_case(
    tokens: int, rows: int, cols: int, nnz: int, dtype: torch.dtype, precision: str, ceilings: DeviceCeilings
) -> CaseModel:
    """:func:`model_case` for a CSR weight with ``nnz`` kept entries (values, int32 columns, int32 row offsets):
    its products run on FMA units, so the sparse arithmetic bound is the exact-fp32 matmul rate."""
    size = torch.finfo(dtype).bits // 8
    weight_bytes = nnz * (size + 4) + (rows + 1) * 4
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * nnz, weight_bytes,
        ceilings.matmul_tflops[precision], ceilings.matmul_tflops["float32"], ceilings, transposes_x=True,
    )


def model_block_case(
    tokens: int, rows: int, cols: int, kept_blocks: int, block: tuple[int, int], dtype: torch.dtype,
    precision: str, ceilings: DeviceCeilings,
) -> CaseModel:
    """:func:`model_case` for a block-sparse weight after a row permutation: ``kept_blocks`` dense
    ``block`` tiles on tensor cores, int32 block columns, block-row offsets and row permutation; x is read
    row-major, so the op needs no transpose (op and kernel bounds are equal)."""
    size = torch.finfo(dtype).bits // 8
    kept = kept_blocks * block[0] * block[1]
    weight_bytes = kept * size + kept_blocks * 4 + (rows // block[0] + 1) * 4 + rows * 4
    rate = ceilings.matmul_tflops[precision]
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * kept, weight_bytes, rate, rate, ceilings, transposes_x=False
    )


def model_sddmm_case(
    rows: int, cols: int, depth: int, nnz: int, dtype: torch.dtype, precision: str, ceilings: DeviceCeilings
) -> CaseModel:
    """The sampled product ``(A @ B.T)`` at ``nnz`` positions of a ``[rows, cols]`` CSR structure, for
    ``A`` ``[rows, depth]`` and ``B`` ``[cols, depth]``, against the full dense ``A @ B.T``; the sampled
    dot products run on FMA units (exact-fp32 rate), the dense one at the dtype's matmul rate."""
    size = torch.finfo(dtype).bits // 8
    operands = (rows + cols) * depth * size
    dense_flops = 2.0 * rows * cols * depth
    sparse_flops = 2.0 * nnz * depth
    dense_bytes = operands + rows * cols * size
    sparse_bytes = operands + nnz * (size + 8)
    dense_ms = _bound(dense_flops, dense_bytes, ceilings.matmul_tflops[precision], ceilings)
    sparse_ms = _bound(sparse_flops, sparse_bytes, ceilings.matmul_tflops["float32"], ceilings)
    return CaseModel(
        dense_flops, sparse_flops, dense_bytes, sparse_bytes, sparse_bytes, dense_ms, sparse_ms, sparse_ms
    )


def _linear_model(
    tokens: int, rows: int, cols: int, size: int, sparse_flops: float, weight_bytes: float,
    dense_tflops: float, sparse_tflops: float, ceilings: DeviceCeilings, transposes_x: bool,
) -> CaseModel:
    """Counts and bounds of ``Y[M, N] = X[M, K] @ W.T``, dense against a sparse ``W`` of ``weight_bytes``
    doing ``sparse_flops``; ``transposes_x`` adds the op's pass that makes x feature-major (read + write)."""
    dense_flops = 2.0 * tokens * rows * cols
    activations = tokens * cols * size + tokens * rows * size
    dense_bytes = activations + rows * cols * size
    kernel_bytes = activations + weight_bytes
    op_bytes = kernel_bytes + (2 * tokens * cols * size if transposes_x else 0)
    return CaseModel(
        dense_flops, sparse_flops, dense_bytes, kernel_bytes, op_bytes,
        _bound(dense_flops, dense_bytes, dense_tflops, ceilings),
        _bound(sparse_flops, kernel_bytes, sparse_tflops, ceilings),
        _bound(sparse_flops, op_bytes, sparse_tflops, ceilings),
    )


def _bound(flops: float, moved: float, tflops: float, ceilings: DeviceCeilings) -> float:
    """The time (ms) below which no kernel can do ``flops`` at ``tflops`` and move ``moved`` bytes."""
    return max(flops / (tflops * 1e9), moved / (ceilings.copy_tbps * 1e9))


# Tiles for more than 64 tokens, from benchmarks/tune_vector.py on an H100 (bf16; fp16 shares them):
# (vector, tokens <= 512) -> (block_m, block_k, num_warps, num_stages, weight_first).
_HALF_TABLE = {
    (16, True): (128, 128, 4, 3, False),
    (16, False): (128, 64, 4, 3, False),
    (32, True): (256, 128, 8, 3, False),
    (32, False): (256, 64, 8, 3, False),
    (64, True): (64, 128, 8, 3, True),
    (64, False): (128, 64, 4, 3, True),
    (128, True): (64, 128, 8, 3, True),
    (128, False): (128, 64, 8, 3, True),
}


def choose_vector_config(
    tokens: int, rows: int, kept: int, vector: int, dtype: torch.dtype, device: torch.device
) -> VectorConfig:
    """The vector-wise kernel's config for a case. Few tokens (<= 64) are bound by weight bytes: small
    token tiles, and split-K until the grid covers the multiprocessors twice. More tokens take tiles from
    a small table tuned offline; fp32 uses narrower K steps (its tiles take twice the shared memory)."""
    if interpreter_active():
        return interpreter_config(vector)
    block_n = min(vector, 128)
    if tokens <= 64:
        block_m = max(16, triton.next_power_of_2(tokens))
        block_k = 64 if dtype == torch.float32 else 128
        tiles = rows // block_n
        sms = _multiprocessors(device)
        split_k = 1
        while tiles * split_k < 2 * sms and kept // (block_k * split_k * 2) >= 2:
            split_k *= 2
        return VectorConfig(block_m, block_n, block_k, 4, 3, 8, split_k, vector >= 64)
    if dtype == torch.float32:
        return VectorConfig(128, block_n, 32, 8 if block_n >= 64 else 4, 3)
    block_m, block_k, warps, stages, weight_first = _HALF_TABLE[(vector, tokens <= 512)]
    return VectorConfig(block_m, block_n, block_k, warps, stages, 8, 1, weight_first)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
