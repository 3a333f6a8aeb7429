"""The Triton kernels against a float64 reference, outputs poisoned first (interpreter on CPU, native on GPU):
N:M (vector- and element-wise), the transpose and the probes, CSR (the SpMM and the SDDMM, plain and tiled) and
block-shuffled (the block-sparse kernel and its split choice)."""

from __future__ import annotations

import importlib

import pytest
import torch

import nmspmm
from nmspmm.formats.block_shuffled import BlockShuffledWeight
from nmspmm.formats.csr import CSRWeight
from nmspmm.kernels import VectorConfig, nm_element_matmul, nm_vector_matmul, transpose
from nmspmm.kernels import choose_vector_config
from nmspmm.kernels.block_sparse import BlockSparseConfig, block_sparse_matmul
from nmspmm.formats.bitmap import BitmapWeight
from nmspmm.kernels.nm_element import bitmap_matmul, cached_kept_bits, expands_to_dense, kept_bits
from nmspmm.kernels.nm_vector import gathers_ahead
from nmspmm.kernels.csr_spmm import csr_spmm
from nmspmm.kernels.sddmm import sddmm as sddmm_kernel
from nmspmm.kernels.sddmm import CELL, SddmmTile, sddmm_tiled
from nmspmm.ops.csr import csr_linear
from nmspmm.prune.unstructured import prune_csr
from conftest import DEVICE, TOLERANCE, block_weight, csr_weight, dense_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(tokens: int, rows: int, cols: int, pattern: str, vector: int, dtype: torch.dtype):
    weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    expected = x.double() @ weight.to_dense().double().t() + bias.double()
    return weight, x, bias, expected


def _poisoned(tokens: int, rows: int, dtype: torch.dtype, feature_major: bool) -> torch.Tensor:
    if feature_major:
        return torch.full((rows, tokens), float("nan"), dtype=dtype, device=DEVICE).t()
    return torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,pattern,vector",
    [
        (1, 64, 64, "2:4", 16),
        (8, 64, 96, "4:8", 32),
        (7, 128, 128, "8:32", 64),
        (33, 96, 96, "3:8", 32),
        (20, 128, 128, "4:64", 128),
        (5, 32, 48, "13:16", 16),
    ],
)
@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("variant", ["chosen", "weight_first", "split_k"])
@pytest.mark.parametrize("x_layout", ["feature_major", "rows"])
def test_vector_kernel(tokens, rows, cols, pattern, vector, dtype, feature_major, variant, x_layout):
    # x feature-major (as transposed for many tokens) or as the op passes few tokens (x.t() of row-major rows):
    # the kernel issues the gathers one K step ahead itself where Triton cannot pipeline them.
    weight, x, bias, expected = _case(tokens, rows, cols, pattern, vector, dtype)
    out = _poisoned(tokens, rows, dtype, feature_major)
    xt = x.t().contiguous() if x_layout == "feature_major" else x.t()
    config = choose_vector_config(tokens, rows, weight.kept_per_row, vector, dtype, x.device)
    if variant == "weight_first":
        config = VectorConfig(32, min(vector, 32), 16, 4, 2, weight_first=True)
    elif variant == "split_k":
        config = VectorConfig(16, 16, 16, 4, 2, split_k=3, weight_first=tokens % 2 == 0)
    nm_vector_matmul(xt, weight.values, weight.kept_offsets(), weight.n, weight.m, vector, out, config, bias)
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_gathers_ahead_where_triton_cannot_pipeline_the_gathers():
    # Tokens contiguous and 4-byte aligned: Triton's pipeline; token rows or 2-byte runs: the kernel's own.
    assert not gathers_ahead((16, 1), 16, 2)
    assert not gathers_ahead((7, 1), 1, 4)
    assert gathers_ahead((7, 1), 1, 2)
    assert gathers_ahead((1, 4096), 16, 2)
    assert gathers_ahead((1, 4096), 16, 4)


