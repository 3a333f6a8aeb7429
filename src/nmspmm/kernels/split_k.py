"""The finishing pass of split-K launches: the programs of one output tile each summed a share of the reduction
into their own fp32 slice; this kernel adds the slices (and the bias) and writes the result in the output's
dtype and layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_k_sum_kernel(
    partial_ptr, bias_ptr, y_ptr, M, N,
    stride_ps, stride_pm, stride_ym, stride_yn,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(partial_ptr + split * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], mask=valid)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=valid)


def sum_split_k(partial: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``partial.sum(0) (+ bias)`` into ``out`` ([M, N], any strides) for fp32 ``partial`` [S, M, N] with
    unit stride along N; ``bias`` [N] contiguous."""
    splits, tokens, rows = partial.shape
    block = 32
    _split_k_sum_kernel[(triton.cdiv(tokens, block), triton.cdiv(rows, block))](
        partial, bias if bias is not None else partial, out, tokens, rows,
        partial.stride(0), partial.stride(1), out.stride(0), out.stride(1),
        SPLIT_K=splits, HAS_BIAS=bias is not None, BLOCK_M=block, BLOCK_N=block, num_warps=4,
    )
    return out
