"""The benchmark beyond N:M: unstructured CSR SpMM and SDDMM against PyTorch's CSR path (cuSPARSE) and dense
cuBLAS, and shuffled block-wise sparsity (Shfl-BW) against dense and against vector-wise N:M at equal sparsity.
Every case is checked against a float64 reference before it is timed, with inputs rotated out of L2."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats import BitmapWeight, BlockShuffledWeight, CSRWeight
from ..formats.pattern import NM_OF_SPARSITY
from ..ops import linear, sddmm
from ..perf import DeviceCeilings, model_bitmap_case, model_block_case, model_csr_case, model_sddmm_case
from ..prune import kept_magnitude, prune, prune_block_shuffled, prune_csr
from .cases import DTYPES, load_suite
from ..progress import progress
from .report import device_slug, geomean, merge_csv, speedup_of
from .runner import (
    GRAPH_TOKENS, TOLERANCE, graph_median_ms, matmul_precision, median_ms, relative_error, rotated_dense,
    rotation_sets,
)

KINDS = ("csr", "sddmm", "block", "bitmap")
KEY = ("kind", "M", "N", "K", "sparsity", "dtype", "block")
CSR_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
CSR_TOKENS = (1, 16, 256, 1024, 4096)
BLOCK_SPARSITIES = (0.5, 0.75, 0.875)
BLOCK_TOKENS = (16, 256, 1024, 4096)
# Vector length of the N:M side-by-side with block-sparse cases (their patterns: formats.pattern.NM_OF_SPARSITY).
NM_VECTOR = 64
DEVICE = "cuda"  # the benchmark's device; tests run the case logic on "cpu" with a stand-in timer


@dataclass(frozen=True)
class FormatCase:
    """One product: ``kind`` "csr" (``X[M, K] @ W.T``, W unstructured), "sddmm" (``dY.T @ X`` sampled at W's
    kept positions, the weight gradient: depth M), "block" (W block-sparse after a row permutation) or "bitmap"
    (W unstructured as a bitmap, the same entries as "csr")."""

    kind: str
    tokens: int
    rows: int
    cols: int
    sparsity: float
    dtype: str
    block: tuple[int, int] = (0, 0)


def format_cases(
    kinds: list[str] | None = None,
    tokens: list[int] | None = None,
    layers: list[tuple[int, int]] | None = None,
    sparsities: list[float] | None = None,
    dtypes: list[str] | None = None,
    blocks: list[tuple[int, int]] | None = None,
) -> list[FormatCase]:
    """Every combination of the given (default: the issue's) kinds, token counts, suite layers, sparsities,
    dtypes (default bf16 and exact fp32 for CSR and SDDMM, bf16 for blocks) and block shapes (default 32x32)."""
    kinds = kinds or list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds: expected names from {KINDS}, got {kind!r}")
    for dtype in dtypes or []:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: expected names from {DTYPES}, got {dtype!r}")
    for sparsity in sparsities or []:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsities: expected fractions in [0, 1), got {sparsity}")
    layers = layers or [tuple(layer) for layer in load_suite()["layers_NK"]]
    cases = []
    for kind in kinds:
        is_block = kind == "block"
        kind_tokens = tokens or (BLOCK_TOKENS if is_block else CSR_TOKENS)
        kind_sparsities = sparsities or (BLOCK_SPARSITIES if is_block else CSR_SPARSITIES)
        kind_dtypes = dtypes or (["bfloat16"] if is_block else ["bfloat16", "float32"])
        kind_blocks = (blocks or [(32, 32)]) if is_block else [(0, 0)]
        for dtype, sparsity, block, m, (n, k) in itertools.product(
            kind_dtypes, kind_sparsities, kind_blocks, kind_tokens, layers
        ):
            if is_block and (n % block[0] or k % block[1]):
                continue
            cases.append(FormatCase(kind, m, n, k, sparsity, dtype, block))
    return cases


def quick_format_cases() -> list[FormatCase]:
    """A few minutes on an H100: two suite layers, three sparsities per kind, decode and prefill tokens."""
    layers = [(4096, 4096), (11008, 4096)]
    cases = format_cases(["csr"], [1, 16, 1024, 4096], layers, [0.7, 0.9, 0.98], ["bfloat16", "float32"])
    cases += format_cases(["sddmm"], [256, 4096], layers, [0.7, 0.9, 0.98], ["float32"])
    cases += format_cases(["block"], [16, 1024, 4096], layers, list(BLOCK_SPARSITIES), ["bfloat16"])
    cases += format_cases(["bitmap"], [1, 16, 1024, 4096], layers, [0.5, 0.7, 0.9], ["bfloat16"])
    return cases


class _WeightCache:
    """Pruned weights per (kind, layer, sparsity, dtype, block), reused across token counts: the block search
    and CSR compression cost seconds on large layers."""

    def __init__(self) -> None:
        self._weights: dict[tuple, tuple] = {}

    def get(self, case: FormatCase, dtype: torch.dtype) -> tuple:
        if case.kind == "bitmap":  # the CSR weight's entries (the same rule keeps the same ones), beside it
            bitmap_key = ("bitmap", case.rows, case.cols, case.sparsity, case.dtype)
            if bitmap_key not in self._weights:
                dense, csr = self.get(FormatCase("csr", 1, case.rows, case.cols, case.sparsity, case.dtype), dtype)
                self._weights[bitmap_key] = (dense, (BitmapWeight.from_dense(dense, csr.mask()), csr))
            return self._weights[bitmap_key]
        key = (case.kind == "block", case.rows, case.cols, case.sparsity, case.dtype, case.block)
        if key not in self._weights:
            generator = torch.Generator(device=DEVICE).manual_seed(hash(key) % 2**31)
            dense = torch.randn(case.rows, case.cols, device=DEVICE, generator=generator).to(dtype) * case.cols**-0.5
            if case.kind == "block":
                weight = prune_block_shuffled(dense, case.sparsity, case.block)
            else:
                weight = prune_csr(dense, case.sparsity)
            self._weights = {key: (dense, weight)}  # one layer at a time: large layers do not pile up
        return self._weights[key]


def run_format_case(case: FormatCase, ceilings: DeviceCeilings, stamp: dict[str, str], cache: _WeightCache) -> dict:
    """Check and time one case beside its baselines; return its result row."""
    with matmul_precision(case.dtype):
        dtype = torch.float32 if case.dtype in ("float32", "tf32") else getattr(torch, case.dtype)
        dense, weight = cache.get(case, dtype)
        runner = {"csr": _run_csr, "sddmm": _run_sddmm, "block": _run_block, "bitmap": _run_bitmap}[case.kind]
        measured = runner(case, dense, weight, dtype, ceilings)
    return {
        **stamp, "kind": case.kind, "M": case.tokens, "N": case.rows, "K": case.cols, "sparsity": case.sparsity,
        "dtype": case.dtype, "block": f"{case.block[0]}x{case.block[1]}" if case.kind == "block" else "",
        **measured,
    }


def _sets(case: FormatCase, element: int, weight_bytes: int) -> int:
    """Input sets to rotate for ``case`` (x, y and the weight of one set)."""
    set_bytes = (case.tokens * case.cols + case.tokens * case.rows) * element + weight_bytes
    return rotation_sets(set_bytes, torch.cuda.get_device_properties().L2_cache_size if DEVICE == "cuda" else 0)


def _try_ms(functions: list) -> float:
    """Median time, or NaN where PyTorch does not support the call for this dtype."""
    try:
        functions[0]()
    except (RuntimeError, NotImplementedError, TypeError):
        return math.nan
    return median_ms(functions)


def _timings(ms: float, dense_ms: float, peer_ms: float, model, rel_error: float, correct: bool) -> dict:
    return {
        "ms": ms, "dense_ms": dense_ms, "speedup": dense_ms / ms, "peer_ms": peer_ms, "speedup_vs_peer": peer_ms / ms,
        "ideal_speedup": model.dense_ms / model.op_ms, "fraction_of_bound": model.op_ms / ms,
        "bound_ms": model.op_ms, "rel_error": rel_error, "correct": correct,
    }


NOT_GRAPHED = {"graph_ms": math.nan, "dense_graph_ms": math.nan, "peer_graph_ms": math.nan}


def _graphed(tokens: int, correct: bool, ours: list, dense: list, peer: list | None = None) -> dict:
    """For few tokens on CUDA, the same calls replayed from CUDA graphs: GPU time without the host's launch
    overhead, which otherwise decides (and scatters) eager times of a few microseconds. cuSPARSE is not graphed."""
    if tokens > GRAPH_TOKENS or DEVICE != "cuda":
        return NOT_GRAPHED
    return {
        "graph_ms": graph_median_ms(ours) if correct else math.nan,
        "dense_graph_ms": graph_median_ms(dense),
        "peer_graph_ms": graph_median_ms(peer) if peer is not None else math.nan,
    }


def _run_csr(case: FormatCase, dense: torch.Tensor, weight: CSRWeight, dtype: torch.dtype, ceilings) -> dict:
    """nmspmm.linear (row-major x in and y out, the transpose counted) against x @ W.T (cuBLAS, dense W) and
    PyTorch's CSR product (cuSPARSE) on the same row-major x: ``(W_csr @ x.T).T``."""
    element = torch.finfo(dtype).bits // 8
    sets = _sets(case, element, weight.nbytes)
    xs = [torch.randn(case.tokens, case.cols, device=DEVICE, dtype=dtype) for _ in range(sets)]
    weights = [weight] + [weight._with_values(weight.values.clone()) for _ in range(sets - 1)]
    reference = xs[0].double() @ weight.to_dense().double().t()
    rel_error = relative_error(linear(xs[0], weight), reference)
    correct = rel_error < TOLERANCE[case.dtype]
    dense_calls = [lambda x=x, w=w: x @ w.t() for x, w in zip(xs, rotated_dense(dense, sets))]
    dense_ms = median_ms(dense_calls)
    torch_csr = [w.to_dense().to_sparse_csr() for w in weights]
    peer_ms = _try_ms([lambda x=x, w=w: (w @ x.t()).t() for x, w in zip(xs, torch_csr)])
    calls = [lambda x=x, w=w: linear(x, w) for x, w in zip(xs, weights)]
    ms = median_ms(calls) if correct else math.nan
    model = model_csr_case(case.tokens, case.rows, case.cols, weight.nnz, dtype, case.dtype, ceilings)
    return {
        **_timings(ms, dense_ms, peer_ms, model, rel_error, correct),
        **_graphed(case.tokens, correct, calls, dense_calls),
    }


def _run_bitmap(
    case: FormatCase, dense: torch.Tensor, weights: tuple[BitmapWeight, CSRWeight], dtype: torch.dtype, ceilings
) -> dict:
    """nmspmm.linear on the bitmap weight (row-major x in and y out) against x @ W.T (cuBLAS, dense W) and, as the
    peer, nmspmm's CSR product of the same entries; few tokens are also replayed from CUDA graphs on all three."""
    weight, csr = weights
    element = torch.finfo(dtype).bits // 8
    sets = _sets(case, element, weight.nbytes)
    xs = [torch.randn(case.tokens, case.cols, device=DEVICE, dtype=dtype) for _ in range(sets)]
    bitmaps = [weight] + [weight._with_values(weight.values.clone()) for _ in range(sets - 1)]
    csrs = [csr] + [csr._with_values(csr.values.clone()) for _ in range(sets - 1)]
    reference = xs[0].double() @ weight.to_dense().double().t()
    rel_error = relative_error(linear(xs[0], weight), reference)
    correct = rel_error < TOLERANCE[case.dtype]
    dense_calls = [lambda x=x, w=w: x @ w.t() for x, w in zip(xs, rotated_dense(dense, sets))]
    dense_ms = median_ms(dense_calls)
    peer_calls = [lambda x=x, w=w: linear(x, w) for x, w in zip(xs, csrs)]
    peer_ms = median_ms(peer_calls)
    calls = [lambda x=x, w=w: linear(x, w) for x, w in zip(xs, bitmaps)]
    ms = median_ms(calls) if correct else math.nan
    model = model_bitmap_case(case.tokens, case.rows, case.cols, weight.nnz, dtype, case.dtype, ceilings)
    return {
        **_timings(ms, dense_ms, peer_ms, model, rel_error, correct),
        **_graphed(case.tokens, correct, calls, dense_calls, peer_calls),
    }


def _run_sddmm(case: FormatCase, dense: torch.Tensor, weight: CSRWeight, dtype: torch.dtype, ceilings) -> dict:
    """The weight gradient of a CSR layer, ``dY.T @ X`` at the kept positions (depth M tokens, both operands
    feature-major), against the full dense ``dY.T @ X`` (cuBLAS) and ``torch.sparse.sampled_addmm`` (cuSPARSE)."""
    element = torch.finfo(dtype).bits // 8
    sets = _sets(case, element, weight.nbytes)
    grads = [torch.randn(case.rows, case.tokens, device=DEVICE, dtype=dtype) for _ in range(sets)]
    inputs = [torch.randn(case.cols, case.tokens, device=DEVICE, dtype=dtype) for _ in range(sets)]
    mask = weight.mask()
    reference = (grads[0].double() @ inputs[0].double().t())[mask]
    rel_error = relative_error(sddmm(grads[0], inputs[0], weight).values, reference)
    correct = rel_error < TOLERANCE[case.dtype]
    dense_ms = median_ms([lambda a=a, b=b: a @ b.t() for a, b in zip(grads, inputs)])
    pattern = weight.to_dense().to_sparse_csr()
    peer_ms = _try_ms([
        lambda a=a, b=b: torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0) for a, b in zip(grads, inputs)
    ])
    ms = median_ms([lambda a=a, b=b: sddmm(a, b, weight) for a, b in zip(grads, inputs)]) if correct else math.nan
    model = model_sddmm_case(case.rows, case.cols, case.tokens, weight.nnz, dtype, case.dtype, ceilings)
    return {**_timings(ms, dense_ms, peer_ms, model, rel_error, correct), **NOT_GRAPHED}


