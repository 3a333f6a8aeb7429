"""Train small models sparse from scratch with SR-STE and compare the loss curves with dense training, a mask
fixed at initialization, and plain STE (masks recomputed, no decay); writes the CSV and PNG that
docs/training.md shows.

Two student-teacher regressions on Gaussian inputs, with the student shaped like the teacher:
- ``planted``: one 256x256 linear layer whose teacher is N:M sparse on a random vector-wise mask. A sparse
  student fits it exactly only if it finds the teacher's mask, which is what recomputing masks is for.
- ``mlp``: a dense 128-512-128 GELU MLP teacher, which no sparse student can fit exactly: the curves show how
  much of the gap to dense training each recipe closes.

    python examples/srste_training.py --out docs            # about a minute on two CPU cores
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torch import nn

import nmspmm
from nmspmm.training import finalize_srste, prepare_srste

RECIPES = ("dense", "fixed-mask", "ste", "sr-ste")
TASKS = ("planted", "mlp")
BATCH = 256


def teacher_and_student(task: str, pattern: str, vector: int) -> tuple[nn.Module, nn.Module]:
    """The frozen teacher and a freshly initialized student of the same shape for ``task``."""
    if task == "planted":
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(256, 256))
        scores = torch.rand(teacher[0].weight.shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            teacher[0].weight.mul_(nmspmm.magnitude_mask(scores, pattern, vector))
        torch.manual_seed(1)
        return teacher.requires_grad_(False), nn.Sequential(nn.Linear(256, 256))

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))

    torch.manual_seed(0)
    teacher = mlp().requires_grad_(False)
    torch.manual_seed(1)
    return teacher, mlp()


def train(task: str, recipe: str, pattern: str, vector: int, steps: int, eval_every: int) -> list[tuple[int, float]]:
    """Train one student with ``recipe``; return (step, held-out MSE) pairs, the last one measured on the model
    as deployed (SparseLinear layers for every sparse recipe)."""
    teacher, student = teacher_and_student(task, pattern, vector)
    if recipe == "fixed-mask":
        nmspmm.sparsify(student, pattern, vector)
    elif recipe in ("ste", "sr-ste"):
        prepare_srste(student, pattern, vector, mask_interval=1, decay=0.0 if recipe == "ste" else 2e-4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(2)
    width = teacher[0].in_features
    held_out = torch.randn(4096, width, generator=generator)
    held_out_target = teacher(held_out)

    def evaluate() -> float:
        student.eval()
        with torch.no_grad():
            loss = nn.functional.mse_loss(student(held_out), held_out_target).item()
        student.train()
        return loss

    curve = [(0, evaluate())]
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, width, generator=generator)
        loss = nn.functional.mse_loss(student(x), teacher(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 and step < steps:
            curve.append((step, evaluate()))
    finalize_srste(student)
    curve.append((steps, evaluate()))
    return curve


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"planted": "linear 256x256, sparse teacher", "mlp": "GELU MLP 128-512-128, dense teacher"}
    figure, axes = plt.subplots(1, len(TASKS), figsize=(11, 4), squeeze=False)
    for axis, task in zip(axes[0], TASKS):
        for recipe, style in zip(RECIPES, ("k--", "C0-", "C1-", "C3-")):
            points = [
                (row["step"], row["eval_loss"]) for row in rows if row["task"] == task and row["recipe"] == recipe
            ]
            axis.plot(*zip(*points), style, label=recipe)
        axis.set_title(titles[task])
        axis.set_xlabel("training step")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("held-out MSE")
    axes[0][0].legend()
    figure.suptitle(f"{rows[0]['pattern']} with vector {rows[0]['vector']}: AdamW, cosine schedule, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for srste-loss.csv and .png")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--pattern", default="8:32")
    parser.add_argument("--vector", type=int, default=32)
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    for task in TASKS:
        for recipe in RECIPES:
            start = time.perf_counter()
            curve = train(task, recipe, args.pattern, args.vector, args.steps, args.eval_every)
            print(f"{task:>8} {recipe:>10}: held-out MSE {curve[0][1]:.3g} -> {curve[-1][1]:.3g} "
                  f"({time.perf_counter() - start:.0f} s)")
            rows += [{"task": task, "recipe": recipe, "pattern": args.pattern, "vector": args.vector,
                      "step": step, "eval_loss": loss} for step, loss in curve]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "srste-loss.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "srste-loss.png")
    return rows


if __name__ == "__main__":
    main()