def test_vector_kernel_tf32():
    weight, x, _, expected = _case(19, 64, 128, "8:32", 32, torch.float32)
    expected = x.double() @ weight.to_dense().double().t()
    out = _poisoned(19, 64, torch.float32, False)
    config = choose_vector_config(19, 64, weight.kept_per_row, 32, torch.float32, x.device)
    nm_vector_matmul(
        x.t().contiguous(), weight.values, weight.kept_offsets(), weight.n, weight.m, 32, out, config,
        input_precision="tf32",
    )
    assert relative_error(out, expected) < TOLERANCE["tf32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,pattern",
    [(1, 8, 16, "2:4"), (7, 24, 64, "3:4"), (9, 33, 64, "5:32"), (3, 5, 64, "60:64"), (18, 70, 200, "2:8")],
)
@pytest.mark.parametrize("layout", ["rows", "feature_major", "out_transposed"])
@pytest.mark.parametrize("variant", ["chosen", "split_k"])
def test_element_kernel(tokens, rows, cols, pattern, dtype, layout, variant):
    # x as the op passes it (x.t() of row-major rows) or feature-major; K not a multiple of the 32-input words
    # (200), N not of the tile (33, 70), and a split of K into three shares.
    weight, x, bias, expected = _case(tokens, rows, cols, pattern, 1, dtype)
    out = _poisoned(tokens, rows, dtype, layout == "out_transposed")
    xt = x.t().contiguous() if layout == "feature_major" else x.t()
    config = None
    if variant == "split_k":
        config = VectorConfig(16, 16, max(32, weight.m), 4, 2, split_k=3, weight_first=True)
    nm_element_matmul(
        xt, weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias, config,
        input_precision="tf32x3" if dtype == torch.float32 else "ieee",
    )
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("split_k", [1, 3])
def test_element_kernel_sums_only_the_kept_inputs_of_a_non_finite_row(poison, split_k):
    # The expanded tile holds zeros at pruned inputs; a non-finite input there must not reach the output (the
    # kernel's kept-only recomputation), while one at a kept input must, with its sign.
    weight, x, bias, _ = _case(6, 40, 128, "2:4", 1, torch.float32)
    mask = weight.mask()
    feature = int(((mask.sum(0) > 0) & (mask.sum(0) < mask.shape[0])).nonzero()[0])
    x[3, feature] = poison
    out = _poisoned(6, 40, torch.float32, False)
    config = VectorConfig(16, 16, 32, 4, 2, split_k=split_k, weight_first=True)
    nm_element_matmul(x.t(), weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias, config, "tf32x3")
    clean = x.clone()
    clean[3, feature] = 0.0
    expected = clean.double() @ weight.to_dense().double().t() + bias.double()
    reaches = mask[:, feature]
    reached = poison * weight.to_dense()[reaches, feature].double()  # the poison (with w's sign) swamps the rest
    torch.testing.assert_close(out[3, reaches].double(), reached, equal_nan=True, rtol=0, atol=0)
    assert relative_error(out[3, ~reaches], expected[3, ~reaches]) < TOLERANCE[torch.float32]
    others = [0, 1, 2, 4, 5]
    assert relative_error(out[others], expected[others]) < TOLERANCE[torch.float32]


