"""The benchmark's CPU-side parts: case selection, result files, summary and plot (timing needs a GPU)."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from nmspmm.bench import Case, quick_cases, suite_cases
from nmspmm.bench.report import device_slug, merge_csv, plot, summary_markdown
from nmspmm.cli import main
from nmspmm.prune import prune as nmspmm_prune


def test_suite_matches_the_paper_definition():
    cases = suite_cases()
    assert len({(c.rows, c.cols) for c in cases}) == 20
    assert {c.tokens for c in cases} == {256, 512, 1024, 2048, 4096}
    assert {c.pattern for c in cases} == {"16:32", "12:32", "8:32", "4:32", "2:4", "1:4", "2:8", "1:8"}
    assert all(c.rows % c.vector == 0 for c in cases)
    decode = suite_cases(tokens=[256], decode=True)
    assert {c.tokens for c in decode} == {256, 1, 8, 16, 64}


def test_suite_filters_and_rejects_unknown_dtype():
    cases = suite_cases([512], [(4096, 4096)], ["8:32"], [64], ["float32", "tf32"])
    assert cases == [Case(512, 4096, 4096, "8:32", 64, "float32"), Case(512, 4096, 4096, "8:32", 64, "tf32")]
    with pytest.raises(ValueError, match="dtypes: expected names from"):
        suite_cases(dtypes=["int8"])


def test_quick_set_is_small():
    cases = quick_cases()
    assert 20 <= len(cases) <= 60
    assert {c.dtype for c in cases} == {"bfloat16", "float32"}


def _row(m: int, pattern: str, level: str, speedup: float) -> dict:
    return {
        "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "M": m, "N": 4096, "K": 4096,
        "pattern": pattern, "vector": 64, "dtype": "bfloat16", "level": level, "ms": 1.0 / speedup,
        "dense_ms": 1.0, "speedup": speedup, "ideal_speedup": 4.0, "fraction_of_bound": speedup / 4.0,
        "semi_structured_ms": math.nan,
    }


def test_results_merge_replaces_same_case(tmp_path):
    path = tmp_path / "dev.csv"
    merge_csv([_row(256, "8:32", "op", 2.0), _row(256, "8:32", "kernel", 3.0)], path)
    merged = merge_csv([_row(256, "8:32", "op", 2.5), _row(512, "8:32", "op", 1.5)], path)
    assert len(merged) == 3
    with path.open() as handle:
        stored = {(r["M"], r["level"]): float(r["speedup"]) for r in csv.DictReader(handle)}
    assert stored == {("256", "op"): 2.5, ("256", "kernel"): 3.0, ("512", "op"): 1.5}


def test_summary_is_a_geomean():
    rows = [_row(256, "8:32", "op", 2.0), _row(512, "8:32", "op", 8.0), _row(256, "4:32", "op", 3.0)]
    table = summary_markdown(rows)
    assert "| cases | 8:32 | 4:32 |" in table
    assert "| bfloat16 | 64 | op | 3 | 4.00x (100%) | 3.00x (75%) |" in table


def test_rows_show_eager_and_semi_structured_ratios():
    from nmspmm.bench.report import format_rows

    row = {**_row(256, "2:4", "op", 2.0), "eager_ms": 0.5, "dense_eager_ms": 1.0, "semi_structured_ms": 1.5}
    line = format_rows([row]).splitlines()[1]
    assert line.split()[-2:] == ["3.00x", "2.00x"]
    assert format_rows([_row(256, "8:32", "op", 2.0)]).splitlines()[1].split()[-1] == "50.0"


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    plot([_row(256, "8:32", "op", 2.0), _row(256, "4:32", "op", 3.0)], path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize(
    "argv", [["bench", "--quick"], ["bench-formats", "--quick"], ["models"], ["host"]], ids=lambda argv: argv[0]
)
def test_gpu_commands_without_gpu_end_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"nmspmm {argv[0]}: error: needs a CUDA GPU, and torch sees none (demo runs on the CPU)\n"
    )


def test_bench_run_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("checks the message shown without a GPU")
    from nmspmm.bench import quick_cases, run

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run(quick_cases())


def test_version(capsys):
    import nmspmm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"nmspmm {nmspmm.__version__}\n"
    assert nmspmm.__version__ == "0.1.0"


def test_every_option_has_help():
    from nmspmm.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "bench", "bench-formats", "bench-quantized", "models", "host"}
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, (name, action.dest)



def test_quantized_summary_and_table_from_rows():
    from nmspmm.bench.quantized import format_quantized, summary_quantized

    def row(tokens: int, values: str, ms: float) -> dict:
        return {
            "M": tokens, "N": 4096, "K": 4096, "pattern": "8:32", "values": values, "ms": ms, "bf16_nm_ms": 2 * ms,
            "dense_ms": 4 * ms, "dense_fp8_ms": float("nan"), "speedup_vs_bf16_nm": 2.0, "speedup_vs_dense": 4.0,
            "fraction_of_bound": 0.5, "rel_error": 1e-3, "correct": True,
        }

    rows = [row(1, "int8", 0.01), row(16, "int8", 0.02), row(4096, "int8", 0.5), row(1, "float8_e4m3fn", 0.01)]
    summary = summary_quantized(rows)
    assert "int8 decode M<=16: 2.00x our bf16 N:M, 4.00x dense bf16, fraction of bound 0.50 (2 cases)" in summary
    assert "int8 prefill M>=256: 2.00x our bf16 N:M" in summary and "float8_e4m3fn decode M<=16" in summary
    assert "float8_e4m3fn prefill" not in summary
    assert len(format_quantized(rows).splitlines()) == 1 + len(rows)


def test_bench_quantized_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-quantized", "--tokens", "1"])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_cli_rejects_bad_layer():
    with pytest.raises(SystemExit):
        main(["bench", "--layers", "4096by4096"])


def test_format_cases_cover_the_issue_grid():
    from nmspmm.bench.formats import format_cases, quick_format_cases

    cases = format_cases(["csr"], layers=[(4096, 4096)])
    assert {c.sparsity for c in cases} == {0.5, 0.7, 0.8, 0.9, 0.95, 0.98}
    assert {c.tokens for c in cases} == {1, 16, 256, 1024, 4096}
    assert {c.dtype for c in cases} == {"bfloat16", "float32"}
    blocks = format_cases(["block"], layers=[(4096, 4096), (4010, 4096)], blocks=[(32, 32)])
    assert {(c.rows, c.sparsity) for c in blocks} == {(4096, 0.5), (4096, 0.75), (4096, 0.875)}
    assert {c.kind for c in quick_format_cases()} == {"csr", "sddmm", "block", "bitmap"}
    with pytest.raises(ValueError, match=r"kinds: expected names from"):
        format_cases(["coo"])
    with pytest.raises(ValueError, match=r"sparsities: expected fractions in \[0, 1\), got 1.5"):
        format_cases(sparsities=[1.5])


def test_format_summary_groups_by_regime():
    from nmspmm.bench.formats import summary_markdown

    row = {"kind": "csr", "dtype": "float32", "sparsity": 0.9, "speedup": 2.0, "speedup_vs_peer": 4.0,
           "fraction_of_bound": 0.5}
    graphed = {"graph_ms": "0.01", "dense_graph_ms": "0.03"}
    table = summary_markdown(
        [{**row, "M": 1, **graphed}, {**row, "M": 256, "graph_ms": ""}, {**row, "M": 1024, "speedup": 8.0}]
    )
    assert "| csr | float32 | M >= 256 | 90.0% | 2 | 4.00x | 4.00x | 50% |  |  |" in table
    assert "| csr | float32 | M <= 16 | 90.0% | 1 | 2.00x | 4.00x | 50% | 3.00x |  |" in table
    block = {**row, "kind": "block", "M": 16, "sparsity": 0.75, **graphed, "peer_graph_ms": "0.005"}
    table = summary_markdown([{**block, "block": "32x32"}, {**block, "block": "64x64", "graph_ms": "0.0025"}])
    assert "| block 32x32 | float32 | M <= 16 | 75.0% | 1 | 2.00x | 4.00x | 50% | 3.00x | 0.50x |" in table
    assert "| block 64x64 | float32 | M <= 16 | 75.0% | 1 | 2.00x | 4.00x | 50% | 12.00x | 2.00x |" in table


def test_format_cases_run_end_to_end_on_cpu(monkeypatch):
    """The case logic (weights, checks, baselines, model columns) with a stand-in timer that runs each
    function once; on CUDA machines the real benchmark does this with do_bench."""
    from nmspmm.bench import formats
    from nmspmm.perf import DeviceCeilings

    def run_once_ms(functions):
        functions[0]()
        return 1.0

    monkeypatch.setattr(formats, "DEVICE", "cpu")
    monkeypatch.setattr(formats, "median_ms", run_once_ms)
    rates = {"bfloat16": 1.0, "float16": 1.0, "float32": 1.0, "tf32": 1.0}
    ceilings = DeviceCeilings("cpu", rates, 1.0, 1.0, "", 132, launch_us=2.0)
    cache = formats._WeightCache()
    stamp = {"device": "cpu", "date": "2026-11-23"}
    for case in [
        formats.FormatCase("csr", 7, 64, 96, 0.9, "float32"),
        formats.FormatCase("sddmm", 9, 64, 96, 0.7, "float32"),
        formats.FormatCase("bitmap", 7, 64, 96, 0.9, "float32"),
        formats.FormatCase("bitmap", 3, 64, 96, 0.9, "float32"),  # its weight again, from the cache
        formats.FormatCase("block", 5, 64, 96, 0.75, "float32", (16, 32)),
    ]:
        row = formats.run_format_case(case, ceilings, stamp, cache)
        assert row["correct"] and row["rel_error"] < 1e-5, row
        assert row["ms"] == 1.0 and row["kind"] == case.kind and 0 < row["bound_ms"]
    assert 0 < row["kept_magnitude"] <= 1 and 0 < row["nm_kept_magnitude"] <= 1


def test_config_samples_come_from_the_tuners_grid():
    from nmspmm.bench.configs import large_configs, sample_configs, small_configs, within

    large = list(large_configs(64, torch.bfloat16))
    assert len(large) == 40 and {c.block_n for c in large} == {64}
    small = list(small_configs(32, torch.float32, 16))
    assert len(small) == 8 and {c.block_m for c in small} == {16} and {c.block_n for c in small} == {32}
    assert {c.block_n for c in small_configs(64, torch.bfloat16, 1)} == {32, 64}
    sample = sample_configs(4096, 64, torch.bfloat16)
    assert len(sample) == 20 and all(c in large for c in sample)
    assert all(c in small for c in sample_configs(16, 32, torch.float32))
    assert within(1.09, 1.0) and not within(1.11, 1.0)


def test_config_summary_counts_cases_within_ten_percent():
    from nmspmm.bench.report import config_summary

    rows = [
        {"config_within_10pct": True, "config_chosen_ms": 1.0, "config_best_ms": 1.0},
        {"config_within_10pct": "False", "config_chosen_ms": 1.5, "config_best_ms": 1.0},
        {"level": "op"},
    ]
    assert config_summary(rows) == (
        "model's config within 10% of the best config tried: 1 of 2 cases (chosen/best time: geomean 1.225, worst 1.50)"
    )
    assert config_summary([{"level": "op"}]) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the config check; GPUs run it for real")
def test_config_check_runs_every_sampled_config_under_the_interpreter(monkeypatch):
    from nmspmm.bench import runner
    from nmspmm.kernels import choose_vector_config

    calls = []

    def one_call_ms(functions):
        functions[0]()
        calls.append(1)
        return float(len(calls))

    monkeypatch.setattr(runner, "graph_median_ms", one_call_ms)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    case = Case(5, 64, 256, "8:32", 32, "float16")
    weight = nmspmm_prune(torch.randn(64, 256).half(), "8:32", 32)
    x_ts = [torch.randn(256, 5).half() for _ in range(2)]
    reference = x_ts[0].double().t() @ weight.to_dense().double().t()
    chosen = choose_vector_config(5, 64, weight.kept_per_row, 32, torch.float16, x_ts[0].device)
    result = runner._config_check(case, chosen, [weight, weight], x_ts, reference)
    assert result["configs_tried"] == len(calls) == 13
    assert result["config_chosen_ms"] == 1.0 and result["config_within_10pct"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cap applies on the CPU")
def test_demo_says_when_it_caps_the_tokens(capsys):
    main(["demo", "--shape", "64", "64", "--tokens", "300"])
    out = capsys.readouterr().out
    assert "tokens: 300 capped at 256 on the CPU" in out and "256 tokens" in out


def test_result_rows_name_the_route_that_ran():
    from nmspmm.bench.runner import _route
    from nmspmm.kernels import VectorConfig

    config = VectorConfig(16, 64, 128, 4, 3, 8, 1, True)

    def route(tokens: int, vector: int, dtype: torch.dtype) -> str:
        return _route(Case(tokens, 4096, 4096, "2:4", vector, "bfloat16"), config, dtype)

    assert route(256, 64, torch.bfloat16) == "bm16 bn64 bk128 w4 s3 sk1 wf"
    assert route(64, 1, torch.bfloat16) == "element-wise bm16 bn64 bk128 w4 s3 sk1 wf"
    assert route(65, 1, torch.bfloat16) == "dense expansion + cuBLAS"
    assert route(4096, 1, torch.float32) == "element-wise bm16 bn64 bk128 w4 s3 sk1 wf"
