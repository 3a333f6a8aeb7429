"""``nmspmm.linear`` for every weight format: the call goes to the format's own product."""

from __future__ import annotations

import torch

from ..formats import BitmapWeight, BlockShuffledWeight, CSRWeight, NMSparseWeight, QuantizedNMWeight, SparseWeight
from . import bitmap, block_shuffled, csr, nm

_FORMATS = "an nmspmm.NMSparseWeight, QuantizedNMWeight, CSRWeight, BitmapWeight or BlockShuffledWeight"
_FEATURE_MAJOR_FORMATS = "NMSparseWeight, CSRWeight or BitmapWeight"


def linear(
    x: torch.Tensor, weight: SparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]`` and a sparse weight of any format: a contiguous
    ``[..., N]`` result in x's dtype. On CUDA the format's Triton kernels run (never a silent dense fallback);
    on the CPU the dense reference, or the kernels under ``TRITON_INTERPRET=1`` with ``backend="triton"``."""
    if isinstance(weight, QuantizedNMWeight):
        return nm.nm_quantized_linear(x, weight, bias, backend=backend)
    if isinstance(weight, NMSparseWeight):
        return nm.nm_linear(x, weight, bias, backend=backend)
    if isinstance(weight, CSRWeight):
        return csr.csr_linear(x, weight, bias, backend=backend)
    if isinstance(weight, BitmapWeight):
        return bitmap.bitmap_linear(x, weight, bias, backend=backend)
    if isinstance(weight, BlockShuffledWeight):
        return block_shuffled.block_shuffled_linear(x, weight, bias, backend=backend)
    raise TypeError(f"weight: expected {_FORMATS}, got {type(weight).__name__}")


def linear_feature_major(
    x_t: torch.Tensor,
    weight: NMSparseWeight | CSRWeight | BitmapWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The product on feature-major activations: ``x_t`` is ``[K, M]`` (``X.T``), the result ``[N, M]``, so a
    chain of sparse layers needs no transposes. N:M, CSR and bitmap weights (block-sparse reads x row-major)."""
    if isinstance(weight, NMSparseWeight):
        return nm.nm_linear_feature_major(x_t, weight, bias, backend=backend)
    if isinstance(weight, CSRWeight):
        return csr.csr_linear_feature_major(x_t, weight, bias, backend=backend)
    if isinstance(weight, BitmapWeight):
        return bitmap.bitmap_linear_feature_major(x_t, weight, bias, backend=backend)
    if isinstance(weight, BlockShuffledWeight):
        raise TypeError(
            f"weight: linear_feature_major takes an {_FEATURE_MAJOR_FORMATS}; a BlockShuffledWeight reads x "
            "row-major, so call nmspmm.linear(x, weight)"
        )
    raise TypeError(f"weight: expected an nmspmm.{_FEATURE_MAJOR_FORMATS}, got {type(weight).__name__}")
