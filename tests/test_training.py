"""SR-STE training: the straight-through gradient with its decay, the mask schedule, end-to-end training,
state dicts, finalizing to SparseLinear, and argument checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import nmspmm
from nmspmm.training import SRSTELinear, finalize_srste, prepare_srste
from conftest import DEVICE, TOLERANCE, relative_error

BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]


def _linear(rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(cols, rows, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern,vector", [("8:32", 32), ("2:4", 1), ("3:8", 16)])
def test_gradients_are_straight_through_plus_decay(pattern, vector, dtype, backend):
    rows, cols, tokens, decay = 64, 96, 7, 0.05
    layer = SRSTELinear(_linear(rows, cols, dtype), pattern, vector, decay=decay, backend=backend)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)
    layer(x).backward(grad_y)

    mask = nmspmm.magnitude_mask(layer.weight.detach(), pattern, vector)
    masked = (layer.weight.detach().double() * mask).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ masked.t() + layer.bias.detach().double()).backward(grad_y.double())
    expected_weight = masked.grad + decay * (~mask) * layer.weight.detach().double()
    assert relative_error(x.grad, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(layer.weight.grad, expected_weight) < TOLERANCE[dtype]
    assert relative_error(layer.bias.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]


def test_forward_matches_sparse_linear_of_the_current_mask():
    layer = SRSTELinear(_linear(64, 64), "4:8", 16)
    x = torch.randn(3, 5, 64, device=DEVICE)
    expected = layer.to_sparse()(x)
    assert torch.equal(layer(x), expected)
    assert layer(x).shape == (3, 5, 64)


def test_mask_is_recomputed_every_interval_in_training_only():
    layer = SRSTELinear(_linear(32, 64), "2:8", 16, mask_interval=3)
    x = torch.randn(4, 64, device=DEVICE)
    masks = []
    for _ in range(7):
        with torch.no_grad():
            layer.weight.copy_(torch.randn_like(layer.weight))
        layer(x).sum().backward()
        masks.append(layer.kept_offsets.clone())
    changed = [not torch.equal(masks[i], masks[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]

    layer.eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    before = layer.kept_offsets.clone()
    layer(x)
    assert torch.equal(layer.kept_offsets, before) and layer.steps == 7


def _train_teacher_student(decay: float, steps: int = 300) -> tuple[list[float], list[int], SRSTELinear]:
    """Fit a 2:8 SR-STE layer to a dense teacher with SGD; the losses, the mask flips per step, the layer."""
    torch.manual_seed(1)
    teacher = nn.Linear(64, 32, device=DEVICE)
    layer = SRSTELinear(_linear(32, 64, seed=2), "2:8", 1, decay=decay)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(256, 64, device=DEVICE)
    target = teacher(x).detach()
    losses, flips = [], []
    for _ in range(steps):
        before = layer.kept_offsets.clone()
        loss = ((layer(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        flips.append(int((layer.kept_offsets != before).sum()))
    return losses, flips, layer


def test_decay_settles_the_mask_that_plain_ste_keeps_flipping():
    plain_losses, plain_flips, _ = _train_teacher_student(decay=0.0)
    losses, flips, layer = _train_teacher_student(decay=0.5)
    assert losses[-1] < 0.6 * losses[0] and plain_losses[-1] < 0.6 * plain_losses[0]
    assert sum(flips[-50:]) * 10 < sum(plain_flips[-50:])
    dropped = ~nmspmm.magnitude_mask(layer.weight.detach(), "2:8", 1)
    weight = layer.weight.detach().abs()
    assert weight[dropped].mean() < 0.2 * weight[~dropped].mean()


def test_prepare_train_finalize_a_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10)).to(DEVICE)
    report = prepare_srste(model, "4:8", 16, skip=lambda name, module: module.out_features == 10)
    assert report.swapped == ["0", "2"] and report.skipped == {"3": "user filter"} and report.method == "sr-ste"
    assert 0 < report.sparse_bytes < report.dense_bytes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 64, device=DEVICE)
    for _ in range(3):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert finalize_srste(model) == ["0", "2"]
        assert isinstance(model[0], nmspmm.SparseLinear) and isinstance(model[3], nn.Linear)
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_rederives_the_mask():
    source = nn.Sequential(nn.Linear(64, 64))
    prepare_srste(source, "2:4", 16)
    with torch.no_grad():
        source[0].weight.mul_(torch.rand_like(source[0].weight))
    source[0].update_mask()
    state = source.state_dict()
    assert set(state) == {"0.weight", "0.bias"}
    target = nn.Sequential(nn.Linear(64, 64))
    prepare_srste(target, "2:4", 16)
    target.load_state_dict(state)
    assert torch.equal(target[0].kept_offsets, source[0].kept_offsets)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mask_interval": 0}, ValueError, r"mask_interval: expected a positive int"),
        ({"mask_interval": 1.5}, ValueError, r"mask_interval: expected a positive int"),
        ({"decay": -1.0}, ValueError, r"decay: expected a finite, non-negative number, got -1.0"),
        ({"decay": float("nan")}, ValueError, r"decay: expected a finite, non-negative number"),
        ({"pattern": "2:3"}, ValueError, r"pattern: m must be one of"),
        ({"pattern": "5:32"}, ValueError, r"linear.weight: in_features K=48 must be divisible by m=32"),
        ({"vector": 64}, ValueError, r"vector: V=64 must divide out_features N=32"),
        ({"backend": "cuda"}, ValueError, r"backend: expected one of"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    arguments = {"pattern": "2:4", "vector": 16} | kwargs
    with pytest.raises(error, match=match):
        SRSTELinear(nn.Linear(48, 32), arguments.pop("pattern"), arguments.pop("vector"), **arguments)


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match=r"linear: expected a torch.nn.Linear, got Conv1d"):
        SRSTELinear(nn.Conv1d(4, 4, 1), "2:4")
    layer = SRSTELinear(nn.Linear(16, 16), "2:4")
    with pytest.raises(TypeError, match=r"x: dtype torch.float64 does not match weight dtype torch.float32"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: expected last dimension K=16 \(in_features\), got shape \(2, 8\)"):
        layer(torch.randn(2, 8))
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"weight: expected finite values, got nan at row 3, column 5"):
        layer(torch.randn(2, 16)).sum().backward()
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got str"):
        prepare_srste("model", "2:4")
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got int"):
        finalize_srste(3)


def test_loss_curve_example_runs(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "srste_training.py"
    spec = importlib.util.spec_from_file_location("srste_training", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--out", str(tmp_path), "--steps", "40", "--eval-every", "20"])
    assert {(row["task"], row["recipe"]) for row in rows} == {(t, r) for t in example.TASKS for r in example.RECIPES}
    planted_sr_ste = [row["eval_loss"] for row in rows if row["task"] == "planted" and row["recipe"] == "sr-ste"]
    assert planted_sr_ste[-1] < 0.5 * planted_sr_ste[0]
    assert (tmp_path / "srste-loss.csv").stat().st_size > 0 and (tmp_path / "srste-loss.png").stat().st_size > 0