def _bitmap_case(tokens: int, rows: int, cols: int, density: float, dtype: torch.dtype):
    dense = torch.randn(rows, cols, device=DEVICE).to(dtype)
    weight = BitmapWeight.from_dense(dense, torch.rand(rows, cols, device=DEVICE) < density)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    expected = x.double() @ weight.to_dense().double().t() + bias.double()
    return weight, x, bias, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,density",
    [(1, 7, 45, 0.3), (5, 33, 200, 0.6), (17, 40, 300, 0.1), (3, 16, 128, 0.0), (2, 16, 64, 1.0), (9, 70, 257, 0.5)],
)
@pytest.mark.parametrize("layout", ["rows", "feature_major", "out_transposed"])
@pytest.mark.parametrize("config", [None, (64, 3), (128, 2)])
def test_bitmap_kernel(tokens, rows, cols, density, dtype, layout, config):
    # Unstructured weights through the element-wise kernel: odd K (not a multiple of a word or of a block of
    # inputs), empty and full weights, both expansions (gathered from half density on, masked loads below), K
    # steps of 32 (the interpreter's), 64 and 128 with K split into shares that start at blocks of inputs.
    weight, x, bias, expected = _bitmap_case(tokens, rows, cols, density, dtype)
    out = _poisoned(tokens, rows, dtype, layout == "out_transposed")
    xt = x.t().contiguous() if layout == "feature_major" else x.t()
    if config is not None:
        config = VectorConfig(16, 16, config[0], 4, 2, split_k=config[1], weight_first=True)
    bitmap_matmul(
        xt, weight.values, weight.bitmap, weight.block_offsets, out, bias, config,
        input_precision="tf32x3" if dtype == torch.float32 else "ieee",
    )
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_bitmap_kernel_sums_only_the_kept_inputs_of_a_non_finite_row(poison, density):
    # As for element-wise N:M: a non-finite input reaches exactly the outputs whose rows keep that input.
    weight, x, bias, _ = _bitmap_case(6, 40, 200, density, torch.float32)
    mask = weight.mask()
    feature = int(((mask.sum(0) > 0) & (mask.sum(0) < mask.shape[0])).nonzero()[0])
    x[3, feature] = poison
    out = _poisoned(6, 40, torch.float32, False)
    config = VectorConfig(16, 16, 64, 4, 2, split_k=3, weight_first=True)
    bitmap_matmul(x.t(), weight.values, weight.bitmap, weight.block_offsets, out, bias, config, "tf32x3")
    clean = x.clone()
    clean[3, feature] = 0.0
    expected = clean.double() @ weight.to_dense().double().t() + bias.double()
    keeps = mask[:, feature]
    assert relative_error(out[3, ~keeps], expected[3, ~keeps]) < TOLERANCE[torch.float32]
    signs = torch.sign(weight.to_dense()[keeps, feature]) * (1 if poison > 0 else -1)
    if poison != poison:
        assert torch.isnan(out[3, keeps]).all()
    else:
        assert torch.equal(out[3, keeps], signs * float("inf"))
    others = [0, 1, 2, 4, 5]
    assert relative_error(out[others], expected[others]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,rows,cols,kind", [(256, 33, 200, "2:8"), (333, 70, 64, "60:64"), (256, 45, 333, 0.6), (300, 7, 129, 0.2)]
)
@pytest.mark.parametrize("layout", ["rows", "feature_major", "out_transposed"])
def test_products_on_the_dense_expansion(tokens, rows, cols, kind, dtype, layout):
    # Beyond DIRECT_TOKENS tokens a bf16/fp16 product expands the weight into a dense buffer and runs cuBLAS:
    # odd N and K (not whole words, blocks or tiles), both tile expansions, every output layout, with bias.
    assert expands_to_dense(tokens, dtype, False) and not expands_to_dense(tokens, torch.float32, False)
    if isinstance(kind, str):
        weight, x, bias, expected = _case(tokens, rows, cols, kind, 1, dtype)
    else:
        weight, x, bias, expected = _bitmap_case(tokens, rows, cols, kind, dtype)
    out = _poisoned(tokens, rows, dtype, layout == "out_transposed")
    xt = x.t().contiguous() if layout == "feature_major" else x.t()
    if isinstance(kind, str):
        nm_element_matmul(xt, weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias)
    else:
        bitmap_matmul(xt, weight.values, weight.bitmap, weight.block_offsets, out, bias)
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind,rows,cols", [("2:4", 40, 128), ("2:4", 150, 64), (0.5, 40, 200), (0.3, 150, 100)])
def test_dense_expansion_sums_only_the_kept_inputs_of_a_non_finite_row(poison, kind, rows, cols):
    # The expansion's zeros times a non-finite input at a pruned position give NaN: the repair recomputes the
    # token tiles (of 16) whose product is not finite (checked on the result where it is the smaller, else on x),
    # so the poison reaches exactly the outputs whose rows keep that input; other tiles keep cuBLAS's result.
    tokens, dtype = 272, torch.bfloat16
    if isinstance(kind, str):
        weight, x, bias, _ = _case(tokens, rows, cols, kind, 1, dtype)
    else:
        weight, x, bias, _ = _bitmap_case(tokens, rows, cols, kind, dtype)
    mask = weight.mask()
    feature = int(((mask.sum(0) > 0) & (mask.sum(0) < mask.shape[0])).nonzero()[0])
    x[3, feature] = poison
    x[270, feature] = poison
    out = _poisoned(tokens, rows, dtype, False)
    if isinstance(kind, str):
        nm_element_matmul(x.t(), weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias)
    else:
        bitmap_matmul(x.t(), weight.values, weight.bitmap, weight.block_offsets, out, bias)
    clean = x.clone()
    clean[3, feature] = clean[270, feature] = 0.0
    expected = clean.double() @ weight.to_dense().double().t() + bias.double()
    keeps = mask[:, feature]
    signs = torch.sign(weight.to_dense()[keeps, feature]) * (1 if poison > 0 else -1)
    for token in (3, 270):
        assert relative_error(out[token, ~keeps], expected[token, ~keeps]) < TOLERANCE[dtype]
        if poison != poison:
            assert torch.isnan(out[token, keeps]).all()
        else:
            assert torch.equal(out[token, keeps], (signs * float("inf")).to(dtype))
    others = [t for t in range(tokens) if t not in (3, 270)]
    assert relative_error(out[others], expected[others]) < TOLERANCE[dtype]


