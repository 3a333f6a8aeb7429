"""Statistics of the inputs each ``nn.Linear`` of a model receives over calibration batches: the per-feature L2
norms that Wanda scores by (:func:`collect_input_norms`), the Gram matrices ``X^T X`` that SparseGPT
reconstructs from (:func:`collect_input_grams`), and the layer-by-layer procedure that prunes a model with each
layer's Gram matrix taken on the partly pruned model (:func:`prune_sequentially`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..formats.base import SparseWeightBase


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` called on one batch, its output returned: a tensor as the input, a mapping as keyword arguments,
    a tuple or list as positional arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        f"batches: expected each batch to be a torch.Tensor, a Mapping or a tuple/list, got {type(batch).__name__}"
    )


def selected_linears(model: nn.Module, names: Iterable[str] | None) -> tuple[dict[str, nn.Linear], bool]:
    """The ``nn.Linear`` modules of ``model`` named in ``names`` (all of them when None), by name, and whether
    they were named (then each must receive input)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if names is None:
        return linears, False
    if isinstance(names, str):
        raise TypeError(f"names: expected an iterable of module names, got the str {names!r}")
    selected = list(dict.fromkeys(names))
    unknown = [name for name in selected if name not in linears]
    if unknown:
        raise ValueError(f"names: expected names of nn.Linear modules of model, got {unknown}")
    return {name: linears[name] for name in selected}, True


