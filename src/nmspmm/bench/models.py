"""End-to-end benchmark of a LLaMA-architecture causal LM, dense against sparsified, eager and compiled.

The model is ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden 4096, 32 heads, 32 kv
heads, vocab 32000, a configurable intermediate size and layer count) with random bf16 weights from a fixed
seed: nothing is downloaded. Each sparse model is a *fresh* dense model of the same seed, sparsified with
``nmspmm.sparsify(model.model, pattern, vector=...)`` (every attention and MLP projection; the LM head stays
dense). It is never a ``copy.deepcopy`` of the dense model: transformers caches the compiled forward on the
model object, and a deep copy made after a compile would carry the dense one over.

Two phases, each eager and compiled:

- **prefill**: one forward of ``prefill_tokens`` tokens at batch 1 (``use_cache=False``), the median wall time
  of several runs with a CUDA synchronize around each, so eager times include the host's launch overhead.
  Compiled is ``torch.compile(model)`` in its default mode.
- **decode**: transformers' own ``generate`` (greedy, exactly ``new_tokens`` tokens after a random prompt),
  eager with its default dynamic cache, compiled with its own recipe (``cache_implementation="static"``,
  which compiles the forward itself). ``ms`` is the whole call divided by the tokens generated (so that
  ``tokens_per_s = batch * new_tokens / seconds``); ``step_ms`` excludes the prompt (the difference to a
  one-token ``generate``); ``forward_ms`` is the median wall time of the model's forward for one new token,
  the device synchronized before and after it, around the very callable ``generate`` runs (the module itself
  eager, transformers' cached compiled call compiled), during a separate instrumented call;
  ``loop_ms = step_ms - forward_ms`` is what the rest of ``generate``'s loop adds per token (near zero, or
  below, where the loop's host work hides behind the device's work in the uninstrumented calls).

The models of one size are timed side by side: per measurement each is made ready (compiled, warmed up), then
all run in interleaved rounds (each once a round, the order rotating), so that the host's drift over minutes
falls on dense and sparse alike, and each keeps its median.

Before anything is timed, every model is checked: its prefill logits are finite, every sparse projection of
the first decoder layer matches ``F.linear`` with its densified weight, and the compiled prefill matches the
eager one. A model that fails raises CheckError, and nothing of the run is written. A measurement that fails
otherwise (a compile or CUDA-graph error, say) is reported in its rows (``dense_error``, ``sparse_error``)
with empty times, and the run goes on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats.pattern import check_vector, dtype_name, parse_pattern
from ..formats.quantized import check_quantized_dtype
from ..progress import progress
from .report import device_slug, merge_csv
from .runner import relative_error

HIDDEN = 4096
HEADS = 32
VOCAB = 32000
SEED = 0
PATTERNS = ("2:4", "8:32", "4:32")
VECTOR = 64
INTERMEDIATES = (11008, 14336)
LAYERS = 4
BATCHES = (1, 16, 64)
NEW_TOKENS = 128
PROMPT = 128
PREFILL_TOKENS = 2048
MODES = ("eager", "compiled")
PHASES = ("prefill", "decode")
PREFILL_RUNS = 10  # timed forwards per prefill measurement (the median is kept), rotating among PROMPTS
PREFILL_PROMPTS = 3
DECODE_RUNS = 3  # timed generate calls per decode measurement (the median is kept)
LAYER_TOLERANCE = 2e-2  # sparse projection against F.linear with its densified weight (relative norm error)
# Compiled prefill logits against eager ones, same model: a broken compile gives errors near 1; on the H200
# (4 layers, bf16) the fused kernels' rounding gave 0.012 (8:32) to 0.024 (dense).
COMPILED_TOLERANCE = 1e-1
KEY = ("mode", "phase", "batch", "tokens", "prompt", "pattern", "vector", "values", "intermediate", "layers", "hidden")
# What a measurement reports ("" in the CSV where it has none: prefill has no steps, and only compiled prefill
# a logits_error, the relative error of its logits against the eager ones).
MEASURES = ("ms", "tokens_per_s", "step_ms", "forward_ms", "loop_ms", "first_ms", "logits_error")


class CheckError(RuntimeError):
    """A model (or its compiled form) computes a wrong result: the run stops, and nothing of it is written."""


def check_models_arguments(
    patterns: tuple[str, ...] | list[str],
    vector: int,
    intermediates: tuple[int, ...] | list[int],
    layers: int,
    batches: tuple[int, ...] | list[int],
    new_tokens: int,
    prompt: int,
    prefill_tokens: int,
    modes: tuple[str, ...] | list[str],
    phases: tuple[str, ...] | list[str],
    hidden: int = HIDDEN,
    heads: int = HEADS,
    weight_dtype: torch.dtype | None = None,
) -> None:
    """Raise ValueError (TypeError for a wrong type) naming the first argument that does not fit; so a bad
    selection fails before any model is built."""
    if weight_dtype is not None:
        check_quantized_dtype(weight_dtype, "weight_dtype")
    if not patterns:
        raise ValueError("patterns: expected at least one n:m pattern, like '8:32'")
    for pattern in patterns:
        parse_pattern(pattern)
    check_vector(vector)
    for name, values in (("intermediates", intermediates), ("batches", batches)):
        if not values:
            raise ValueError(f"{name}: expected at least one value")
        for value in values:
            _check_positive(name, value)
    for name, value in (
        ("layers", layers), ("prompt", prompt), ("prefill_tokens", prefill_tokens), ("hidden", hidden),
        ("heads", heads),
    ):
        _check_positive(name, value)
    _check_positive("new_tokens", new_tokens)
    if new_tokens < 2:
        raise ValueError(f"new_tokens: expected at least 2 (a step time needs two tokens), got {new_tokens}")
    for name, values, allowed in (("modes", modes, MODES), ("phases", phases, PHASES)):
        if not values:
            raise ValueError(f"{name}: expected names from {allowed}, got none")
        for value in values:
            if value not in allowed:
                raise ValueError(f"{name}: expected names from {allowed}, got {value!r}")
    if hidden % heads:
        raise ValueError(f"heads: must divide hidden={hidden}, got {heads}")
    for pattern in patterns:
        _, m = parse_pattern(pattern)
        for size in (hidden, *intermediates):
            if size % m:
                raise ValueError(f"pattern {pattern}: m={m} must divide every layer's input size, not {size}")
    for size in (hidden, *intermediates):
        if size % vector:
            raise ValueError(f"vector: V={vector} must divide every layer's output size, not {size}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def build_llama(
    intermediate: int = 11008,
    layers: int = LAYERS,
    *,
    hidden: int = HIDDEN,
    heads: int = HEADS,
    vocab: int = VOCAB,
    max_positions: int = 4096,
    seed: int = SEED,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """A ``transformers.LlamaForCausalLM`` from a config, with random weights drawn after
    ``torch.manual_seed(seed)`` (so two calls give the same weights), in ``dtype`` on ``device``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()


