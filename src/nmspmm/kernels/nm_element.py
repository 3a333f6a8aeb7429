"""Element-wise N:M product (V = 1) on tensor cores: every output feature keeps its own n of each m inputs, so
no two features share a gather. The kernel loads the compressed weight tile (the kept values and a bitmap of
which inputs each row keeps), expands it in registers into a dense tile with zeros where inputs are pruned,
and runs a dense MMA with the matching tile of ``X``, read as stored (row-major needs no transpose): decode
reads the compressed bytes only, prefill runs the dense tensor-core product.

The zeros of the expanded tile would turn a NaN or Inf input at a pruned position into NaN (``0 * inf``),
which the product over the kept inputs never reads. A tile whose result is not finite therefore recomputes
its share of the product over the kept inputs alone (on FMA units, in fp32), so that every output has the
documented meaning of the other formats' kernels; finite inputs never take that path."""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreter_active, multiprocessors, next_power_of_2, upcasts_bf16, wide_offsets
from .nm_vector import VectorConfig
from .split_k import SplitKLaunch, split_k_total

# Inputs per bitmap word (int32).
WORD_BITS = 32


@triton.jit
def _kept_bits_tile(bits_ptr, offs_n, n_valid, k0, WORDS, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The bitmap's ``[BLOCK_N, BLOCK_K // 32, 32]`` bits from input ``k0`` on: 1 where a row keeps an input."""
    word = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(
        bits_ptr + offs_n[:, None] * WORDS + word[None, :], mask=n_valid[:, None] & (word < WORDS)[None, :], other=0
    )
    return (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1


@triton.jit
def _expanded_tile(
    values_ptr, bits_ptr, offs_n, n_valid, k0, KEPT, WORDS,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
    GATHER: tl.constexpr,
):
    """The dense ``[BLOCK_N, BLOCK_K]`` tile of an N:M weight from input ``k0`` on, in ``DTYPE``: kept values where
    the bitmap keeps an input, zeros elsewhere. A row's kept values lie in input order, so a kept input's slot is its
    group's first slot plus the number of inputs the group keeps before it. ``GATHER`` loads the tile's kept values
    as one contiguous block and places them with a register gather; otherwise each kept input loads its own value
    (masked). 8-bit values (DTYPE differs from theirs) are exact in DTYPE."""
    kept = _kept_bits_tile(bits_ptr, offs_n, n_valid, k0, WORDS, BLOCK_N, BLOCK_K)
    kept = tl.reshape(kept, (BLOCK_N, BLOCK_K // GROUP, GROUP))
    before = tl.cumsum(kept, axis=2) - kept
    cast: tl.constexpr = values_ptr.dtype.element_ty != DTYPE
    if GATHER:
        width: tl.constexpr = BLOCK_K // GROUP * N_KEEP
        packed_cols = k0 // GROUP * N_KEEP + tl.arange(0, width)
        valid = n_valid[:, None] & (packed_cols < KEPT)[None, :]
        if cast:
            packed = tl.load(values_ptr + offs_n[:, None] * KEPT + packed_cols[None, :], mask=valid)
            packed = tl.where(valid, packed.to(DTYPE), 0.0)
        else:
            packed = tl.load(values_ptr + offs_n[:, None] * KEPT + packed_cols[None, :], mask=valid, other=0.0)
        # Pruned inputs after a group's last kept one point one past it: clamp, then zero them.
        slot = tl.arange(0, BLOCK_K // GROUP)[None, :, None] * N_KEEP + before
        slot = tl.minimum(tl.reshape(slot, (BLOCK_N, BLOCK_K)), width - 1)
        w = tl.gather(packed, slot, axis=1)
        return tl.where(tl.reshape(kept, (BLOCK_N, BLOCK_K)) != 0, w, 0.0)
    slot = ((k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)) * N_KEEP)[None, :, None] + before
    if cast:
        w = tl.load(values_ptr + offs_n[:, None, None] * KEPT + slot, mask=kept != 0)
        w = tl.where(kept != 0, w.to(DTYPE), 0.0)
    else:
        w = tl.load(values_ptr + offs_n[:, None, None] * KEPT + slot, mask=kept != 0, other=0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _expanded_bitmap_tile(
    values_ptr, bits_ptr, offs_n, n_valid, k0, first, WORDS,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr,
):
    """The dense ``[BLOCK_N, BLOCK_K]`` tile of an unstructured (bitmap) weight from input ``k0`` on, and how many
    inputs each row keeps in it. ``first`` [BLOCK_N] is the slot in ``values`` (all rows' kept values, row-major, in
    input order) of each row's first kept value at or after ``k0``; a kept input's slot adds the number its row
    keeps before it in the tile. ``GATHER`` loads ``BLOCK_K`` values from ``first`` on (a row keeps at most that
    many here) and places them with a register gather; otherwise each kept input loads its own value (masked)."""
    kept = tl.reshape(_kept_bits_tile(bits_ptr, offs_n, n_valid, k0, WORDS, BLOCK_N, BLOCK_K), (BLOCK_N, BLOCK_K))
    before = tl.cumsum(kept, axis=1) - kept
    count = tl.sum(kept, axis=1)
    if GATHER:
        cols = tl.arange(0, BLOCK_K)
        packed = tl.load(
            values_ptr + first[:, None] + cols[None, :], mask=n_valid[:, None] & (cols[None, :] < count[:, None]),
            other=0.0,
        )
        w = tl.gather(packed, before, axis=1)
        w = tl.where(kept != 0, w, 0.0)
    else:
        w = tl.load(values_ptr + first[:, None] + before, mask=kept != 0, other=0.0)
    return w, count


@triton.jit
def _nm_element_kernel(
    xt_ptr, y_ptr, partial_ptr, counter_ptr, values_ptr, bits_ptr, bias_ptr, scales_ptr, firsts_ptr,
    M, N, K, KEPT, WORDS, BLOCKS,
    stride_xk, stride_xm, stride_ym, stride_yn, stride_ps,
    SPLIT_K: tl.constexpr, N_KEEP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    SCALED: tl.constexpr, GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    WIDE: tl.constexpr, UNSTRUCTURED: tl.constexpr, BLOCK_INPUTS: tl.constexpr,
):
    # UNSTRUCTURED: an unstructured (bitmap) weight, whose ``values`` hold every row's kept values one after
    # another and ``firsts_ptr`` [N, BLOCKS] the slot of each row's first kept value in each block of BLOCK_INPUTS
    # inputs; each program's share of K starts at such a block, and later steps count on from it.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: consecutive programs share a band of token tiles, so x tiles stay in L2.
    pids_per_band = GROUP_SIZE_M * num_pid_n
    band = pid // pids_per_band
    first_m = band * GROUP_SIZE_M
    band_m = min(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    # Split-K: program pid_k sums its own share of the inputs; the tile's last program adds the shares.
    pid_k = tl.program_id(1)
    share_unit: tl.constexpr = BLOCK_INPUTS if UNSTRUCTURED else BLOCK_K
    k_share = tl.cdiv(tl.cdiv(K, share_unit), SPLIT_K) * share_unit
    k_begin = pid_k * k_share
    k_end = min(K, k_begin + k_share)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:  # offsets of 2**31 elements or more: int64 arithmetic
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_valid = offs_m < M
    n_valid = offs_n < N
    # The tile is computed transposed, W @ X.T (output features on the MMA's M side).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = tl.zeros((BLOCK_N,), dtype=tl.int32)
    count = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < k_end
        if WIDE:
            kk = kk.to(tl.int64)
        if UNSTRUCTURED:
            at_block = k0 % BLOCK_INPUTS == 0
            stored = tl.load(firsts_ptr + offs_n * BLOCKS + k0 // BLOCK_INPUTS, mask=n_valid & at_block, other=0)
            first = tl.where(at_block, stored, first + count)
            w, count = _expanded_bitmap_tile(
                values_ptr, bits_ptr, offs_n, n_valid, k0, first, WORDS, BLOCK_N, BLOCK_K, GATHER
            )
        else:
            # 8-bit values (SCALED) are expanded in the activations' dtype; their scales apply to the sum.
            w = _expanded_tile(
                values_ptr, bits_ptr, offs_n, n_valid, k0, KEPT, WORDS, N_KEEP, GROUP, BLOCK_N, BLOCK_K,
                (tl.float32 if UPCAST else xt_ptr.dtype.element_ty) if SCALED else values_ptr.dtype.element_ty,
                GATHER,
            )
        x = tl.load(
            xt_ptr + kk[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=k_valid[:, None] & m_valid[None, :], other=0.0,
        )
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)
    # A non-finite input anywhere in the share makes its whole token row of the tile non-finite (NaN * 0 or
    # Inf * 0 at pruned positions), so one check of the result finds every tile that needs the kept-only sum.
    finite = (acc == acc) & (tl.abs(acc) < float("inf"))
    if tl.min(tl.min(finite.to(tl.int32), axis=1), axis=0) == 0:
        acc = tl.zeros_like(acc)
        if UNSTRUCTURED:
            slot = tl.load(firsts_ptr + offs_n * BLOCKS + k_begin // BLOCK_INPUTS, mask=n_valid, other=0)
        else:
            slot = offs_n * KEPT + (k_begin // GROUP) * N_KEEP
        for k in range(k_begin, k_end):
            bit = (tl.load(bits_ptr + offs_n * WORDS + k // 32, mask=n_valid, other=0) >> (k % 32)) & 1
            w = tl.where(bit != 0, tl.load(values_ptr + slot, mask=bit != 0).to(tl.float32), 0.0)
            k_row = k
            if WIDE:
                k_row = k.to(tl.int64)
            x = tl.load(xt_ptr + k_row * stride_xk + offs_m * stride_xm, mask=m_valid, other=0.0).to(tl.float32)
            acc += tl.where(bit[:, None] != 0, w[:, None] * x[None, :], 0.0)
            slot += bit
    if SCALED:
        acc = acc * tl.load(scales_ptr + offs_n, mask=n_valid, other=0.0)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    y_mask = m_valid[None, :] & n_valid[:, None]
    partial_ptrs = partial_ptr + offs_m[None, :] * N + offs_n[:, None]
    finish = True
    if SPLIT_K > 1:
        finish, acc = split_k_total(acc, partial_ptrs, stride_ps, counter_ptr + pid, pid_k, y_mask, SPLIT_K)
    if finish:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def kept_bits(kept_offsets: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """The bitmap the kernel reads: int32 ``[N, ceil(cols / 32)]``, bit j of word w of row r set where row r keeps
    input ``32 * w + j``, from uint8 ``kept_offsets`` ``[N, cols // m * n]`` (kept positions within each group of m).
    Built in row chunks, so that the int64 scatter indices stay small beside the weight."""
    rows, kept = kept_offsets.shape
    bits = torch.zeros(rows, cdiv(cols, WORD_BITS), dtype=torch.int32, device=kept_offsets.device)
    group_start = (torch.arange(kept, device=kept_offsets.device) // n * m)[None, :]
    chunk = max(1, (1 << 24) // max(1, kept))
    for first in range(0, rows, chunk):
        columns = group_start + kept_offsets[first:first + chunk].long()
        # Distinct powers of two, bit 31 as int32's -2**31: their sum is the word, with no overflow.
        word_bits = torch.ones_like(columns, dtype=torch.int32) << (columns % WORD_BITS).to(torch.int32)
        bits[first:first + chunk].scatter_add_(1, columns // WORD_BITS, word_bits)
    return bits


# id(kept_offsets) -> (a weak reference to it, its data pointer and version, its bitmap), so that the plans built
# for each call of the autograd path reuse one bitmap per weight; an entry goes when its offsets do.
_BITMAPS: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}


def cached_kept_bits(kept_offsets: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """:func:`kept_bits`, derived once per ``kept_offsets`` tensor while its storage and version stay the same."""
    key = id(kept_offsets)
    entry = _BITMAPS.get(key)
    if (
        entry is not None and entry[0]() is kept_offsets and entry[1] == kept_offsets.data_ptr()
        and entry[2] == kept_offsets._version and entry[3].shape[1] == cdiv(cols, WORD_BITS)
    ):
        return entry[3]
    bits = kept_bits(kept_offsets, n, m, cols)
    _BITMAPS[key] = (weakref.ref(kept_offsets, lambda _, key=key: _BITMAPS.pop(key, None)),
                     kept_offsets.data_ptr(), kept_offsets._version, bits)
    return bits


def element_block_k(m: int, block_k: int) -> int:
    """``block_k`` raised to a multiple of the bitmap word and of the group (the kernel expands whole words and
    whole groups)."""
    return max(block_k, WORD_BITS, m)


def choose_element_config(
    tokens: int, rows: int, cols: int, m: int, dtype: torch.dtype, device: torch.device
) -> VectorConfig:
    """The element-wise kernel's config (tiles are weight-first: output features on the MMA's M side). Up to 64
    tokens the product is bound by the weight's bytes: 64 output features by 128 inputs, streamed 3 stages deep,
    split over K while the grid holds fewer than four programs per SM. More tokens take 128 output features by
    256 tokens by 64 inputs with 8 warps where that grid fills at least half the SMs, else 64 by 128 by 64 with 4
    warps (64 by 128 by 32 in fp32). From the H200 sweep in ``docs/perf-notes.md``
    (session 10)."""
    return _choose_element_config(tokens, rows, cols, m, dtype, device, interpreter_active())


@functools.lru_cache(maxsize=4096)
def _choose_element_config(
    tokens: int, rows: int, cols: int, m: int, dtype: torch.dtype, device: torch.device, interpreted: bool
) -> VectorConfig:
    if interpreted:
        return VectorConfig(16, 16, element_block_k(m, 32), 4, 1, 8, 1, True)
    if tokens <= 64:
        block_n, block_k = 64, element_block_k(m, 128)
        tiles = cdiv(rows, block_n)
        split_k = 1
        while tiles * split_k < 4 * multiprocessors(device) and cols >= 4 * block_k * split_k * 2:
            split_k *= 2
        return VectorConfig(max(16, next_power_of_2(tokens)), block_n, block_k, 4, 3, 8, split_k, True)
    if dtype == torch.float32:
        return VectorConfig(128, 64, element_block_k(m, 32), 4, 3, 8, 1, True)
    if 2 * cdiv(tokens, 256) * cdiv(rows, 128) >= multiprocessors(device):
        return VectorConfig(256, 128, element_block_k(m, 64), 8, 3, 8, 1, True)
    return VectorConfig(128, 64, element_block_k(m, 64), 4, 3, 8, 1, True)


def gathers_tile(n: int, m: int, block_k: int) -> bool:
    """Whether the kernel expands a tile by one contiguous load of its kept values and a register gather (rather
    than a masked load per kept input): where at least half the inputs are kept, and the block of kept values is a
    power of two wide (``tl.gather``'s source). On the H200 (graph-replayed, bf16, 4096 and 11008 output features
    by 4096 inputs, 1 to 4096 tokens) the gather ran 2:4 1.4-2.0x faster, and 8:32 (a quarter kept, so the masked
    loads move a quarter of the lanes) 0.6-1.15x as fast: ``docs/perf-notes.md``, session 11."""
    width = block_k // m * n
    return 2 * n >= m and width & (width - 1) == 0


# Inputs per stored block of an unstructured weight's first-slot table (its block_offsets).
BLOCK_INPUTS = 128


def _element_launch(
    xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int], values: torch.Tensor,
    bits: torch.Tensor, firsts: torch.Tensor | None, rows: int, kept: int, n: int, m: int, config: VectorConfig,
    bias: torch.Tensor | None, input_precision: str, scales: torch.Tensor | None, dtype: torch.dtype | None,
    gather: bool,
) -> SplitKLaunch:
    """The prepared launch of the element-wise kernel for an N:M weight (``firsts`` None) or an unstructured one
    (``firsts``: its [N, ceil(K / BLOCK_INPUTS)] first slots)."""
    cols, tokens = xt_shape
    block_k = config.block_k
    if block_k % WORD_BITS or block_k % m:
        raise ValueError(f"config: block_k={block_k} must be a multiple of {WORD_BITS} and of m={m}")
    if firsts is not None and BLOCK_INPUTS % block_k:
        raise ValueError(f"config: block_k={block_k} must divide {BLOCK_INPUTS} for an unstructured weight")
    if not config.weight_first:
        raise ValueError("config: the element-wise kernel computes weight-first tiles only (weight_first=True)")
    upcast = upcasts_bf16(values.dtype if dtype is None else dtype)
    split_unit = block_k if firsts is None else BLOCK_INPUTS
    split_k = max(1, min(config.split_k, cdiv(cols, split_unit)))
    tiles = cdiv(tokens, config.block_m) * cdiv(rows, config.block_n)
    weight = (
        values, bits, values if bias is None else bias, values if scales is None else scales,
        values if firsts is None else firsts, tokens, rows, cols, kept, bits.shape[1],
        1 if firsts is None else firsts.shape[1], *xt_strides, *out_strides, tokens * rows,
    )
    constexprs = dict(
        SPLIT_K=split_k, N_KEEP=n, GROUP=m, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_SIZE_M=config.group_size_m,
        SCALED=scales is not None, GATHER=gather,
        INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST=upcast,
        WIDE=wide_offsets(
            (xt_shape, xt_strides), ((tokens, rows), out_strides),
            extents=(values.numel(), split_k * tokens * rows),
        ),
        UNSTRUCTURED=firsts is not None, BLOCK_INPUTS=BLOCK_INPUTS,
    )
    return SplitKLaunch(
        _nm_element_kernel, (tiles, split_k, 1), weight, constexprs, config.num_warps, config.num_stages, split_k,
        tokens, rows, tiles,
    )


class ElementProduct:
    """The element-wise kernel's launch for one weight and one layout of ``xt`` [K, M] and ``out`` [M, N],
    prepared once: a call writes ``xt.T @ W.T (+ bias)`` into ``out`` (tensors of the prepared shapes and strides;
    only their data pointers are read). See :func:`nm_element_matmul` for the arguments, and :class:`VectorProduct`
    for ``scales`` and ``dtype`` (8-bit values); ``bits``, the bitmap :func:`kept_bits` gives for ``kept_offsets``
    (derived and cached here when not given)."""

    __slots__ = ("_launch", "bits")

    def __init__(
        self,
        xt_shape: tuple[int, int],
        xt_strides: tuple[int, int],
        out_strides: tuple[int, int],
        values: torch.Tensor,
        kept_offsets: torch.Tensor,
        n: int,
        m: int,
        config: VectorConfig,
        bias: torch.Tensor | None = None,
        input_precision: str = "ieee",
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        bits: torch.Tensor | None = None,
    ) -> None:
        rows, kept = values.shape
        self.bits = cached_kept_bits(kept_offsets, n, m, xt_shape[0]) if bits is None else bits.contiguous()
        self._launch = _element_launch(
            xt_shape, xt_strides, out_strides, values, self.bits, None, rows, kept, n, m, config, bias,
            input_precision, scales, dtype, gathers_tile(n, m, config.block_k),
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(xt, out)


class BitmapProduct:
    """The element-wise kernel's launch for an unstructured weight stored as a bitmap: ``values`` (every row's kept
    values one after another, in input order), int32 ``bitmap`` [N, ceil(K / 32)] and int32 ``block_offsets``
    [N, ceil(K / BLOCK_INPUTS)] (the slot of each row's first kept value in each block of inputs). Prepared once
    for one layout of ``xt`` [K, M] and ``out`` [M, N], as :class:`ElementProduct`. The tile is expanded by a
    register gather where at least half the weight is kept (see :func:`gathers_tile`), else by masked loads."""

    __slots__ = ("_launch",)

    def __init__(
        self,
        xt_shape: tuple[int, int],
        xt_strides: tuple[int, int],
        out_strides: tuple[int, int],
        values: torch.Tensor,
        bitmap: torch.Tensor,
        block_offsets: torch.Tensor,
        config: VectorConfig,
        bias: torch.Tensor | None = None,
        input_precision: str = "ieee",
    ) -> None:
        rows = bitmap.shape[0]
        gather = 2 * values.numel() >= rows * xt_shape[0]
        # The kernel indexes every weight tensor and the bias as contiguous.
        self._launch = _element_launch(
            xt_shape, xt_strides, out_strides, values.contiguous(), bitmap.contiguous(), block_offsets.contiguous(),
            rows, 0, 1, 1, config, None if bias is None else bias.contiguous(), input_precision, None, None, gather,
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(xt, out)


def bitmap_matmul(
    xt: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    block_offsets: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: VectorConfig | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for an unstructured ``W`` stored as a bitmap
    (:class:`BitmapProduct`); ``xt`` is [K, M] (any strides). ``config`` defaults to :func:`choose_element_config`'s
    (its K steps divide :data:`BLOCK_INPUTS`). Repeated products of one weight keep a :class:`BitmapProduct`."""
    if config is None:
        rows, cols, tokens = bitmap.shape[0], xt.shape[0], xt.shape[1]
        config = choose_element_config(tokens, rows, cols, WORD_BITS, values.dtype, values.device)
    product = BitmapProduct(
        tuple(xt.shape), xt.stride(), out.stride(), values, bitmap, block_offsets, config, bias, input_precision
    )
    product(xt, out)
    return out


def nm_element_matmul(
    xt: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: VectorConfig | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for an element-wise N:M ``W`` given
    as ``values`` and uint8 ``kept_offsets``, both [N, K*n/m]; ``xt`` is [K, M] (any strides: ``x.t()`` of a
    row-major ``x`` is read as it is). Accumulates in fp32; fp32 inputs take ``input_precision`` as in
    :func:`nm_vector_matmul`. ``config`` defaults to :func:`choose_element_config`'s. Repeated products of one
    weight keep an :class:`ElementProduct` instead."""
    if config is None:
        config = choose_element_config(xt.shape[1], values.shape[0], xt.shape[0], m, values.dtype, values.device)
    product = ElementProduct(
        tuple(xt.shape), xt.stride(), out.stride(), values, kept_offsets, n, m, config, bias, input_precision
    )
    product(xt, out)
    return out