def test_bitmap_kernel_refuses_steps_across_blocks():
    weight, x, bias, _ = _bitmap_case(2, 16, 256, 0.5, torch.float32)
    out = torch.empty(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_k=256 must divide 128"):
        bitmap_matmul(x.t(), weight.values, weight.bitmap, weight.block_offsets, out, bias,
                      VectorConfig(16, 16, 256, 4, 2, weight_first=True))


@pytest.mark.parametrize("pattern", ["2:4", "3:8", "7:16", "20:32", "33:64"])
def test_kept_bits_match_the_mask(pattern):
    weight = nmspmm.prune(torch.randn(9, 192, device=DEVICE), pattern, 1)
    bits = kept_bits(weight.kept_offsets(), weight.n, weight.m, 192)
    assert bits.dtype == torch.int32 and bits.shape == (9, 6)
    unpacked = (bits[:, :, None] >> torch.arange(32, dtype=torch.int32, device=DEVICE)) & 1
    assert torch.equal(unpacked.reshape(9, 192).bool(), weight.mask())


def test_cached_kept_bits_follow_the_offsets():
    weight = nmspmm.prune(torch.randn(8, 64, device=DEVICE), "2:4", 1)
    offsets = weight.kept_offsets().clone()
    first = cached_kept_bits(offsets, 2, 4, 64)
    assert cached_kept_bits(offsets, 2, 4, 64) is first
    offsets[0, :2] = torch.tensor([2, 3], dtype=offsets.dtype, device=DEVICE)  # an in-place edit: a new version
    again = cached_kept_bits(offsets, 2, 4, 64)
    assert again is not first and int(again[0, 0]) & 0xF == 0b1100


@pytest.mark.parametrize(
    "config,message",
    [
        (VectorConfig(16, 16, 48, 4, 2, weight_first=True), "block_k=48 must be a multiple of 32"),
        (VectorConfig(16, 16, 32, 4, 2), "weight-first tiles only"),
    ],
)
def test_element_kernel_refuses_a_config_it_cannot_run(config, message):
    weight, x, _, _ = _case(3, 16, 64, "2:4", 1, torch.float32)
    out = _poisoned(3, 16, torch.float32, False)
    with pytest.raises(ValueError, match=message):
        nm_element_matmul(x.t(), weight.values, weight.kept_offsets(), 2, 4, out, None, config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (37, 70), (64, 16)])