def sparsified(
    model: torch.nn.Module, pattern: str, vector: int, weight_dtype: torch.dtype | None = None
) -> dict:
    """Sparsify ``model.model`` (every projection of the decoder; the LM head stays dense) in place, with
    ``weight_dtype``'s 8-bit values if given; return the report's counts. Raises RuntimeError if any projection
    was skipped (the comparison would be unfair)."""
    from ..nn import sparsify

    report = sparsify(model.model, pattern, vector=vector, weight_dtype=weight_dtype)
    if report.skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped.items())
        raise RuntimeError(f"sparsify {pattern} V={vector} skipped layers: {reasons}")
    return {
        "layers_swapped": len(report.swapped), "weight_bytes_dense": report.dense_bytes,
        "weight_bytes_sparse": report.sparse_bytes,
    }


@torch.no_grad()
def check_model(model: torch.nn.Module, prompt: torch.Tensor, tokens: int = 64) -> torch.Tensor:
    """Check ``model`` before it is timed and return its eager prefill logits for ``prompt``: the logits must
    be finite, and every sparse projection of the first decoder layer must match ``F.linear`` with its
    densified weight on a random input of ``tokens`` rows (relative error below LAYER_TOLERANCE).
    Raises CheckError naming what failed."""
    logits = model(input_ids=prompt, use_cache=False).logits
    if not bool(torch.isfinite(logits).all()):
        raise CheckError("check: the prefill logits are not all finite")
    generator = torch.Generator(device=prompt.device).manual_seed(SEED + 1)
    from ..nn import SPARSE_MODULES

    for name, module in model.model.layers[0].named_modules():
        if not isinstance(module, SPARSE_MODULES):
            continue
        dense = module.to_dense()
        x = torch.randn(tokens, module.in_features, device=dense.device, dtype=dense.dtype, generator=generator)
        error = relative_error(module(x), F.linear(x.float(), dense.float()))
        if not error < LAYER_TOLERANCE:
            raise CheckError(
                f"check: layers.0.{name} differs from F.linear with its densified weight by {error:.2e} "
                f"(relative norm error; allowed {LAYER_TOLERANCE})"
            )
    return logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(function: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms, with the device synchronized before and after (host time included)."""
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return 1e3 * (time.perf_counter() - start)


class _PrefillTimer:
    """One model's prefill measurement: made ready on construction (compiled with ``torch.compile(model)`` and
    two warm-ups first where ``mode`` is "compiled", its logits then compared with ``reference``, the eager
    logits of ``prompts[0]``: CheckError above COMPILED_TOLERANCE), then one timed forward per round over the
    prompts in turn."""

    def __init__(
        self, model: torch.nn.Module, prompts: list[torch.Tensor], mode: str, reference: torch.Tensor | None
    ) -> None:
        self.prompts = prompts
        self.forward = torch.compile(model) if mode == "compiled" else model
        self.times: list[float] = []
        with torch.no_grad():
            first = self.forward(input_ids=prompts[0], use_cache=False).logits
            self.error = None
            if mode == "compiled" and reference is not None:
                self.error = relative_error(first, reference)
                if not self.error < COMPILED_TOLERANCE:
                    raise CheckError(
                        f"check: compiled prefill logits differ from eager by {self.error:.2e} "
                        f"(relative; allowed {COMPILED_TOLERANCE})"
                    )
            del first
            self.forward(input_ids=prompts[1 % len(prompts)], use_cache=False)

    @torch.no_grad()
    def round(self, index: int) -> None:
        prompt = self.prompts[index % len(self.prompts)]
        self.times.append(wall_ms(lambda: self.forward(input_ids=prompt, use_cache=False), prompt.device))

    def result(self) -> dict:
        """Median ms of a forward, tokens/s, and the compiled logits' error against the eager ones."""
        ms = statistics.median(self.times)
        batch, tokens = self.prompts[0].shape
        return {"ms": ms, "tokens_per_s": 1e3 * batch * tokens / ms, "logits_error": self.error}


