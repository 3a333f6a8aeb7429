"""Vector-wise N:M product on tensor cores (or exact fp32 FMA): ``Y = X @ W.T`` where each tile of
BLOCK_N output features shares one choice of kept inputs, so the tile is a dense product over the
gathered input features. ``X`` is read feature-major (``xt = X.T``), so every gathered feature is one
contiguous row of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import interpreter_active


@triton.jit
def _nm_vector_kernel(
    xt_ptr, values_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_ym, stride_yn,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < M
    offsets_row = offsets_ptr + (pid_n * BLOCK_N // VECTOR) * KEPT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KEPT, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_valid = kk < KEPT
        offset = tl.load(offsets_row + kk, mask=k_valid, other=0).to(tl.int32)
        column = (kk // N_KEEP) * GROUP + offset
        x = tl.load(
            xt_ptr + column[None, :] * stride_xk + offs_m[:, None] * stride_xm,
            mask=m_valid[:, None] & k_valid[None, :], other=0.0,
        )
        w = tl.load(values_ptr + offs_n[None, :] * KEPT + kk[:, None], mask=k_valid[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None])


@dataclass(frozen=True)
class VectorConfig:
    """Tile shape and pipelining of one launch of the vector-wise kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_size_m: int = 8


def default_vector_config(tokens: int, vector: int, dtype: torch.dtype) -> VectorConfig:
    """A tile shape from a small table: BLOCK_N may not exceed V (a tile shares one index set)."""
    block_n = min(vector, 128)
    if interpreter_active():
        return VectorConfig(block_m=16, block_n=block_n, block_k=16, num_warps=4, num_stages=1)
    block_m = 128 if tokens > 64 else max(16, triton.next_power_of_2(tokens))
    block_k = 32 if dtype == torch.float32 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return VectorConfig(block_m, block_n, block_k, num_warps, num_stages=3)


def nm_vector_matmul(
    xt: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    vector: int,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_precision: str = "ieee",
    config: VectorConfig | None = None,
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for a vector-wise N:M ``W`` given
    as ``values`` [N, K*n/m] and uint8 ``kept_offsets`` [N/V, K*n/m]; ``xt`` is [K, M] with unit token stride.

    ``input_precision`` is ``"ieee"`` (exact fp32 FMA for fp32 inputs) or ``"tf32"``; fp16/bf16 use tensor
    cores either way. Shapes are trusted: ``nmspmm.ops`` validates them.
    """
    tokens = xt.shape[1]
    rows, kept = values.shape
    config = config or default_vector_config(tokens, vector, values.dtype)
    if vector % config.block_n or rows % config.block_n:
        raise ValueError(f"config: block_n={config.block_n} must divide vector={vector} and N={rows}")
    upcast = interpreter_active() and values.dtype == torch.bfloat16
    grid = (triton.cdiv(tokens, config.block_m) * (rows // config.block_n),)
    _nm_vector_kernel[grid](
        xt, values, kept_offsets, bias if bias is not None else values, out,
        tokens, rows, kept,
        xt.stride(0), xt.stride(1), out.stride(0), out.stride(1),
        N_KEEP=n, GROUP=m, VECTOR=vector, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_SIZE_M=config.group_size_m,
        INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST=upcast,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
