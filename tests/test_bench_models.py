"""The CPU-side parts of ``nmspmm models`` and ``nmspmm host``: argument checks, the refusal without CUDA,
result rows, CSV merging and tables, the host timer and cases, and the eager measurement on a tiny model
(timing needs a GPU; on the CPU the same code runs on the reference path)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import nmspmm
from nmspmm.bench import host, models
from nmspmm import cli
from nmspmm.cli import main

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


# --- command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "--patterns", "8:33"], "m must be one of"),
        (["models", "--patterns", "eight"], "expected 'n:m'"),
        (["models", "--batches", "1", "0"], "expected a positive integer, got 0"),
        (["models", "--batches", "x"], "expected a positive integer, got 'x'"),
        (["models", "--vector", "48"], "expected a vector length in"),
        (["models", "--modes", "graph"], "invalid choice: 'graph'"),
        (["models", "--phases", "train"], "invalid choice: 'train'"),
        (["models", "--new-tokens", "1"], "new_tokens: expected at least 2"),
        (["models", "--intermediate", "11000"], "must divide every layer"),
        (["host", "--shapes", "16x4096"], "expected a shape as MxNxK"),
        (["host", "--shapes", "0x256x256"], "expected positive sizes"),
        (["host", "--shapes", "1x100x256"], "N must be a multiple of 64"),
        (["host", "--calls", "-3"], "expected a positive integer, got -3"),
        (["llama"], "invalid choice: 'llama'"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_passes_a_selection_to_run_models(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_require_gpu", lambda parser, command: None)
    monkeypatch.setattr(models, "run_models", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    main([
        "models", "--modes", "eager", "compiled", "--batches", "1", "16", "--patterns", "2:4", "8:32",
        "--intermediate", "11008", "--new-tokens", "32", "--out-dir", "out", "--weight-dtype", "int8",
    ])
    assert seen["args"] == (
        ("2:4", "8:32"), 64, (11008,), 4, (1, 16), 32, 128, 2048, ("eager", "compiled"), ("prefill", "decode"), "out"
    )
    assert seen["kwargs"] == {"weight_dtype": torch.int8}


def test_cli_defaults_are_the_full_plan(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_require_gpu", lambda parser, command: None)
    monkeypatch.setattr(models, "run_models", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    main(["models"])
    assert seen["args"] == (
        models.PATTERNS, models.VECTOR, models.INTERMEDIATES, models.LAYERS, models.BATCHES, models.NEW_TOKENS,
        models.PROMPT, models.PREFILL_TOKENS, models.MODES, models.PHASES, "benchmarks/results",
    )
    assert seen["kwargs"] == {"weight_dtype": None}
    assert models.INTERMEDIATES == (11008, 14336) and models.BATCHES == (1, 16, 64)


def test_cli_passes_shapes_to_run_host(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_require_gpu", lambda parser, command: None)
    monkeypatch.setattr(host, "run_host", lambda *args: seen.setdefault("args", args))
    main(["host", "--shapes", "1x256x256", "8x512x1024", "--calls", "50"])
    assert seen["args"] == (((1, 256, 256), (8, 512, 1024)), 50, 5, "benchmarks/results")


# --- argument checks and the refusal without CUDA ---------------------------------------------------------


def _selection(**changes) -> dict:
    selection = dict(
        patterns=("8:32",), vector=64, intermediates=(11008,), layers=4, batches=(1,), new_tokens=8, prompt=16,
        prefill_tokens=64, modes=("eager",), phases=("prefill",),
    )
    selection.update(changes)
    return selection


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"patterns": ()}, ValueError, "patterns: expected at least one"),
        ({"patterns": ("4:3",)}, ValueError, "pattern: m must be one of"),
        ({"vector": 3}, ValueError, "vector: expected one of"),
        ({"batches": (1, 0)}, ValueError, "batches: expected a positive int, got 0"),
        ({"batches": (1.5,)}, TypeError, "batches: expected a positive int"),
        ({"layers": 0}, ValueError, "layers: expected a positive int"),
        ({"new_tokens": 1}, ValueError, "new_tokens: expected at least 2"),
        ({"modes": ("fast",)}, ValueError, "modes: expected names from"),
        ({"phases": ()}, ValueError, "phases: expected names from"),
        ({"intermediates": (11000,)}, ValueError, "pattern 8:32: m=32 must divide"),
        ({"intermediates": (11072,), "vector": 128}, ValueError, "vector: V=128 must divide"),
        ({"weight_dtype": torch.float16}, TypeError, "weight_dtype: expected torch.float8_e4m3fn or torch.int8"),
    ],
)
def test_run_models_checks_arguments_before_anything_else(changes, error, message):
    with pytest.raises(error, match=message):
        models.run_models(**_selection(**changes))


@needs_no_cuda
def test_run_models_needs_cuda():
    with pytest.raises(RuntimeError, match="nmspmm models needs a CUDA GPU"):
        models.run_models(**_selection())


@needs_no_cuda
def test_run_host_needs_cuda():
    with pytest.raises(RuntimeError, match="nmspmm host needs a CUDA GPU"):
        host.run_host()


def test_run_host_checks_arguments():
    with pytest.raises(ValueError, match="shapes: expected at least one"):
        host.run_host(shapes=())
    with pytest.raises(ValueError, match="calls: expected a positive int"):
        host.run_host(calls=0)


# --- models: rows, CSV, table, and the eager measurement on a tiny model ------------------------------------

STAMP = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13", "triton": "3.9", "cuda": "13.0", "date": "2026-11-30"}


def _times(scale: float) -> dict:
    return {
        ("eager", "prefill", 1): {"ms": 10.0 * scale, "tokens_per_s": 2048 / (0.01 * scale)},
        ("eager", "decode", 16): {
            "ms": 5.0 * scale, "tokens_per_s": 16 / (0.005 * scale), "step_ms": 4.0 * scale,
            "forward_ms": 3.0 * scale, "loop_ms": 1.0 * scale, "first_ms": 20.0 * scale,
        },
    }


def _model_rows(pattern: str = "8:32", sparse_scale: float = 0.5) -> list[dict]:
    stamp = {**STAMP, "transformers": "5.24"}
    return models.model_rows(
        stamp, _times(1.0), _times(sparse_scale), pattern, 64, 11008, 4, 4096, 2048, 128, 128,
        {"layers_swapped": 28},
    )


def test_model_rows_pair_sparse_with_dense():
    prefill, decode = _model_rows()
    for column in ("device", "torch", "triton", "transformers", "cuda", "date", "mode", "phase", "batch", "tokens",
                   "pattern", "vector", "intermediate", "dense_ms", "sparse_ms", "speedup", "dense_tokens_per_s",
                   "sparse_tokens_per_s", "dense_forward_ms", "sparse_forward_ms", "dense_loop_ms", "sparse_loop_ms"):
        assert column in prefill and column in decode
    assert (prefill["phase"], prefill["tokens"], prefill["prompt"]) == ("prefill", 2048, "")
    assert prefill["speedup"] == pytest.approx(2.0)
    assert prefill["dense_forward_ms"] is None and prefill["sparse_loop_ms"] is None
    assert (decode["batch"], decode["tokens"], decode["prompt"]) == (16, 128, 128)
    assert (decode["dense_forward_ms"], decode["sparse_forward_ms"]) == (3.0, 1.5)
    assert (decode["dense_loop_ms"], decode["sparse_loop_ms"]) == (1.0, 0.5)
    assert decode["layers_swapped"] == 28


def test_models_csv_merges_by_case(tmp_path):
    out = models.write_models_csv(_model_rows("8:32", 0.5), tmp_path, STAMP["device"])
    assert out.name == "nvidia-h100-80gb-hbm3-models.csv"
    models.write_models_csv(_model_rows("8:32", 0.25) + _model_rows("4:32", 0.2), tmp_path, STAMP["device"])
    with out.open() as handle:
        stored = list(csv.DictReader(handle))
    assert len(stored) == 4
    speedups = {(r["pattern"], r["phase"]): float(r["speedup"]) for r in stored}
    assert speedups == {
        ("8:32", "prefill"): 4.0, ("8:32", "decode"): 4.0, ("4:32", "prefill"): 5.0, ("4:32", "decode"): 5.0,
    }
    prefill = next(r for r in stored if r["phase"] == "prefill")
    assert prefill["dense_forward_ms"] == "" and prefill["prompt"] == ""


def test_rows_with_8_bit_values_are_cases_of_their_own(tmp_path):
    stamp = {**STAMP, "transformers": "5.24"}
    quantized = models.model_rows(
        stamp, _times(1.0), _times(0.4), "8:32", 64, 11008, 4, 4096, 2048, 128, 128, None, "int8"
    )
    assert {row["values"] for row in quantized} == {"int8"} and {row["values"] for row in _model_rows()} == {""}
    out = models.write_models_csv(_model_rows("8:32", 0.5) + quantized, tmp_path, STAMP["device"])
    with out.open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert models.format_models_rows(quantized).splitlines()[1].split()[4:6] == ["8:32", "int8"]


def test_merge_keeps_old_rows_without_a_new_key_column(tmp_path):
    from nmspmm.bench.report import merge_csv

    path = tmp_path / "old.csv"
    merge_csv([{"mode": "eager", "phase": "prefill", "ms": 1.0}], path, ("mode", "phase"))
    merged = merge_csv([{"mode": "eager", "phase": "prefill", "batch": 1, "ms": 2.0}], path, models.KEY)
    assert len(merged) == 2


def test_models_table_shows_every_row():
    lines = models.format_models_rows(_model_rows()).splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:9] == ["eager", "prefill", "1", "2048", "8:32", "11008", "10.000", "5.000", "2.00"]
    assert lines[1].split()[-2:] == ["-/-", "-/-"]
    assert lines[2].split()[-2:] == ["3.00/1.50", "1.00/0.50"]


def test_measurement_count():
    assert models.measurement_count(("eager", "compiled"), ("prefill", "decode"), (1, 16, 64)) == 8
    assert models.measurement_count(("eager",), ("decode",), (1, 16)) == 2


def _tiny(pattern: str | None = None, weight_dtype: torch.dtype | None = None) -> torch.nn.Module:
    model = models.build_llama(128, 1, hidden=64, heads=4, vocab=256, device="cpu", dtype=torch.float32)
    if pattern is not None:
        counts = models.sparsified(model, pattern, 16, weight_dtype)
        assert counts["layers_swapped"] == 7 and counts["weight_bytes_sparse"] < counts["weight_bytes_dense"]
    return model


def test_sparsified_with_8_bit_values():
    model = _tiny("8:32", torch.int8)
    layers = [module for module in model.modules() if isinstance(module, nmspmm.QuantizedSparseLinear)]
    assert len(layers) == 7 and all(layer.values.dtype == torch.int8 for layer in layers)
    assert models.sparsified(_tiny(), "8:32", 16)["weight_bytes_sparse"] > sum(layer.weight.nbytes for layer in layers)


def test_build_is_reproducible_and_fresh():
    first, second = _tiny(), _tiny()
    assert first is not second
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert first.model.layers[0].mlp.down_proj.weight.std() > 0


def test_eager_measurement_on_a_tiny_model():
    """The eager path end to end on the CPU: check, prefill, generate, and the forward timed inside generate."""
    generator = torch.Generator().manual_seed(0)
    prefill = [torch.randint(256, (1, 32), generator=generator) for _ in range(3)]
    decode = {2: torch.randint(256, (2, 8), generator=generator)}
    labels = []
    times = models.measure_models(
        {"dense": _tiny(), "2:4": _tiny("2:4")}, ("eager",), ("prefill", "decode"), prefill, decode, 4,
        labels.append, prefill_runs=2, decode_runs=1,
    )
    for name in ("dense", "2:4"):
        assert set(times[name]) == {("eager", "prefill", 1), ("eager", "decode", 2)}
        step = times[name][("eager", "decode", 2)]
        measures = ("ms", "tokens_per_s", "step_ms", "forward_ms", "loop_ms", "first_ms")
        assert all(step[m] is not None and math.isfinite(step[m]) for m in measures)
        assert step["tokens_per_s"] == pytest.approx(1e3 * 2 * 4 / (step["ms"] * 4))
        assert step["loop_ms"] == pytest.approx(step["step_ms"] - step["forward_ms"])
    assert labels == [
        "dense eager prefill", "2:4 eager prefill", "dense eager decode batch 2", "2:4 eager decode batch 2",
    ]


def test_models_are_timed_in_interleaved_rounds(monkeypatch):
    """Each round times every model once, in an order that rotates, after all of them are made ready."""
    events = []

    class Recorder:
        def __init__(self, model, prompts, mode, reference):
            self.name = model.name
            events.append(("ready", self.name))

        def round(self, index):
            events.append((index, self.name))

        def result(self):
            return {"ms": 1.0}

    monkeypatch.setattr(models, "_PrefillTimer", Recorder)
    monkeypatch.setattr(models, "check_model", lambda model, prompt: None)
    named = {name: torch.nn.Module() for name in ("dense", "2:4", "8:32")}
    for name, module in named.items():
        module.name = name
    prompts = [torch.zeros(1, 4, dtype=torch.long)]
    times = models.measure_models(named, ("eager",), ("prefill",), prompts, {}, 4, prefill_runs=4)
    assert events[:3] == [("ready", "dense"), ("ready", "2:4"), ("ready", "8:32")]
    rounds = [events[3 + 3 * i: 6 + 3 * i] for i in range(4)]
    assert [[name for _, name in r] for r in rounds] == [
        ["dense", "2:4", "8:32"], ["2:4", "8:32", "dense"], ["8:32", "dense", "2:4"], ["dense", "2:4", "8:32"],
    ]
    assert all(index == i for i, r in enumerate(rounds) for index, _ in r)
    assert all(times[name][("eager", "prefill", 1)] == {"ms": 1.0} for name in named)


def test_a_failed_measurement_is_reported_and_the_others_go_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Detected 2 tensor(s) in the cudagraph pool not tracked as outputs.\nDebugging: ...")

    monkeypatch.setattr(models, "_DecodeTimer", broken)
    prompts = [torch.randint(256, (1, 16)) for _ in range(3)]
    times = models.measure_models({"2:4": _tiny("2:4")}, ("eager",), ("prefill", "decode"), prompts,
                                  {2: prompts[0]}, 4, prefill_runs=1)["2:4"]
    assert times[("eager", "decode", 2)] == {
        "error": "RuntimeError: Detected 2 tensor(s) in the cudagraph pool not tracked as outputs."
    }
    assert times[("eager", "prefill", 1)]["ms"] > 0
    dense = {**times, ("eager", "decode", 2): _times(1.0)[("eager", "decode", 16)]}
    row = models.model_rows(STAMP, dense, times, "2:4", 16, 128, 1, 64, 16, 4, 16)[1]
    assert row["sparse_ms"] is None and row["speedup"] is None and row["dense_ms"] == 5.0
    assert row["sparse_error"].startswith("RuntimeError: Detected") and row["dense_error"] == ""
    assert "failed: sparse RuntimeError: Detected" in models.format_models_rows([row])


def test_a_round_that_fails_drops_only_its_model(monkeypatch):
    class Flaky:
        def __init__(self, model, prompts, mode, reference):
            self.name = model.name

        def round(self, index):
            if self.name == "2:4" and index == 1:
                raise RuntimeError("CUDA error: out of memory")

        def result(self):
            return {"ms": 2.0}

    monkeypatch.setattr(models, "_PrefillTimer", Flaky)
    monkeypatch.setattr(models, "check_model", lambda model, prompt: None)
    named = {name: torch.nn.Module() for name in ("dense", "2:4")}
    for name, module in named.items():
        module.name = name
    times = models.measure_models(named, ("eager",), ("prefill",), [torch.zeros(1, 4, dtype=torch.long)], {}, 4,
                                  prefill_runs=3)
    assert times["dense"][("eager", "prefill", 1)] == {"ms": 2.0}
    assert times["2:4"][("eager", "prefill", 1)] == {"error": "RuntimeError: CUDA error: out of memory"}


def test_a_wrong_result_stops_the_run(monkeypatch):
    def wrong(*args, **kwargs):
        raise models.CheckError("check: compiled prefill logits differ")

    monkeypatch.setattr(models, "_PrefillTimer", wrong)
    prompts = [torch.randint(256, (1, 16)) for _ in range(3)]
    with pytest.raises(models.CheckError, match="compiled prefill logits differ"):
        models.measure_models({"dense": _tiny()}, ("eager",), ("prefill",), prompts, {}, 4)


def test_check_model_catches_a_wrong_sparse_layer():
    model = _tiny("2:4")
    layer = model.model.layers[0].mlp.down_proj
    layer.forward = lambda x: torch.zeros(*x.shape[:-1], layer.out_features)  # a product that ignores the weight
    with pytest.raises(models.CheckError, match="layers.0.mlp.down_proj differs from F.linear"):
        models.check_model(model, torch.randint(256, (1, 16)))


# --- host -----------------------------------------------------------------------------------------------------


def test_host_cases_cover_every_format():
    cases = host.host_cases()
    assert len(cases) == 3 * 7
    labels = {(c.label, c.grad) for c in cases}
    assert labels == {
        ("8:32 V=64", False), ("2:4 V=1", False), ("8:32 V=64", True), ("2:4 V=1", True),
        ("8:32 V=64 int8", False), ("csr 90%", False), ("block 32x32 75%", False),
    }
    assert {c.shape for c in cases} == {"1x256x256", "16x4096x4096", "256x4096x4096"}


def test_host_timer_is_the_minimum_per_call_over_batches():
    seen = []
    syncs = []
    inputs = [torch.zeros(1) + i for i in range(3)]
    us = host.host_time_us(lambda x: seen.append(int(x)), inputs, calls=4, repeats=2, warmup=1,
                           synchronize=lambda: syncs.append(1))
    assert seen == [0] + [0, 1, 2, 0] * 2
    assert len(syncs) == 3 and 0 < us < 1e5


@pytest.mark.parametrize("case", host.host_cases([(2, 64, 64)]), ids=lambda c: f"{c.label}-grad{c.grad}")
def test_host_case_functions_agree_on_cpu(case):
    ours, theirs, xs, error = host.case_functions(case, "cpu", torch.float32, inputs=3)
    assert len({x.data_ptr() for x in xs}) == 3
    assert error < 1e-5
    y = ours(xs[1])
    assert y.shape == theirs(xs[1]).shape == (2, 64)
    assert y.requires_grad == case.grad


def test_host_csv_and_table(tmp_path):
    stamp = {**STAMP, "cpu": "Test CPU"}
    cases = host.host_cases([(1, 256, 256)])
    rows = [host.host_row(stamp, case, 40.0, 20.0, 200, 5) for case in cases]
    out = host.write_host_csv(rows, tmp_path, STAMP["device"])
    assert out.name == "nvidia-h100-80gb-hbm3-host.csv"
    host.write_host_csv([host.host_row(stamp, cases[0], 30.0, 20.0, 200, 5)], tmp_path, STAMP["device"])
    host.write_host_csv([host.host_row({**stamp, "cpu": "Other CPU"}, cases[0], 50.0, 20.0, 200, 5)], tmp_path,
                        STAMP["device"])
    with out.open() as handle:
        stored = list(csv.DictReader(handle))
    assert len(stored) == len(cases) + 1
    columns = ("device", "cpu", "torch", "triton", "date", "case", "grad", "shape", "nmspmm_us", "torch_us", "ratio")
    for column in columns:
        assert column in stored[0]
    first = [r for r in stored if r["case"] == cases[0].label and r["grad"] == "False"]
    assert sorted(float(r["ratio"]) for r in first) == [1.5, 2.5]
    table = host.format_host_rows(rows).splitlines()
    assert table[1].split() == ["8:32", "V=64", "False", "1x256x256", "40.0", "20.0", "2.00"]


def test_cpu_model_names_the_processor():
    assert isinstance(host.cpu_model(), str) and host.cpu_model()
