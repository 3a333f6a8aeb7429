"""Sampled dense-dense product (SDDMM): ``out[j] = sum_d a[row[j], d] * b[col[j], d]`` for every nonzero ``j``
of a sparse structure (rows in order, columns ascending within a row). Two kernels, both accumulating in fp32:

- per nonzero (short reductions): programs take flat chunks of nonzeros, so every program does the same work
  whatever the row lengths; each nonzero reads its own ``a`` and ``b`` runs, on FMA units.
- per tile (long reductions on tensor cores): a program computes a dense ``BLOCK_R x BLOCK_C`` tile of
  ``a @ b.T``, then gathers the tile's nonzeros out of it. Each ``a`` and ``b`` run is read once per tile instead
  of once per nonzero, which is what bounds the first kernel when the reduction is long (L2-to-SM traffic).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreter_active, launch, upcasts_bf16


@triton.jit
def _sddmm_kernel(
    a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr,
    NNZ, D, stride_a, stride_b,
    BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    j_valid = j < NNZ
    row = tl.load(rows_ptr + j, mask=j_valid, other=0).to(tl.int64)
    col = tl.load(cols_ptr + j, mask=j_valid, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_NNZ, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        valid = j_valid[:, None] & (d < D)[None, :]
        a = tl.load(a_ptr + row[:, None] * stride_a + d[None, :], mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + col[:, None] * stride_b + d[None, :], mask=valid, other=0.0).to(tl.float32)
        acc += a * b
    tl.store(out_ptr + j, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=j_valid)


@triton.jit
def _sddmm_tiled_kernel(
    a_ptr, b_ptr, cell_offsets_ptr, cols_ptr, out_ptr,
    R, C, D, stride_a, stride_b, CELLS_PER_ROW,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, CELL: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    row_valid = rows < R
    # The tile spans BLOCK_C // CELL cells of the offsets; within a row, consecutive cells' runs are adjacent.
    first_cell = col_block * (BLOCK_C // CELL)
    end_cell = min(first_cell + BLOCK_C // CELL, CELLS_PER_ROW)
    row_base = rows.to(tl.int64) * CELLS_PER_ROW
    starts = tl.load(cell_offsets_ptr + row_base + first_cell, mask=row_valid, other=0)
    ends = tl.load(cell_offsets_ptr + row_base + end_cell, mask=row_valid, other=0)
    if tl.sum(ends - starts, axis=0) > 0:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + d[None, :],
                        mask=row_valid[:, None] & (d < D)[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_b + d[None, :],
                        mask=(cols < C)[:, None] & (d < D)[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
        # A row of the tile holds at most BLOCK_C nonzeros (distinct columns): one [BLOCK_R, BLOCK_C] gather
        # picks every nonzero of the tile out of the accumulator.
        local = tl.arange(0, BLOCK_C)
        j = starts[:, None] + local[None, :]
        j_valid = local[None, :] < (ends - starts)[:, None]
        column = tl.load(cols_ptr + j, mask=j_valid, other=0) - col_block * BLOCK_C
        picked = tl.gather(acc, tl.where(j_valid, column, 0), axis=1)
        tl.store(out_ptr + j, picked.to(out_ptr.dtype.element_ty), mask=j_valid)


class SddmmBlocks(NamedTuple):
    """Tile of one :func:`sddmm` program: ``block_nnz`` nonzeros by ``block_d`` reduction elements per step."""

    block_nnz: int
    block_d: int
    num_warps: int


def sddmm_blocks(depth: int) -> SddmmBlocks:
    """Tiles for a reduction of length ``depth``: 64 nonzeros by 32 reduction elements (16 when ``depth`` <= 16),
    eight elements a thread. On an H100 (4096 x 4096 at 90%, fp16) this beat 32 by 128 by 1.3x to 1.5x for
    depth 256 and 4096: small tiles keep more programs resident to overlap the gathers. Small tiles under the
    interpreter."""
    if interpreter_active():
        return SddmmBlocks(16, 16, 4)
    block_d = 16 if depth <= 16 else 32
    return SddmmBlocks(64, block_d, 64 * block_d // 256)


def sddmm(
    a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write ``(a @ b.T)[row_indices[j], col_indices[j]]`` into ``out[j]`` for every nonzero ``j`` (``out`` [nnz],
    contiguous); ``a`` is [R, D] and ``b`` [C, D], any row stride but unit stride along D (when D > 1); the
    indices int32."""
    nnz, depth = out.numel(), a.shape[1]
    if nnz == 0:
        return out
    if depth > 1 and (a.stride(1) != 1 or b.stride(1) != 1):
        raise ValueError(f"a, b: expected unit stride along D, got strides {a.stride()} and {b.stride()}")
    blocks = sddmm_blocks(depth)
    launch(
        _sddmm_kernel, (cdiv(nnz, blocks.block_nnz),),
        (a, b, row_indices.contiguous(), col_indices.contiguous(), out, nnz, depth, a.stride(0), b.stride(0)),
        dict(BLOCK_NNZ=blocks.block_nnz, BLOCK_D=blocks.block_d), blocks.num_warps,
    )
    return out