class _StepClock:
    """Wall-time spans of single-token forwards, the device synchronized at both ends of each: the forward's
    time alone (host and device), with nothing of the loop around it overlapping."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: list[float] = []

    def start(self) -> float:
        _synchronize(self.device)
        return time.perf_counter()

    def stop(self, start: float) -> None:
        _synchronize(self.device)
        self.spans.append(1e3 * (time.perf_counter() - start))

    def ms(self) -> list[float]:
        return list(self.spans)


def _is_step(kwargs: dict) -> bool:
    """Whether a forward call is one decode step: input_ids with one new token per sequence."""
    ids = kwargs.get("input_ids")
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1


class _TimedCall:
    """Stands in for transformers' cached compiled call during one ``generate``: times its one-token calls."""

    def __init__(self, call: Callable, clock: _StepClock) -> None:
        self.call = call
        self.clock = clock

    def __call__(self, *args: object, **kwargs: object) -> object:
        if not _is_step(kwargs):
            return self.call(*args, **kwargs)
        start = self.clock.start()
        out = self.call(*args, **kwargs)
        self.clock.stop(start)
        return out


@contextlib.contextmanager
def _timed_steps(model: torch.nn.Module, mode: str, clock: _StepClock) -> Iterator[bool]:
    """Time every single-token forward that ``generate`` runs inside the block; yields whether it could hook
    in. Eager: forward hooks on the model. Compiled: the compiled callable that transformers caches on the model
    (``_compiled_call``, made by the warm-up ``generate``) is wrapped, outside the compiled region."""
    if mode == "eager":
        pending: list[object | None] = []

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append(clock.start() if _is_step(kwargs) else None)

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            start = pending.pop() if pending else None
            if start is not None:
                clock.stop(start)

        handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            yield True
        finally:
            for handle in handles:
                handle.remove()
        return
    compiled = getattr(model, "_compiled_call", None)
    if compiled is None:
        yield False
        return
    model._compiled_call = _TimedCall(compiled, clock)
    try:
        yield True
    finally:
        model._compiled_call = compiled