def _run_block(
    case: FormatCase, dense: torch.Tensor, weight: BlockShuffledWeight, dtype: torch.dtype, ceilings
) -> dict:
    """The block-sparse product against cuBLAS and against nmspmm's vector-wise N:M (V=64) of the same sparsity
    (``peer``), both through nmspmm.linear on row-major x; also the weight magnitude each keeps."""
    element = torch.finfo(dtype).bits // 8
    sets = _sets(case, element, weight.nbytes)
    xs = [torch.randn(case.tokens, case.cols, device=DEVICE, dtype=dtype) for _ in range(sets)]
    reference = xs[0].double() @ weight.to_dense().double().t()
    rel_error = relative_error(linear(xs[0], weight), reference)
    correct = rel_error < TOLERANCE[case.dtype]
    dense_calls = [lambda x=x, w=w: x @ w.t() for x, w in zip(xs, rotated_dense(dense, sets))]
    dense_ms = median_ms(dense_calls)
    nm_weight = prune(dense, NM_OF_SPARSITY[case.sparsity], NM_VECTOR)
    peer_calls = [lambda x=x: linear(x, nm_weight) for x in xs]
    peer_ms = median_ms(peer_calls)
    calls = [lambda x=x: linear(x, weight) for x in xs]
    ms = median_ms(calls) if correct else math.nan
    kept_blocks = int(weight.block_columns.numel())
    model = model_block_case(case.tokens, case.rows, case.cols, kept_blocks, case.block, dtype, case.dtype, ceilings)
    return {
        **_timings(ms, dense_ms, peer_ms, model, rel_error, correct),
        **_graphed(case.tokens, correct, calls, dense_calls, peer_calls),
        "kept_magnitude": kept_magnitude(dense, weight.mask()),
        "nm_kept_magnitude": kept_magnitude(dense, nm_weight.mask()),
    }


