"""Unstructured sparse product (Sputnik-style SpMM): ``out[m, n] = sum_j values[j] * xt[col[j], m]`` over the
nonzeros ``j`` of CSR row ``n``.

One program owns one weight row and a block of tokens. Programs are launched in ``row_order`` (rows by
descending length), so the longest rows start first and the short ones fill in behind them: the row swizzle
that balances work when row lengths vary. Activations are read feature-major (``xt = X.T``, [K, M]), so every
gathered input feature is one contiguous run of tokens. Products run on FMA units, accumulated in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, interpreter_active, next_power_of_2
from .transpose import Transpose


@triton.jit
def _csr_spmm_kernel(
    xt_ptr, out_ptr, values_ptr, col_ptr, row_offsets_ptr, row_order_ptr, bias_ptr,
    M, stride_xk, stride_xm, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    # Token blocks vary fastest, so the programs of one row run together and share its columns and values.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    row = tl.load(row_order_ptr + pid // num_pid_m)
    offs_m = (pid % num_pid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    start = tl.load(row_offsets_ptr + row)
    end = tl.load(row_offsets_ptr + row + 1)
    acc = tl.zeros((BLOCK_NNZ, BLOCK_M), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NNZ):
        j = j0 + tl.arange(0, BLOCK_NNZ)
        j_valid = j < end
        col = tl.load(col_ptr + j, mask=j_valid, other=0).to(tl.int64)
        w = tl.load(values_ptr + j, mask=j_valid, other=0.0).to(tl.float32)
        x = tl.load(
            xt_ptr + col[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=j_valid[:, None] & m_valid[None, :], other=0.0,
        ).to(tl.float32)
        acc += w[:, None] * x
    result = tl.sum(acc, axis=0)
    if HAS_BIAS:
        result += tl.load(bias_ptr + row).to(tl.float32)
    out_ptrs = out_ptr + offs_m.to(tl.int64) * stride_om + row.to(tl.int64) * stride_on
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=m_valid)


class SpmmBlocks(NamedTuple):
    """Tile of one :func:`csr_spmm` program: ``block_m`` tokens by ``block_nnz`` nonzeros per step."""

    block_m: int
    block_nnz: int
    num_warps: int


def spmm_blocks(tokens: int, rows: int, nnz: int) -> SpmmBlocks:
    """Tiles for ``tokens`` activations and a weight of ``rows`` rows holding ``nnz`` nonzeros.

    ``block_m``: as many tokens as there are, up to 64 (one gathered feature then fills a 128-byte line in
    fp16; 128 was slower). ``block_nnz``: about 512 tile elements, at least 16, and no more than the average row
    holds (short rows waste no lanes). Small tiles keep many programs resident, and the gathers need that
    parallelism: on an H100 (4096 x 4096 at 90%, fp16) 16 nonzeros by 64 tokens took 1.9 ms for 4096 tokens
    against 2.6 ms for 32 by 64, and 32 by 16 tokens 19 us for 16 tokens against 26 us for 128 by 16. Under the
    interpreter at most 32 tokens, so that it also runs several token blocks.
    """
    block_m = min(next_power_of_2(tokens), 32 if interpreter_active() else 64)
    average_row = cdiv(nnz, max(rows, 1))
    block_nnz = max(min(next_power_of_2(average_row), 512 // block_m), 16)
    num_warps = 4 if block_m * block_nnz >= 1024 else 2
    return SpmmBlocks(block_m, block_nnz, num_warps)


def _transposed_write_min_tokens() -> int:
    """From how many tokens a row-major ``out`` is better written feature-major and then transposed: each
    program writes one column of ``out``, an element per cache line (H100, 4096 x 4096 at 90%, fp16, 4096
    tokens: 3.6 ms direct, 2.6 ms through a feature-major buffer). Lower under the interpreter, so that tests
    cover both ways."""
    return 32 if interpreter_active() else 512


class CSRProduct:
    """The SpMM for one CSR weight and one layout of ``xt`` [K, M] and ``out`` [M, N], prepared once: a call writes
    ``xt.T @ W.T (+ bias)`` into ``out`` (tensors of the prepared shapes and strides; only their data pointers are
    read, also where nothing is launched: the fill then writes through the prepared layout). See :func:`csr_spmm`
    for the arguments."""

    __slots__ = ("_launch", "_out_t_shape", "_transpose", "_fill", "_out_layout")

    def __init__(
        self,
        xt_shape: tuple[int, int],
        xt_strides: tuple[int, int],
        out_shape: tuple[int, int],
        out_strides: tuple[int, int],
        values: torch.Tensor,
        col_indices: torch.Tensor,
        row_offsets: torch.Tensor,
        row_order: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        tokens, rows = out_shape
        self._launch = self._transpose = self._out_t_shape = None
        self._fill = bias  # where the weight has no nonzeros: the bias, or zeros
        # The [M, N] view the fill writes: out may come as another view of that memory (ProductPlan's
        # feature-major [N, M] result), so the prepared shape and strides say where each element goes.
        self._out_layout = (tuple(out_shape), tuple(out_strides))
        if tokens * rows == 0 or values.numel() == 0:
            return
        if out_strides[0] != 1 and tokens >= _transposed_write_min_tokens():
            # Written feature-major into a buffer, then transposed into out.
            self._out_t_shape = (rows, tokens)
            self._transpose = Transpose(self._out_t_shape, (tokens, 1), out_strides)
            out_strides = (1, tokens)
        values, col_indices, row_offsets, row_order = (
            t.contiguous() for t in (values, col_indices, row_offsets, row_order)
        )
        bias = None if bias is None else bias.contiguous()
        blocks = spmm_blocks(tokens, rows, values.numel())
        self._launch = Launcher(
            _csr_spmm_kernel, (rows * cdiv(tokens, blocks.block_m), 1, 1),
            (
                values, col_indices, row_offsets, row_order, values if bias is None else bias,
                tokens, *xt_strides, *out_strides,
            ),
            dict(HAS_BIAS=bias is not None, BLOCK_M=blocks.block_m, BLOCK_NNZ=blocks.block_nnz), blocks.num_warps,
        )

    def __call__(self, xt: torch.Tensor, out: torch.Tensor) -> None:
        if self._launch is None:
            out = out.as_strided(*self._out_layout)
            if self._fill is not None:
                out.copy_(self._fill.expand_as(out))
            else:
                out.zero_()
        elif self._transpose is None:
            self._launch(xt, out)
        else:
            out_t = out.new_empty(self._out_t_shape)
            self._launch(xt, out_t)
            self._transpose(out_t, out)


def csr_spmm(
    xt: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_offsets: torch.Tensor,
    row_order: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``xt.T @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for the CSR ``W`` [N, K] given by
    ``values`` [nnz], int32 ``col_indices`` [nnz] and ``row_offsets`` [N + 1], launching rows in the int32
    ``row_order`` [N]; ``xt`` is [K, M] (any strides; unit token stride reads fastest). Rows without nonzeros
    get the bias (or zero). Accumulates in fp32. A row-major ``out`` for many tokens is written through a
    feature-major buffer and a tiled transpose (see :func:`_transposed_write_min_tokens`). Repeated products of
    one weight keep a :class:`CSRProduct` instead."""
    product = CSRProduct(
        tuple(xt.shape), xt.stride(), tuple(out.shape), out.stride(), values, col_indices, row_offsets, row_order,
        bias,
    )
    product(xt, out)
    return out