class _DecodeTimer:
    """One model's decode measurement: ``model.generate`` of exactly ``new_tokens`` greedy tokens after
    ``prompt`` ([batch, length]), eager (dynamic cache) or compiled (transformers' static-cache recipe, which
    compiles the forward in the warm-up call made on construction). Each round times a whole ``generate`` and a
    one-token one."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, mode: str) -> None:
        self.model, self.prompt, self.new_tokens, self.mode = model, prompt, new_tokens, mode
        pad = getattr(model.config, "pad_token_id", None)
        self.options = {
            "attention_mask": torch.ones_like(prompt), "do_sample": False,
            "pad_token_id": model.config.eos_token_id if pad is None else pad,
        }
        if mode == "compiled":
            self.options["cache_implementation"] = "static"
        self.totals: list[float] = []
        self.firsts: list[float] = []
        out = self._generate(new_tokens)
        expected = (prompt.shape[0], prompt.shape[1] + new_tokens)
        if out.shape != expected:
            raise CheckError(f"generate returned shape {tuple(out.shape)}, expected {expected}")
        self._generate(1)

    @torch.no_grad()
    def _generate(self, tokens: int) -> torch.Tensor:
        return self.model.generate(self.prompt, max_new_tokens=tokens, min_new_tokens=tokens, **self.options)

    def round(self, index: int) -> None:
        self.totals.append(wall_ms(lambda: self._generate(self.new_tokens), self.prompt.device))
        self.firsts.append(wall_ms(lambda: self._generate(1), self.prompt.device))

    def result(self) -> dict:
        """ms per generated token over the whole call, tokens/s, the per-step ms without the prompt, the
        forward's ms per step (from one more, instrumented, ``generate``), the rest of the loop's ms per step and
        the one-token call's ms (medians over the rounds)."""
        total_ms, first_ms = statistics.median(self.totals), statistics.median(self.firsts)
        step_ms = (total_ms - first_ms) / (self.new_tokens - 1)
        clock = _StepClock(self.prompt.device)
        with _timed_steps(self.model, self.mode, clock) as hooked:
            self._generate(self.new_tokens)
        steps = clock.ms() if hooked else []
        forward_ms = statistics.median(steps) if steps else None
        if forward_ms is None:
            sys.stderr.write(
                f"\nwarning: no single-token forward of generate ({self.mode}) could be timed; forward_ms left empty\n"
            )
        batch = self.prompt.shape[0]
        return {
            "ms": total_ms / self.new_tokens, "tokens_per_s": 1e3 * batch * self.new_tokens / total_ms,
            "step_ms": step_ms, "forward_ms": forward_ms,
            "loop_ms": None if forward_ms is None else step_ms - forward_ms, "first_ms": first_ms,
        }


def _reset_compiler() -> None:
    torch._dynamo.reset()


def _failure_of(error: Exception, label: str) -> dict:
    """A measurement's record of why it failed (its first line), the whole message on stderr."""
    text = str(error).strip()
    sys.stderr.write(f"\nwarning: {label} failed, no times for it: {type(error).__name__}: {text[:4000]}\n")
    return {"error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"}