def test_transpose(shape, dtype):
    base = torch.randn(shape[0], shape[1] * 2, device=DEVICE).to(dtype)
    x = base[:, ::2]
    out = torch.full((shape[1], shape[0]), float("nan"), dtype=dtype, device=DEVICE)
    transpose(x, out)
    assert torch.equal(out, x.t())


def test_l2_probe_sums_the_chunks_it_reads():
    from nmspmm.kernels import L2_PROBE_BLOCK, l2_read

    chunks, programs, reads = 3, 2, 4
    buffer = torch.randn(chunks * L2_PROBE_BLOCK + 5, device=DEVICE).bfloat16()
    out = torch.full((programs * L2_PROBE_BLOCK,), float("nan"), device=DEVICE)
    assert l2_read(buffer, programs, reads, out) == programs * reads * L2_PROBE_BLOCK * 2
    rows = buffer[: chunks * L2_PROBE_BLOCK].float().view(chunks, L2_PROBE_BLOCK)
    for program in range(programs):
        expected = sum(rows[(program * 7 + step * 13) % chunks] for step in range(reads))
        assert torch.allclose(out.view(programs, -1)[program], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="buffer, out: need at least 4096 buffer elements"):
        l2_read(buffer[:100], programs, reads, out)


def test_touch_probe_stores_each_program_index():
    from nmspmm.kernels import touch

    out = torch.full((5,), -1, dtype=torch.int32, device=DEVICE)
    touch(out, 4)
    assert out.tolist() == [0, 1, 2, 3, -1]
    with pytest.raises(ValueError, match="out: need an int32 tensor of at least 4 elements, got torch.float32 of 5"):
        touch(out.float(), 4)


