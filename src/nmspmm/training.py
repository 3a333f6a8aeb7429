"""Sparse training. SR-STE (Zhou et al., ICLR 2021): dense master weights, an N:M mask recomputed by magnitude
every few steps, the sparse kernels in the forward pass, and a straight-through gradient for every weight plus a
decay that pushes the pruned ones toward zero so that the mask settles; ``prepare_srste`` swaps a model's
``nn.Linear`` layers for :class:`SRSTELinear`, and after training ``finalize_srste`` swaps those for
:class:`~nmspmm.nn.SparseLinear` with the final mask.

Recovery after one-shot pruning (:func:`recover`): the kept values of a sparsified model (every format) are
fine-tuned under their fixed structure to match the dense model's outputs (distillation).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formats.nm import NMSparseWeight, kept_row_columns
from .formats.pattern import check_vector, check_weight_matrix, parse_pattern
from .nn import SPARSE_MODULES, SparseLinear, SparsifyConfig, SparsifyReport, replace_module, swap_linears
from .ops.backend import check_backend, check_operands
from .ops.nm import grad_input, nm_linear_op
from .progress import progress as draw_progress
from .prune import prune
from .prune.calibration import run_batch

DEFAULT_DECAY = 2e-4


class _SRSTEProduct(torch.autograd.Function):
    """``x @ (W * mask).T + b`` through the N:M kernels, with SR-STE's gradient for the dense ``W``:
    ``dY.T @ x`` at every position (straight through the mask) plus ``decay * W`` where the mask drops."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kept_offsets: torch.Tensor,
        n: int,
        m: int,
        vector: int,
        decay: float,
        backend: str,
    ) -> torch.Tensor:
        columns = kept_row_columns(kept_offsets, n, m, vector)
        values = weight.gather(1, columns)
        ctx.save_for_backward(x_rows, weight, values, kept_offsets, columns)
        ctx.pattern = (n, m, vector, decay, backend)
        return nm_linear_op(x_rows, values, kept_offsets, bias, n, m, vector, backend)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
        x_rows, weight, values, kept_offsets, columns = ctx.saved_tensors
        n, m, vector, decay, backend = ctx.pattern
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(grad_y, values, kept_offsets, n, m, vector, x_rows.shape[1], backend)
        if ctx.needs_input_grad[1]:
            compute = torch.promote_types(grad_y.dtype, torch.float32)
            dropped = torch.ones_like(weight, dtype=torch.bool).scatter_(1, columns, False)
            full = grad_y.to(compute).t() @ x_rows.to(compute)
            grad_weight = (full + decay * dropped * weight.to(compute)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class SRSTELinear(nn.Module):
    """A linear layer trained sparse with SR-STE: the dense ``weight`` is the Parameter the optimizer updates,
    the forward pass multiplies by its magnitude-pruned N:M form (recomputed before every ``mask_interval``-th
    training step, held fixed in eval mode and no-grad calls), and ``to_sparse`` gives the :class:`SparseLinear`
    to deploy. The state dict holds the dense weights only; loading one recomputes the mask from them."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    kept_offsets: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear,
        pattern: str,
        vector: int = 1,
        *,
        mask_interval: int = 1,
        decay: float = DEFAULT_DECAY,
        backend: str = "auto",
    ) -> None:
        """Take over ``linear``'s weight and bias (shared, not copied) as the dense master weights."""
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        self.n, self.m = parse_pattern(pattern)
        self.vector = check_vector(vector)
        check_weight_matrix(linear.weight, self.n, self.m, self.vector, "linear.weight")
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f"mask_interval: expected a positive int (training steps), got {mask_interval!r}")
        if not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay: expected a finite, non-negative number, got {decay!r}")
        check_backend(backend)
        self.out_features, self.in_features = linear.weight.shape
        self.mask_interval, self.decay, self.backend = mask_interval, float(decay), backend
        self.weight = linear.weight
        self.bias = linear.bias
        self.steps = 0
        self.register_buffer("kept_offsets", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.update_mask()

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def update_mask(self) -> None:
        """Recompute the N:M mask from the current dense weight by magnitude (raises on non-finite weights)."""
        self.kept_offsets = prune(self.weight.detach(), self.pattern, self.vector).kept_offsets()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if self.steps % self.mask_interval == 0:
                self.update_mask()
            self.steps += 1
        check_operands(x, self.weight, torch.Tensor, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = _SRSTEProduct.apply(
            rows, self.weight, self.bias, self.kept_offsets, self.n, self.m, self.vector, self.decay, self.backend
        )
        return y.view(*x.shape[:-1], self.out_features)

    def to_sparse(self) -> SparseLinear:
        """The deployable :class:`SparseLinear` with the current mask and copies of the kept values and bias."""
        mask = torch.zeros_like(self.weight, dtype=torch.bool)
        mask.scatter_(1, kept_row_columns(self.kept_offsets, self.n, self.m, self.vector), True)
        sparse = NMSparseWeight.from_dense(self.weight.detach(), mask, self.pattern, self.vector)
        bias = None if self.bias is None else self.bias.detach().clone()
        return SparseLinear(sparse, bias, backend=self.backend)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Load the dense weights, then take the mask from them (masks are derived, so files hold none)."""
        super()._load_from_state_dict(*args, **kwargs)
        self.update_mask()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern='{self.pattern}', "
            f"vector={self.vector}, mask_interval={self.mask_interval}, decay={self.decay}, "
            f"bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class SRSTEConfig(SparsifyConfig):
    """:func:`prepare_srste`'s swap: an :class:`SRSTELinear` of ``pattern`` with V=``vector`` sharing the layer's
    parameters, its mask recomputed every ``mask_interval`` steps, ``decay`` on the pruned weights."""

    pattern: str
    vector: int = 1
    mask_interval: int = 1
    decay: float = DEFAULT_DECAY
    backend: str = "auto"

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        check_vector(self.vector)

    def fits(self, weight: torch.Tensor) -> None:
        n, m = parse_pattern(self.pattern)
        check_weight_matrix(weight, n, m, self.vector)

    def make(self, linear: nn.Linear, input_norm: torch.Tensor | None = None) -> nn.Module:
        return SRSTELinear(
            linear, self.pattern, self.vector, mask_interval=self.mask_interval, decay=self.decay, backend=self.backend
        )

    def sparse_bytes(self, module: nn.Module) -> int:
        return module.to_sparse().weight.nbytes

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "vector": self.vector, "method": "sr-ste", "sparsity": None}


def prepare_srste(
    model: nn.Module,
    pattern: str,
    vector: int = 1,
    skip: Callable[[str, nn.Module], bool] | None = None,
    *,
    mask_interval: int = 1,
    decay: float = DEFAULT_DECAY,
    backend: str = "auto",
) -> SparsifyReport:
    """Replace, in place, every eligible ``nn.Linear`` of ``model`` (as :func:`~nmspmm.sparsify` chooses them)
    by an :class:`SRSTELinear` sharing its parameters; train as usual, then call :func:`finalize_srste`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return swap_linears(model, SRSTEConfig(pattern, vector, mask_interval, decay, backend), skip)


def finalize_srste(model: nn.Module) -> list[str]:
    """Replace, in place, every :class:`SRSTELinear` of ``model`` by its :meth:`~SRSTELinear.to_sparse`
    module; return their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = [name for name, module in model.named_modules() if isinstance(module, SRSTELinear)]
    if "" in names:
        raise ValueError("model: is itself an SRSTELinear; call model.to_sparse() instead")
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_sparse())
    return names


LOSSES = ("mse", "cosine", "kl")


@dataclass
class RecoveryReport:
    """What :func:`recover` did: the loss of every step (the loss curve), the trained parameter count and the
    seconds it took."""

    losses: list[float] = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.losses:
            return f"recover: no steps ({self.parameters} trainable values)"
        return (
            f"recover: {len(self.losses)} steps over {self.parameters} values in {self.seconds:.1f} s, loss "
            f"{self.losses[0]:.4g} -> {self.losses[-1]:.4g}"
        )


def model_output(output: Any) -> torch.Tensor:
    """The tensor :func:`recover` matches by default: ``output`` itself, or its ``last_hidden_state`` or
    ``logits`` (a ``transformers`` model output), in that order."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"output: the model returned {type(output).__name__}, which is neither a tensor nor has last_hidden_state or "
        "logits; pass output=, a function from the model's output to the tensor to match"
    )


def _token_weights(batch: Any, target: torch.Tensor) -> torch.Tensor | None:
    """Weights ``[..., 1]`` of the token vectors of ``target`` from a mapping batch's ``attention_mask``
    (padding counts for nothing; ``target`` may have leading dimensions before the mask's, such as stacked
    layers), or None where the batch has no mask of that shape."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    tokens = tuple(target.shape[:-1])
    if not isinstance(mask, torch.Tensor) or mask.dim() > len(tokens) or tokens[len(tokens) - mask.dim():] != tuple(
        mask.shape
    ):
        return None
    return mask.to(device=target.device, dtype=torch.float32).expand(tokens).unsqueeze(-1)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str, weights: torch.Tensor | None
) -> torch.Tensor:
    """``"mse"``: the squared error over the teacher's squares (so 1 means no better than zeros); ``"cosine"``: one
    minus the cosine similarity of each token's vector to the teacher's, averaged; ``"kl"``: KL(teacher || student)
    of the softmax over the last dimension (logits). Tokens weighted by ``weights``."""
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        error, scale = (student - teacher).square(), teacher.square()
        if weights is not None:
            error, scale = error * weights, scale * weights
        return error.sum() / scale.sum().clamp_min(1e-30)
    if loss == "cosine":
        per_token = 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1).unsqueeze(-1)
    else:
        log_student, log_teacher = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1, keepdim=True)
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def recover(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    steps: int,
    *,
    lr: float = 1e-3,
    loss: str = "mse",
    output: Callable[[Any], torch.Tensor] = model_output,
    train_biases: bool = True,
    progress: bool | None = None,
) -> RecoveryReport:
    """Fine-tune the kept values of every sparse module of ``model`` (:class:`~nmspmm.SparseLinear`,
    :class:`~nmspmm.CSRLinear`, :class:`~nmspmm.BlockShuffledLinear`; their structure stays fixed; the 8-bit
    values of a :class:`~nmspmm.QuantizedSparseLinear` are not trained, and a model with no others is refused), and
    their biases when ``train_biases``, so that ``model``'s outputs match the dense ``teacher``'s on ``batches``
    (cycled, one per step, for ``steps`` steps; each a tensor, a mapping of keyword arguments or a tuple, as
    :func:`~nmspmm.prune.collect_input_norms` takes them). Every other parameter stays as it is.

    ``loss`` is ``"mse"`` (the squared error relative to the teacher's squares, for hidden states), ``"cosine"``
    (each token's direction, for embeddings compared by cosine) or ``"kl"`` (for logits); a mapping batch's
    ``attention_mask`` leaves padding tokens out. ``output`` picks the tensor to match from what the models
    return (by default the tensor, ``last_hidden_state`` or ``logits``; stacked hidden states of every layer
    distil layer by layer). AdamW at ``lr``, decayed linearly to zero over the
    steps. Both models run in eval mode (no dropout: the student fits the teacher's deterministic outputs) and
    get their modes and ``requires_grad`` flags back afterwards. ``progress`` draws a bar with the loss on stderr
    (by default when stderr is a terminal). Returns the loss curve."""
    for name, value in (("model", model), ("teacher", teacher)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if not callable(output):
        raise TypeError(f"output: expected a callable from the model's output to a tensor, got {type(output).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches: expected an iterable of batches, got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    sparse = [module for module in model.modules() if isinstance(module, SPARSE_MODULES)]
    if not sparse:
        raise ValueError("model: has no sparse modules to recover (sparsify it first)")
    trained = [module.values for module in sparse if isinstance(module.values, nn.Parameter)]
    if not trained:
        raise ValueError(
            "model: its sparse modules hold quantized values (QuantizedSparseLinear), which have no gradient; "
            "recover the unquantized model, then quantize it"
        )
    if train_biases:
        trained += [module.bias for module in sparse if module.bias is not None]
    report = RecoveryReport(parameters=sum(parameter.numel() for parameter in trained))
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    modes = {module: module.training for module in (*model.modules(), *teacher.modules())}
    show = sys.stderr.isatty() if progress is None else bool(progress)
    start = time.perf_counter()
    try:
        model.eval()
        teacher.eval()
        for parameter in flags:
            parameter.requires_grad_(False)
        for parameter in trained:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        targets: dict[int, torch.Tensor] = {}
        for step in range(steps):
            index = step % len(batches)
            batch = batches[index]
            if index not in targets:
                with torch.no_grad():
                    targets[index] = output(run_batch(teacher, batch)).detach()
            target = targets[index]
            value = distillation_loss(output(run_batch(model, batch)), target, loss, _token_weights(batch, target))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            report.losses.append(float(value.detach()))
            if show:
                draw_progress(step + 1, steps, f"recover: loss {report.losses[-1]:.4g}")
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        for module, mode in modes.items():
            module.train(mode)
    report.seconds = time.perf_counter() - start
    return report