def measure_models(
    models: dict[str, torch.nn.Module],
    modes: tuple[str, ...],
    phases: tuple[str, ...],
    prefill_prompts: list[torch.Tensor],
    decode_prompts: dict[int, torch.Tensor],
    new_tokens: int,
    tick: Callable[[str], None] = lambda label: None,
    prefill_runs: int = PREFILL_RUNS,
    decode_runs: int = DECODE_RUNS,
) -> dict[str, dict[tuple[str, str, int], dict]]:
    """Check every model (:func:`check_model`), then time them side by side in every mode and phase:
    measurements keyed by model name, then ``(mode, phase, batch)``. Per measurement every model is made ready
    (compiled, warmed up), then timed in interleaved rounds, each model once a round in an order that rotates, so
    that the host's drift over minutes (timings on the H200's host moved by up to 50% between runs) falls on
    all of them alike; each keeps its median. ``tick(label)`` is called after each model's measurement (the
    progress bar). The compiler's caches are reset before each compiled measurement.

    A measurement that fails for another reason than a wrong result (a compile or CUDA-graph error, say) is
    kept as ``{"error": "..."}`` and reported, and the others go on; a CheckError (a wrong result) raises."""
    references = {name: check_model(model, prefill_prompts[0]) for name, model in models.items()}
    plan: list[tuple[str, str, int]] = []
    for mode in modes:
        if "prefill" in phases:
            plan.append((mode, "prefill", prefill_prompts[0].shape[0]))
        if "decode" in phases:
            plan += [(mode, "decode", batch) for batch in decode_prompts]
    times: dict[str, dict[tuple[str, str, int], dict]] = {name: {} for name in models}
    for mode, phase, batch in plan:
        key = (mode, phase, batch)
        label = f"{mode} {phase}" + (f" batch {batch}" if phase == "decode" else "")
        if mode == "compiled":
            _reset_compiler()
        timers: dict[str, _PrefillTimer | _DecodeTimer] = {}
        # Every model's compiled forward stays cached for the rounds: one entry per model and input shape.
        with torch._dynamo.config.patch(recompile_limit=max(8, 4 * len(models))):
            for name, model in models.items():
                try:
                    if phase == "prefill":
                        timers[name] = _PrefillTimer(model, prefill_prompts, mode, references[name])
                    else:
                        timers[name] = _DecodeTimer(model, decode_prompts[batch], new_tokens, mode)
                except CheckError:
                    raise
                except Exception as error:  # noqa: BLE001 - reported in the row, the other measurements go on
                    times[name][key] = _failure_of(error, f"{name} {label}")
            names = list(timers)
            for index in range(prefill_runs if phase == "prefill" else decode_runs):
                turn = index % max(1, len(names))
                for name in names[turn:] + names[:turn]:
                    if name not in timers:
                        continue
                    try:
                        timers[name].round(index)
                    except Exception as error:  # noqa: BLE001 - as above
                        times[name][key] = _failure_of(error, f"{name} {label}")
                        del timers[name]
            for name, timer in timers.items():
                try:
                    times[name][key] = timer.result()
                except Exception as error:  # noqa: BLE001 - as above
                    times[name][key] = _failure_of(error, f"{name} {label}")
        if mode == "compiled":
            _reset_compiler()
        for name in models:
            tick(f"{name} {label}")
    return times


def model_rows(
    stamp: dict[str, str],
    dense: dict[tuple[str, str, int], dict],
    sparse: dict[tuple[str, str, int], dict],
    pattern: str,
    vector: int,
    intermediate: int,
    layers: int,
    hidden: int,
    prefill_tokens: int,
    new_tokens: int,
    prompt: int,
    counts: dict | None = None,
    values: str = "",
) -> list[dict]:
    """One result row per sparse measurement, beside the dense measurement of the same key (``values``: the 8-bit
    dtype of the sparse model's kept values, "" for the model's own dtype): ``dense_ms``,
    ``sparse_ms``, ``speedup = dense_ms / sparse_ms`` and each MEASURES pair (None, an empty CSV cell, where
    a phase has none), and ``dense_error``/``sparse_error``: why a measurement failed ("" if it did not)."""
    rows = []
    for (mode, phase, batch), times in sparse.items():
        reference = dense[(mode, phase, batch)]
        dense_ms, sparse_ms = reference.get("ms"), times.get("ms")
        row = {
            **stamp, "mode": mode, "phase": phase, "batch": batch,
            "tokens": prefill_tokens if phase == "prefill" else new_tokens,
            "prompt": "" if phase == "prefill" else prompt, "pattern": pattern, "vector": vector, "values": values,
            "intermediate": intermediate, "layers": layers, "hidden": hidden,
            "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": None if dense_ms is None or sparse_ms is None else dense_ms / sparse_ms,
        }
        for measure in MEASURES[1:]:
            row[f"dense_{measure}"] = reference.get(measure)
            row[f"sparse_{measure}"] = times.get(measure)
        row["dense_error"] = reference.get("error", "")
        row["sparse_error"] = times.get("error", "")
        row.update(counts or {})
        rows.append(row)
    return rows


