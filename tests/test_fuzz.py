"""Property-based fuzzing of every format's product, its gradients and ``sddmm`` (issue 15, point 6).

Each case builds a weight (pruned by nmspmm's pruning functions, or compressed from a drawn mask), reads which
entries it keeps from its stored structure with this file's own decoding, and checks the product and the
gradients of x, the kept values and bias against a float64 oracle over the ORIGINAL dense weight times that mask
(``W * mask``), never the format's own ``to_dense``; quantized N:M weights (kind ``nm8``: 8-bit kept values, one
fp32 scale per output feature) against one over their dequantized values at the decoded kept positions, with
gradients for x and bias only. Operands take drawn strides inside NaN-filled storage (a read outside a view
poisons the result), every allocation the library makes is filled with NaN (torch's deterministic mode), and
where a kernel takes an ``out`` it gets a NaN-filled view that must be written exactly.

Two tiers: the reference path (the CPU's default backend) and the Triton kernels (under the CPU interpreter at
small shapes; on a CUDA machine natively, with larger odd shapes). A fixed seed by default, so that a CI failure
replays; ``NMSPMM_FUZZ_SEED=random`` (or a number, to replay) and ``NMSPMM_FUZZ_SCALE`` (a multiplier of the case
counts) for longer runs, the seed printed where the run starts (the README's "Development" section)."""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import nmspmm
from conftest import DEVICE, TOLERANCE, block_mask, relative_error
from nmspmm import BitmapWeight, BlockShuffledWeight, CSRWeight, NMSparseWeight, QuantizedNMWeight
from nmspmm.formats import SUPPORTED_BLOCK_SIDES, SUPPORTED_M, SUPPORTED_VECTORS
from nmspmm.formats.bitmap import BLOCK_INPUTS, WORD_BITS
from nmspmm.formats.quantized import QUANTIZED_DTYPES, QUANTIZED_MAX
from nmspmm.kernels import (
    block_sparse_matmul, choose_vector_config, csr_spmm, nm_element_matmul, nm_grad_input, nm_grad_values,
    nm_vector_matmul, transpose,
)
from nmspmm.kernels.nm_element import ElementProduct, bitmap_matmul, choose_element_config
from nmspmm.kernels.nm_vector import VectorConfig, VectorProduct
from nmspmm.kernels.sddmm import CELL, sddmm_tiled
from nmspmm.kernels.sddmm import sddmm as sddmm_kernel
from nmspmm.ops.backend import input_precision

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Cases per tier and format in a default run (CI), split evenly over the three dtypes: 10,000 on the reference
# path, 1,000 for the kernels; and a few for the quantized N:M weights (nm8, about 6 s on two idle CPU cores). Bitmap
# weights take CSR's share of reference cases and fewer kernel cases: the interpreter runs their cases (K up to
# 301) about 2.5 times slower than CSR's, so that each dtype takes about as long as CSR's (13 s on two CPU cores).
CI_CASES = {
    "reference": {"nm": 4500, "csr": 2500, "bitmap": 2500, "block": 1800, "sddmm": 1200, "nm8": 300},
    "kernels": {"nm": 400, "csr": 250, "bitmap": 100, "block": 200, "sddmm": 150, "nm8": 60},
}
# A quantized weight's product against the float64 one with its dequantized weight (as tests/test_quantized.py
# bounds it): the 8-bit values are exact in every activation dtype.
QUANTIZED_TOLERANCE = {torch.float32: TOLERANCE[torch.float32], torch.float16: TOLERANCE[torch.float16],
                       torch.bfloat16: 1e-2}


