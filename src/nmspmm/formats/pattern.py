"""N:M pattern parsing and the argument checks every format shares."""

from __future__ import annotations

import re

import torch
from torch._subclasses.fake_tensor import is_fake

SUPPORTED_M = (4, 8, 16, 32, 64)
SUPPORTED_VECTORS = (1, 16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The largest N or K of a weight: the formats' int32 indices (and the kernels' offsets) address up to it.
MAX_SIDE = 2**31 - 1
# The vector-wise pattern of M=32 for each sparsity the studies compare formats at (N:M's is 1 - n/m).
NM_OF_SPARSITY = {0.5: "16:32", 0.75: "8:32", 0.875: "4:32"}


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Split an ``"n:m"`` pattern into ``(n, m)``, checking 1 <= n < m and m in SUPPORTED_M."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected a string like '8:32', got {type(pattern).__name__} {pattern!r}")
    match = re.fullmatch(r"\s*([0-9]{1,3})\s*:\s*([0-9]{1,3})\s*", pattern)
    if match is None:
        shown = pattern if len(pattern) <= 40 else f"{pattern[:40]}... ({len(pattern)} characters)"
        raise ValueError(
            f"pattern: expected 'n:m' with two positive integers (ASCII digits), like '8:32', got {shown!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if m not in SUPPORTED_M:
        raise ValueError(f"pattern: m must be one of {SUPPORTED_M}, got m={m} in {pattern!r}")
    if not 1 <= n < m:
        raise ValueError(f"pattern: n must satisfy 1 <= n < m, got n={n}, m={m} in {pattern!r}")
    return n, m


def check_shape(shape: object) -> tuple[int, ...]:
    """A weight's shape as a tuple of Python ints, or a TypeError naming ``shape`` (the formats' validation checks
    that it is ``(N, K)`` with N, K > 0)."""
    try:
        items = tuple(shape)
    except TypeError:
        raise TypeError(f"shape: expected (N, K) as two ints, got {type(shape).__name__} {shape!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"shape: expected (N, K) as two ints, got {shape!r}")
    if any(v > MAX_SIDE for v in items):
        raise ValueError(f"shape: N and K must be at most {MAX_SIDE} (int32 indices and kernel offsets), got {items}")
    return items


def check_vector(vector: int) -> int:
    """Validate a vector length V (how many consecutive output features share one choice)."""
    if isinstance(vector, bool) or not isinstance(vector, int):
        raise TypeError(f"vector: expected an int in {SUPPORTED_VECTORS}, got {type(vector).__name__} {vector!r}")
    if vector not in SUPPORTED_VECTORS:
        raise ValueError(f"vector: expected one of {SUPPORTED_VECTORS}, got {vector}")
    return vector


def check_weight_matrix(weight: torch.Tensor, n: int, m: int, vector: int, name: str = "weight") -> None:
    """Check that ``weight`` is a non-empty 2-D float matrix whose shape fits the pattern and vector."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out_features, in_features] matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(weight.shape)}")
    if cols % m:
        raise ValueError(f"{name}: in_features K={cols} must be divisible by m={m} of the pattern {n}:{m}")
    if rows % vector:
        raise ValueError(f"vector: V={vector} must divide out_features N={rows} of {name}")


def check_values(values: object) -> None:
    """Refuse ``values`` that are not a tensor of a supported dtype (every format's kept values)."""
    if not isinstance(values, torch.Tensor) or values.dtype not in SUPPORTED_DTYPES:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"values: expected a float16, bfloat16 or float32 tensor, got {got}")


def holds_values(tensor: torch.Tensor) -> bool:
    """False for a tensor that has a shape but no elements to read: on the meta device (a model built under
    ``torch.device("meta")``, as transformers and accelerate do for large models) or a FakeTensor (under
    ``FakeTensorMode``). The formats and pruners skip their checks of values (finite, index ranges and order) for
    such tensors, which no check could read, and keep those of shapes, dtypes and devices. While torch.compile
    traces, tensors stand for real ones, so this is True: the value checks run as in eager mode."""
    if torch.compiler.is_compiling():
        return True
    return not (tensor.is_meta or is_fake(tensor))


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as saved weights name it: ``"float16"``, ``"bfloat16"``, ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def check_state_dtype(values: torch.Tensor, dtype_name: object) -> None:
    """Check that a saved weight's ``values`` have the dtype its metadata names (``"float16"`` etc.)."""
    expected = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}.get(dtype_name)
    if expected != values.dtype:
        raise ValueError(f"dtype: metadata says {dtype_name!r}, but the stored values are {values.dtype}")


def checked_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor, after checking that it is a 0/1 tensor of ``weight``'s shape and device (its
    values only where it holds them: :func:`holds_values`)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask: expected shape {tuple(weight.shape)} like weight, got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask: on {mask.device}, but weight is on {weight.device}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or (
            holds_values(mask) and not bool(((mask == 0) | (mask == 1)).all())
        ):
            raise TypeError(f"mask: expected a bool (or 0/1 integer) tensor, got {mask.dtype}")
        mask = mask.bool()
    return mask
