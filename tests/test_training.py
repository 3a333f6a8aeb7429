"""SR-STE training: the straight-through gradient with its decay, the mask schedule, end-to-end training,
state dicts, finalizing to SparseLinear, and argument checks; recovery after one-shot pruning (distillation)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import nmspmm
from nmspmm.training import SRSTELinear, distillation_loss, finalize_srste, prepare_srste, recover
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


class _Student(nn.Module):
    """An MLP with a LayerNorm between its linears (a parameter recovery must leave alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


@pytest.mark.parametrize(
    ("pattern", "kwargs"), [("2:4", {"vector": 16}), ("csr", {"sparsity": 0.7}), ("block", {"sparsity": 0.5,
                                                                                             "block": (16, 16)})],
)
def test_recover_fits_the_teacher_under_the_fixed_structure(pattern, kwargs):
    torch.manual_seed(0)
    teacher = _Student().to(DEVICE)
    model = copy.deepcopy(teacher)
    nmspmm.sparsify(model, pattern, **kwargs)
    masks = {name: module.weight.mask().clone() for name, module in model.named_children() if name != "norm"}
    norm_before = copy.deepcopy(model.norm.state_dict())
    batches = [torch.randn(16, 32, device=DEVICE) for _ in range(8)]
    model.train()
    teacher.train()
    report = recover(model, teacher, batches, 150, lr=3e-3, progress=False)
    assert len(report.losses) == 150 and report.seconds > 0
    assert report.parameters == sum(module.values.numel() + module.bias.numel() for module in (model.up, model.down))
    assert sum(report.losses[-10:]) < 0.5 * sum(report.losses[:10]), report.losses[::15]
    for name, mask in masks.items():
        assert torch.equal(getattr(model, name).weight.mask(), mask)
    assert all(torch.equal(value, norm_before[key]) for key, value in model.norm.state_dict().items())
    assert model.training and teacher.training  # modes given back
    assert all(parameter.requires_grad for parameter in model.parameters())
    with torch.no_grad():
        held_out = torch.randn(64, 32, device=DEVICE)
        assert relative_error(model(held_out), teacher(held_out)) < 0.8 * relative_error(
            _pruned_only(teacher, pattern, kwargs)(held_out), teacher(held_out))


def _pruned_only(teacher: nn.Module, pattern: str, kwargs: dict) -> nn.Module:
    pruned = copy.deepcopy(teacher)
    nmspmm.sparsify(pruned, pattern, **kwargs)
    return pruned


def test_distillation_losses_and_padding():
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mse = distillation_loss(student, teacher, "mse", None)
    torch.testing.assert_close(mse, (student - teacher).square().sum() / teacher.square().sum())
    assert float(distillation_loss(teacher, teacher, "cosine", None)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(teacher, teacher, "kl", None)) == pytest.approx(0.0, abs=1e-6)
    # Tokens of weight 0 (padding) count for nothing, whatever they hold.
    weights = torch.ones(2, 5, 1)
    weights[1, 3:] = 0
    noisy = student.clone()
    noisy[1, 3:] = 1e6
    for loss in ("mse", "cosine", "kl"):
        torch.testing.assert_close(distillation_loss(noisy, teacher, loss, weights),
                                   distillation_loss(student, teacher, loss, weights))


def test_recover_leaves_padding_out_of_a_mapping_batch():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.layer(input_ids)

    teacher = Keyword()
    model = copy.deepcopy(teacher)
    nmspmm.sparsify(model, "2:4")
    mask = torch.ones(1, 4, dtype=torch.long)
    mask[0, 2:] = 0
    batch = {"input_ids": torch.randn(1, 4, 8), "attention_mask": mask}
    with torch.no_grad():
        expected = distillation_loss(model(**batch), teacher(**batch), "mse", mask.unsqueeze(-1).float())
        unmasked = distillation_loss(model(**batch), teacher(**batch), "mse", None)
    report = recover(model, teacher, [batch], 1, progress=False)
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) != pytest.approx(float(unmasked), rel=1e-3)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"steps": -1}, ValueError, r"steps: expected a non-negative int, got -1"),
        ({"lr": 0.0}, ValueError, r"lr: expected a positive number, got 0.0"),
        ({"loss": "l1"}, ValueError, r"loss: expected one of \('mse', 'cosine', 'kl'\), got 'l1'"),
        ({"batches": []}, ValueError, r"batches: expected at least one batch, got none"),
        ({"batches": torch.randn(4, 32)}, TypeError, r"batches: expected an iterable of batches, got Tensor"),
        ({"output": "logits"}, TypeError, r"output: expected a callable"),
        ({"teacher": "dense"}, TypeError, r"teacher: expected a torch.nn.Module, got str"),
    ],
)
def test_recover_rejects_bad_arguments(change, error, match):
    teacher = _Student()
    model = copy.deepcopy(teacher)
    nmspmm.sparsify(model, "2:4")
    arguments = {"model": model, "teacher": teacher, "batches": [torch.randn(4, 32)], "steps": 1} | change
    with pytest.raises(error, match=match):
        recover(**arguments)


def test_recover_needs_sparse_modules_and_a_tensor_to_match():
    teacher = _Student()
    with pytest.raises(ValueError, match=r"model: has no sparse modules to recover \(sparsify it first\)"):
        recover(copy.deepcopy(teacher), teacher, [torch.randn(4, 32)], 1)

    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> dict:
            return {"hidden": self.layer(x)}

    model = Pairs()
    nmspmm.sparsify(model, "2:4")
    with pytest.raises(TypeError, match=r"output: the model returned dict, .*pass output="):
        recover(model, Pairs(), [torch.randn(4, 32)], 1)

    quantized = copy.deepcopy(teacher)
    nmspmm.sparsify(quantized, "2:4", weight_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"model: its sparse modules hold quantized values .*then quantize it"):
        recover(quantized, teacher, [torch.randn(4, 32)], 1)
    report = recover(model, Pairs(), [torch.randn(4, 32)], 2, output=lambda out: out["hidden"], progress=False)
    assert len(report.losses) == 2
