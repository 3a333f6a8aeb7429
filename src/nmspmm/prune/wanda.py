"""Activation-aware pruning to vector-wise N:M (Wanda: Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models"): weight w_ij scores |w_ij| * ||x_j||_2, where ||x_j||_2 is the L2 norm
of input feature j over calibration tokens, so inputs that carry large activations keep more weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .magnitude import check_prunable, check_scores, topn_group_mask, vector_sums


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, pattern: str, vector: int = 1) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping, per V-group and group of m inputs, the n inputs with the largest
    ``||x_j|| * sum |w_ij|`` over the V rows; float64 scores and ties to the lower index, as in magnitude pruning."""
    n, m = check_prunable(weight, pattern, vector)
    check_scores(input_norm, "input_norm", (weight.shape[1],))
    norm = input_norm.detach().to(device=weight.device, dtype=torch.float64)
    return topn_group_mask(vector_sums(weight.detach().abs(), vector) * norm, n, m, vector)


def _run(model: nn.Module, batch: Any) -> None:
    """Call ``model`` on one calibration batch: a tensor as the input, a mapping as keyword arguments,
    a tuple or list as positional arguments."""
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(
            f"batches: expected each batch to be a torch.Tensor, a Mapping or a tuple/list, got {type(batch).__name__}"
        )


def collect_input_norms(
    model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` without gradients and return, per ``nn.Linear`` (all, or those in ``names``),
    the float32 L2 norm ``[in_features]`` of each input feature over all tokens, as :func:`wanda_mask` takes.

    Squares are summed in float64; padding tokens count like any other, so feed unpadded batches. Without
    ``names``, linears that received no input are left out; a named one that received none is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if names is None:
        selected = list(linears)
    else:
        if isinstance(names, str):
            raise TypeError(f"names: expected an iterable of module names, got the str {names!r}")
        selected = list(dict.fromkeys(names))
        unknown = [name for name in selected if name not in linears]
        if unknown:
            raise ValueError(f"names: expected names of nn.Linear modules of model, got {unknown}")

    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        squares = x.detach().to(torch.float64).square().reshape(-1, x.shape[-1]).sum(0)
        if name in sums:
            sums[name].add_(squares)
        else:
            sums[name] = squares

    handles = [
        linears[name].register_forward_pre_hook(
            lambda module, args, kwargs, name=name: accumulate(name, args[0] if args else kwargs["input"]),
            with_kwargs=True,
        )
        for name in selected
    ]
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("batches: expected at least one batch, got none")
    if names is not None:
        unused = [name for name in selected if name not in sums]
        if unused:
            raise ValueError(f"names: these linears received no input while running the batches: {unused}")
    return {name: sums[name].sqrt().to(torch.float32) for name in selected if name in sums}
