"""Vector-wise N:M product on tensor cores (or exact fp32 FMA): ``Y = X @ W.T`` where each tile of
BLOCK_N output features shares one choice of kept inputs, so the tile is a dense product over the
gathered input features. ``X`` is read feature-major (``xt = X.T``), so every gathered feature is one
contiguous row of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreter_active, launch
from .split_k import split_k_buffers, split_k_total


@triton.jit
def _nm_vector_kernel(
    xt_ptr, values_ptr, offsets_ptr, bias_ptr, y_ptr, partial_ptr, counter_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_ym, stride_yn, stride_ps,
    SPLIT_K: tl.constexpr, N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    WEIGHT_FIRST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TOKEN_ALIGN: tl.constexpr, Y_ROW_ALIGN: tl.constexpr,
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
    m_valid = offs_m < M
    offsets_row = offsets_ptr + (pid_n * BLOCK_N // VECTOR) * KEPT
    # WEIGHT_FIRST computes the transposed tile W @ X_kept (output features on the MMA's M side).
    if WEIGHT_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < k_end
        offset = tl.load(offsets_row + kk, mask=k_valid, other=0).to(tl.int32)
        column = (kk // N_KEEP) * GROUP + offset
        if WEIGHT_FIRST:
            w = tl.load(values_ptr + offs_n[:, None] * KEPT + kk[None, :], mask=k_valid[None, :], other=0.0)
            x = tl.load(
                xt_ptr + column[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                mask=k_valid[:, None] & m_valid[None, :], other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, x, acc, input_precision=INPUT_PRECISION)
        else:
            x = tl.load(
                xt_ptr + column[None, :] * stride_xk + offs_m[:, None] * stride_xm,
                mask=m_valid[:, None] & k_valid[None, :], other=0.0,
            )
            w = tl.load(values_ptr + offs_n[None, :] * KEPT + kk[:, None], mask=k_valid[:, None], other=0.0)
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


def _alignment(*values: int) -> int:
    """The largest power of two up to 16 that divides every value (a token count, strides between token rows)."""
    alignment = 16
    while any(value % alignment for value in values):
        alignment //= 2
    return alignment


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
    ``nmspmm.ops`` validates them and ``nmspmm.perf`` picks ``config``.
    """
    tokens = xt.shape[1]
    rows, kept = values.shape
    if vector % config.block_n or rows % config.block_n:
        raise ValueError(f"config: block_n={config.block_n} must divide vector={vector} and N={rows}")
    upcast = interpreter_active() and values.dtype == torch.bfloat16
    split_k = max(1, min(config.split_k, cdiv(kept, config.block_k)))
    tiles = cdiv(tokens, config.block_m) * (rows // config.block_n)
    partial = counters = values
    if split_k > 1:
        partial, counters = split_k_buffers(out.device, split_k, tokens, rows, tiles)
    launch(
        _nm_vector_kernel, (tiles, split_k),
        (
            xt, values, kept_offsets, values if bias is None else bias, out, partial, counters,
            tokens, rows, kept, xt.stride(0), xt.stride(1), out.stride(0), out.stride(1), tokens * rows,
        ),
        dict(
            SPLIT_K=split_k, N_KEEP=n, GROUP=m, VECTOR=vector, HAS_BIAS=bias is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_SIZE_M=config.group_size_m, WEIGHT_FIRST=config.weight_first,
            INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST=upcast,
            TOKEN_ALIGN=_alignment(tokens, xt.stride(0)), Y_ROW_ALIGN=_alignment(out.stride(1)) if out.stride(0) == 1 else 1,
        ),
        config.num_warps, config.num_stages,
    )
    return out
