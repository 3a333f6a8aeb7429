"""Stored tensors are checked wherever a weight is built or loaded (issue 15, point 1): NaN or infinite values
are refused unless allowed, and so are tensors whose elements overlap in memory (a stride-0 view would make every
row read row 0), through the constructors, safetensors, torch.load and the modules' state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmspmm
from conftest import DEVICE


def _weights() -> dict[str, object]:
    torch.manual_seed(0)
    dense = torch.randn(64, 64, device=DEVICE)
    return {
        "nm": nmspmm.prune(dense, "2:4", 16),
        "csr": nmspmm.prune.prune_csr(dense, 0.75),
        "block": nmspmm.prune.prune_block_shuffled(dense, 0.5, (16, 16), search=False),
    }


def _rebuilt(weight, **changes):
    tensors = {**weight.state_tensors(), **changes}
    return type(weight).from_state(tensors, weight.state_fields())


@pytest.mark.parametrize("kind", ["nm", "csr", "block"])
def test_nonfinite_values_are_refused_unless_allowed(kind):
    weight = _weights()[kind]
    values = weight.values.clone()
    values.view(-1)[[0, 3]] = torch.tensor([float("nan"), float("inf")], device=DEVICE)
    with pytest.raises(ValueError, match=r"values: expected finite values, found 2 NaN or infinite"):
        _rebuilt(weight, values=values)
    allowed = type(weight).from_state({**weight.state_tensors(), "values": values}, weight.state_fields(),
                                      allow_nonfinite=True)
    assert torch.isnan(allowed.values).any()


@pytest.mark.parametrize("kind", ["nm", "csr", "block"])
def test_overlapping_values_are_refused(kind):
    weight = _weights()[kind]
    first = weight.values.reshape(-1)[:1] if kind == "csr" else weight.values[:1]
    aliased = first.expand_as(weight.values)  # every row reads row 0
    with pytest.raises(ValueError, match=r"values: its elements overlap in memory"):
        _rebuilt(weight, values=aliased)


def test_files_and_state_dicts_refuse_nonfinite_values(tmp_path):
    weight = _weights()["nm"]
    values = weight.values.clone()
    values[0, 0] = float("nan")
    poisoned = nmspmm.NMSparseWeight(values, weight.offsets, "2:4", 16, weight.shape, allow_nonfinite=True)
    path = tmp_path / "w.safetensors"
    nmspmm.save_safetensors({"w": poisoned}, path)
    with pytest.raises(ValueError, match=r"values: expected finite values, found 1 NaN or infinite"):
        nmspmm.load_safetensors(path)
    assert torch.isnan(nmspmm.load_safetensors(path, allow_nonfinite=True)["w"].values).any()
    torch.save(poisoned, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"values: expected finite values"):
        torch.load(tmp_path / "w.pt")
    layer = nmspmm.SparseLinear(weight)
    state = layer.state_dict()
    state["values"] = values
    with pytest.raises(ValueError, match=r"state_dict: values and offsets are not a .*expected finite values"):
        layer.load_state_dict(state)
    state["values"] = weight.values[:1].expand_as(weight.values)
    with pytest.raises(ValueError, match=r"overlap in memory"):
        layer.load_state_dict(state)
    assert isinstance(layer, nn.Module)


def test_a_cast_that_overflows_is_refused_but_held_nonfinite_values_move():
    weight = _weights()["nm"]
    big = nmspmm.NMSparseWeight(weight.values * 1e6, weight.offsets, "2:4", 16, weight.shape)
    with pytest.raises(ValueError, match=r"values: expected finite values"):
        big.to(torch.float16)  # 1e6 overflows fp16
    values = weight.values.clone()
    values[0, 0] = float("inf")
    held = nmspmm.NMSparseWeight(values, weight.offsets, "2:4", 16, weight.shape, allow_nonfinite=True)
    assert torch.isinf(held.to(torch.float16).values).any()