def write_models_csv(rows: list[dict], out_dir: str | Path, device: str) -> Path:
    """Merge ``rows`` into ``<out_dir>/<device slug>-models.csv`` (rows of the same KEY replaced); return the path."""
    out = Path(out_dir) / f"{device_slug(device)}-models.csv"
    merge_csv(rows, out, KEY)
    return out


def _cell(value: object, digits: int = 2) -> str:
    if value in (None, ""):
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def format_models_rows(rows: list[dict]) -> str:
    """The terminal table: per row the case, dense and sparse ms (decode: per generated token), the speedup,
    both tokens/s and, for decode, both forward and loop ms per step; then why a measurement failed, if one did."""
    lines = [
        f"{'mode':>8} {'phase':>7} {'batch':>5} {'tokens':>6} {'pattern':>7} {'inter':>6} {'dense ms':>9} "
        f"{'sparse ms':>9} {'speedup':>7} {'dense tok/s':>11} {'sparse tok/s':>12} {'fwd d/s ms':>13} "
        f"{'loop d/s ms':>13}"
    ]
    for r in rows:
        forward = f"{_cell(r.get('dense_forward_ms'))}/{_cell(r.get('sparse_forward_ms'))}"
        loop = f"{_cell(r.get('dense_loop_ms'))}/{_cell(r.get('sparse_loop_ms'))}"
        lines.append(
            f"{r['mode']:>8} {r['phase']:>7} {r['batch']:>5} {r['tokens']:>6} {_label(r):>7} {r['intermediate']:>6} "
            f"{_cell(r['dense_ms'], 3):>9} {_cell(r['sparse_ms'], 3):>9} {_cell(r['speedup']):>7} "
            f"{_cell(r.get('dense_tokens_per_s'), 0):>11} {_cell(r.get('sparse_tokens_per_s'), 0):>12} "
            f"{forward:>13} {loop:>13}" + _failure(r)
        )
    return "\n".join(lines)


def _label(row: dict) -> str:
    """The pattern, with the 8-bit dtype of the values where the sparse model has one ('8:32 int8')."""
    values = row.get("values") or ""
    return f"{row['pattern']} {values}" if values else str(row["pattern"])


def _failure(row: dict) -> str:
    """'  failed: sparse RuntimeError: ...' where a measurement of the row failed, else ''."""
    failed = [f"{side} {row[f'{side}_error']}" for side in ("dense", "sparse") if row.get(f"{side}_error")]
    return f"  failed: {'; '.join(failed)}"[:160] if failed else ""


def measurement_count(modes: tuple[str, ...], phases: tuple[str, ...], batches: tuple[int, ...]) -> int:
    """How many measurements one model takes (each is one step of the progress bar)."""
    return len(modes) * (("prefill" in phases) + ("decode" in phases) * len(batches))


def _free_memory() -> None:
    """Drop the compiler's caches (which hold the last model's graphs) and return freed GPU memory."""
    _reset_compiler()
    gc.collect()  # transformers' cached compiled call refers back to its model: a cycle
    torch.cuda.empty_cache()


