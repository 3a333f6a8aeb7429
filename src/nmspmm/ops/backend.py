"""Backend choice shared by every format's ops: the Triton kernels (CUDA, or the CPU interpreter when asked)
or the dense reference on the CPU, and the precision of fp32 tensor-core products."""

from __future__ import annotations

import torch

from ..kernels.launch import interpreter_active

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: str) -> None:
    """Reject a backend name not in :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def use_triton(backend: str, device: torch.device) -> bool:
    """True when the product on ``device`` runs the Triton kernels: always on CUDA (never a silent dense
    fallback), on the CPU only for ``backend="triton"`` under the interpreter; False means the reference."""
    check_backend(backend)
    if backend == "reference":
        return False
    if device.type == "cuda":
        return True
    if backend == "triton":
        if not interpreter_active():
            raise ValueError("backend: 'triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False


def input_precision(dtype: torch.dtype) -> str:
    """tf32 for fp32 operands when torch's matmul precision allows it (as torch.matmul does), else exact."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
