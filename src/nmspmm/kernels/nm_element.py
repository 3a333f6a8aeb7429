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

from .launch import Launcher, cdiv, interpreter_active, multiprocessors, next_power_of_2, upcasts_bf16, wide_offsets
from .nm_vector import VectorConfig
from .split_k import SplitKLaunch, split_k_total

# Inputs per bitmap word (int32).
WORD_BITS = 32


@triton.jit
def _bit_counts(words, NATIVE: tl.constexpr):
    """The number of set bits of each int32 of ``words``: the hardware's ``popc`` on a GPU (``NATIVE``), a
    bit-parallel count under the interpreter, which runs no inline assembly."""
    if NATIVE:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1)
    bits = words.to(tl.uint32, bitcast=True)
    bits = bits - ((bits >> 1) & 0x55555555)
    bits = (bits & 0x33333333) + ((bits >> 2) & 0x33333333)
    bits = (bits + (bits >> 4)) & 0x0F0F0F0F
    return ((bits * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _expanded_tile(
    values_ptr, bits_ptr, offs_n, n_valid, k0, first, WORDS,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr, GATHER: tl.constexpr, DTYPE: tl.constexpr,
    NATIVE_POPC: tl.constexpr,
):
    """The dense ``[BLOCK_N, BLOCK_K]`` tile of a weight from input ``k0`` on, in ``DTYPE`` (kept values where the
    bitmap keeps an input, zeros elsewhere), and how many inputs each row keeps in it. Each row's kept values lie in
    input order and ``first`` [BLOCK_N] is the slot of its first one at or after ``k0``, so a kept input's slot adds
    the number the row keeps before it in the tile: the bit counts of the tile's earlier words plus that of its own
    word's lower bits (no scan over the tile's inputs). ``GATHER`` loads ``WIDTH`` values from ``first`` on (a row
    keeps at most that many in the tile) and places them with a register gather; otherwise each kept input loads
    its own value (masked). 8-bit values (DTYPE differs from theirs) are exact in DTYPE."""
    word = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(
        bits_ptr + offs_n[:, None] * WORDS + word[None, :], mask=n_valid[:, None] & (word < WORDS)[None, :], other=0
    )
    per_word = _bit_counts(words, NATIVE_POPC)
    bit = tl.arange(0, 32)[None, None, :]
    lower = words[:, :, None] & ~(-1 << bit)
    before = (tl.cumsum(per_word, axis=1) - per_word)[:, :, None] + _bit_counts(lower, NATIVE_POPC)
    before = tl.reshape(before, (BLOCK_N, BLOCK_K))
    kept = tl.reshape((words[:, :, None] >> bit) & 1, (BLOCK_N, BLOCK_K)) != 0
    count = tl.sum(per_word, axis=1)
    cast: tl.constexpr = values_ptr.dtype.element_ty != DTYPE
    if GATHER:
        cols = tl.arange(0, WIDTH)
        valid = n_valid[:, None] & (cols[None, :] < count[:, None])
        packed = tl.load(values_ptr + first[:, None] + cols[None, :], mask=valid, other=0.0)
        if cast:
            packed = packed.to(DTYPE)
        # Pruned inputs after a row's last kept one point one past it: clamp, then zero them.
        w = tl.gather(packed, tl.minimum(before, WIDTH - 1), axis=1)
        return tl.where(kept, w, 0.0), count
    w = tl.load(values_ptr + first[:, None] + before, mask=kept, other=0.0)
    if cast:
        w = tl.where(kept, w.to(DTYPE), 0.0)
    return w, count


@triton.jit
def _kept_only_sum(
    xt_ptr, values_ptr, bits_ptr, offs_m, m_valid, offs_n, n_valid, k_begin, k_end, slot, WORDS,
    stride_xk, stride_xm, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr,
):
    """The tile's ``[BLOCK_N, BLOCK_M]`` sum over inputs ``k_begin`` to ``k_end`` of the kept inputs only, one input
    at a time on FMA units in fp32: what a NaN or Inf input at a pruned position must not reach. ``slot``
    [BLOCK_N] is each row's first kept value's slot at or after ``k_begin``."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(k_begin, k_end):
        bit = (tl.load(bits_ptr + offs_n * WORDS + k // 32, mask=n_valid, other=0) >> (k % 32)) & 1
        w = tl.where(bit != 0, tl.load(values_ptr + slot, mask=bit != 0).to(tl.float32), 0.0)
        k_row = k
        if WIDE:
            k_row = k.to(tl.int64)
        x = tl.load(xt_ptr + k_row * stride_xk + offs_m * stride_xm, mask=m_valid, other=0.0).to(tl.float32)
        acc += tl.where(bit[:, None] != 0, w[:, None] * x[None, :], 0.0)
        slot += bit
    return acc


@triton.jit
def _nm_element_kernel(
    xt_ptr, y_ptr, partial_ptr, counter_ptr, values_ptr, bits_ptr, bias_ptr, scales_ptr, firsts_ptr,
    M, N, K, KEPT, WORDS, BLOCKS,
    stride_xk, stride_xm, stride_ym, stride_yn, stride_ps,
    SPLIT_K: tl.constexpr, N_KEEP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    SCALED: tl.constexpr, GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    WIDE: tl.constexpr, UNSTRUCTURED: tl.constexpr, BLOCK_INPUTS: tl.constexpr, NATIVE_POPC: tl.constexpr,
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
    # 8-bit values (SCALED) are expanded in the activations' dtype; their scales apply to the sum.
    dtype: tl.constexpr = (
        (tl.float32 if UPCAST else xt_ptr.dtype.element_ty) if SCALED else values_ptr.dtype.element_ty
    )
    width: tl.constexpr = BLOCK_K if UNSTRUCTURED else BLOCK_K // GROUP * N_KEEP
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < k_end
        if WIDE:
            kk = kk.to(tl.int64)
        if UNSTRUCTURED:
            at_block = k0 % BLOCK_INPUTS == 0
            stored = tl.load(firsts_ptr + offs_n * BLOCKS + k0 // BLOCK_INPUTS, mask=n_valid & at_block, other=0)
            first = tl.where(at_block, stored, first + count)
            w, count = _expanded_tile(
                values_ptr, bits_ptr, offs_n, n_valid, k0, first, WORDS, BLOCK_N, BLOCK_K, width, GATHER, dtype,
                NATIVE_POPC,
            )
        else:
            # Every group keeps N_KEEP inputs, so a row's slots before group g number g * N_KEEP.
            w, _ = _expanded_tile(
                values_ptr, bits_ptr, offs_n, n_valid, k0, offs_n * KEPT + (k0 // GROUP) * N_KEEP, WORDS, BLOCK_N,
                BLOCK_K, width, GATHER, dtype, NATIVE_POPC,
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
        if UNSTRUCTURED:
            slot = tl.load(firsts_ptr + offs_n * BLOCKS + k_begin // BLOCK_INPUTS, mask=n_valid, other=0)
        else:
            slot = offs_n * KEPT + (k_begin // GROUP) * N_KEEP
        acc = _kept_only_sum(
            xt_ptr, values_ptr, bits_ptr, offs_m, m_valid, offs_n, n_valid, k_begin, k_end, slot, WORDS,
            stride_xk, stride_xm, BLOCK_N, BLOCK_M, WIDE,
        )
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


@triton.jit
def _densify_kernel(
    dense_ptr, values_ptr, bits_ptr, firsts_ptr, N, K, KEPT, WORDS, BLOCKS,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr,
    WIDE: tl.constexpr, UNSTRUCTURED: tl.constexpr, BLOCK_INPUTS: tl.constexpr, NATIVE_POPC: tl.constexpr,
):
    # The weight's dense [N, K] form, row-major, one [BLOCK_N, BLOCK_K] tile per program; an unstructured weight's
    # tiles are its blocks of BLOCK_INPUTS inputs (BLOCK_K), whose first slots it stores.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    if WIDE:
        offs_n = offs_n.to(tl.int64)
    n_valid = offs_n < N
    if UNSTRUCTURED:
        first = tl.load(firsts_ptr + offs_n * BLOCKS + k0 // BLOCK_INPUTS, mask=n_valid, other=0)
    else:
        first = offs_n * KEPT + (k0 // GROUP) * N_KEEP
    width: tl.constexpr = BLOCK_K if UNSTRUCTURED else BLOCK_K // GROUP * N_KEEP
    w, _ = _expanded_tile(
        values_ptr, bits_ptr, offs_n, n_valid, k0, first, WORDS, BLOCK_N, BLOCK_K, width, GATHER,
        values_ptr.dtype.element_ty, NATIVE_POPC,
    )
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(dense_ptr + offs_n[:, None] * K + kk[None, :], w, mask=n_valid[:, None] & (kk < K)[None, :])


@triton.jit
def _nonfinite_kernel(
    src_ptr, flags_ptr, M, F, stride_f, stride_m, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, WIDE: tl.constexpr,
):
    # flags[t, c] = 1 where features c * BLOCK_F on (BLOCK_F of them) of token tile t (BLOCK_M tokens) of the
    # [F, M] tensor at src_ptr hold a NaN or Inf, else 0.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_f = offs_f.to(tl.int64)
    values = tl.load(
        src_ptr + offs_f[:, None] * stride_f + offs_m[None, :] * stride_m,
        mask=(offs_f < F)[:, None] & (offs_m < M)[None, :], other=0.0,
    ).to(tl.float32)
    nonfinite = ((values != values) | (tl.abs(values) == float("inf"))).to(tl.int32)
    tl.store(flags_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.max(tl.max(nonfinite, 1), 0))


@triton.jit
def _repair_kernel(
    xt_ptr, y_ptr, flags_ptr, values_ptr, bits_ptr, bias_ptr, firsts_ptr, M, N, K, KEPT, WORDS, BLOCKS, CHUNKS,
    stride_xk, stride_xm, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
    CHUNKS_P2: tl.constexpr, WIDE: tl.constexpr, UNSTRUCTURED: tl.constexpr,
):
    # After a product over the dense expansion: each flagged token tile (BLOCK_M tokens, flags [tiles, CHUNKS]) gets
    # its [BLOCK_N, BLOCK_M] output tile recomputed over the kept inputs only (the expansion's zeros times a NaN or
    # Inf at a pruned input give NaN, which the product over the kept inputs never reads). A program serves one
    # tile of output features for TILES_PER_PROGRAM token tiles, so that a clean product costs few programs.
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:
        offs_n = offs_n.to(tl.int64)
    n_valid = offs_n < N
    tiles = tl.cdiv(M, BLOCK_M)
    chunk = tl.arange(0, CHUNKS_P2)
    for step in range(TILES_PER_PROGRAM):
        tile = tl.program_id(0) * TILES_PER_PROGRAM + step
        valid = (chunk < CHUNKS) & (tile + 0 * chunk < tiles)
        flagged = tl.load(flags_ptr + tile * CHUNKS + chunk, mask=valid, other=0)
        if tl.max(flagged, 0) != 0:
            offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            if WIDE:
                offs_m = offs_m.to(tl.int64)
            m_valid = offs_m < M
            if UNSTRUCTURED:
                slot = tl.load(firsts_ptr + offs_n * BLOCKS, mask=n_valid, other=0)
            else:
                slot = offs_n * KEPT
            acc = _kept_only_sum(
                xt_ptr, values_ptr, bits_ptr, offs_m, m_valid, offs_n, n_valid, 0, K, slot, WORDS, stride_xk,
                stride_xm, BLOCK_N, BLOCK_M, WIDE,
            )
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[:, None]
            y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_valid[None, :] & n_valid[:, None])


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


# Up to this many tokens a product expands its weight tile by tile in the kernel; more run on the dense expansion
# (bf16 and fp16: see expands_to_dense).
DIRECT_TOKENS = 64
# The non-finite check and repair after a product on the expansion: token tiles, feature chunks of the check, output
# features per repair tile, and token tiles per repair program.
_REPAIR_TOKENS, _CHECK_FEATURES, _REPAIR_ROWS, _REPAIR_TILES = 16, 512, 64, 16


def expands_to_dense(tokens: int, dtype: torch.dtype, scaled: bool) -> bool:
    """Whether a product expands the weight into a transient dense buffer and multiplies with cuBLAS rather than
    expanding each tile in the kernel: bf16 and fp16 beyond :data:`DIRECT_TOKENS` tokens (not 8-bit values). There
    the product costs the dense FLOPs either way and cuBLAS runs them at the dense rate, while the expansion costs
    one pass over the weight (its compressed bytes read, its dense bytes written). On the H200 (bf16, four suite
    layers, unstructured 50-90% and element-wise 2:4, 8:32, 16:32; geomeans per kind) the expansion ran at
    0.25-0.41x of cuBLAS at 128-512 tokens against the kernel's 0.07-0.20x, at 0.63-0.69x at 1024-4096 against
    0.11-0.23x, and the kernel was as fast or faster at 1-64 (``docs/perf-notes.md``, session 13)."""
    return tokens > DIRECT_TOKENS and dtype in (torch.bfloat16, torch.float16) and not scaled


class _ExpandedLaunch:
    """A product on the weight's dense expansion: one launch writes ``W`` [N, K] into a buffer, cuBLAS multiplies,
    and two short launches find the token tiles whose result holds a NaN or Inf (the check reads x or the result,
    whichever is smaller: a finite x gives a finite product but for overflow) and recompute those outputs over the
    kept inputs only, so that the result means what the kernel's does. A call passes ``xt`` [K, M] and ``out``
    [M, N] of the prepared shapes and strides (cuBLAS writes a row-major ``out`` or its transpose in place, others
    through a copy)."""

    __slots__ = (
        "_dense_shape", "_values", "_bias", "_layout", "_views", "_densify", "_check_x", "_check", "_repair", "_flags",
    )

    def __init__(
        self, xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int],
        values: torch.Tensor, bits: torch.Tensor, firsts: torch.Tensor | None, rows: int, kept: int, n: int, m: int,
        bias: torch.Tensor | None,
    ) -> None:
        cols, tokens = xt_shape
        self._dense_shape, self._values, self._bias = (rows, cols), values, bias
        self._layout = "rows" if out_strides == (rows, 1) else "features" if out_strides == (1, tokens) else "other"
        # The plans pass x and out as they hold them (the launches read only data pointers); cuBLAS takes views.
        self._views = ((xt_shape, xt_strides), ((tokens, rows), out_strides))
        unstructured = firsts is not None
        block_k = BLOCK_INPUTS if unstructured else element_block_k(m, 128)
        if block_k % WORD_BITS or block_k % m:
            raise ValueError(f"m={m}: the expansion's tiles of {block_k} inputs must hold whole groups")
        wide = wide_offsets(
            (xt_shape, xt_strides), ((tokens, rows), out_strides), extents=(values.numel(), rows * cols)
        )
        firsts_or_values = values if firsts is None else firsts
        blocks = 1 if firsts is None else firsts.shape[1]
        # Masked loads expanded unstructured weights fastest at every density measured (session 13).
        gather = not unstructured and gathers_tile(n, m, block_k)
        self._densify = Launcher(
            _densify_kernel, (cdiv(rows, 32), cdiv(cols, block_k), 1),
            (values, bits, firsts_or_values, rows, cols, kept, bits.shape[1], blocks),
            dict(N_KEEP=n, GROUP=m, BLOCK_N=32, BLOCK_K=block_k, GATHER=gather, WIDE=wide, UNSTRUCTURED=unstructured,
                 BLOCK_INPUTS=BLOCK_INPUTS, NATIVE_POPC=not interpreter_active()),
            4,
        )
        tiles = cdiv(tokens, _REPAIR_TOKENS)
        self._check_x = cols <= rows
        features, strides = (cols, xt_strides) if self._check_x else (rows, (out_strides[1], out_strides[0]))
        chunks = cdiv(features, _CHECK_FEATURES)
        self._flags = (tiles * chunks,)
        self._check = Launcher(
            _nonfinite_kernel, (tiles, chunks, 1), (tokens, features, *strides),
            dict(BLOCK_M=_REPAIR_TOKENS, BLOCK_F=_CHECK_FEATURES, WIDE=wide), 4,
        )
        self._repair = Launcher(
            _repair_kernel, (cdiv(tiles, _REPAIR_TILES), cdiv(rows, _REPAIR_ROWS), 1),
            (values, bits, values if bias is None else bias, firsts_or_values, tokens, rows, cols, kept, bits.shape[1],
             blocks, chunks, *xt_strides, *out_strides),
            dict(HAS_BIAS=bias is not None, BLOCK_M=_REPAIR_TOKENS, BLOCK_N=_REPAIR_ROWS,
                 TILES_PER_PROGRAM=_REPAIR_TILES, CHUNKS_P2=next_power_of_2(chunks), WIDE=wide,
                 UNSTRUCTURED=unstructured),
            4,
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        (xt_shape, xt_strides), (out_shape, out_strides) = self._views
        xt, out = xt.as_strided(xt_shape, xt_strides), out.as_strided(out_shape, out_strides)
        dense = torch.empty(self._dense_shape, dtype=self._values.dtype, device=self._values.device)
        self._densify(dense)
        bias = self._bias
        if self._layout == "features":
            if bias is None:
                torch.mm(dense, xt, out=out.t())
            else:
                torch.addmm(bias[:, None], dense, xt, out=out.t())
        else:
            product = out if self._layout == "rows" else None
            if bias is None:
                product = torch.mm(xt.t(), dense.t(), out=product)
            else:
                product = torch.addmm(bias, xt.t(), dense.t(), out=product)
            if product is not out:
                out.copy_(product)
        flags = torch.empty(self._flags, dtype=torch.int32, device=self._values.device)
        self._check(xt if self._check_x else out, flags)
        self._repair(xt, out, flags)


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
        UNSTRUCTURED=firsts is not None, BLOCK_INPUTS=BLOCK_INPUTS, NATIVE_POPC=not interpreter_active(),
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
        self._launch: SplitKLaunch | _ExpandedLaunch
        if expands_to_dense(xt_shape[1], values.dtype, scales is not None):
            self._launch = _ExpandedLaunch(
                xt_shape, xt_strides, out_strides, values, self.bits, None, rows, kept, n, m, bias
            )
        else:
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
        # The kernels index every weight tensor and the bias as contiguous.
        values, bitmap, block_offsets = values.contiguous(), bitmap.contiguous(), block_offsets.contiguous()
        bias = None if bias is None else bias.contiguous()
        self._launch: SplitKLaunch | _ExpandedLaunch
        if expands_to_dense(xt_shape[1], values.dtype, False):
            self._launch = _ExpandedLaunch(
                xt_shape, xt_strides, out_strides, values, bitmap, block_offsets, rows, 0, 1, 1, bias
            )
        else:
            self._launch = _element_launch(
                xt_shape, xt_strides, out_strides, values, bitmap, block_offsets, rows, 0, 1, 1, config, bias,
                input_precision, None, None, gather,
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