def _scale() -> float:
    """``NMSPMM_FUZZ_SCALE``: how many times the default number of cases to run (1 when unset)."""
    text = os.environ.get("NMSPMM_FUZZ_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"NMSPMM_FUZZ_SCALE: expected a positive number, got {text!r}")
    return scale


def _seed() -> int | None:
    """``NMSPMM_FUZZ_SEED``: None when unset (hypothesis derandomized: the same cases every run), a fresh seed for
    ``random``, else the given seed (to replay a run)."""
    text = os.environ.get("NMSPMM_FUZZ_SEED", "")
    if not text:
        return None
    if text == "random":
        return secrets.randbelow(2**32)
    if not text.isdigit():
        raise ValueError(f"NMSPMM_FUZZ_SEED: expected 'random' or a non-negative integer, got {text!r}")
    return int(text)


SCALE = _scale()
SEED = _seed()


@dataclass(frozen=True)
class Tier:
    """Where a tier runs and how large its cases are: ``rows``, ``cols`` bound N and K (block-shuffled weights are
    at least one block), ``tokens`` the tokens of x, ``batch`` each leading dimension of x after the first,
    ``depth`` sddmm's D."""

    name: str
    device: str
    backend: str
    rows: int
    cols: int
    tokens: int
    batch: int
    depth: int
    launchers: bool  # also run the kernels' own launchers with a poisoned out
    few_patterns: bool  # only a few n per m: each pattern compiles its own kernels on a GPU


REFERENCE = Tier("reference", "cpu", "auto", rows=48, cols=96, tokens=40, batch=9, depth=80, launchers=False,
                 few_patterns=False)
if DEVICE == "cuda":
    KERNELS = Tier("kernels", "cuda", "auto", rows=640, cols=1088, tokens=700, batch=40, depth=300, launchers=True,
                   few_patterns=True)
else:
    KERNELS = Tier("kernels", "cpu", "triton", rows=20, cols=64, tokens=17, batch=5, depth=80, launchers=True,
                   few_patterns=False)


@pytest.fixture(scope="module", autouse=True)
def _announce_seed(request: pytest.FixtureRequest) -> None:
    """Print a fresh or given seed where the run starts (outside pytest's capture), so that its failures replay."""
    if SEED is not None:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\nnmspmm fuzz: NMSPMM_FUZZ_SEED={SEED} NMSPMM_FUZZ_SCALE={SCALE:g} (set both to replay this run)")


# ---------------------------------------------------------------------------------------------------------
# What a case is: plain drawn parameters; the test body builds the tensors from them.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a tensor's elements lie: its dimensions ``order``-ed from outermost to innermost in memory, a
    ``steps`` gap between neighbours along each (2 leaves a hole), and the storage ``offset`` of the first."""

    order: tuple[int, ...]
    steps: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class NMSpec:
    """An N:M weight of ``rows`` x ``cols``, magnitude-pruned (``nmspmm.prune``) or from a drawn mask."""

    n: int
    m: int
    vector: int
    rows: int
    cols: int
    pruned: bool


@dataclass(frozen=True)
class CSRSpec:
    """A CSR weight pruned to ``sparsity`` (``prune_csr``), or from a mask keeping each entry with ``1 - sparsity``."""

    rows: int
    cols: int
    sparsity: float
    pruned: bool


@dataclass(frozen=True)
class BitmapSpec:
    """A bitmap weight pruned to ``sparsity`` (``prune_bitmap``), or from a mask keeping each entry with
    ``1 - sparsity`` (none at sparsity 1, which pruning refuses: never ``pruned``)."""

    rows: int
    cols: int
    sparsity: float
    pruned: bool


@dataclass(frozen=True)
class BlockSpec:
    """A block-shuffled weight of ``block_rows`` x ``block_cols`` blocks, pruned (``prune_block_shuffled``, with
    ``iterations`` of search or none) or from a drawn block mask and row permutation."""

    block: tuple[int, int]
    block_rows: int
    block_cols: int
    sparsity: float
    pruned: bool
    iterations: int | None


@dataclass(frozen=True)
class QuantizedSpec:
    """The N:M weight ``nm`` with its kept values quantized (``NMSparseWeight.quantize``) to ``values_dtype``,
    float8_e4m3fn or int8, one fp32 scale per output feature."""

    nm: NMSpec
    values_dtype: torch.dtype


Spec = NMSpec | CSRSpec | BitmapSpec | BlockSpec | QuantizedSpec


@dataclass(frozen=True)
class Product:
    """One product and its gradients: x of ``leading`` dimensions (``[K, M]`` when ``feature_major``), the laid
    out operands (``scales_layout`` for a quantized weight's scales), which gradients are taken, and whether a
    second call follows after the values (and scales) change in place. ``split`` is a bitmap weight's launch
    (``bitmap_matmul``) in the launchers: its split-K and K step."""

    dtype: torch.dtype
    leading: tuple[int, ...]
    feature_major: bool
    x_layout: Layout
    values_layout: Layout
    bias_layout: Layout | None
    grads: tuple[str, ...]
    grad_layout: Layout
    repeat: bool
    distribution: str
    launchers: bool
    out_transposed: bool
    seed: int
    scales_layout: Layout | None = None
    split: tuple[int, int] | None = None


@dataclass(frozen=True)
class LinearCase:
    """A weight and one product with it."""

    spec: Spec
    product: Product


@dataclass(frozen=True)
class SddmmCase:
    """``sddmm(a, b, weight)`` for a CSR weight and ``a`` ``[N, depth]``, ``b`` ``[K, depth]`` of drawn layouts."""

    spec: CSRSpec
    dtype: torch.dtype
    depth: int
    a_layout: Layout
    b_layout: Layout
    launchers: bool
    seed: int


def layouts(dims: int) -> st.SearchStrategy[Layout]:
    """Contiguous (what shrinking goes to), or any order of the dimensions with gaps and an offset."""
    contiguous = Layout(tuple(range(dims)), (1,) * dims, 0)
    strided = st.builds(
        Layout, st.permutations(range(dims)).map(tuple), st.tuples(*[st.sampled_from((1, 2))] * dims),
        st.integers(0, 3),
    )
    return st.one_of(st.just(contiguous), strided)


def sizes(low: int, high: int) -> st.SearchStrategy[int]:
    """A size in ``[low, high]``, its ends often (0 and 1 tokens, one row)."""
    return st.one_of(st.sampled_from((low, min(low + 1, high), high)), st.integers(low, high))


@st.composite
def products(draw: st.DrawFn, tier: Tier, dtype: torch.dtype, values_dims: int, feature_major: bool,
             quantized: bool = False, split: bool = False) -> Product:
    """The activations' side of a case: shapes (no leading dimension, empty and single-token batches), strides,
    bias, gradients and the weight's value distribution. A ``quantized`` weight takes no gradient of its own (x's
    and bias's only) and has its scales laid out too; with ``split``, the launchers' split-K (1 to 4 shares of the
    blocks of 128 inputs) and K step (each that divides a block) are drawn."""
    feature_major = feature_major and draw(st.booleans())
    if feature_major:
        leading: tuple[int, ...] = (draw(sizes(0, tier.tokens)),)
    else:
        # Up to 3 leading dimensions, the first of up to ``tokens``, the others of up to ``batch``, together at
        # most ``tokens``.
        dims, budget = [], tier.tokens
        for _ in range(draw(st.integers(0, 3))):
            size = draw(sizes(0, min(tier.batch, budget) if dims else budget))
            dims.append(size)
            budget //= max(size, 1)
        leading = tuple(dims)
    x_dims = 2 if feature_major else len(leading) + 1
    bias_layout = draw(st.none() | layouts(1))
    weight_grads = () if quantized else ("values",)
    grads = draw(st.lists(st.sampled_from(("x", *weight_grads, "bias") if bias_layout else ("x", *weight_grads)),
                          unique=True))
    return Product(
        dtype=dtype,
        leading=leading,
        feature_major=feature_major,
        x_layout=draw(layouts(x_dims)),
        values_layout=draw(layouts(values_dims)),
        bias_layout=bias_layout,
        grads=tuple(sorted(grads)),
        grad_layout=draw(layouts(x_dims)),
        repeat=not grads and draw(st.booleans()),
        distribution=draw(st.sampled_from(("normal", "integers", "wide"))),
        launchers=tier.launchers and draw(st.booleans()),
        out_transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        scales_layout=draw(layouts(1)) if quantized else None,
        split=(draw(st.integers(1, 4)), draw(st.sampled_from((32, 64, 128)))) if split else None,
    )


def kept_counts(tier: Tier, m: int) -> list[int]:
    """The n of the patterns n:m a tier draws: all of them, or on a GPU five (both storage forms, the ends)."""
    if not tier.few_patterns:
        return list(range(1, m))
    return sorted({1, max(1, m // 4), m // 2, m // 2 + 1, m - 1})


@st.composite
def nm_specs(draw: st.DrawFn, tier: Tier) -> NMSpec:
    """Any supported m and V (V = 1 element-wise), n from :func:`kept_counts`, N a multiple of V, K of m."""
    m = draw(st.sampled_from(SUPPORTED_M))
    n = draw(st.sampled_from(kept_counts(tier, m)))
    vector = draw(st.sampled_from(SUPPORTED_VECTORS))
    rows = draw(sizes(1, tier.rows)) if vector == 1 else vector * draw(sizes(1, max(1, tier.rows // vector)))
    cols = m * draw(sizes(1, max(1, tier.cols // m)))
    return NMSpec(n, m, vector, rows, cols, pruned=draw(st.booleans()))


@st.composite
def nm_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> LinearCase:
    """An N:M weight (:func:`nm_specs`) and a product with it (row-major or feature-major x)."""
    spec = draw(nm_specs(tier))
    return LinearCase(spec, draw(products(tier, dtype, values_dims=2, feature_major=True)))


@st.composite
def nm8_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> LinearCase:
    """An N:M weight (:func:`nm_specs`) quantized to either 8-bit dtype, and a product with it (row-major x only:
    a quantized weight has no feature-major product)."""
    spec = QuantizedSpec(draw(nm_specs(tier)), draw(st.sampled_from(QUANTIZED_DTYPES)))
    return LinearCase(spec, draw(products(tier, dtype, values_dims=2, feature_major=False, quantized=True)))


def csr_specs(tier: Tier) -> st.SearchStrategy[CSRSpec]:
    """Any N and K (odd, one), sparsity from none to nearly all (no kept entry at all in small weights)."""
    sparsity = st.one_of(st.sampled_from((0.0, 0.5, 0.9, 0.99)), st.floats(0.0, 0.999))
    return st.builds(CSRSpec, sizes(1, tier.rows), sizes(1, tier.cols), sparsity, st.booleans())


@st.composite
def csr_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> LinearCase:
    """A CSR weight and a product with it (row-major or feature-major x)."""
    spec = draw(csr_specs(tier))
    return LinearCase(spec, draw(products(tier, dtype, values_dims=1, feature_major=True)))


# A CPU tier's bitmap weights reach K = 301, past two blocks of block_offsets (128 inputs each): the other kinds'
# K stays within one. On a GPU the tier's own K (1088) spans more.
BITMAP_COLS = 2 * BLOCK_INPUTS + 45


@st.composite
def bitmap_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> LinearCase:
    """Any N and K (odd, one, several blocks of 128 inputs), densities from all kept to none (both of the kernel's
    tile expansions: gathered at density >= 0.5, masked below), and a product with it (row-major or
    feature-major x) whose launchers take a drawn split-K and K step."""
    sparsity = draw(st.one_of(st.sampled_from((0.0, 0.5, 0.9, 1.0)), st.floats(0.0, 1.0)))
    pruned = sparsity < 1 and draw(st.booleans())
    spec = BitmapSpec(draw(sizes(1, tier.rows)), draw(sizes(1, max(tier.cols, BITMAP_COLS))), sparsity, pruned)
    return LinearCase(spec, draw(products(tier, dtype, values_dims=1, feature_major=True, split=True)))


@st.composite
def block_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> LinearCase:
    """Any block sides, a few blocks each way, every fraction of blocks pruned (all and none too), searched or
    identity permutations."""
    block = (draw(st.sampled_from(SUPPORTED_BLOCK_SIDES)), draw(st.sampled_from(SUPPORTED_BLOCK_SIDES)))
    block_rows = draw(sizes(1, max(1, 2 * tier.rows // block[0])))
    block_cols = draw(sizes(1, max(1, 2 * tier.cols // block[1])))
    sparsity = draw(st.one_of(st.sampled_from((0.0, 0.5, 1.0)), st.floats(0.0, 1.0)))
    pruned = draw(st.booleans())
    iterations = draw(st.none() | st.integers(0, 3)) if pruned else None
    spec = BlockSpec(block, block_rows, block_cols, sparsity, pruned, iterations)
    return LinearCase(spec, draw(products(tier, dtype, values_dims=3, feature_major=False)))


@st.composite
def sddmm_cases(draw: st.DrawFn, tier: Tier, dtype: torch.dtype) -> SddmmCase:
    """A CSR weight, a reduction depth from 1 (both kernels' ranges), and layouts for a and b."""
    return SddmmCase(
        draw(csr_specs(tier)), dtype, draw(sizes(1, tier.depth)), draw(layouts(2)), draw(layouts(2)),
        tier.launchers and draw(st.booleans()), draw(st.integers(0, 2**32 - 1)),
    )


# ---------------------------------------------------------------------------------------------------------
# Tensors: drawn layouts in NaN-filled storage, poisoned outputs, values.
# ---------------------------------------------------------------------------------------------------------


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation undoing ``order``: ``_inverse(order)[order[i]] == i``."""
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def laid_out(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A view holding ``values`` with ``layout``'s strides, in storage whose other elements are NaN (int8, a
    quantized weight's values: -128, which no quantized weight holds)."""
    storage = [values.shape[dim] * layout.steps[dim] for dim in layout.order]
    poison = math.nan if values.dtype.is_floating_point else torch.iinfo(values.dtype).min
    flat = torch.full((layout.offset + math.prod(storage),), poison, dtype=values.dtype, device=values.device)
    base = flat[layout.offset:].view(storage).permute(_inverse(layout.order))
    return base[tuple(slice(None, None, step) for step in layout.steps)].copy_(values)


def poisoned_out(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A NaN-filled ``out`` view of ``shape`` (its dimensions reversed in memory when ``transposed``) inside storage
    with a margin on every side: ``(out, storage, mask of the storage outside out)``."""
    margin = 2
    order = tuple(reversed(range(len(shape)))) if transposed else tuple(range(len(shape)))
    storage = torch.full([shape[dim] + 2 * margin for dim in order], math.nan, dtype=dtype, device=device)
    region = tuple(slice(margin, margin + shape[dim]) for dim in order)
    outside = torch.ones(storage.shape, dtype=torch.bool, device=device)
    outside[region] = False
    return storage[region].permute(_inverse(order)), storage, outside


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fill every tensor torch allocates uninitialized (``torch.empty``) with NaN (integers with their maximum), so
    that an output element no kernel writes shows; torch does so in its deterministic mode, here warn-only (the
    library's non-deterministic ops still run) with those warnings silenced."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*deterministic", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def sample(shape: tuple[int, ...], distribution: str, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """CPU values of ``shape`` in ``dtype``: normal, small integers (ties and zeros for pruning), or normal values
    scaled by powers of two from 2**-6 to 2**6."""
    if distribution == "integers":
        values = torch.randint(-3, 4, shape, generator=generator).float()
    else:
        values = torch.randn(shape, generator=generator)
        if distribution == "wide":
            values = values * 2.0 ** torch.randint(-6, 7, shape, generator=generator)
    return values.to(dtype)


Expected = tuple[torch.Tensor, torch.Tensor]


def oracle(formula: Callable[..., torch.Tensor], *operands: torch.Tensor) -> Expected:
    """``formula`` (linear in each operand) over float64 operands, and over their absolute values: the scale of its
    rounding errors, since a sum that cancels is computed only to the precision of its terms."""
    return formula(*operands), formula(*(operand.abs() for operand in operands))


def assert_close(name: str, actual: torch.Tensor, expected: Expected, tolerance: float) -> None:
    """``actual`` has the oracle's shape, is finite, and its error's Frobenius norm is below ``tolerance`` times
    the larger of the oracle's norm and its scale's (conftest's relative error, measured against that scale)."""
    value, scale = expected
    assert tuple(actual.shape) == tuple(value.shape), f"{name}: shape {tuple(actual.shape)}, expected " \
                                                      f"{tuple(value.shape)}"
    norm = float(value.norm().clamp_min(1e-30))
    error = relative_error(actual.detach(), value) * norm / max(norm, float(scale.norm()))
    assert error < tolerance, f"{name}: relative error {error:.3g} >= {tolerance:g}"


def assert_out(name: str, out: torch.Tensor, storage: torch.Tensor, outside: torch.Tensor, expected: Expected,
               tolerance: float) -> None:
    """A kernel wrote ``out`` right (no element left NaN) and nothing of its storage outside it."""
    assert_close(name, out, expected, tolerance)
    assert bool(storage[outside].isnan().all()), f"{name}: the kernel wrote outside its out"


# ---------------------------------------------------------------------------------------------------------
# Weights and the oracle's mask, read from each format's stored structure (not its to_dense or mask).
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    """Which entries a weight keeps, decoded here from its stored tensors: the bool ``[N, K]`` ``mask``, and
    ``index``, shaped like the format's ``values``: the row-major position in ``[N, K]`` of each stored value."""

    mask: torch.Tensor
    index: torch.Tensor

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """A dense ``[N, K]`` matrix's entries laid out as the format's ``values``."""
        return dense.reshape(-1)[self.index]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The dense ``[N, K]`` matrix holding ``values`` (laid out as the format's) at the kept entries, zeros
        elsewhere: :meth:`gather`'s inverse."""
        dense = values.new_zeros(self.mask.numel())
        dense[self.index.reshape(-1)] = values.reshape(-1)
        return dense.view(self.mask.shape)

    def to(self, device: str) -> Kept:
        """The same structure on ``device`` (the oracle runs where the tier does)."""
        return Kept(self.mask.to(device), self.index.to(device))


def nm_kept(weight: NMSparseWeight) -> Kept:
    """``offsets`` ``[N / V, K / m, s]`` list the kept positions in each group of m when n <= m - n, else the
    dropped ones; values are each row's kept weights in ascending input order."""
    n, m, vector = weight.n, weight.m, weight.vector
    offsets = weight.offsets.cpu().long()
    groups, runs, stored = offsets.shape
    assert stored == min(n, m - n)
    marks = torch.zeros(groups, runs, m, dtype=torch.bool).scatter_(2, offsets, True)
    assert bool((marks.sum(-1) == stored).all()), "offsets: a position listed twice"
    if n > m - n:
        marks = ~marks
    mask = marks.reshape(groups, runs * m).repeat_interleave(vector, 0)
    return Kept(mask, mask.reshape(-1).nonzero().view(weight.shape[0], -1))


def csr_kept(weight: CSRWeight) -> Kept:
    """Row r keeps the columns ``col_indices[row_offsets[r]:row_offsets[r + 1]]``, ascending, values in that order."""
    rows, cols = weight.shape
    offsets, columns = weight.row_offsets.cpu().long(), weight.col_indices.cpu().long()
    row_of = torch.repeat_interleave(torch.arange(rows), offsets.diff())
    positions = row_of * cols + columns
    assert bool((positions.diff() > 0).all()), "col_indices: not ascending within rows"
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[positions] = True
    return Kept(mask.view(rows, cols), positions)


def bitmap_kept(weight: BitmapWeight) -> Kept:
    """Bit j (least significant first) of int32 word w of row r is set where row r keeps input ``32 * w + j``, and
    none at inputs >= K; values are the kept weights in row-major order; ``block_offsets[r, b]`` is how many values
    lie before row r's first kept input at or after ``128 * b``. Read here with divisions of the words as unsigned
    integers (the format decodes them with shifts)."""
    rows, cols = weight.shape
    words = weight.bitmap.cpu().long() % 2**32
    assert words.shape == (rows, -(-cols // WORD_BITS)), "bitmap: not [N, ceil(K / 32)]"
    bits = (words[:, :, None] // 2 ** torch.arange(WORD_BITS)) % 2
    bits = bits.reshape(rows, -1).bool()
    assert not bool(bits[:, cols:].any()), "bitmap: a bit set at an input >= K"
    mask = bits[:, :cols]
    flat = mask.reshape(-1)
    assert weight.values.shape == (int(flat.sum()),), "values: not one per bit set"
    before = flat.long().cumsum(0) - flat.long()  # the values before each entry, row-major
    starts = (torch.arange(rows) * cols)[:, None] + torch.arange(0, cols, BLOCK_INPUTS)
    assert torch.equal(weight.block_offsets.cpu().long(), before[starts]), "block_offsets: not where blocks start"
    return Kept(mask, flat.nonzero().view(-1))


def block_kept(weight: BlockShuffledWeight) -> Kept:
    """Block-row r of ``W[row_permutation]`` keeps the blocks ``block_columns[offsets[r]:offsets[r + 1]]``; values
    are those blocks in storage order."""
    (bn, bk), (rows, cols) = weight.block, weight.shape
    block_rows, block_cols = rows // bn, cols // bk
    offsets, columns = weight.block_row_offsets.cpu().long(), weight.block_columns.cpu().long()
    permutation = weight.row_permutation.cpu().long()
    row_of = torch.repeat_interleave(torch.arange(block_rows), offsets.diff())
    blocks = torch.zeros(block_rows, block_cols, dtype=torch.bool)
    blocks[row_of, columns] = True
    assert int(blocks.sum()) == columns.numel(), "block_columns: a block listed twice"
    mask = torch.empty(rows, cols, dtype=torch.bool)
    mask[permutation] = blocks.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    # Value [b, i, j] of block b (block-row r, block-column c) is W[permutation[r * bn + i], c * bk + j].
    weight_rows = permutation.view(block_rows, bn)[row_of]
    index = weight_rows[:, :, None] * cols + (columns * bk)[:, None, None] + torch.arange(bk)
    return Kept(mask, index)


def _at_least(low: torch.Tensor, high: torch.Tensor) -> bool:
    """``low >= high`` everywhere, up to float64 rounding of sums taken in another order."""
    return bool((low >= high - 1e-9 * high.abs()).all())


def build_nm(spec: NMSpec, dense: torch.Tensor, generator: torch.Generator) -> tuple[NMSparseWeight, Kept]:
    """The weight and its decoded structure, after checking it against the drawn mask or magnitude pruning."""
    pattern, groups, runs = f"{spec.n}:{spec.m}", spec.rows // spec.vector, spec.cols // spec.m
    if spec.pruned:
        weight = nmspmm.prune(dense, pattern, spec.vector)
    else:
        order = torch.rand(groups, runs, spec.m, generator=generator).argsort(-1)
        marks = torch.zeros(groups, runs, spec.m, dtype=torch.bool).scatter_(-1, order[..., : spec.n], True)
        drawn = marks.view(groups, -1).repeat_interleave(spec.vector, 0)
        weight = NMSparseWeight.from_dense(dense, drawn.to(dense.device), pattern, spec.vector)
    kept = nm_kept(weight)
    if spec.pruned:
        # Per V-group and group of m, no dropped input has a larger summed |w| than a kept one.
        scores = dense.cpu().double().abs().view(groups, spec.vector, spec.cols).sum(1).view(groups, runs, spec.m)
        marks = kept.mask[:: spec.vector].view(groups, runs, spec.m)
        low = torch.where(marks, scores, math.inf).amin(-1)
        high = torch.where(marks, -math.inf, scores).amax(-1)
        assert _at_least(low, high), "prune: a dropped input outweighs a kept one"
    else:
        assert torch.equal(kept.mask, drawn), "from_dense: the stored structure is not the mask"
    return weight, kept


def build_csr(spec: CSRSpec, dense: torch.Tensor, generator: torch.Generator) -> tuple[CSRWeight, Kept]:
    """The weight and its decoded structure, after checking it against the drawn mask or the pruning rule (the
    ``round((1 - sparsity) * N * K)`` largest |w|)."""
    return _build_unstructured(spec, dense, generator, CSRWeight, nmspmm.prune.prune_csr, csr_kept)


def build_bitmap(spec: BitmapSpec, dense: torch.Tensor, generator: torch.Generator) -> tuple[BitmapWeight, Kept]:
    """:func:`build_csr` for a bitmap weight (``prune_bitmap`` keeps the entries ``prune_csr`` keeps)."""
    return _build_unstructured(spec, dense, generator, BitmapWeight, nmspmm.prune.prune_bitmap, bitmap_kept)


def _build_unstructured(
    spec: CSRSpec | BitmapSpec, dense: torch.Tensor, generator: torch.Generator, weight_type: type,
    prune: Callable[[torch.Tensor, float], object], decode: Callable[[object], Kept],
) -> tuple[object, Kept]:
    """An unstructured weight of ``weight_type`` (pruned by ``prune``, or from the drawn mask) and its structure
    as ``decode`` reads it, checked against the mask or the pruning rule."""
    if spec.pruned:
        weight = prune(dense, spec.sparsity)
    else:
        drawn = torch.rand(spec.rows, spec.cols, generator=generator) >= spec.sparsity
        weight = weight_type.from_dense(dense, drawn.to(dense.device))
    assert type(weight) is weight_type, f"{weight_type.__name__}: built a {type(weight).__name__}"
    kept = decode(weight)
    if spec.pruned:
        name = prune.__name__
        assert weight.nnz == round((1 - spec.sparsity) * spec.rows * spec.cols), f"{name}: kept count"
        magnitudes = dense.cpu().double().abs()
        if 0 < weight.nnz < magnitudes.numel():
            assert _at_least(magnitudes[kept.mask].min(), magnitudes[~kept.mask].max()), f"{name}: not the largest"
    else:
        assert torch.equal(kept.mask, drawn), "from_dense: the stored structure is not the mask"
    return weight, kept


def build_block(spec: BlockSpec, dense: torch.Tensor, generator: torch.Generator) -> tuple[BlockShuffledWeight, Kept]:
    """The weight and its decoded structure, after checking it against the drawn mask and permutation or the
    pruning rule (the largest tiles of ``W[perm]``, a searched ``perm`` never keeping less than the identity)."""
    (bn, bk), rows, cols = spec.block, spec.block_rows * spec.block[0], spec.block_cols * spec.block[1]
    if spec.pruned:
        search = spec.iterations is not None
        weight = nmspmm.prune.prune_block_shuffled(dense, spec.sparsity, spec.block, search=search,
                                                   iterations=spec.iterations)
    else:
        permutation = torch.randperm(rows, generator=generator)
        blocks = block_mask(rows, cols, spec.block, 1 - spec.sparsity, generator)
        drawn = torch.empty(rows, cols, dtype=torch.bool)
        drawn[permutation] = blocks.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        weight = BlockShuffledWeight.from_dense(dense, drawn.to(dense.device), spec.block,
                                                permutation.to(dense.device))
    kept = block_kept(weight)
    if spec.pruned:
        keep = round((1 - spec.sparsity) * spec.block_rows * spec.block_cols)
        assert weight.block_count == keep, "prune_block_shuffled: kept block count"
        magnitudes = dense.cpu().double().abs()
        permutation = weight.row_permutation.cpu().long()
        if spec.iterations is None:
            assert torch.equal(permutation, torch.arange(rows)), "prune_block_shuffled: a permutation without search"
        tiles = magnitudes[permutation].view(spec.block_rows, bn, spec.block_cols, bk).sum((1, 3))
        chosen = kept.mask[permutation].view(spec.block_rows, bn, spec.block_cols, bk)[:, 0, :, 0]
        if 0 < keep < tiles.numel():
            assert _at_least(tiles[chosen].min(), tiles[~chosen].max()), "prune_block_shuffled: not the largest"
        identity = magnitudes.view(spec.block_rows, bn, spec.block_cols, bk).sum((1, 3)).flatten()
        assert _at_least(tiles[chosen].sum(), identity.topk(keep).values.sum()), "search: worse than the identity"
    else:
        assert torch.equal(kept.mask, drawn), "from_dense: the stored structure is not the mask"
    return weight, kept


def build_nm8(spec: QuantizedSpec, dense: torch.Tensor, generator: torch.Generator) -> tuple[QuantizedNMWeight, Kept]:
    """The N:M weight :func:`build_nm` makes and checks, quantized, and its structure decoded from the quantized
    weight's own offsets, after checking the quantization: each row's scale its largest kept magnitude over the
    8-bit dtype's (1 for a row of zeros), each value the kept weight over its row's scale, rounded (int8: to the
    nearest integer, never -128; float8_e4m3fn: to the nearest of 3 mantissa bits, 2**-9 apart below 2**-6)."""
    source, source_kept = build_nm(spec.nm, dense, generator)
    weight = source.quantize(spec.values_dtype)
    assert type(weight) is QuantizedNMWeight and weight.values_dtype == spec.values_dtype, "quantize: type or dtype"
    assert weight.dtype == dense.dtype and weight.scales.dtype == torch.float32, "quantize: products' or scales' dtype"
    kept = nm_kept(weight)
    assert torch.equal(kept.index, source_kept.index), "quantize: the structure changed"
    original = kept.to(dense.device).gather(dense).float()  # the kept weights, in fp32 as quantize computes
    peak = QUANTIZED_MAX[spec.values_dtype]
    largest = original.abs().amax(1) if original.shape[1] else original.new_zeros(original.shape[0])
    assert torch.equal(weight.scales, torch.where(largest > 0, largest / peak, 1.0)), "quantize: scales"
    quantized, target = weight.values.double(), original.double() / weight.scales.double()[:, None]
    if spec.values_dtype == torch.int8:
        assert not bool((weight.values == -128).any()), "quantize: int8 -128"
        step = torch.ones_like(target)
    else:
        step = 2.0 ** (target.abs().clamp_min(2.0**-6).log2().floor() - 3)
    assert bool((quantized.abs() <= peak).all()), "quantize: a value beyond the dtype's largest"
    # Half a step, and the rounding of quantize's fp32 division.
    assert bool(((quantized - target).abs() <= step / 2 + 1e-6 * peak).all()), "quantize: a value not rounded"
    return weight, kept


def spec_shape(spec: Spec) -> tuple[int, int]:
    """``(N, K)`` of a drawn weight."""
    if isinstance(spec, BlockSpec):
        return spec.block_rows * spec.block[0], spec.block_cols * spec.block[1]
    if isinstance(spec, QuantizedSpec):
        return spec.nm.rows, spec.nm.cols
    return spec.rows, spec.cols


BUILDERS: dict[type, Callable[..., tuple[object, Kept]]] = {
    NMSpec: build_nm, CSRSpec: build_csr, BitmapSpec: build_bitmap, BlockSpec: build_block, QuantizedSpec: build_nm8,
}


# ---------------------------------------------------------------------------------------------------------
# The properties.
# ---------------------------------------------------------------------------------------------------------


def check_linear(case: LinearCase, tier: Tier) -> None:
    """``nmspmm.linear`` (or ``linear_feature_major``) and its gradients against ``x @ (W * mask).T + b`` in
    float64 (a quantized weight: ``x @ W8.T + b``, ``W8`` its dequantized values at the kept positions, and no
    gradient for its values or scales); inputs unchanged; a second call after the values change in place sees
    them; and, where drawn, the format's kernel launchers with poisoned ``out``."""
    product, spec = case.product, case.spec
    quantized = isinstance(spec, QuantizedSpec)
    dtype, device = product.dtype, tier.device
    tolerance = QUANTIZED_TOLERANCE[dtype] if quantized else TOLERANCE[dtype]
    generator = torch.Generator().manual_seed(product.seed)
    rows, cols = spec_shape(spec)
    dense = sample((rows, cols), product.distribution, generator, dtype).to(device)
    built, kept = BUILDERS[type(spec)](spec, dense, generator)
    kept = kept.to(device)
    if quantized:
        # The oracle's weight: values * scales per row in float64, at the positions decoded from the offsets.
        masked = kept.scatter(built.values.double() * built.scales.double()[:, None])
    else:
        assert torch.equal(built.values, kept.gather(dense)), "values: not the dense weight's kept entries"
        masked = dense.double() * kept.mask  # the oracle's weight: W * mask, float64 on the tier's device

    values = laid_out(built.values, product.values_layout).requires_grad_("values" in product.grads)
    tensors = {**built.state_tensors(), "values": values}
    if quantized:
        tensors["scales"] = laid_out(built.scales, product.scales_layout)
    weight = type(built).from_state(tensors, built.state_fields())
    x_shape = (cols, *product.leading) if product.feature_major else (*product.leading, cols)
    x = laid_out(sample(x_shape, "normal", generator, dtype).to(device), product.x_layout)
    x.requires_grad_("x" in product.grads)
    bias = None
    if product.bias_layout is not None:
        bias = laid_out(sample((rows,), "normal", generator, dtype).to(device), product.bias_layout)
        bias.requires_grad_("bias" in product.grads)
    bias64 = torch.zeros(rows, dtype=torch.float64, device=device) if bias is None else bias.detach().double()
    inputs = [t for t in (x, values, weight.scales if quantized else None, bias) if t is not None]
    before = [t.detach().clone() for t in inputs]

    def call(x: torch.Tensor) -> torch.Tensor:
        if product.feature_major:
            return nmspmm.linear_feature_major(x, weight, bias, backend=tier.backend)
        return nmspmm.linear(x, weight, bias, backend=tier.backend)

    def token_rows(x: torch.Tensor) -> torch.Tensor:
        """x as float64 ``[M, K]`` rows."""
        x = x.detach().double()
        return x.t() if product.feature_major else x.reshape(-1, cols)

    def output(x_rows: torch.Tensor, masked: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = x_rows @ masked.t() + bias
        return y.t() if product.feature_major else y.view(*product.leading, rows)

    with torch.set_grad_enabled(bool(product.grads)):
        y = call(x)
    assert y.dtype == dtype and y.device == x.device and y.is_contiguous(), "y: dtype, device or layout"
    x_rows = token_rows(x)
    assert_close("y", y, oracle(output, x_rows, masked, bias64), tolerance)
    grad_rows = None
    if product.grads:
        grad_y = laid_out(sample(tuple(y.shape), "normal", generator, dtype).to(device), product.grad_layout)
        y.backward(grad_y)
        grad_rows = grad_y.double()
        grad_rows = grad_rows.t() if product.feature_major else grad_rows.reshape(-1, rows)
        if "x" in product.grads:
            def grad_x(grad_rows: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
                grad = grad_rows @ masked
                return grad.t() if product.feature_major else grad.view(x.shape)

            assert_close("x.grad", x.grad, oracle(grad_x, grad_rows, masked), tolerance)
        if "values" in product.grads:
            expected = oracle(lambda g, x: kept.gather(g.t() @ x), grad_rows, x_rows)
            assert_close("values.grad", values.grad, expected, tolerance)
        if "bias" in product.grads:
            assert_close("bias.grad", bias.grad, oracle(lambda g: g.sum(0), grad_rows), tolerance)
        if quantized:
            assert weight.values.grad is None and weight.scales.grad is None, "a quantized weight got a gradient"
            assert not (weight.values.requires_grad or weight.scales.requires_grad), "values or scales require grad"
    assert all(same_bits(a, b) for a, b in zip(before, inputs)), "an input changed"
    if product.repeat:
        # Every value negated (and a quantized weight's scales doubled), in place: no kept plan may hold a copy.
        factor = -2.0 if quantized else -1.0
        with torch.no_grad():
            negate(weight.values)
            if quantized:
                weight.scales.mul_(2)
            again = laid_out(sample(x_shape, "normal", generator, dtype).to(device), product.x_layout)
            expected = oracle(output, token_rows(again), factor * masked, bias64)
            assert_close("y after values.neg_()", call(again), expected, tolerance)
            negate(weight.values)
            if quantized:
                weight.scales.div_(2)
    if product.launchers:
        forward = oracle(lambda x, w, b: x @ w.t() + b, x_rows, masked, bias64)
        LAUNCHERS[type(spec)](weight, x_rows, bias, grad_rows, product, masked, kept, forward, tier)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes (torch.equal has no float8 kernel on the CPU)."""

    def raw(tensor: torch.Tensor) -> torch.Tensor:  # (a copy with unit strides: contiguous() may keep a size-1 one)
        return tensor.detach().clone(memory_format=torch.contiguous_format).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def negate(values: torch.Tensor) -> None:
    """``values.neg_()``, for float8 too (torch has no float8 neg on the CPU: its sign bit flipped)."""
    if values.dtype == torch.float8_e4m3fn:
        values.view(torch.uint8).bitwise_xor_(0x80)
    else:
        values.neg_()


def launch_nm(
    weight: NMSparseWeight, x_rows: torch.Tensor, bias: torch.Tensor | None, grad_rows: torch.Tensor | None,
    product: Product, masked: torch.Tensor, kept: Kept, forward: Expected, tier: Tier,
) -> None:
    """The N:M launchers (the transpose and the product, and the gradient kernels where a gradient was taken)
    into poisoned outs."""
    dtype, tolerance, transposed = product.dtype, TOLERANCE[product.dtype], product.out_transposed
    values, offsets = weight.values.detach().contiguous(), weight.kept_offsets()
    bias = None if bias is None else bias.detach().contiguous()
    (rows, cols), tokens, kept_count = weight.shape, x_rows.shape[0], weight.values.shape[1]
    n, m, vector, precision = weight.n, weight.m, weight.vector, input_precision(dtype)
    x = x_rows.to(dtype).to(tier.device)
    xt, storage, outside = poisoned_out((cols, tokens), dtype, tier.device, False)
    transpose(x, xt)  # the copy that feeds the product, into a poisoned out too
    assert torch.equal(xt, x.t()) and bool(storage[outside].isnan().all()), "transpose: not x.T, or wrote outside"
    xt = xt.contiguous()
    out, storage, outside = poisoned_out((tokens, rows), dtype, tier.device, transposed)
    if vector == 1:
        nm_element_matmul(xt, values, offsets, n, m, out, bias, input_precision=precision)
    else:
        config = choose_vector_config(tokens, rows, kept_count, vector, dtype, values.device)
        nm_vector_matmul(xt, values, offsets, n, m, vector, out, config, bias, precision)
    assert_out("nm launcher y", out, storage, outside, forward, tolerance)
    if grad_rows is None:
        return
    grad_y = grad_rows.to(dtype).to(tier.device)
    out, storage, outside = poisoned_out((tokens, cols), dtype, tier.device, transposed)
    nm_grad_input(grad_y, values, offsets, n, m, vector, cols, out, input_precision=precision)
    assert_out("nm launcher grad x", out, storage, outside, oracle(torch.matmul, grad_rows, masked), tolerance)
    out, storage, outside = poisoned_out((rows, kept_count), dtype, tier.device, transposed)
    nm_grad_values(xt, grad_y, offsets, n, m, vector, out, input_precision=precision)
    expected = oracle(lambda g, x: kept.gather(g.t() @ x), grad_rows, x_rows)
    assert_out("nm launcher grad values", out, storage, outside, expected, tolerance)


def launch_csr(
    weight: CSRWeight, x_rows: torch.Tensor, bias: torch.Tensor | None, grad_rows: torch.Tensor | None,
    product: Product, masked: torch.Tensor, kept: Kept, forward: Expected, tier: Tier,
) -> None:
    """The CSR SpMM launcher into a poisoned out."""
    dtype, transposed = product.dtype, product.out_transposed
    bias = None if bias is None else bias.detach().contiguous()
    xt = x_rows.t().to(dtype).to(tier.device).contiguous()
    out, storage, outside = poisoned_out((x_rows.shape[0], weight.shape[0]), dtype, tier.device, transposed)
    csr_spmm(xt, weight.values.detach(), weight.col_indices, weight.row_offsets, weight.row_order(), out, bias)
    assert_out("csr launcher y", out, storage, outside, forward, TOLERANCE[dtype])


def launch_bitmap(
    weight: BitmapWeight, x_rows: torch.Tensor, bias: torch.Tensor | None, grad_rows: torch.Tensor | None,
    product: Product, masked: torch.Tensor, kept: Kept, forward: Expected, tier: Tier,
) -> None:
    """``bitmap_matmul`` (the element-wise kernel's unstructured path) with the drawn split-K and K step into a
    poisoned out, x read as contiguous ``[K, M]`` (feature-major cases) or as the transposed view of row-major x;
    and where a gradient was taken the same kernel over the transposed structure (the input gradient, as the
    backward runs it) into another. On a GPU the K step stays within the default config's (shared memory)."""
    dtype, tolerance, transposed = product.dtype, TOLERANCE[product.dtype], product.out_transposed
    split_k, block_k = product.split
    values = weight.values.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    (rows, cols), tokens, precision = weight.shape, x_rows.shape[0], input_precision(dtype)

    def config(tokens: int, rows: int, cols: int) -> VectorConfig:
        base = choose_element_config(tokens, rows, cols, WORD_BITS, dtype, values.device)
        step = block_k if tier.device == "cpu" else min(block_k, base.block_k)
        return replace(base, block_k=step, split_k=split_k)

    x = x_rows.to(dtype).to(tier.device)
    xt = x.t().contiguous() if product.feature_major else x.t()
    out, storage, outside = poisoned_out((tokens, rows), dtype, tier.device, transposed)
    bitmap_matmul(xt, values, weight.bitmap, weight.block_offsets, out, bias, config(tokens, rows, cols), precision)
    assert_out("bitmap launcher y", out, storage, outside, forward, tolerance)
    if grad_rows is None:
        return
    bitmap_t, offsets_t, permutation = weight.transposed_structure()
    grad_y = grad_rows.to(dtype).to(tier.device)
    out, storage, outside = poisoned_out((tokens, cols), dtype, tier.device, transposed)
    bitmap_matmul(grad_y.t(), values[permutation], bitmap_t, offsets_t, out, None, config(tokens, cols, rows),
                  precision)
    assert_out("bitmap launcher grad x", out, storage, outside, oracle(torch.matmul, grad_rows, masked), tolerance)


def launch_block(
    weight: BlockShuffledWeight, x_rows: torch.Tensor, bias: torch.Tensor | None, grad_rows: torch.Tensor | None,
    product: Product, masked: torch.Tensor, kept: Kept, forward: Expected, tier: Tier,
) -> None:
    """The block-sparse launcher into a poisoned out."""
    dtype, transposed = product.dtype, product.out_transposed
    bias = None if bias is None else bias.detach().contiguous()
    x = x_rows.to(dtype).to(tier.device)
    out, storage, outside = poisoned_out((x_rows.shape[0], weight.shape[0]), dtype, tier.device, transposed)
    block_sparse_matmul(
        x, weight.values.detach().contiguous(), weight.block_columns, weight.block_row_offsets,
        weight.block_row_order, weight.row_permutation, out, bias, input_precision(dtype),
    )
    assert_out("block launcher y", out, storage, outside, forward, TOLERANCE[dtype])


def launch_nm8(
    weight: QuantizedNMWeight, x_rows: torch.Tensor, bias: torch.Tensor | None, grad_rows: torch.Tensor | None,
    product: Product, masked: torch.Tensor, kept: Kept, forward: Expected, tier: Tier,
) -> None:
    """The quantized product's launch (the element-wise kernel at V=1, else the vector-wise one, with the scales)
    into a poisoned out, and where a gradient was taken the activations' gradient kernel over the dequantized
    values in the activations' dtype (as the backward runs it)."""
    dtype, tolerance, transposed = product.dtype, QUANTIZED_TOLERANCE[product.dtype], product.out_transposed
    values, offsets, scales = weight.values.contiguous(), weight.kept_offsets(), weight.scales.contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    (rows, cols), tokens, kept_count = weight.shape, x_rows.shape[0], weight.values.shape[1]
    n, m, vector, precision = weight.n, weight.m, weight.vector, input_precision(dtype)
    xt = x_rows.t().to(dtype).to(tier.device).contiguous()
    out, storage, outside = poisoned_out((tokens, rows), dtype, tier.device, transposed)
    if vector == 1:
        config = choose_element_config(tokens, rows, cols, m, dtype, values.device)
        launch = ElementProduct(tuple(xt.shape), xt.stride(), out.stride(), values, offsets, n, m, config, bias,
                                precision, scales, dtype)
    else:
        config = choose_vector_config(tokens, rows, kept_count, vector, dtype, values.device, eight_bit=True)
        launch = VectorProduct(tuple(xt.shape), xt.stride(), out.stride(), values, offsets, n, m, vector, config,
                               bias, precision, scales, dtype)
    launch(xt, out)
    assert_out("nm8 launcher y", out, storage, outside, forward, tolerance)
    if grad_rows is None:
        return
    grad_y = grad_rows.to(dtype).to(tier.device)
    out, storage, outside = poisoned_out((tokens, cols), dtype, tier.device, transposed)
    nm_grad_input(grad_y, weight.dequantized_values().contiguous(), offsets, n, m, vector, cols, out,
                  input_precision=precision)
    assert_out("nm8 launcher grad x", out, storage, outside, oracle(torch.matmul, grad_rows, masked), tolerance)


LAUNCHERS: dict[type, Callable[..., None]] = {
    NMSpec: launch_nm, CSRSpec: launch_csr, BitmapSpec: launch_bitmap, BlockSpec: launch_block,
    QuantizedSpec: launch_nm8,
}


def check_sddmm(case: SddmmCase, tier: Tier) -> None:
    """``nmspmm.sddmm`` against ``(a @ b.T)`` at the kept entries in float64, and, where drawn, both SDDMM kernels
    into poisoned outs."""
    dtype, tolerance, spec = case.dtype, TOLERANCE[case.dtype], case.spec
    generator = torch.Generator().manual_seed(case.seed)
    dense = sample((spec.rows, spec.cols), "normal", generator, dtype).to(tier.device)
    weight, kept = build_csr(spec, dense, generator)
    kept = kept.to(tier.device)
    a = laid_out(sample((spec.rows, case.depth), "normal", generator, dtype).to(tier.device), case.a_layout)
    b = laid_out(sample((spec.cols, case.depth), "normal", generator, dtype).to(tier.device), case.b_layout)
    before = (a.clone(), b.clone())
    sampled = nmspmm.sddmm(a, b, weight, backend=tier.backend)
    expected = oracle(lambda a, b: kept.gather(a @ b.t()), a.double(), b.double())
    assert isinstance(sampled, CSRWeight) and sampled.values.dtype == dtype, "sddmm: format or dtype"
    assert torch.equal(sampled.col_indices, weight.col_indices) and torch.equal(sampled.row_offsets, weight.row_offsets)
    assert_close("sddmm", sampled.values, expected, tolerance)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]), "an input changed"
    if case.launchers:
        # Unit stride along D, as the kernels take their operands (a size-1 D included).
        a, b = a.new_empty(a.shape).copy_(a), b.new_empty(b.shape).copy_(b)
        out, storage, outside = poisoned_out((weight.nnz,), dtype, tier.device, False)
        sddmm_kernel(a, b, weight.row_indices(), weight.col_indices, out)
        assert_out("sddmm kernel", out, storage, outside, expected, tolerance)
        out, storage, outside = poisoned_out((weight.nnz,), dtype, tier.device, False)
        sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, out, input_precision(dtype))
        assert_out("sddmm tiled kernel", out, storage, outside, expected, tolerance)


STRATEGIES: dict[str, Callable[[Tier, torch.dtype], st.SearchStrategy]] = {
    "nm": nm_cases, "csr": csr_cases, "bitmap": bitmap_cases, "block": block_cases, "sddmm": sddmm_cases,
    "nm8": nm8_cases,
}


def fuzz(kind: str, tier: Tier, dtype: torch.dtype, cases: int, fresh: bool = True) -> int:
    """Check ``cases`` drawn cases of ``kind`` on ``tier`` (with the run's seed when ``fresh``, else derandomized)
    inside :func:`poisoned_allocations`; return how many ran (hypothesis re-raises a failure, shrunk)."""
    check = check_sddmm if kind == "sddmm" else check_linear
    ran = 0

    def run(case: LinearCase | SddmmCase) -> None:
        nonlocal ran
        ran += 1
        with poisoned_allocations():
            check(case, tier)

    seeded = fresh and SEED is not None
    configured = settings(
        max_examples=cases, deadline=None, database=None, derandomize=not seeded, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    test = configured(given(STRATEGIES[kind](tier, dtype))(run))
    if seeded:
        test = seed(SEED)(test)
    test()
    return ran


def _cases(tier: Tier, kind: str) -> int:
    """Cases per dtype for ``kind`` on ``tier``: its share of the default count, times ``NMSPMM_FUZZ_SCALE``."""
    return math.ceil(CI_CASES[tier.name][kind] * SCALE / len(DTYPES))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", STRATEGIES)
def test_reference_path(kind: str, dtype: torch.dtype) -> None:
    """The dense reference (the CPU's default backend), all of its drawn cases run."""
    cases = _cases(REFERENCE, kind)
    assert fuzz(kind, REFERENCE, dtype, cases) >= cases


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", STRATEGIES)
def test_kernels(kind: str, dtype: torch.dtype) -> None:
    """The Triton kernels (interpreted on the CPU, native on CUDA) through the API and their launchers."""
    cases = _cases(KERNELS, kind)
    assert fuzz(kind, KERNELS, dtype, cases) >= cases


# ---------------------------------------------------------------------------------------------------------
# The suite catches planted bugs: each makes the reference path silently wrong in a way some cases show.
# ---------------------------------------------------------------------------------------------------------


def _plant_nm_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """An off-by-one: the reference densifies the last kept position of every row one feature too far right."""
    original = nmspmm.ops.nm.dense_from_kept

    def shifted(values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
        kept_offsets = kept_offsets.clone()
        last = kept_offsets[:, -1]
        kept_offsets[:, -1] = torch.where(last < m - 1, last + 1, last)
        return original(values, kept_offsets, n, m, vector)

    monkeypatch.setattr(nmspmm.ops.nm, "dense_from_kept", shifted)


def _plant_csr_column(monkeypatch: pytest.MonkeyPatch) -> None:
    """One corrupted column index: the reference reads the last nonzero one column right (mod K)."""
    original = nmspmm.ops.csr.dense_from_csr

    def corrupted(values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor,
                  shape: tuple[int, int]) -> torch.Tensor:
        col_indices = col_indices.clone()
        if col_indices.numel():
            col_indices[-1] = (col_indices[-1] + 1) % shape[1]
        return original(values, row_indices, col_indices, shape)

    monkeypatch.setattr(nmspmm.ops.csr, "dense_from_csr", corrupted)


def _plant_bitmap_sign_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sign slip: the reference decodes bit 31 of every bitmap word (int32's sign bit) as clear, so that it drops
    each kept input at 31 mod 32 and places the values after it one kept entry early."""
    original = nmspmm.ops.bitmap.dense_from_bitmap

    def cleared(values: torch.Tensor, bitmap: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return original(values, bitmap & 0x7FFFFFFF, shape)

    monkeypatch.setattr(nmspmm.ops.bitmap, "dense_from_bitmap", cleared)


def _plant_block_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The permutation for its inverse: right for the identity (and any involution), wrong after a real search."""
    monkeypatch.setattr(nmspmm.ops.block_shuffled, "inverse_permutation", lambda permutation: permutation.long())


def _plant_nm8_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """One scale off by a factor: the quantized reference dequantizes its last output feature at twice its scale."""
    original = nmspmm.ops.nm._reference

    def rescaled(rows_in: torch.Tensor, values: torch.Tensor, *structure: object) -> torch.Tensor:
        if values.dtype == torch.float32:  # the dequantized values (``values * scales[:, None]``) of an nm8 case
            values = torch.cat([values[:-1], 2 * values[-1:]])
        return original(rows_in, values, *structure)

    monkeypatch.setattr(nmspmm.ops.nm, "_reference", rescaled)


@pytest.mark.parametrize(
    ("kind", "plant"),
    [("nm", _plant_nm_offset), ("csr", _plant_csr_column), ("bitmap", _plant_bitmap_sign_bit),
     ("block", _plant_block_permutation), ("nm8", _plant_nm8_scale)],
    ids=["nm-offset-off-by-one", "csr-column-corrupted", "bitmap-bit-31-dropped", "block-permutation-not-inverted",
         "nm8-scale-doubled"],
)
def test_the_fuzzing_finds_a_planted_bug(kind: str, plant: Callable[[pytest.MonkeyPatch], None],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Derandomized, so that the demonstration is the same every run; a wrong product is what must be found."""
    plant(monkeypatch)
    with pytest.raises(AssertionError, match=r"relative error"):
        fuzz(kind, REFERENCE, torch.float32, 300, fresh=False)


# ---------------------------------------------------------------------------------------------------------
# Cases the fuzzing found, kept as plain tests.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [0, 3])
def test_a_feature_major_csr_product_without_work_fills_the_bias_per_output(tokens: int) -> None:
    """Found by test_kernels[csr-*]: with no nonzeros (or no tokens) the kept plan's fill wrote the bias along the
    wrong axis of the feature-major ``[N, M]`` result (silently wrong at M == N) or failed to broadcast it."""
    weight = CSRWeight.from_dense(torch.randn(3, 4, device=DEVICE), torch.zeros(3, 4, dtype=torch.bool, device=DEVICE))
    bias = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    y_t = nmspmm.linear_feature_major(torch.randn(4, tokens, device=DEVICE), weight, bias, backend=KERNELS.backend)
    assert torch.equal(y_t, bias[:, None].expand(3, tokens))


def test_strided_values_and_bias_reach_the_bitmap_kernel() -> None:
    """Strided values and bias reach the bitmap kernel as the elements they view (found by test_kernels[bitmap-*]:
    the product read them as contiguous, so that it took the NaN-filled storage between them)."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 150, generator=generator) < 0.6
    weight = BitmapWeight.from_dense(torch.randn(5, 150, generator=generator), mask).to(DEVICE)
    values = laid_out(weight.values, Layout((0,), (2,), 1))  # every other element of NaN-filled storage
    strided = BitmapWeight(values, weight.bitmap, weight.block_offsets, weight.shape)
    bias = torch.randn(5, generator=generator).to(DEVICE)
    x = torch.randn(7, 150, generator=generator).to(DEVICE)
    expected = x.double() @ weight.to_dense().double().t()
    y = nmspmm.linear(x, strided, backend=KERNELS.backend)
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    y = nmspmm.linear(x, weight, laid_out(bias, Layout((0,), (2,), 1)), backend=KERNELS.backend)
    assert relative_error(y, expected + bias.double()) < TOLERANCE[torch.float32]


def test_strided_scales_reach_the_quantized_kernels() -> None:
    """Strided scales reach the kernels as the values they view (found by test_kernels[nm8-*]: the products read
    them as contiguous)."""
    generator = torch.Generator().manual_seed(0)
    weight = nmspmm.prune(torch.randn(32, 64, generator=generator), "2:4", 16).quantize(torch.int8).to(DEVICE)
    scales = laid_out(weight.scales, Layout((0,), (2,), 1))  # every other element of NaN-filled storage
    strided = QuantizedNMWeight(weight.values, weight.offsets, scales, "2:4", 16, weight.shape, weight.dtype)
    x = torch.randn(5, 64, generator=generator).to(DEVICE)
    expected = x.double() @ weight.to_dense().double().t()
    assert relative_error(nmspmm.linear(x, strided, backend=KERNELS.backend), expected) < TOLERANCE[torch.float32]