# ---- CSR: the SpMM and the SDDMM (plain and tiled) ----------------------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,rows,cols,with_bias", [(1, 45, 70, True), (7, 45, 70, False), (33, 21, 70, True)])
def test_csr_spmm_kernel(tokens, rows, cols, with_bias, dtype):
    weight = csr_weight(rows, cols, dtype)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype) if with_bias else None
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)
    csr_spmm(x.t().contiguous(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out, bias)
    assert relative_error(out, dense_reference(x, weight, bias)) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
def test_csr_spmm_kernel_strided_operands_and_empty_matrix():
    weight = csr_weight(21, 70)
    x = torch.randn(9, 70, device=DEVICE)
    out_t = torch.full((21, 9), float("nan"), device=DEVICE)  # feature-major output: out = out_t.t()
    csr_spmm(x.t(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out_t.t())
    assert relative_error(out_t.t(), dense_reference(x, weight, None)) < TOLERANCE[torch.float32]

    empty = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.zeros(6, 9, dtype=torch.bool, device=DEVICE))
    bias = torch.randn(6, device=DEVICE)
    for b in (bias, None):
        out = torch.full((3, 6), float("nan"), device=DEVICE)
        args = (empty.values, empty.col_indices, empty.row_offsets, empty.row_order())
        csr_spmm(torch.randn(9, 3, device=DEVICE), *args, out, b)
        assert torch.equal(out, (b if b is not None else torch.zeros(6, device=DEVICE)).expand(3, 6))


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [1, 37])
def test_csr_sddmm_kernel(dtype, depth):
    weight = csr_weight(45, 70, dtype)
    a = torch.randn(45, depth, device=DEVICE).to(dtype)
    b = torch.randn(70, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_kernel(a, b, weight.row_indices(), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,depth,sparsity", [(70, 130, 40, 0.9), (64, 64, 64, 0.5), (5, 200, 17, 0.0)])
def test_csr_sddmm_tiled_kernel(dtype, rows, cols, depth, sparsity):
    weight = prune_csr(torch.randn(rows, cols, device=DEVICE).to(dtype), sparsity)
    a = torch.randn(rows, depth, device=DEVICE).to(dtype)
    b = torch.randn(cols, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_sddmm_tiled_kernel_wide_tiles_stop_at_the_last_cell(dtype, monkeypatch):
    # 150 columns make 3 cells of 64; the second 128-wide tile covers only the third, not the next row's first.
    sddmm_module = importlib.import_module("nmspmm.kernels.sddmm")  # the package exports a function of that name
    monkeypatch.setattr(sddmm_module, "sddmm_tile", lambda depth, dtype: SddmmTile(32, 2 * CELL, 32, 4, 1))
    weight = prune_csr(torch.randn(40, 150, device=DEVICE).to(dtype), 0.3)
    a = torch.randn(40, 48, device=DEVICE).to(dtype)
    b = torch.randn(150, 48, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, out)
    assert relative_error(out, (a.double() @ b.double().t())[weight.mask()]) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
def test_csr_sddmm_tiled_kernel_checks_the_offsets_shape():
    weight = csr_weight(20, 130)
    a, b = torch.randn(20, 64, device=DEVICE), torch.randn(130, 64, device=DEVICE)
    out = torch.empty(weight.nnz, device=DEVICE)
    with pytest.raises(ValueError, match="cell_offsets: expected 61 entries"):
        sddmm_tiled(a, b, weight.tile_offsets(32), weight.col_indices, out)


@pytest.mark.usefixtures("seeded")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 16, 256, 1024])
def test_csr_spmm_kernel_large(tokens, dtype):
    weight = prune_csr(torch.randn(4096, 4096, device=DEVICE).to(dtype), 0.9)
    x = torch.randn(tokens, 4096, device=DEVICE).to(dtype)
    bias = torch.randn(4096, device=DEVICE).to(dtype)
    out = torch.full((tokens, 4096), float("nan"), dtype=dtype, device=DEVICE)
    csr_spmm(x.t().contiguous(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out, bias)
    assert relative_error(out, dense_reference(x, weight, bias)) < TOLERANCE[dtype]
    assert relative_error(csr_linear(x, weight, bias), dense_reference(x, weight, bias)) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_spmm_imbalanced_rows_large(dtype):
    # Row densities from 0 to 100%: the row swizzle must still cover every row.
    density = torch.linspace(0, 1, 3000, device=DEVICE)[torch.randperm(3000, device=DEVICE)]
    mask = torch.rand(3000, 2048, device=DEVICE) < density[:, None] ** 4
    weight = CSRWeight.from_dense(torch.randn(3000, 2048, device=DEVICE).to(dtype), mask)
    x = torch.randn(333, 2048, device=DEVICE).to(dtype)
    assert relative_error(csr_linear(x, weight), dense_reference(x, weight, None)) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [16, 1000])
def test_csr_sddmm_kernel_large(dtype, depth):
    weight = prune_csr(torch.randn(4096, 4096, device=DEVICE).to(dtype), 0.9)
    a = torch.randn(4096, depth, device=DEVICE).to(dtype)
    b = torch.randn(4096, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_kernel(a, b, weight.row_indices(), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]
    tiled = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, tiled)
    assert relative_error(tiled, expected) < TOLERANCE[dtype]


# ---- block-shuffled: the block-sparse kernel and its config choice ------------------------------------------


def _launch(x: torch.Tensor, sparse: BlockShuffledWeight, out: torch.Tensor, bias: torch.Tensor | None,
            precision: str = "ieee") -> None:
    block_sparse_matmul(
        x, sparse.values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
        sparse.row_permutation, out, bias, precision,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,block,empty",
    [(1, 64, 64, (32, 32), (1,)), (7, 48, 80, (16, 16), (0, 2)), (33, 128, 32, (64, 16), ())],
)
def test_block_shuffled_kernel_matches_reference(tokens, rows, cols, block, empty, dtype):
    sparse, _, _ = block_weight(rows, cols, block, dtype, density=0.5, empty_block_rows=empty, seed=tokens,
                               device=DEVICE)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)
    _launch(x, sparse, out, bias)
    assert relative_error(out, dense_reference(x, sparse, bias)) < TOLERANCE[dtype]


