"""Block-sparse product on tensor cores: ``Y = X @ W.T`` where the row-permuted weight ``W[perm]`` is stored as
dense ``(BN, BK)`` blocks in block-CSR form. Each kept block is one MMA tile against BK contiguous features of
row-major ``X``; the output columns are un-permuted by the store."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import FEW_TOKENS, cdiv, interpreter_active, next_power_of_2, upcasts_bf16
from .split_k import SplitKLaunch, split_k_total


@triton.jit
def _block_sparse_kernel(
    x_ptr, out_ptr, partial_ptr, counter_ptr, values_ptr, block_columns_ptr, block_row_offsets_ptr,
    block_row_order_ptr, row_permutation_ptr, bias_ptr,
    M, N, stride_xm, stride_xk, stride_om, stride_on, stride_ps,
    SPLIT_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    block_row = tl.load(block_row_order_ptr + tl.program_id(0))
    # Split-K: program pid_k multiplies its share of the block-row's blocks; the tile's last program adds them.
    pid_k = tl.program_id(2)
    row_first = tl.load(block_row_offsets_ptr + block_row)
    row_last = tl.load(block_row_offsets_ptr + block_row + 1)
    share = tl.cdiv(row_last - row_first, SPLIT_K)
    first = row_first + pid_k * share
    last = min(row_last, first + share)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # values[j] is [BN, BK] row-major; read transposed as the [BK, BN] right operand.
    w_ptrs = values_ptr + first.to(tl.int64) * (BN * BK) + offs_k[:, None] + offs_n[None, :] * BK
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for j in range(first, last):
        column = tl.load(block_columns_ptr + j)
        features = (column * BK + offs_k).to(tl.int64)
        x = tl.load(x_rows + features[None, :] * stride_xk, mask=m_valid[:, None], other=0.0)
        w = tl.load(w_ptrs)
        w_ptrs += BN * BK
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    original_rows = tl.load(row_permutation_ptr + block_row * BN + offs_n)
    finish = True
    if SPLIT_K > 1:
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        partial_ptrs = partial_ptr + offs_m.to(tl.int64)[:, None] * N + original_rows.to(tl.int64)[None, :]
        finish, acc = split_k_total(acc, partial_ptrs, stride_ps, counter_ptr + tile, pid_k, m_valid[:, None], SPLIT_K)
    if finish:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + original_rows).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + original_rows.to(tl.int64)[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


@dataclass(frozen=True)
class BlockSparseConfig:
    """Token tile, pipelining and split-K of one launch of the block-sparse kernel."""

    block_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1


# Shared memory a launch may plan for its pipeline stages (H100 has 228 KiB per SM; leave room for the epilogue).
_SHARED_MEMORY_BUDGET = 160 * 1024


def choose_block_sparse_config(
    tokens: int, block: tuple[int, int], dtype: torch.dtype, rows: int, kept_blocks: int
) -> BlockSparseConfig:
    """Token tile from the token count (the smallest power of two >= 16 holding them, at most 128, or 64 when
    fp32 blocks are large), stages as many as the shared-memory budget holds (1 to 5: deep pipelines hide the
    latency of the block-column loads, 1.5x faster at M = 16 on an H100); small tiles under the interpreter.
    Up to :data:`FEW_TOKENS` tokens, block-rows of 64 blocks or more are split in two (fp32 halves, added by the
    tile's last program inside the launch): with a sum kernel after it, at 16 tokens, 32x32 blocks at 50% (H100)
    took 12.3 against 13.1 us on 4096x4096 and 25.9 against 29.4 us on 11008x4096; at 75% and 87.5% (32 and 16
    blocks a block-row) a split in two was 6-36% slower."""
    if interpreter_active():
        return BlockSparseConfig(block_m=16, num_warps=4, num_stages=1)
    bn, bk = block
    element = torch.finfo(dtype).bits // 8
    largest = 64 if element == 4 and bn * bk >= 64 * 64 else 128
    block_m = min(largest, max(16, next_power_of_2(tokens)))
    stage_bytes = (block_m * bk + bk * bn) * element
    stages = max(1, min(5, _SHARED_MEMORY_BUDGET // stage_bytes))
    warps = 8 if block_m * bn >= 128 * 64 else 4
    split_k = 2 if tokens <= FEW_TOKENS and kept_blocks >= 64 * (rows // bn) else 1
    return BlockSparseConfig(block_m=block_m, num_warps=warps, num_stages=stages, split_k=split_k)


class BlockSparseProduct:
    """The block-sparse kernel's launch for one weight and one layout of ``x`` [M, K] and ``out`` [M, N], prepared
    once: a call writes ``x @ W.T (+ bias)`` into ``out`` (tensors of the prepared shapes and strides; only their
    data pointers are read). See :func:`block_sparse_matmul` for the arguments."""

    __slots__ = ("_launch",)

    def __init__(
        self,
        x_shape: tuple[int, int],
        x_strides: tuple[int, int],
        out_strides: tuple[int, int],
        values: torch.Tensor,
        block_columns: torch.Tensor,
        block_row_offsets: torch.Tensor,
        block_row_order: torch.Tensor,
        row_permutation: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_precision: str = "ieee",
        config: BlockSparseConfig | None = None,
    ) -> None:
        tokens = x_shape[0]
        kept_blocks, bn, bk = values.shape
        rows = row_permutation.shape[0]
        if config is None:
            config = choose_block_sparse_config(tokens, (bn, bk), values.dtype, rows, kept_blocks)
        upcast = upcasts_bf16(values.dtype)
        split_k = config.split_k
        grid = (block_row_order.shape[0], cdiv(tokens, config.block_m), split_k)
        weight = (
            values, block_columns, block_row_offsets, block_row_order, row_permutation,
            values if bias is None else bias, tokens, rows, *x_strides, *out_strides, tokens * rows,
        )
        self._launch = SplitKLaunch(
            _block_sparse_kernel, grid, weight,
            dict(
                SPLIT_K=split_k, BN=bn, BK=bk, BLOCK_M=config.block_m, HAS_BIAS=bias is not None,
                INPUT_PRECISION="ieee" if upcast else input_precision, UPCAST=upcast,
            ),
            config.num_warps, config.num_stages, split_k, tokens, rows, grid[0] * grid[1],
        )

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(x, out)


def block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    block_columns: torch.Tensor,
    block_row_offsets: torch.Tensor,
    block_row_order: torch.Tensor,
    row_permutation: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_precision: str = "ieee",
    config: BlockSparseConfig | None = None,
) -> torch.Tensor:
    """Write ``x @ W.T (+ bias)`` into ``out`` ([M, N], any strides) for ``x`` [M, K] (any strides) and ``W``
    given by its row permutation and the block-CSR form of ``W[row_permutation]``: ``values`` [nblocks, BN, BK]
    (contiguous), int32 ``block_columns``, ``block_row_offsets`` [N / BN + 1], ``block_row_order`` (the launch
    order of the block-rows, a permutation of them) and ``row_permutation`` [N]. ``bias`` [N] is in the original
    order. Accumulates in fp32; ``input_precision`` is ``"ieee"``, ``"tf32x3"`` or ``"tf32"`` for fp32
    operands. Block-rows without blocks write the bias (or zeros). Shapes are trusted: ``nmspmm.ops`` validates
    them. Repeated products of one weight keep a :class:`BlockSparseProduct` instead."""
    product = BlockSparseProduct(
        tuple(x.shape), x.stride(), out.stride(), values, block_columns, block_row_offsets, block_row_order,
        row_permutation, bias, input_precision, config,
    )
    product(x, out)
    return out
