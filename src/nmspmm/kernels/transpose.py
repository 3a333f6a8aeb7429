"""Tiled transpose into feature-major layout: ``out[K, M] = x[M, K]`` for any strides of ``x``.

A tiled copy keeps both the reads and the writes coalesced, where ``x.t().contiguous()`` reaches only a
fraction of the device's copy bandwidth."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, interpreter_active, wide_offsets


@triton.jit
def _transpose_kernel(
    x_ptr, out_ptr, M, K,
    stride_xm, stride_xk, stride_ok, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:  # offsets of 2**31 elements or more: int64 arithmetic
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    valid = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=valid)
    tl.store(out_ptr + offs_k[None, :] * stride_ok + offs_m[:, None] * stride_om, tile, mask=valid)


class Transpose:
    """The transpose's launch for one shape and layout of ``x`` [M, K] and ``out`` [K, M], prepared once: a call
    writes ``x.T`` into ``out`` (tensors of the prepared shapes and strides; only their data pointers are read)."""

    __slots__ = ("_launch",)

    def __init__(self, shape: tuple[int, int], x_strides: tuple[int, int], out_strides: tuple[int, int]) -> None:
        rows, cols = shape
        block = 16 if interpreter_active() else 64
        wide = wide_offsets((shape, x_strides), ((cols, rows), out_strides))
        self._launch = Launcher(
            _transpose_kernel, (cdiv(rows, block), cdiv(cols, block), 1), (rows, cols, *x_strides, *out_strides),
            dict(BLOCK_M=block, BLOCK_K=block, WIDE=wide), 4,
        )

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self._launch(x, out)


def transpose(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x.T`` as a contiguous ``[K, M]`` tensor (written into ``out`` if given)."""
    rows, cols = x.shape
    if out is None:
        out = torch.empty((cols, rows), dtype=x.dtype, device=x.device)
    Transpose((rows, cols), x.stride(), out.stride())(x, out)
    return out
