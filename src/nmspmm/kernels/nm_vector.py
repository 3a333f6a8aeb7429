"""Vector-wise N:M product on tensor cores (or exact fp32 FMA): ``Y = X @ W.T`` where each tile of
BLOCK_N output features shares one choice of kept inputs, so the tile is a dense product over the
gathered input features. ``X`` is read as ``xt = X.T``: feature-major (contiguous), every gathered feature is one
contiguous row of tokens; a view of row-major ``X`` (few tokens) is gathered element by element."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import (
    FEW_TOKENS, cdiv, interpreter_active, multiprocessors, next_power_of_2, upcasts_bf16, wide_offsets,
)
from .split_k import SplitKLaunch, split_k_total


@triton.jit
def _kept_columns(offsets_row, kk, k_end, N_KEEP: tl.constexpr, GROUP: tl.constexpr, WIDE: tl.constexpr):
    """The input feature of each kept slot ``kk`` of a V-group (slots from ``k_end`` on read nothing)."""
    return _columns(tl.load(offsets_row + kk, mask=kk < k_end, other=0), kk, N_KEEP, GROUP, WIDE)


@triton.jit
def _columns(offset, kk, N_KEEP: tl.constexpr, GROUP: tl.constexpr, WIDE: tl.constexpr):
    """The input features of kept slots ``kk`` from their stored ``offset`` s within their groups."""
    column = (kk // N_KEEP) * GROUP + offset.to(tl.int32)
    if WIDE:
        column = column.to(tl.int64)
    return column


@triton.jit
def _gathered_x(xt_ptr, column, k_valid, offs_m, m_valid, stride_xk, stride_xm, WEIGHT_FIRST: tl.constexpr):
    """The activations of the kept ``column`` s where ``k_valid`` (both shaped [kept, 1] for the weight-first
    product, out [kept, tokens]; else [1, kept] and [tokens, kept])."""
    if WEIGHT_FIRST:
        x = tl.load(
            xt_ptr + column * stride_xk + offs_m[None, :] * stride_xm, mask=k_valid & m_valid[None, :], other=0.0
        )
    else:
        x = tl.load(
            xt_ptr + column * stride_xk + offs_m[:, None] * stride_xm, mask=m_valid[:, None] & k_valid, other=0.0
        )
    return x


@triton.jit
def _kept_values(values_ptrs, k_valid, xt_ptr, SCALED: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of stored values (zeros past the last kept slot). 8-bit values are exact in the activations' dtype
    and converted to it here; their scales apply to the sums."""
    if SCALED:
        w = tl.load(values_ptrs, mask=k_valid)
        w = tl.where(k_valid, w.to(tl.float32 if UPCAST else xt_ptr.dtype.element_ty), 0.0)
    else:
        w = tl.load(values_ptrs, mask=k_valid, other=0.0)
    return w


