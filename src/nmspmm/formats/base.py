"""What every sparse weight format shares: dtype and device from its values, and moves."""

from __future__ import annotations

from typing import Any

import torch


class SparseWeightBase:
    """Base of the weight formats; a subclass holds ``values`` and implements ``to`` (a validated copy)."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def cuda(self, device: int | str | torch.device | None = None) -> Any:
        """A copy on a CUDA device (the current one by default)."""
        return self.to("cuda" if device is None else device)

    def cpu(self) -> Any:
        """A copy on the CPU."""
        return self.to("cpu")
