"""Benchmark output: the results CSV (merged per device), the terminal table, the geomean summary and the plot."""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

KEY = ("M", "N", "K", "pattern", "vector", "dtype", "level")


def device_slug(device: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def merge_csv(rows: list[dict], path: Path, key: tuple[str, ...] = KEY) -> list[dict]:
    """Write ``rows`` into ``path``, replacing earlier rows with the same ``key`` columns (by default the same
    case and level); return all rows. A key column a row lacks, or holds None in, counts as empty (as the CSV
    stores it), so rows of an older file without a newer key column are kept, not refused."""
    merged: dict[tuple, dict] = {}
    if path.exists():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                merged[_key_of(row, key)] = row
    for row in rows:
        merged[_key_of(row, key)] = row
    fields = list(rows[0]) if rows else []
    for row in merged.values():
        fields += [f for f in row if f not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(merged.values())
    return list(merged.values())


def _key_of(row: dict, key: tuple[str, ...]) -> tuple[str, ...]:
    """``row``'s key columns as the CSV writes them: None and missing become ''."""
    return tuple("" if row.get(k) is None else str(row[k]) for k in key)


def format_rows(rows: list[dict]) -> str:
    """One line per result row: the case, the CUDA-graph times and their ratios, the speedup over PyTorch's
    semi-structured 2:4 (both eager: cuSPARSELt is not graphed) and the eager speedup over cuBLAS."""
    lines = [
        f"{'M':>5} {'N':>6} {'K':>6} {'pattern':>7} {'V':>3} {'dtype':>8} {'level':>6} {'ms':>8} "
        f"{'dense':>8} {'speedup':>7} {'ideal':>6} {'bound%':>6} {'vs 2:4 pt':>9} {'eager':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r['M']:>5} {r['N']:>6} {r['K']:>6} {r['pattern']:>7} {r['vector']:>3} {r['dtype']:>8} "
            f"{r['level']:>6} {float(r['ms']):8.4f} {float(r['dense_ms']):8.4f} {float(r['speedup']):7.2f} "
            f"{float(r['ideal_speedup']):6.2f} {100 * float(r['fraction_of_bound']):6.1f} "
            f"{_ratio(r.get('eager_ms'), r.get('semi_structured_ms')):>9} "
            f"{_ratio(r.get('eager_ms'), r.get('dense_eager_ms')):>7}"
        )
    return "\n".join(lines)


def speedup_of(ms: object, dense_ms: object) -> float:
    """``dense_ms / ms`` from result fields (numbers or CSV strings); NaN where either time is missing."""
    if ms in (None, "") or dense_ms in (None, ""):
        return math.nan
    return float(dense_ms) / float(ms)


def _ratio(ms: object, dense_ms: object) -> str:
    """``dense_ms / ms`` as 'N.NNx', or blank where either time is missing."""
    value = speedup_of(ms, dense_ms)
    return "" if math.isnan(value) else f"{value:.2f}x"


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def summary_markdown(rows: list[dict]) -> str:
    """Geomean speedup over cuBLAS (and fraction of the model's bound) per dtype, V, level and pattern."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dtype"], int(r["vector"]), r["level"], r["pattern"])].append(r)
    patterns = sorted({k[3] for k in groups}, key=lambda p: (1 - _density(p), int(p.split(":")[1])))
    lines = [
        "| dtype | V | level | cases | " + " | ".join(patterns) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in patterns) + " |",
    ]
    for dtype, vector, level in sorted({k[:3] for k in groups}):
        cells, count = [], 0
        for pattern in patterns:
            members = groups.get((dtype, vector, level, pattern), [])
            count += len(members)
            speed = geomean([float(r["speedup"]) for r in members])
            bound = geomean([float(r["fraction_of_bound"]) for r in members])
            cells.append("" if math.isnan(speed) else f"{speed:.2f}x ({bound:.0%})")
        lines.append(f"| {dtype} | {vector} | {level} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_summary(rows: list[dict]) -> str:
    """How often the model's config was within 10% of the best config tried (rows of ``--check-configs``)."""
    checked = [r for r in rows if str(r.get("config_within_10pct", "")) in ("True", "False")]
    if not checked:
        return ""
    hits = sum(str(r["config_within_10pct"]) == "True" for r in checked)
    ratios = [float(r["config_chosen_ms"]) / float(r["config_best_ms"]) for r in checked]
    return (
        f"model's config within 10% of the best config tried: {hits} of {len(checked)} cases "
        f"(chosen/best time: geomean {geomean(ratios):.3f}, worst {max(ratios):.2f})"
    )


def plot(rows: list[dict], path: Path) -> None:
    """Speedup over cuBLAS against sparsity, one panel per dtype/V/level, one line per token count M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], int(r["vector"]), r["level"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (dtype, vector, level) in zip(axes[0], panels):
        series: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if (r["dtype"], int(r["vector"]), r["level"]) == (dtype, vector, level):
                series[int(r["M"])][1 - _density(r["pattern"])].append(float(r["speedup"]))
        for tokens, points in sorted(series.items()):
            xs = sorted(points)
            ax.plot([100 * x for x in xs], [geomean(points[x]) for x in xs], marker="o", label=f"M={tokens}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{dtype}, V={vector}, {level}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup over torch.matmul")
        ax.legend(fontsize=7)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"nmspmm vs cuBLAS on {device} ({rows[0]['date'] if rows else ''})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _density(pattern: str) -> float:
    n, m = map(int, pattern.split(":"))
    return n / m
