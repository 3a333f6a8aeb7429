"""The performance model: FLOPs and the fewest bytes a product must move, the device's measured ceilings,
the bound times of the dense and the sparse products, and the ideal speedup. Each kernel's config choice lives
beside its kernel (``nmspmm.kernels``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import triton

from .kernels.launch import multiprocessors
from .kernels.nm_element import expands_to_dense

PRECISIONS = ("bfloat16", "float16", "float32", "tf32")


@dataclass(frozen=True)
class DeviceCeilings:
    """Measured rates of one device: dense matmul TFLOP/s per precision, copy bandwidth (HBM read + write) and
    the read bandwidth from L2 to the SMs, which bounds kernels that gather the same cached activations into
    many tiles; its number of SMs, which bounds how much of that gathering their L1 caches can absorb; and the
    fixed cost of launching a kernel (graph-replayed), which bounds the shortest products."""

    device: str
    matmul_tflops: dict[str, float]
    copy_tbps: float
    l2_tbps: float
    torch_version: str
    multiprocessors: int
    launch_us: float


def measure_ceilings(device: torch.device | str = "cuda") -> DeviceCeilings:
    """Time a large matmul per precision, a large device copy and reads of a 16 MB buffer that stays in L2
    (median of ``triton.testing.do_bench``), and the fixed cost of launching a kernel that does nothing (one
    program per SM, replayed from a CUDA graph)."""
    import triton.testing

    from .kernels import L2_PROBE_BLOCK, l2_read, touch

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
    cached = torch.randn(8 * 2**20, device=device, dtype=torch.bfloat16)
    programs = 16 * multiprocessors(device)
    sums = torch.empty(programs * L2_PROBE_BLOCK, device=device)
    read = l2_read(cached, programs, 64, sums)
    ms = triton.testing.do_bench(lambda: l2_read(cached, programs, 64, sums), return_mode="median")
    marks = torch.empty(multiprocessors(device), device=device, dtype=torch.int32)
    launch_ms = triton.testing.do_bench_cudagraph(lambda: touch(marks, marks.numel()), rep=20, return_mode="median")
    return DeviceCeilings(
        torch.cuda.get_device_name(device), rates, copy_tbps, read / ms / 1e9, torch.__version__,
        multiprocessors(device), 1e3 * launch_ms,
    )


def device_ceilings(device: torch.device | str = "cuda", refresh: bool = False) -> DeviceCeilings:
    """The device's ceilings, measured once and cached in ``$NMSPMM_CACHE`` (default ``~/.cache/nmspmm``)."""
    name = torch.cuda.get_device_name(torch.device(device))
    cache = Path(os.environ.get("NMSPMM_CACHE", Path.home() / ".cache" / "nmspmm")) / "ceilings.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{name}|torch {torch.__version__}"
    if key in known and set(known[key]) == {f.name for f in fields(DeviceCeilings)} and not refresh:
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


