"""Element-wise N:M product (V = 1): every output feature keeps its own n of each m inputs, so no two
features share a gather and the product runs on FMA units. Correct for every pattern; not yet tuned."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, interpreter_active, wide_offsets


@triton.jit
def _nm_element_kernel(
    xt_ptr, y_ptr, values_ptr, offsets_ptr, bias_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_ym, stride_yn,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if WIDE:  # offsets of 2**31 elements or more: int64 arithmetic
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
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
        if WIDE:
            column = column.to(tl.int64)
        x = tl.load(
            xt_ptr + column[None, :, :] * stride_xk + offs_m[:, None, None] * stride_xm,
            mask=m_valid[:, None, None] & kn_valid[None, :, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


class ElementProduct:
    """The element-wise kernel's launch for one weight and one layout of ``xt`` [K, M] and ``out`` [M, N],
    prepared once: a call writes ``xt.T @ W.T (+ bias)`` into ``out`` (tensors of the prepared shapes and strides;
    only their data pointers are read). See :func:`nm_element_matmul` for the arguments."""

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
        bias: torch.Tensor | None = None,
    ) -> None:
        tokens = xt_shape[1]
        rows, kept = values.shape
        block_m, block_n, block_k = (16, 16, 8) if interpreter_active() else (32, 32, 8)
        self._launch = Launcher(
            _nm_element_kernel, (cdiv(tokens, block_m), cdiv(rows, block_n), 1),
            (values, kept_offsets, values if bias is None else bias, tokens, rows, kept, *xt_strides, *out_strides),
            dict(
                N_KEEP=n, GROUP=m, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                WIDE=wide_offsets((xt_shape, xt_strides), ((tokens, rows), out_strides), extents=(rows * kept,)),
            ),
            4,
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(xt, out)


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
    given as ``values`` and uint8 ``kept_offsets``, both [N, K*n/m]; accumulates in fp32. Repeated products of
    one weight keep an :class:`ElementProduct` instead."""
    ElementProduct(tuple(xt.shape), xt.stride(), out.stride(), values, kept_offsets, n, m, bias)(xt, out)
    return out
