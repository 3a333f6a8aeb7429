"""Launch helpers shared by the kernel files."""

from __future__ import annotations

import functools
import os

import torch


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The number of SMs of a CUDA device (launch rules size grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