def test_block_shuffled_kernel_all_empty_strided_operands_and_tf32():
    sparse, _, _ = block_weight(32, 64, (16, 16), density=0.0, device=DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)
    out = torch.full((32, 5), float("nan"), device=DEVICE).t()  # [5, 32] with column-major strides
    _launch(x, sparse, out, None)
    assert torch.equal(out, torch.zeros(5, 32, device=DEVICE))
    _launch(x, sparse, out, bias)
    assert torch.equal(out, bias.expand(5, 32))
    sparse, _, _ = block_weight(64, 64, (16, 32), density=0.7, device=DEVICE)
    x = torch.randn(64, 9, device=DEVICE).t()  # the features of a token are strided
    out = torch.full((64, 9), float("nan"), device=DEVICE).t()
    _launch(x, sparse, out, bias.repeat(2))
    assert relative_error(out, dense_reference(x, sparse, bias.repeat(2))) < TOLERANCE[torch.float32]
    out.fill_(float("nan"))
    _launch(x, sparse, out, None, "tf32")
    assert relative_error(out, dense_reference(x, sparse, None)) < TOLERANCE["tf32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [2, 3])
def test_block_shuffled_kernel_split_over_blocks_sums_every_share(dtype, split_k):
    # Block-rows of 0 to 5 blocks split three ways leave some programs without blocks: their slices must be zeros.
    sparse, _, _ = block_weight(64, 80, (16, 16), dtype, density=0.6, empty_block_rows=(2,), seed=split_k,
                               device=DEVICE)
    x = torch.randn(7, 80, device=DEVICE).to(dtype)
    bias = torch.randn(64, device=DEVICE).to(dtype)
    config = BlockSparseConfig(block_m=16, num_warps=4, num_stages=1, split_k=split_k)
    for with_bias in (None, bias):
        out = torch.full((64, 7), float("nan"), dtype=dtype, device=DEVICE).t()
        block_sparse_matmul(
            x, sparse.values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
            sparse.row_permutation, out, with_bias, config=config,
        )
        assert relative_error(out, dense_reference(x, sparse, with_bias)) < TOLERANCE[dtype]


def test_block_shuffled_few_tokens_split_long_block_rows_in_two(monkeypatch):
    import nmspmm.kernels.block_sparse as block_sparse

    monkeypatch.setattr(block_sparse, "interpreter_active", lambda: False)

    def split(tokens, rows, kept_blocks, block=(32, 32)):
        return block_sparse.choose_block_sparse_config(tokens, block, torch.bfloat16, rows, kept_blocks).split_k

    blocks_4096 = (4096 // 32) ** 2
    assert split(16, 4096, blocks_4096 // 2) == 2  # 50%: 64 blocks a block-row
    assert split(16, 4096, blocks_4096 // 4) == 1  # 75%: 32
    assert split(1024, 4096, blocks_4096 // 2) == 1  # many tokens: enough token tiles


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(32, 32), (64, 16), (16, 16)])
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("tokens", [1, 16, 256, 1024])
def test_block_shuffled_kernel_large_shapes(tokens, rows, cols, block, dtype):
    sparse, _, _ = block_weight(rows, cols, block, dtype, density=0.25, empty_block_rows=(3,), seed=tokens,
                               device="cuda")
    x = torch.randn(tokens, cols, device="cuda").to(dtype)
    bias = torch.randn(rows, device="cuda").to(dtype)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device="cuda")
    _launch(x, sparse, out, bias)
    assert relative_error(out, dense_reference(x, sparse, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn", [16, 32, 64, 128])
@pytest.mark.parametrize("bk", [16, 32, 64, 128])
def test_block_shuffled_kernel_every_block_shape(bn, bk, dtype):
    sparse, _, _ = block_weight(512, 1024, (bn, bk), dtype, density=0.3, empty_block_rows=(1,), device="cuda")
    x = torch.randn(300, 1024, device="cuda").to(dtype)
    out = torch.full((300, 512), float("nan"), dtype=dtype, device="cuda")
    _launch(x, sparse, out, None)
    assert relative_error(out, dense_reference(x, sparse, None)) < TOLERANCE[dtype]
