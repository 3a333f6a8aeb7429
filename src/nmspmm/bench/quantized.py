"""Benchmark of N:M weights with 8-bit values (:class:`~nmspmm.formats.QuantizedNMWeight`, weight-only): our
float8_e4m3fn and int8 products beside, in the same process, our bf16 N:M product of the same weight, dense
bf16 (cuBLAS) and dense fp8 (``torch._scaled_mm`` with row-wise scales, x quantized per token inside the timed
call). Every product is checked against float64 first (ours against the dequantized weight; dense fp8 against
its own dequantized operands). Times replay CUDA graphs over inputs rotated past L2 (``ms``), with the eager
times beside them; ``bound_ms`` is the performance model's (:func:`nmspmm.perf.model_case`, with the 8-bit
values' bytes and the scales)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..formats import NMSparseWeight, QuantizedNMWeight
from ..formats.pattern import dtype_name
from ..ops import linear
from ..perf import DeviceCeilings, device_ceilings, model_case
from ..progress import progress
from ..prune import prune
from .report import device_slug, geomean, merge_csv
from .runner import environment, graph_median_ms, median_ms, relative_error, rotation_sets

LAYERS = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
TOKENS = (1, 8, 16, 64, 256, 1024, 4096)
PATTERNS = ("8:32",)
VECTOR = 64
VALUES = (torch.float8_e4m3fn, torch.int8)
# Relative norm error against float64: ours with the dequantized weight (the 1e-2), and dense fp8 against
# the product of its dequantized operands (x is quantized too, so it is held to the looser 2e-2).
TOLERANCE = 1e-2
DENSE_FP8_TOLERANCE = 2e-2
KEY = ("M", "N", "K", "pattern", "vector", "values")
FP8_MAX = 448.0


def _row_scaled_fp8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` [R, C] as float8_e4m3fn with one fp32 scale per row ([R, 1]): ``tensor ~ fp8 * scale``."""
    scale = (tensor.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    return (tensor.float() / scale).to(torch.float8_e4m3fn), scale


def dense_fp8_product(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in bf16 through Hopper's fp8 tensor cores: x quantized per token here (counted in its time),
    ``W`` [N, K] given as float8_e4m3fn with its row scales ([1, N])."""
    x_fp8, x_scale = _row_scaled_fp8(x)
    return torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)


def _copies(weight: NMSparseWeight | QuantizedNMWeight, count: int) -> list:
    """``weight`` and ``count - 1`` copies with tensors of their own (rotated so that none stays in L2)."""
    copies = [weight]
    for _ in range(count - 1):
        tensors = {name: tensor.clone() for name, tensor in weight.state_tensors().items()}
        copies.append(type(weight).from_state(tensors, weight.state_fields()))
    return copies


def _timed(functions: list[Callable[[], object]], correct: bool) -> tuple[float, float]:
    """(graph-replayed ms, eager ms) of ``functions``, eager first (what a call derives on its weight is derived
    outside the capture); NaN for a product that failed its check."""
    if not correct:
        return math.nan, math.nan
    with torch.no_grad():
        eager = median_ms(functions)
        return graph_median_ms(functions), eager


def case_rows(
    tokens: int, rows: int, cols: int, pattern: str, vector: int, ceilings: DeviceCeilings, stamp: dict[str, str],
    values: Sequence[torch.dtype] = VALUES,
) -> list[dict]:
    """One row per 8-bit dtype for the case: checked, then timed beside the bf16 N:M and dense baselines."""
    dtype = torch.bfloat16
    dense_weight = torch.randn(rows, cols, device="cuda", dtype=dtype) * cols**-0.5
    weight = prune(dense_weight, pattern, vector)
    quantized = {value: weight.quantize(value) for value in values}
    set_bytes = (tokens * cols + rows * cols) * 2 + weight.nbytes
    sets = rotation_sets(set_bytes, torch.cuda.get_device_properties().L2_cache_size)
    xs = [torch.randn(tokens, cols, device="cuda", dtype=dtype) for _ in range(sets)]

    with torch.no_grad():
        bf16_error = relative_error(linear(xs[0], weight), xs[0].double() @ weight.to_dense().double().t())
    weights = _copies(weight, sets)
    bf16_ms, bf16_eager_ms = _timed([lambda x=x, w=w: linear(x, w) for x, w in zip(xs, weights)], bf16_error < 2e-2)
    dense_weights = [dense_weight] + [torch.randn_like(dense_weight) * cols**-0.5 for _ in range(sets - 1)]
    dense_ms, dense_eager_ms = _timed([lambda x=x, w=w: x @ w.t() for x, w in zip(xs, dense_weights)], True)

    fp8_weights = [_row_scaled_fp8(w) for w in dense_weights]
    fp8_error = math.nan
    try:
        x_fp8, x_scale = _row_scaled_fp8(xs[0])
        operands = (x_fp8.double() * x_scale.double()) @ (fp8_weights[0][0].double() * fp8_weights[0][1].double()).t()
        fp8_error = relative_error(dense_fp8_product(xs[0], fp8_weights[0][0], fp8_weights[0][1].t()), operands)
        fp8_ms, fp8_eager_ms = _timed(
            [lambda x=x, w=w: dense_fp8_product(x, w[0], w[1].t()) for x, w in zip(xs, fp8_weights)],
            fp8_error < DENSE_FP8_TOLERANCE,
        )
    except (RuntimeError, ValueError):  # torch._scaled_mm refuses some shapes (for example M not a multiple of 16)
        fp8_ms = fp8_eager_ms = math.nan

    out = []
    for value, weight_q in quantized.items():
        reference = xs[0].double() @ weight_q.to_dense().double().t()
        with torch.no_grad():
            error = relative_error(linear(xs[0], weight_q), reference)
        correct = error < TOLERANCE
        copies = _copies(weight_q, sets)
        ms, eager_ms = _timed([lambda x=x, w=w: linear(x, w) for x, w in zip(xs, copies)], correct)
        model = model_case(
            tokens, rows, cols, weight.n, weight.m, vector, dtype, "bfloat16", ceilings, values_dtype=value
        )
        out.append({
            **stamp, "M": tokens, "N": rows, "K": cols, "pattern": pattern, "vector": vector,
            "values": dtype_name(value), "ms": ms, "eager_ms": eager_ms, "rel_error": error, "correct": correct,
            "bf16_nm_ms": bf16_ms, "bf16_nm_eager_ms": bf16_eager_ms, "dense_ms": dense_ms,
            "dense_eager_ms": dense_eager_ms, "dense_fp8_ms": fp8_ms, "dense_fp8_eager_ms": fp8_eager_ms,
            "dense_fp8_rel_error": fp8_error, "speedup_vs_bf16_nm": bf16_ms / ms, "speedup_vs_dense": dense_ms / ms,
            "speedup_vs_dense_fp8": fp8_ms / ms, "bound_ms": model.op_ms, "fraction_of_bound": model.op_ms / ms,
            "nbytes": weight_q.nbytes, "bf16_nbytes": weight.nbytes,
        })
    return out


def run_quantized(
    tokens: Sequence[int] = TOKENS,
    layers: Sequence[tuple[int, int]] = LAYERS,
    patterns: Sequence[str] = PATTERNS,
    vector: int = VECTOR,
    out_dir: str | Path = "benchmarks/results",
    make_plot: bool = True,
) -> list[dict]:
    """Check and time every case on the current CUDA device, merge the rows into
    ``<out_dir>/<device>-quantized.csv`` (and its plot), print the table and the geomeans; return the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("nmspmm bench-quantized needs a CUDA GPU; none is visible to torch")
    ceilings = device_ceilings()
    stamp = environment()
    cases = [(m, r, c, p) for r, c in layers for p in patterns for m in tokens]
    rows: list[dict] = []
    for done, (m, r, c, p) in enumerate(cases):
        progress(done, len(cases), f"{m}x{r}x{c} {p} V={vector}")
        rows += case_rows(m, r, c, p, vector, ceilings, stamp)
    progress(len(cases), len(cases), "done")
    path = Path(out_dir) / f"{device_slug(stamp['device'])}-quantized.csv"
    merged = merge_csv(rows, path, KEY)
    if make_plot:
        plot_quantized(merged, path.with_suffix(".png"))
    print(format_quantized(rows))
    print(summary_quantized(rows))
    print(f"\nresults: {path}")
    return rows


def format_quantized(rows: Sequence[dict]) -> str:
    """The terminal table: times in ms (graph-replayed) and the ratios."""
    lines = [
        f"{'M':>5} {'N':>6} {'K':>6} {'pattern':>7} {'values':>13} {'ms':>8} {'bf16 N:M':>8} {'dense':>8} "
        f"{'fp8 dense':>9} {'vs bf16':>7} {'vs dense':>8} {'of bound':>8} {'error':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['M']:>5} {r['N']:>6} {r['K']:>6} {r['pattern']:>7} {r['values']:>13} {r['ms']:8.4f} "
            f"{r['bf16_nm_ms']:8.4f} {r['dense_ms']:8.4f} {r['dense_fp8_ms']:9.4f} {r['speedup_vs_bf16_nm']:6.2f}x "
            f"{r['speedup_vs_dense']:7.2f}x {r['fraction_of_bound']:8.2f} {r['rel_error']:8.1e}"
        )
    return "\n".join(lines)


def summary_quantized(rows: Sequence[dict]) -> str:
    """Geomeans per 8-bit dtype and phase (decode: M <= 16; prefill: M >= 256): over our bf16 N:M, over dense,
    and the fraction of the model's bound."""
    lines = []
    for value in sorted({r["values"] for r in rows}):
        for phase, keep in (("decode M<=16", lambda m: m <= 16), ("prefill M>=256", lambda m: m >= 256)):
            chosen = [r for r in rows if r["values"] == value and keep(int(r["M"])) and r["correct"]]
            if not chosen:
                continue
            lines.append(
                f"{value} {phase}: {geomean([r['speedup_vs_bf16_nm'] for r in chosen]):.2f}x our bf16 N:M, "
                f"{geomean([r['speedup_vs_dense'] for r in chosen]):.2f}x dense bf16, fraction of bound "
                f"{geomean([r['fraction_of_bound'] for r in chosen]):.2f} ({len(chosen)} cases)"
            )
    return "\n".join(lines)


def plot_quantized(rows: Sequence[dict], path: Path) -> None:
    """Speedup over our bf16 N:M product and over dense bf16 against the token count, one line per 8-bit dtype
    (geomean over the layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column, title in ((axes[0], "speedup_vs_bf16_nm", "over our bf16 N:M"),
                              (axes[1], "speedup_vs_dense", "over dense bf16 (cuBLAS)")):
        for value in sorted({r["values"] for r in rows}):
            points: dict[int, list[float]] = {}
            for r in rows:
                ratio = float(r[column])
                if r["values"] == value and math.isfinite(ratio):
                    points.setdefault(int(r["M"]), []).append(ratio)
            tokens = sorted(points)
            ax.plot(tokens, [geomean(points[t]) for t in tokens], marker="o", label=value)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"8-bit N:M values on {rows[0]['device']} ({rows[0]['date']})" if rows else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