# Column granularity of the offsets the per-tile kernel reads (``CSRWeight.tile_offsets(CELL)``); its column
# tiles are multiples of it. Reductions at least TILED_MIN_DEPTH long use the per-tile kernel.
CELL = 64
TILED_MIN_DEPTH = 64
# Exact fp32 (three tf32 products per tile) costs the whole dense product, 1.8 ms at 4096^3 whatever the density
# (the tiles of sddmm_tile); the per-nonzero kernel costs the kept dot products, 0.7 ms at 2% density (H100,
# 2026-11-23). Scaling the latter linearly, they cross near 5%; below it the per-nonzero kernel is the faster.
TILED_MIN_DENSITY_EXACT = 0.05


class SddmmTile(NamedTuple):
    """Tile of one per-tile SDDMM program: ``block_r`` x ``block_c`` outputs, ``block_d`` reduction elements a step."""

    block_r: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int


def sddmm_tile(depth: int, dtype: torch.dtype) -> SddmmTile:
    """The per-tile kernel's tile. From a sweep of nine tiles on 4096 x 4096 at 50% and 90%, depth 256 and 4096
    (H100, 2026-11-23): 128 x 64 x 32 with 4 warps for fp32 (1.84 against 2.36 ms for 64 x 64 at depth 4096) and
    for short half-precision reductions; 128 x 128 x 64 with 8 warps and 4 stages for half precision from a depth
    of 1024 (0.33 against 0.59 ms at depth 4096). Small tiles under the interpreter."""
    if interpreter_active():
        return SddmmTile(64, CELL, 32, 4, 1)
    if dtype != torch.float32 and depth >= 1024:
        return SddmmTile(128, 2 * CELL, 64, 8, 4)
    return SddmmTile(128, CELL, 32, 4, 3)


def sddmm_tiled(
    a: torch.Tensor, b: torch.Tensor, cell_offsets: torch.Tensor, col_indices: torch.Tensor, out: torch.Tensor,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """:func:`sddmm` by dense tensor-core tiles, for ``cell_offsets`` from ``CSRWeight.tile_offsets(CELL)`` (or
    ``nmspmm.formats.csr.tile_offsets_of`` with width ``CELL``); ``a`` [R, D] and ``b`` [C, D] with unit stride
    along D. fp32 operands use ``input_precision`` ("ieee" FMA, "tf32x3" or "tf32")."""
    rows, depth = a.shape
    cols = b.shape[0]
    if out.numel() == 0:
        return out
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError(f"a, b: expected unit stride along D, got strides {a.stride()} and {b.stride()}")
    cells_per_row = cdiv(cols, CELL)
    if cell_offsets.numel() != rows * cells_per_row + 1:
        raise ValueError(
            f"cell_offsets: expected {rows * cells_per_row + 1} entries for a [{rows}, {cols}] structure in cells "
            f"of {CELL} columns, got {cell_offsets.numel()}"
        )
    tile = sddmm_tile(depth, a.dtype)
    upcast = upcasts_bf16(a.dtype)
    grid = (cdiv(rows, tile.block_r), cdiv(cols, tile.block_c))
    launch(
        _sddmm_tiled_kernel, grid,
        (a, b, cell_offsets, col_indices.contiguous(), out, rows, cols, depth, a.stride(0), b.stride(0), cells_per_row),
        dict(
            BLOCK_R=tile.block_r, BLOCK_C=tile.block_c, BLOCK_D=tile.block_d, CELL=CELL, UPCAST=upcast,
            INPUT_PRECISION=input_precision if a.dtype == torch.float32 else "ieee",
        ),
        tile.num_warps, tile.num_stages,
    )
    return out