@contextmanager
def _input_hooks(linears: Mapping[str, nn.Linear], seen: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``seen(name, x)`` with the input of every call of each of ``linears`` while inside; the hooks are
    removed on the way out, error or not."""
    handles = [
        module.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen(name, args[0] if args else kwargs["input"]),
            with_kwargs=True,
        )
        for name, module in linears.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by a hook once the layers being calibrated have their inputs: the rest of the forward pass is not
    needed."""


def _run_all(model: nn.Module, batches: Iterable[Any], stop: bool = False) -> int:
    """Run ``model`` on every batch without gradients (a :class:`_StopForward` ends a batch early when ``stop``);
    return how many batches there were, refusing none."""
    count = 0
    with torch.no_grad():
        for batch in batches:
            try:
                run_batch(model, batch)
            except _StopForward:
                if not stop:
                    raise
            count += 1
    if count == 0:
        raise ValueError("batches: expected at least one batch, got none")
    return count


def _check_reached(linears: Mapping[str, nn.Linear], named: bool, reached: Iterable[str]) -> None:
    if named:
        reached = set(reached)
        unused = [name for name in linears if name not in reached]
        if unused:
            raise ValueError(f"names: these linears received no input while running the batches: {unused}")


def _squares(x: torch.Tensor) -> torch.Tensor:
    """``[K]`` float64 sums of squares of each feature over all rows of ``x``."""
    return x.detach().to(torch.float64).square().reshape(-1, x.shape[-1]).sum(0)


def gram_dtype(device: torch.device) -> torch.dtype:
    """The precision Gram matrices are summed in: float64 on the CPU (the reference path), float32 on a GPU
    (float64 there runs at a small fraction of the rate; SparseGPT's reference sums in float32)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _gram(x: torch.Tensor) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1]).to(gram_dtype(x.device))
    return rows.t() @ rows


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name].add_(value)
    else:
        sums[name] = value


def collect_input_norms(
    model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` without gradients and return, per ``nn.Linear`` (all, or those in ``names``),
    the float32 L2 norm ``[in_features]`` of each input feature over all tokens, as the Wanda rules take.

    Squares are summed in float64; padding tokens count like any other, so feed unpadded batches. Without
    ``names``, linears that received no input are left out; a named one that received none is an error.
    """
    linears, named = selected_linears(model, names)
    sums: dict[str, torch.Tensor] = {}
    with _input_hooks(linears, lambda name, x: _accumulate(sums, name, _squares(x))):
        _run_all(model, batches)
    _check_reached(linears, named, sums)
    return {name: sums[name].sqrt().to(torch.float32) for name in linears if name in sums}


def collect_input_grams(
    model: nn.Module, batches: Iterable[Any], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``batches`` without gradients and return, per ``nn.Linear`` (all, or those in ``names``),
    the Gram matrix ``X^T X`` ``[in_features, in_features]`` of its inputs ``X`` over all tokens (in
    :func:`gram_dtype`), as SparseGPT takes. One pass over the model as it is; :func:`prune_sequentially` takes
    each layer's on the partly pruned model instead. Unreached linears as in :func:`collect_input_norms`."""
    linears, named = selected_linears(model, names)
    grams: dict[str, torch.Tensor] = {}
    with _input_hooks(linears, lambda name, x: _accumulate(grams, name, _gram(x))):
        _run_all(model, batches)
    _check_reached(linears, named, grams)
    return {name: grams[name] for name in linears if name in grams}


def _execution_groups(
    model: nn.Module, batches: list[Any], linears: Mapping[str, nn.Linear]
) -> tuple[list[list[str]], bool]:
    """The linears in the order the forward pass first reaches them, grouped where consecutive layers take the
    very same input tensor (attention's query, key and value): a group's inputs do not depend on one another,
    so one calibration pass serves it. Also whether every reached layer runs at most once per batch, so that a
    pass may stop once a group has its inputs."""
    order: list[str] = []
    inputs: dict[str, int] = {}
    calls: dict[str, int] = {}
    once = True
    kept: list[torch.Tensor] = []  # holds each first input alive, so that no later tensor reuses its id

    def seen(name: str, x: torch.Tensor) -> None:
        nonlocal once
        calls[name] = calls.get(name, 0) + 1
        once = once and calls[name] == 1
        if name not in inputs:
            order.append(name)
            inputs[name] = id(x)
            kept.append(x)

    with _input_hooks(linears, seen), torch.no_grad():
        for batch in batches:
            calls.clear()
            run_batch(model, batch)
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[groups[-1][0]] == inputs[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, once


def prune_sequentially(
    model: nn.Module,
    batches: Iterable[Any],
    prune_layer: Callable[[str, torch.Tensor, torch.Tensor], SparseWeightBase],
    names: Iterable[str] | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, SparseWeightBase]:
    """Prune the ``nn.Linear`` layers of ``model`` (all, or those in ``names``) one after another, as SparseGPT's
    reference procedure does: in the order the forward pass reaches them, each layer's Gram matrix is summed
    over ``batches`` on the model with every earlier layer already pruned, ``prune_layer(name, weight, gram)``
    prunes it, and the pruned weight (its ``to_dense()``) replaces the layer's dense weight in place before the
    next layer is calibrated, so that later layers make up for what earlier ones lost.

    Layers that take the same input tensor are calibrated together, and a calibration pass stops at the last
    layer it needs when every layer runs once per batch (about a transformer block per pass). Returns the
    pruned weights by name. On an error the model's weights are restored. ``progress(done, total, name)`` is
    called before each layer. A named layer that receives no input is an error; without ``names`` it is left
    out."""
    linears, named = selected_linears(model, names)
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    groups, stop_early = _execution_groups(model, batches, linears)
    _check_reached(linears, named, [name for group in groups for name in group])
    total = sum(len(group) for group in groups)
    originals = {name: linears[name].weight.detach().to("cpu", copy=True) for group in groups for name in group}
    pruned: dict[str, SparseWeightBase] = {}
    try:
        for group in groups:
            members = {name: linears[name] for name in group}
            grams: dict[str, torch.Tensor] = {}
            pending = set(group)

            def seen(name: str, x: torch.Tensor) -> None:
                _accumulate(grams, name, _gram(x))
                pending.discard(name)
                if stop_early and not pending:
                    raise _StopForward

            with _input_hooks(members, seen):
                for batch in batches:
                    pending.update(group)
                    _run_all(model, [batch], stop=stop_early)
            for name in group:
                if progress is not None:
                    progress(len(pruned), total, name)
                weight = linears[name].weight
                sparse = prune_layer(name, weight.detach(), grams.pop(name))
                with torch.no_grad():
                    weight.copy_(sparse.to_dense())
                pruned[name] = sparse
    except BaseException:
        with torch.no_grad():
            for name, original in originals.items():
                linears[name].weight.copy_(original)
        raise
    return pruned
