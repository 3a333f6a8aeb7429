"""Element-wise N:M product (V = 1): every output feature keeps its own n of each m inputs, so no two
features share a gather and the product runs on FMA units. Correct for every pattern; not yet tuned."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreter_active, launch


@triton.jit
def _nm_element_kernel(
    xt_ptr, values_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_ym, stride_yn,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < M
    n_valid = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KEPT, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kn_valid = (kk[:, None] < KEPT) & n_valid[None, :]
        entry = offs_n[None, :] * KEPT + kk[:, None]
        offset = tl.load(offsets_ptr + entry, mask=kn_valid, other=0).to(tl.int32)
        w = tl.load(values_ptr + entry, mask=kn_valid, other=0.0).to(tl.float32)
        column = (kk[:, None] // N_KEEP) * GROUP + offset
        x = tl.load(
            xt_ptr + column[None, :, :] * stride_xk + offs_m[:, None, None] * stride_xm,
            mask=m_valid[:, None, None] & kn_valid[None, :, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def nm_element_matmul(
    xt: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for an element-wise N:M ``W``
    given as ``values`` and uint8 ``kept_offsets``, both [N, K*n/m]; accumulates in fp32."""
    tokens = xt.shape[1]
    rows, kept = values.shape
    block_m, block_n, block_k = (16, 16, 8) if interpreter_active() else (32, 32, 8)
    grid = (cdiv(tokens, block_m), cdiv(rows, block_n))
    launch(
        _nm_element_kernel, grid,
        (
            xt, values, kept_offsets, bias if bias is not None else values, out,
            tokens, rows, kept, xt.stride(0), xt.stride(1), out.stride(0), out.stride(1),
        ),
        dict(N_KEEP=n, GROUP=m, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k), 4,
    )
    return out
