"""The benchmark harness: nmspmm beside cuBLAS (and PyTorch's 2:4 path) on the NM-SpMM paper's suite."""

from __future__ import annotations

from pathlib import Path

from ..progress import progress
from .cases import Case, quick_cases, suite_cases
from .report import config_summary, device_slug, format_rows, merge_csv, plot, summary_markdown

__all__ = ["Case", "quick_cases", "suite_cases", "run"]


def run(
    cases: list[Case], out_dir: str | Path = "benchmarks/results", make_plot: bool = True, check_configs: bool = False
) -> list[dict]:
    """Check and time ``cases`` on the current CUDA device, print the table and the geomean summary, and
    merge the rows into ``<out_dir>/<device>.csv`` (plus ``<device>.png``); return this run's rows. With
    ``check_configs``, also time a sample of the tuner's configs per case and report how often the model's
    choice is within 10% of the best."""
    import torch

    from ..perf import device_ceilings
    from .runner import environment, run_case

    if not torch.cuda.is_available():
        raise RuntimeError("nmspmm bench needs a CUDA GPU; none is visible to torch")
    stamp = environment()
    ceilings = device_ceilings()
    rows: list[dict] = []
    dense_times: dict[tuple, dict[str, float]] = {}
    for done, case in enumerate(cases):
        progress(done, len(cases), f"{case.tokens}x{case.rows}x{case.cols} {case.pattern} V={case.vector} {case.dtype}")
        rows += run_case(case, ceilings, stamp, check_configs, dense_times)
    progress(len(cases), len(cases), "done")
    out = Path(out_dir) / f"{device_slug(stamp['device'])}.csv"
    every_row = merge_csv(rows, out)
    if make_plot:
        plot(every_row, out.with_suffix(".png"))
    print(format_rows(rows))
    print(f"\nceilings: {ceilings}\n")
    print(summary_markdown(rows))
    if check_configs:
        print(config_summary(rows))
    print(f"\nresults: {out}")
    return rows