def run_models(
    patterns: tuple[str, ...] = PATTERNS,
    vector: int = VECTOR,
    intermediates: tuple[int, ...] = INTERMEDIATES,
    layers: int = LAYERS,
    batches: tuple[int, ...] = BATCHES,
    new_tokens: int = NEW_TOKENS,
    prompt: int = PROMPT,
    prefill_tokens: int = PREFILL_TOKENS,
    modes: tuple[str, ...] = MODES,
    phases: tuple[str, ...] = PHASES,
    out_dir: str | Path = "benchmarks/results",
    *,
    hidden: int = HIDDEN,
    heads: int = HEADS,
    prefill_runs: int = PREFILL_RUNS,
    decode_runs: int = DECODE_RUNS,
    weight_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Time the dense LLaMA-layout model and its sparse versions (module docstring) for every intermediate
    size, merge the rows into ``<out_dir>/<device>-models.csv`` after each size, print the table; return this
    run's rows.

    Per intermediate size every model (the dense one and one fresh model per pattern) is built and sparsified
    before anything is compiled, and all are timed side by side (:func:`measure_models`), then freed. Raises
    ValueError for a bad argument, RuntimeError without CUDA or transformers, and CheckError where a model
    computes a wrong result (nothing is written then); a measurement that fails otherwise is reported in its rows
    (``dense_error``/``sparse_error``) and the run goes on. ``weight_dtype`` (``torch.float8_e4m3fn`` or
    ``torch.int8``) gives the sparse models 8-bit values."""
    # Repeats dropped, order kept: each model, size and batch is measured once.
    patterns, intermediates, batches = (tuple(dict.fromkeys(v)) for v in (patterns, intermediates, batches))
    modes, phases = tuple(dict.fromkeys(modes)), tuple(dict.fromkeys(phases))
    check_models_arguments(
        patterns, vector, intermediates, layers, batches, new_tokens, prompt, prefill_tokens, modes, phases,
        hidden, heads, weight_dtype,
    )
    for name, value in (("prefill_runs", prefill_runs), ("decode_runs", decode_runs)):
        _check_positive(name, value)
    if not torch.cuda.is_available():
        raise RuntimeError("nmspmm models needs a CUDA GPU; none is visible to torch")
    try:
        import transformers
    except ImportError as error:
        raise RuntimeError("nmspmm models needs transformers (pip install 'transformers>=4.41')") from error
    from .runner import environment

    stamp = {**environment(), "transformers": transformers.__version__}
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(SEED + 2)
    prefill_prompts = [
        torch.randint(VOCAB, (1, prefill_tokens), device=device, generator=generator) for _ in range(PREFILL_PROMPTS)
    ]
    decode_prompts = {
        batch: torch.randint(VOCAB, (batch, prompt), device=device, generator=generator) for batch in batches
    }
    max_positions = max(4096, prefill_tokens, prompt + new_tokens)
    per_model = measurement_count(modes, phases, batches)
    total = len(intermediates) * (1 + len(patterns)) * per_model
    done = 0
    rows: list[dict] = []
    out = None
    for intermediate in intermediates:
        build = dict(hidden=hidden, heads=heads, max_positions=max_positions)
        # Every model of this size is built (and sparsified) before any is compiled: fresh objects, no deepcopy.
        models: dict[str, torch.nn.Module] = {"dense": build_llama(intermediate, layers, **build)}
        counts: dict[str, dict] = {}
        for pattern in patterns:
            models[pattern] = build_llama(intermediate, layers, **build)
            counts[pattern] = sparsified(models[pattern], pattern, vector, weight_dtype)
        names = list(models)

        def tick(what: str, size: int = intermediate) -> None:
            nonlocal done
            done += 1
            progress(done, total, f"i{size} {what}")

        progress(done, total, f"i{intermediate} check")
        measured = measure_models(
            models, modes, phases, prefill_prompts, decode_prompts, new_tokens, tick, prefill_runs, decode_runs
        )
        del models
        _free_memory()
        for name in names[1:]:
            rows += model_rows(
                stamp, measured["dense"], measured[name], name, vector, intermediate, layers, hidden,
                prefill_tokens, new_tokens, prompt, counts[name],
                "" if weight_dtype is None else dtype_name(weight_dtype),
            )
        out = write_models_csv(rows, out_dir, stamp["device"])  # after each size: a cut run keeps them
    print(format_models_rows(rows))
    if out is not None:
        print(f"\nresults: {out}")
    return rows