def model_case(
    tokens: int, rows: int, cols: int, n: int, m: int, vector: int, dtype: torch.dtype, precision: str,
    ceilings: DeviceCeilings, values_dtype: torch.dtype | None = None,
) -> CaseModel:
    """FLOPs and fewest bytes (x, values, offsets, y; the op adds x's transpose) and the time bounds they
    give at the device's measured matmul rate, copy bandwidth and L2 bandwidth. In L2 traffic, every tile of
    output features (at most ``min(V, 128)`` wide: a tile may not mix choices of kept inputs) gathers its own
    kept x rows for all tokens, and the kept weights are read once per band of 256 tokens (the widest tile).
    Element-wise N:M (V = 1) expands each weight tile to dense and multiplies it whole: the dense FLOPs on tensor
    cores, x read as stored (no transpose) once per tile of 128 output features, and the weight's bytes as stored
    (values and offsets); where that product runs on the weight's dense expansion instead
    (:func:`~nmspmm.kernels.nm_element.expands_to_dense`), :func:`_expansion_model` counts that route.
    ``values_dtype`` (8-bit, :class:`~nmspmm.formats.QuantizedNMWeight`) counts the kept values in its bytes plus
    one fp32 scale per output feature; the arithmetic stays in ``dtype``."""
    size = torch.finfo(dtype).bits // 8
    kept = cols // m * n
    tensor_rate = tensor_core_tflops(precision, ceilings)
    value_size, scales = (size, 0) if values_dtype is None else (_element_bytes(values_dtype), 4 * rows)
    if vector == 1:
        weight_bytes = rows * kept * value_size + rows * (cols // m) * min(n, m - n) + scales
        if expands_to_dense(tokens, dtype, scaled=values_dtype is not None):
            return _expansion_model(tokens, rows, cols, size, weight_bytes, ceilings.matmul_tflops[precision],
                                    ceilings)
        return _linear_model(
            tokens, rows, cols, size, 2.0 * tokens * rows * cols, weight_bytes,
            tokens * cols * size * triton.cdiv(rows, 128), 256, ceilings.matmul_tflops[precision], tensor_rate,
            ceilings, transposes_x=False,
        )
    offsets = rows // vector * kept
    weight_bytes = rows * kept * value_size + offsets + scales
    gathered_x = tokens * kept * size * (rows // min(vector, 128))
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * rows * kept, weight_bytes, gathered_x, 256,
        ceilings.matmul_tflops[precision], tensor_rate, ceilings, transposes_x=True,
    )


def _element_bytes(dtype: torch.dtype) -> int:
    return (torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)).bits // 8


def tensor_core_tflops(precision: str, ceilings: DeviceCeilings) -> float:
    """The rate nmspmm's tensor-core kernels multiply at: the dtype's matmul rate, but exact fp32 runs as three
    tf32 products (see ``nmspmm.ops.backend.input_precision``), a third of the tf32 rate where that beats FMA."""
    if precision not in ceilings.matmul_tflops:
        raise ValueError(f"precision: expected one of {sorted(ceilings.matmul_tflops)}, got {precision!r}")
    if precision == "float32":
        return max(ceilings.matmul_tflops["float32"], ceilings.matmul_tflops["tf32"] / 3)
    return ceilings.matmul_tflops[precision]


def model_csr_case(
    tokens: int, rows: int, cols: int, nnz: int, dtype: torch.dtype, precision: str, ceilings: DeviceCeilings
) -> CaseModel:
    """:func:`model_case` for a CSR weight with ``nnz`` kept entries (values, int32 columns, int32 row offsets):
    its products run on FMA units, so the sparse arithmetic bound is the exact-fp32 matmul rate. From L2 every SM
    reads, at least once, the x row of every column its rows use (:func:`_columns_per_sm`); its L1 may serve
    the re-reads, so this floor is below the kernel's one gather per nonzero."""
    size = torch.finfo(dtype).bits // 8
    weight_bytes = nnz * (size + 4) + (rows + 1) * 4
    gathered_x = min(nnz, ceilings.multiprocessors * _columns_per_sm(rows, cols, nnz, ceilings)) * tokens * size
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * nnz, weight_bytes, gathered_x, 64,
        ceilings.matmul_tflops[precision], ceilings.matmul_tflops["float32"], ceilings, transposes_x=True,
    )


def model_bitmap_case(
    tokens: int, rows: int, cols: int, nnz: int, dtype: torch.dtype, precision: str, ceilings: DeviceCeilings
) -> CaseModel:
    """:func:`model_case` for a bitmap weight with ``nnz`` kept entries (values, one bit per weight, an int32 block
    offset per 128 inputs and row): as element-wise N:M, each tile is expanded to dense and multiplied whole, so
    the dense FLOPs on tensor cores, x read as stored (no transpose) once per tile of 128 output features, and the
    weight's bytes as stored; beyond the kernel's token range, the dense expansion's route
    (:func:`_expansion_model`)."""
    size = torch.finfo(dtype).bits // 8
    weight_bytes = nnz * size + rows * triton.cdiv(cols, 32) * 4 + rows * triton.cdiv(cols, 128) * 4
    if expands_to_dense(tokens, dtype, scaled=False):
        return _expansion_model(tokens, rows, cols, size, weight_bytes, ceilings.matmul_tflops[precision], ceilings)
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * rows * cols, weight_bytes,
        tokens * cols * size * triton.cdiv(rows, 128), 256, ceilings.matmul_tflops[precision],
        tensor_core_tflops(precision, ceilings), ceilings, transposes_x=False,
    )