def summary_markdown(rows: list[dict]) -> str:
    """Geomean speedup over dense (and over the peer: cuSPARSE, or N:M V=64 for blocks) per kind (and block
    shape), dtype and sparsity, for M >= 256 and for M <= 16 (there also with both sides replayed from CUDA
    graphs: cuSPARSE is timed eager only)."""
    lines = [
        "| kind | dtype | tokens | sparsity | cases | vs dense | vs peer | fraction of bound | graphed vs dense "
        "| graphed vs peer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        regime = "M >= 256" if int(row["M"]) >= 256 else "M <= 16"
        groups.setdefault((_kind_label(row), row["dtype"], regime, float(row["sparsity"])), []).append(row)
    for (kind, dtype, regime, sparsity), members in sorted(groups.items()):
        dense = geomean([float(r["speedup"]) for r in members])
        peer = geomean([float(r["speedup_vs_peer"]) for r in members])
        bound = geomean([float(r["fraction_of_bound"]) for r in members])
        graphed = geomean([speedup_of(r.get("graph_ms"), r.get("dense_graph_ms")) for r in members])
        graphed_peer = geomean([speedup_of(r.get("graph_ms"), r.get("peer_graph_ms")) for r in members])
        cells = [f"{dense:.2f}x", "" if math.isnan(peer) else f"{peer:.2f}x", f"{bound:.0%}"]
        cells += ["" if math.isnan(value) else f"{value:.2f}x" for value in (graphed, graphed_peer)]
        lines.append(f"| {kind} | {dtype} | {regime} | {sparsity:.1%} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kind_label(row: dict) -> str:
    """The kind, with the block shape for block-shuffled rows."""
    return f"block {row['block']}" if row["kind"] == "block" else row["kind"]


def plot(rows: list[dict], path: Path) -> None:
    """Speedup over dense against sparsity, one panel per kind (and block shape) and dtype, one line per token
    count; few-token rows use their CUDA-graph times where they have them (eager calls that short measure the
    host)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(_kind_label(r), r["dtype"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (kind, dtype) in zip(axes[0], panels):
        series: dict[tuple[int, bool], dict[float, list[float]]] = {}
        for r in rows:
            if (_kind_label(r), r["dtype"]) == (kind, dtype):
                graphed = speedup_of(r.get("graph_ms"), r.get("dense_graph_ms"))
                value = float(r["speedup"]) if math.isnan(graphed) else graphed
                line = series.setdefault((int(r["M"]), not math.isnan(graphed)), {})
                line.setdefault(float(r["sparsity"]), []).append(value)
        for (tokens, graphed), points in sorted(series.items()):
            xs = sorted(points)
            label = f"M={tokens}" + (" (graphed)" if graphed else "")
            axis.plot([100 * x for x in xs], [geomean(points[x]) for x in xs], marker="o", label=label)
        axis.axhline(1.0, color="grey", lw=0.8, ls="--")
        axis.set_yscale("log")
        axis.set_title(f"{kind}, {dtype}")
        axis.set_xlabel("sparsity (%)")
        axis.set_ylabel("speedup over dense (cuBLAS)")
        axis.legend(fontsize=7)
    figure.suptitle(f"nmspmm CSR / SDDMM / Shfl-BW vs dense on {rows[0]['device']} ({rows[0]['date']})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_rows(rows: list[dict]) -> str:
    """One line per result row."""
    lines = [f"{'kind':>5} {'M':>5} {'N':>6} {'K':>6} {'sparsity':>8} {'dtype':>8} {'ms':>8} {'dense':>8} "
             f"{'speedup':>7} {'vs peer':>7} {'bound%':>6}"]
    for r in rows:
        lines.append(
            f"{r['kind']:>5} {r['M']:>5} {r['N']:>6} {r['K']:>6} {float(r['sparsity']):8.3f} {r['dtype']:>8} "
            f"{float(r['ms']):8.4f} {float(r['dense_ms']):8.4f} {float(r['speedup']):7.2f} "
            f"{float(r['speedup_vs_peer']):7.2f} {100 * float(r['fraction_of_bound']):6.1f}"
        )
    return "\n".join(lines)


def run_formats(
    cases: list[FormatCase], out_dir: str | Path = "benchmarks/results", make_plot: bool = True
) -> list[dict]:
    """Check and time ``cases`` on the current CUDA device, print the table and the summary, and merge the rows
    into ``<out_dir>/<device>-formats.csv`` (plus ``.png``); return this run's rows."""
    from ..perf import device_ceilings
    from .runner import environment

    if not torch.cuda.is_available():
        raise RuntimeError("nmspmm bench-formats needs a CUDA GPU; none is visible to torch")
    stamp = environment()
    ceilings = device_ceilings()
    cache = _WeightCache()
    rows = []
    ordered = sorted(cases, key=lambda c: (c.kind == "block", c.rows, c.cols, c.sparsity, c.dtype, c.block))
    for done, case in enumerate(ordered):
        label = f"{case.kind} {case.tokens}x{case.rows}x{case.cols} {case.sparsity:.3f} {case.dtype}"
        progress(done, len(ordered), label)
        rows.append(run_format_case(case, ceilings, stamp, cache))
    progress(len(ordered), len(ordered), "done")
    out = Path(out_dir) / f"{device_slug(stamp['device'])}-formats.csv"
    every_row = merge_csv(rows, out, KEY)
    if make_plot:
        plot(every_row, out.with_suffix(".png"))
    print(format_rows(rows))
    print()
    print(summary_markdown(every_row))
    print(f"\nresults: {out}")
    return rows