@triton.jit
def _nm_vector_kernel(
    xt_ptr, y_ptr, partial_ptr, counter_ptr, values_ptr, offsets_ptr, bias_ptr, scales_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_ym, stride_yn, stride_ps,
    SPLIT_K: tl.constexpr, N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    WEIGHT_FIRST: tl.constexpr, SCALED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TOKEN_ALIGN: tl.constexpr, Y_ROW_ALIGN: tl.constexpr,
    WIDE: tl.constexpr, GATHER_AHEAD: tl.constexpr,
):
    # Triton assumes alignment only of arguments divisible by 16. Rounding down to multiples of these
    # constants, which divide them (the values are unchanged), tells it that rows of tokens start aligned,
    # so their loads and stores stay vectorised when M is, say, 8.
    M = M // TOKEN_ALIGN * TOKEN_ALIGN
    stride_xk = stride_xk // TOKEN_ALIGN * TOKEN_ALIGN
    stride_yn = stride_yn // Y_ROW_ALIGN * Y_ROW_ALIGN
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = N // BLOCK_N
    # Grouped order: consecutive programs share a band of token tiles, so gathered rows stay in L2.
    pids_per_band = GROUP_SIZE_M * num_pid_n
    band = pid // pids_per_band
    first_m = band * GROUP_SIZE_M
    band_m = min(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    # Split-K: program pid_k sums its own share of the kept inputs; the tile's last program adds the shares.
    pid_k = tl.program_id(1)
    k_share = tl.cdiv(tl.cdiv(KEPT, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_share
    k_end = min(KEPT, k_begin + k_share)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:  # offsets of 2**31 elements or more: int64 arithmetic
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_valid = offs_m < M
    offsets_row = offsets_ptr + (pid_n * BLOCK_N // VECTOR) * KEPT
    # WEIGHT_FIRST computes the transposed tile W @ X_kept (output features on the MMA's M side).
    if WEIGHT_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The kept slots of a step, shaped as the gathered x tile's K side.
    if WEIGHT_FIRST:
        steps = tl.arange(0, BLOCK_K)[:, None]
    else:
        steps = tl.arange(0, BLOCK_K)[None, :]
    if GATHER_AHEAD:
        # Triton pipelines only loads of 4 contiguous bytes or more, so gathers from token rows would wait in
        # series every step (the offsets, then x): here each step issues the next step's gathers and the offsets
        # of the step after, before its own product.
        column = _kept_columns(offsets_row, k_begin + steps, k_end, N_KEEP, GROUP, WIDE)
        x_next = _gathered_x(
            xt_ptr, column, k_begin + steps < k_end, offs_m, m_valid, stride_xk, stride_xm, WEIGHT_FIRST
        )
        slots_next = k_begin + BLOCK_K + steps
        offset_next = tl.load(offsets_row + slots_next, mask=slots_next < k_end, other=0)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < k_end
        if GATHER_AHEAD:
            x = x_next
            slots_next = k0 + BLOCK_K + steps
            x_next = _gathered_x(
                xt_ptr, _columns(offset_next, slots_next, N_KEEP, GROUP, WIDE), slots_next < k_end, offs_m,
                m_valid, stride_xk, stride_xm, WEIGHT_FIRST,
            )
            slots_after = slots_next + BLOCK_K
            offset_next = tl.load(offsets_row + slots_after, mask=slots_after < k_end, other=0)
        else:
            # Offsets loaded as one row of slots (Triton pipelines this load), laid along the tile's K side below.
            column = _kept_columns(offsets_row, kk, k_end, N_KEEP, GROUP, WIDE)
        # Weight-first, the values' copies are issued before the x gather: after it, they waited behind the offsets'
        # layout conversion, 5-10% slower at 16 tokens (H200, session 12).
        if WEIGHT_FIRST:
            w_ptrs = values_ptr + offs_n[:, None] * KEPT + kk[None, :]
            w = _kept_values(w_ptrs, k_valid[None, :], xt_ptr, SCALED, UPCAST)
        if not GATHER_AHEAD:
            if WEIGHT_FIRST:
                x = _gathered_x(xt_ptr, column[:, None], k_valid[:, None], offs_m, m_valid, stride_xk, stride_xm, 1)
            else:
                x = _gathered_x(xt_ptr, column[None, :], k_valid[None, :], offs_m, m_valid, stride_xk, stride_xm, 0)
        if WEIGHT_FIRST:
            if UPCAST:
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)
        else:
            w_ptrs = values_ptr + offs_n[None, :] * KEPT + kk[:, None]
            w = _kept_values(w_ptrs, k_valid[:, None], xt_ptr, SCALED, UPCAST)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if WEIGHT_FIRST:
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
        y_mask = m_valid[None, :]
        partial_ptrs = partial_ptr + offs_m[None, :] * N + offs_n[:, None]
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_valid[:, None]
        partial_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SCALED:
        scale = tl.load(scales_ptr + offs_n)
        if WEIGHT_FIRST:
            acc = acc * scale[:, None]
        else:
            acc = acc * scale[None, :]
    finish = True
    if SPLIT_K > 1:
        finish, acc = split_k_total(acc, partial_ptrs, stride_ps, counter_ptr + pid, pid_k, y_mask, SPLIT_K)
    if finish:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n).to(tl.float32)
            if WEIGHT_FIRST:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@dataclass(frozen=True)
class VectorConfig:
    """Tile shape, pipelining, split-K and operand order of one launch of the vector-wise kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_size_m: int = 8
    split_k: int = 1
    weight_first: bool = False


def interpreter_config(vector: int) -> VectorConfig:
    """Small tiles that keep Triton's CPU interpreter quick."""
    return VectorConfig(block_m=16, block_n=min(vector, 32), block_k=16, num_warps=4, num_stages=1)


# Tiles for more than FEW_TOKENS tokens, from benchmarks/tune_vector.py on an H100 (bf16; fp16 shares them):
# (vector, tokens <= 512) -> (block_m, block_k, num_warps, num_stages, weight_first). V=64 is chosen by
# _half_tile_v64 instead.
_HALF_TABLE = {
    (16, True): (128, 128, 4, 3, False),
    (16, False): (128, 64, 4, 3, False),
    (32, True): (256, 128, 8, 3, False),
    (32, False): (256, 64, 8, 3, False),
    (128, True): (64, 128, 8, 3, True),
    (128, False): (128, 64, 8, 3, True),
}


def _half_tile_v64(tokens: int, rows: int, sms: int) -> tuple[int, int, int, int, bool]:
    """bf16/fp16 tiles at V=64 by how many 128-token tiles the grid holds: under one wave, long K steps of a
    64-token tile with 8 warps; up to two waves, 64-token tiles with short K steps; beyond, 128-token tiles with
    short K steps (graph-timed sweep: ``docs/perf-notes.md``, v8)."""
    programs = cdiv(tokens, 128) * (rows // 64)
    if programs <= sms:
        return 64, 128, 8, 3, True
    if programs <= 2 * sms:
        return 64, 64, 4, 3, True
    return 128, 64, 4, 3, True


def choose_vector_config(
    tokens: int, rows: int, kept: int, vector: int, dtype: torch.dtype, device: torch.device,
    eight_bit: bool = False,
) -> VectorConfig:
    """The vector-wise kernel's config for a case (``dtype`` the activations'; ``eight_bit`` for 8-bit values).
    Few tokens (<= :data:`FEW_TOKENS`) are bound by weight bytes: narrow tiles of output features streamed in long
    K steps, split over K only where a long reduction would leave too few programs. More tokens take tiles tuned
    offline: at V=64 by the size of the grid, otherwise from a small table. Cached: the host time of a call matters
    when there are few tokens."""
    return _choose_vector_config(tokens, rows, kept, vector, dtype, device, interpreter_active(), eight_bit)


# Up to this many tokens, 8-bit values take their own tiles (_eight_bit_config); more share the activations'.
EIGHT_BIT_TOKENS = 16


@functools.lru_cache(maxsize=4096)
def _choose_vector_config(
    tokens: int, rows: int, kept: int, vector: int, dtype: torch.dtype, device: torch.device, interpreted: bool,
    eight_bit: bool = False,
) -> VectorConfig:
    if interpreted:
        return interpreter_config(vector)
    if eight_bit and tokens <= EIGHT_BIT_TOKENS and dtype != torch.float32:
        return _eight_bit_config(tokens, rows, kept, vector, multiprocessors(device))
    if tokens <= FEW_TOKENS:
        return _few_tokens_config(tokens, rows, kept, vector, dtype, multiprocessors(device))
    block_n = min(vector, 128)
    if dtype == torch.float32:
        # Tuned for "tf32x3" (nmspmm's exact fp32) on an H100, 2026-11-23: 16:32-4:32 on 4096x4096,
        # 11008x4096 and 4096x11008 at 256-4096 tokens; tf32 shares them.
        return VectorConfig(128, block_n, 64 if block_n <= 32 else 32, 4 if block_n <= 32 else 8, 3)
    if vector == 64:
        block_m, block_k, warps, stages, weight_first = _half_tile_v64(tokens, rows, multiprocessors(device))
    else:
        block_m, block_k, warps, stages, weight_first = _HALF_TABLE[(vector, tokens <= 512)]
    return VectorConfig(block_m, block_n, block_k, warps, stages, 8, 1, weight_first)


# A program's share of the weight (elements) above which few-token launches split K, while the grid is short.
_SPLIT_K_WORK = 48 * 1024
# Kept inputs per weight row from which one token takes the wider, more split tiles of _few_tokens_config.
_ONE_TOKEN_ROW = 2048


def _few_tokens_config(tokens: int, rows: int, kept: int, vector: int, dtype: torch.dtype, sms: int) -> VectorConfig:
    """Tiles for up to :data:`FEW_TOKENS` tokens, streamed 3 stages deep. Up to 16 tokens: 32 output features by
    256 kept inputs (128 where the tiles outnumber the SMs, so that two programs share an SM). From 17 tokens the
    gathered x rows cost as much as the weight, so tiles take 64 output features (half the gathers) by 128 kept
    inputs. K is split (the tile's last program adds the fp32 shares, inside the launch) while a program's share
    of the weight is large and the grid holds fewer than 64 output features per SM per split. One token in half
    precision with long weight rows (:data:`_ONE_TOKEN_ROW` kept inputs or more) takes 64-wide tiles by 128 kept
    inputs, split at most 8 ways while the grid holds fewer than 128 output features per SM per split; shorter
    rows keep the 16-token rule. The sweeps behind each rule: ``docs/perf-notes.md``, v10 and v11."""
    one = tokens == 1 and dtype != torch.float32 and kept >= _ONE_TOKEN_ROW
    few = tokens <= 16
    block_n = min(vector, 32 if few and not one else 64)
    block_m = max(16, next_power_of_2(tokens))
    tiles = rows // block_n
    if dtype == torch.float32:
        block_k = 128 if few else 64
    else:
        block_k = 256 if few and not one and tiles <= sms else 128
    features_per_sm, min_work, max_split = (128, 0, 8) if one else (64, _SPLIT_K_WORK, kept)
    split_k = 1
    while (
        rows * split_k < features_per_sm * sms and block_n * kept // split_k > min_work
        and kept >= 2 * block_k * split_k and split_k < max_split
    ):
        split_k *= 2
    return VectorConfig(block_m, block_n, block_k, 4, 3, 8, split_k, block_n >= 32)


def _eight_bit_config(tokens: int, rows: int, kept: int, vector: int, sms: int) -> VectorConfig:
    """Tiles for 8-bit values at up to :data:`EIGHT_BIT_TOKENS` tokens: 64 output features by 128 kept inputs,
    split over K while the split grid holds at most three programs per SM. Fitted to a graph-timed sweep on the H200
    (8:32 V=64 at 1 and 16 tokens: 4096x4096 best at split 4, 5.9-6.3 us against 8.0-8.4 us with the bf16 rule;
    11008x4096 at split 2, 11.7-12.1 us against 13.3-15.1 us; ``docs/perf-notes.md``, session 11)."""
    block_n, block_k = min(vector, 64), 128
    tiles = rows // block_n
    split_k = 1
    while tiles * split_k * 2 <= 3 * sms and kept >= 2 * block_k * split_k:
        split_k *= 2
    return VectorConfig(max(16, next_power_of_2(tokens)), block_n, block_k, 4, 3, 8, split_k, True)


def gathers_ahead(xt_strides: tuple[int, int], token_align: int, itemsize: int) -> bool:
    """Whether the kernel issues each K step's x gathers one step ahead itself (its ``GATHER_AHEAD``): Triton
    pipelines only loads of at least 4 contiguous bytes, which gathered features give only where the tokens are
    contiguous (``xt`` feature-major) and aligned to 4 bytes. Row-major x (the decode path's few tokens) and odd
    token counts in 16 bits gather element by element."""
    return xt_strides[1] != 1 or token_align * itemsize < 4


def _alignment(*values: int) -> int:
    """The largest power of two up to 16 that divides every value (a token count, strides between token rows)."""
    combined = 16
    for value in values:
        combined |= value
    return combined & -combined


class VectorProduct:
    """The vector-wise kernel's launch for one weight and one layout of ``xt`` [K, M] and ``out`` [M, N], prepared
    once: a call writes ``xt.T @ W.T (+ bias)`` into ``out`` (tensors of the prepared shapes and strides; only their
    data pointers are read). See :func:`nm_vector_matmul` for the arguments. With ``scales`` (fp32 [N]), ``values``
    are 8-bit (float8_e4m3fn or int8), ``W`` is ``values * scales[:, None]``, and ``dtype`` names the activations'
    dtype."""

    __slots__ = ("_launch",)

    def __init__(
        self,
        xt_shape: tuple[int, int],
        xt_strides: tuple[int, int],
        out_strides: tuple[int, int],
        values: torch.Tensor,
        kept_offsets: torch.Tensor,
        n: int,
        m: int,
        vector: int,
        config: VectorConfig,
        bias: torch.Tensor | None = None,
        input_precision: str = "ieee",
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        tokens = xt_shape[1]
        rows, kept = values.shape
        if vector % config.block_n or rows % config.block_n:
            raise ValueError(f"config: block_n={config.block_n} must divide vector={vector} and N={rows}")
        upcast = upcasts_bf16(values.dtype if dtype is None else dtype)
        token_align = _alignment(tokens, xt_strides[0])
        split_k = max(1, min(config.split_k, cdiv(kept, config.block_k)))
        tiles = cdiv(tokens, config.block_m) * (rows // config.block_n)
        weight = (
            values, kept_offsets, values if bias is None else bias, values if scales is None else scales,
            tokens, rows, kept, *xt_strides, *out_strides, tokens * rows,
        )
        constexprs = dict(
            SPLIT_K=split_k, N_KEEP=n, GROUP=m, VECTOR=vector, HAS_BIAS=bias is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_SIZE_M=config.group_size_m, WEIGHT_FIRST=config.weight_first, SCALED=scales is not None,
            INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST=upcast,
            TOKEN_ALIGN=token_align,
            Y_ROW_ALIGN=_alignment(out_strides[1]) if out_strides[0] == 1 else 1,
            WIDE=wide_offsets(
                (xt_shape, xt_strides), ((tokens, rows), out_strides), extents=(rows * kept, split_k * tokens * rows)
            ),
            GATHER_AHEAD=gathers_ahead(xt_strides, token_align, (values.dtype if dtype is None else dtype).itemsize),
        )
        self._launch = SplitKLaunch(
            _nm_vector_kernel, (tiles, split_k, 1), weight, constexprs, config.num_warps, config.num_stages, split_k,
            tokens, rows, tiles,
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(xt, out)


def nm_vector_matmul(
    xt: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    vector: int,
    out: torch.Tensor,
    config: VectorConfig,
    bias: torch.Tensor | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for a vector-wise N:M ``W`` given
    as ``values`` [N, K*n/m] and uint8 ``kept_offsets`` [N/V, K*n/m]; ``xt`` is [K, M].

    For fp32 inputs ``input_precision`` is ``"ieee"`` (FMA), ``"tf32x3"`` (fp32 accuracy from three
    tf32 tensor-core products) or ``"tf32"``; fp16/bf16 use tensor cores either way. Shapes are trusted:
    ``nmspmm.ops`` validates them and :func:`choose_vector_config` picks ``config``. Repeated products of one
    weight keep a :class:`VectorProduct` instead.
    """
    product = VectorProduct(
        tuple(xt.shape), xt.stride(), out.stride(), values, kept_offsets, n, m, vector, config, bias, input_precision
    )
    product(xt, out)
    return out