def _columns_per_sm(rows: int, cols: int, nnz: int, ceilings: DeviceCeilings) -> float:
    """Expected distinct columns among the rows of one SM, with the rows spread evenly over the SMs and the
    ``nnz`` kept entries placed at random: the fewest x (or b) rows its loads must bring in from L2."""
    rows_per_sm = max(rows / ceilings.multiprocessors, 1.0)
    return cols * (1.0 - (1.0 - nnz / (rows * cols)) ** rows_per_sm)


def model_block_case(
    tokens: int, rows: int, cols: int, kept_blocks: int, block: tuple[int, int], dtype: torch.dtype,
    precision: str, ceilings: DeviceCeilings,
) -> CaseModel:
    """:func:`model_case` for a block-sparse weight after a row permutation: ``kept_blocks`` dense
    ``block`` tiles on tensor cores, int32 block columns, block-row offsets and row permutation; x is read
    row-major, so the op needs no transpose (op and kernel bounds are equal). In L2 traffic every block reads
    its ``block[1]`` x columns for all tokens (x is reused only across the ``block[0]`` rows of a block)."""
    size = torch.finfo(dtype).bits // 8
    kept = kept_blocks * block[0] * block[1]
    weight_bytes = kept * size + kept_blocks * 4 + (rows // block[0] + 1) * 4 + rows * 4
    return _linear_model(
        tokens, rows, cols, size, 2.0 * tokens * kept, weight_bytes, kept_blocks * block[1] * tokens * size, 128,
        ceilings.matmul_tflops[precision], tensor_core_tflops(precision, ceilings), ceilings, transposes_x=False,
    )


def model_sddmm_case(
    rows: int, cols: int, depth: int, nnz: int, dtype: torch.dtype, precision: str, ceilings: DeviceCeilings
) -> CaseModel:
    """The sampled product ``(A @ B.T)`` at ``nnz`` positions of a ``[rows, cols]`` CSR structure, for
    ``A`` ``[rows, depth]`` and ``B`` ``[cols, depth]``, against the full dense ``A @ B.T``. The sparse bound is
    the lower of nmspmm's two algorithms: per nonzero, dot products on FMA units (exact-fp32 rate) whose SMs read
    their rows of ``A`` and the ``B`` rows their nonzeros touch from L2 (see :func:`_columns_per_sm`); or per tile,
    the dense product on tensor cores in tiles of 128 x 128 (each reads 256 operand rows from L2) with the
    nonzeros picked out of it."""
    size = torch.finfo(dtype).bits // 8
    operands = (rows + cols) * depth * size
    dense_flops = 2.0 * rows * cols * depth
    sparse_flops = 2.0 * nnz * depth
    dense_bytes = operands + rows * cols * size
    dense_ms = _bound(dense_flops, dense_bytes, ceilings.matmul_tflops[precision], ceilings)
    rows_per_sm = max(rows / ceilings.multiprocessors, 1.0)
    per_sm_rows = rows_per_sm + _columns_per_sm(rows, cols, nnz, ceilings)
    nonzero_l2 = min(2 * nnz, ceilings.multiprocessors * per_sm_rows) * depth * size
    nonzero_bytes = operands + nnz * (size + 8)
    nonzero_ms = _bound(sparse_flops, nonzero_bytes, ceilings.matmul_tflops["float32"], ceilings, nonzero_l2)
    tile_bytes = operands + nnz * (size + 4) + rows * triton.cdiv(cols, 64) * 4
    tile_l2 = rows * cols * depth * size / 64 + nnz * (size + 4)
    tile_ms = _bound(dense_flops, tile_bytes, tensor_core_tflops(precision, ceilings), ceilings, tile_l2)
    sparse_bytes, sparse_ms = min((nonzero_bytes, nonzero_ms), (tile_bytes, tile_ms), key=lambda pair: pair[1])
    return CaseModel(
        dense_flops, sparse_flops, dense_bytes, sparse_bytes, sparse_bytes, dense_ms, sparse_ms, sparse_ms
    )


def _linear_model(
    tokens: int, rows: int, cols: int, size: int, sparse_flops: float, weight_bytes: float, gathered_x: float,
    weight_band: int, dense_tflops: float, sparse_tflops: float, ceilings: DeviceCeilings, transposes_x: bool,
) -> CaseModel:
    """Counts and bounds of ``Y[M, N] = X[M, K] @ W.T``, dense against a sparse ``W`` of ``weight_bytes``
    doing ``sparse_flops``. From L2 the kernel reads ``gathered_x`` bytes of x, the weight once per band of
    ``weight_band`` tokens, and writes y. ``transposes_x`` adds the op's pass that makes x feature-major (read +
    write). The dense product's tiles reuse operands enough that L2 does not bound it."""
    l2_bytes = gathered_x + weight_bytes * triton.cdiv(tokens, weight_band) + tokens * rows * size
    dense_flops = 2.0 * tokens * rows * cols
    activations = tokens * cols * size + tokens * rows * size
    dense_bytes = activations + rows * cols * size
    kernel_bytes = activations + weight_bytes
    transpose_bytes = 2 * tokens * cols * size if transposes_x else 0
    op_bytes = kernel_bytes + transpose_bytes
    return CaseModel(
        dense_flops, sparse_flops, dense_bytes, kernel_bytes, op_bytes,
        _bound(dense_flops, dense_bytes, dense_tflops, ceilings),
        _bound(sparse_flops, kernel_bytes, sparse_tflops, ceilings, l2_bytes),
        _bound(sparse_flops, op_bytes, sparse_tflops, ceilings, l2_bytes + transpose_bytes),
    )


def _expansion_model(
    tokens: int, rows: int, cols: int, size: int, weight_bytes: float, dense_tflops: float, ceilings: DeviceCeilings
) -> CaseModel:
    """Counts and bounds of a product on the weight's dense expansion (``kernels.nm_element._ExpandedLaunch``): one
    launch reads the ``weight_bytes`` stored and writes the dense weight, the dense product follows at its own
    bound, then a check reads x or y (whichever is smaller) and a repair launch recomputes nothing for finite
    inputs. Four launches, each at the device's fixed cost; x is read as stored (the op level equals the kernel's)."""
    dense_flops = 2.0 * tokens * rows * cols
    activations = tokens * cols * size + tokens * rows * size
    dense_weight = rows * cols * size
    dense_bytes = activations + dense_weight
    checked = tokens * min(rows, cols) * size
    dense_ms = _bound(dense_flops, dense_bytes, dense_tflops, ceilings)
    densify_ms = _bound(0.0, weight_bytes + dense_weight, dense_tflops, ceilings)
    check_ms = _bound(0.0, checked, dense_tflops, ceilings)
    route_ms = densify_ms + dense_ms + check_ms + ceilings.launch_us / 1e3
    route_bytes = weight_bytes + dense_weight + dense_bytes + checked
    return CaseModel(dense_flops, dense_flops, dense_bytes, route_bytes, route_bytes, dense_ms, route_ms, route_ms)


def _bound(flops: float, moved: float, tflops: float, ceilings: DeviceCeilings, l2_moved: float = 0.0) -> float:
    """The time (ms) below which no kernel can do ``flops`` at ``tflops``, move ``moved`` bytes through HBM and
    ``l2_moved`` bytes from L2 to the SMs, after the fixed cost of its launch."""
    streamed = max(flops / (tflops * 1e9), moved / (ceilings.copy_tbps * 1e9), l2_moved / (ceilings.l2_tbps * 1e9))
    return ceilings.launch_us / 1e3 + streamed
