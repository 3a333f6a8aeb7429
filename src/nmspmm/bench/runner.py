"""Run benchmark cases: check nmspmm against the dense reference, then time it at the op level (row-major
x in, row-major y out) and the kernel level (feature-major in and out) beside torch.matmul in the same
process, with inputs rotated so that none stays in L2.

The headline times (``ms``, ``dense_ms``) replay the calls from CUDA graphs: the GPU time of every kernel a
call launches, on both sides, without the host's launch overhead. Eager times, which include that overhead
and so depend on the host machine's speed, are reported beside them (``eager_ms``, ``dense_eager_ms``)."""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..formats import NMSparseWeight
from ..kernels import VectorConfig, choose_element_config, choose_vector_config, nm_vector_matmul
from ..kernels.launch import FEW_TOKENS
from ..kernels.nm_element import expands_to_dense
from ..ops import linear, linear_feature_major
from ..ops.backend import input_precision
from ..perf import DeviceCeilings, model_case
from .configs import sample_configs, within
from ..prune import prune
from .cases import Case

GRAPH_TOKENS = FEW_TOKENS  # bench-formats: up to this many tokens, also time from a CUDA graph
TOLERANCE = {"float32": 1e-5, "tf32": 2e-3, "float16": 2e-3, "bfloat16": 1.5e-2}


@contextlib.contextmanager
def matmul_precision(dtype_name: str) -> Iterator[None]:
    """Run fp32 cases exactly ("float32") or in tf32 ("tf32"), for nmspmm and torch.matmul alike."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _rotating(functions: list[Callable[[], object]]) -> Callable[[], None]:
    """One callable that runs the next of ``functions`` (one per rotated input set) on each call."""
    state = {"next": 0}

    def call() -> None:
        functions[state["next"]]()
        state["next"] = (state["next"] + 1) % len(functions)

    return call


def median_ms(functions: list[Callable[[], object]]) -> float:
    """Median time of one eager call (host launch overhead included), cycling through ``functions``."""
    import triton.testing

    return float(triton.testing.do_bench(_rotating(functions), warmup=10, rep=60, return_mode="median"))


def graph_median_ms(functions: list[Callable[[], object]]) -> float:
    """Like :func:`median_ms`, but replaying the calls from a CUDA graph: the GPU time without the host's
    launch overhead. That overhead decides eager times of short calls: in one H100 session the same kernel
    (256x4096x11008, bf16 8:32) timed 0.031 ms eager on one host and 0.086 ms on another."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(_rotating(functions), rep=20, return_mode="median"))


def environment() -> dict[str, str]:
    """Device and versions stamped on every result row."""
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "date": datetime.date.today().isoformat(),
    }


def run_case(
    case: Case, ceilings: DeviceCeilings, stamp: dict[str, str], check_configs: bool = False,
    dense_times: dict[tuple, dict[str, float]] | None = None,
) -> list[dict]:
    """Check and time one case; return its op-level and kernel-level result rows. With ``check_configs``
    the kernel-level row also says how the model's config compares with a sample of the tuner's grid.
    ``dense_times`` holds the cuBLAS times of shapes already timed in this run, so that the patterns and
    vectors of one shape share one measurement of the dense product."""
    with matmul_precision(case.dtype):
        return _run_case(case, ceilings, stamp, check_configs, {} if dense_times is None else dense_times)


def _run_case(
    case: Case, ceilings: DeviceCeilings, stamp: dict[str, str], check_configs: bool,
    dense_times: dict[tuple, dict[str, float]],
) -> list[dict]:
    dtype = torch.float32 if case.dtype in ("float32", "tf32") else getattr(torch, case.dtype)
    scale = case.cols**-0.5
    dense_weight = torch.randn(case.rows, case.cols, device="cuda", dtype=dtype) * scale
    weight = prune(dense_weight, case.pattern, case.vector)
    element = torch.finfo(dtype).bits // 8
    set_bytes = (case.tokens * case.cols + case.rows * case.cols) * element + weight.nbytes
    sets = rotation_sets(set_bytes, torch.cuda.get_device_properties().L2_cache_size)
    xs = [torch.randn(case.tokens, case.cols, device="cuda", dtype=dtype) for _ in range(sets)]
    x_ts = [x.t().contiguous() for x in xs]
    weights = [weight] + [
        NMSparseWeight(weight.values.clone(), weight.offsets.clone(), weight.pattern, weight.vector, weight.shape)
        for _ in range(sets - 1)
    ]

    reference = xs[0].double() @ weight.to_dense().double().t()
    errors = {
        "op": relative_error(linear(xs[0], weight), reference),
        "kernel": relative_error(linear_feature_major(x_ts[0], weight).t(), reference),
    }
    shape = (case.tokens, case.rows, case.cols, case.dtype)
    if shape not in dense_times:
        dense_times[shape] = _dense_times(case.dtype, xs, rotated_dense(dense_weight, sets))
    dense = dense_times[shape]
    semi_structured_ms = math.nan
    if case.pattern == "2:4" and dtype != torch.float32:
        semi_structured_ms = _semi_structured_ms(xs, weights)
    timed = {
        "op": [lambda x=x, w=w: linear(x, w) for x, w in zip(xs, weights)],
        "kernel": [lambda x=x, w=w: linear_feature_major(x, w) for x, w in zip(x_ts, weights)],
    }
    precision = case.dtype
    model = model_case(
        case.tokens, case.rows, case.cols, weight.n, weight.m, case.vector, dtype, precision, ceilings
    )
    if case.vector > 1:
        config = choose_vector_config(case.tokens, case.rows, weight.kept_per_row, case.vector, dtype, xs[0].device)
    else:
        config = choose_element_config(case.tokens, case.rows, case.cols, weight.m, dtype, xs[0].device)
    rows = []
    for level, functions in timed.items():
        correct = errors[level] < TOLERANCE[case.dtype]
        # Eager first: its calls derive what each rotated weight caches, outside any graph capture.
        eager_ms = median_ms(functions) if correct else math.nan
        ms = graph_median_ms(functions) if correct else math.nan
        bound_ms = model.op_ms if level == "op" else model.kernel_ms
        rows.append({
            **stamp,
            "M": case.tokens, "N": case.rows, "K": case.cols, "pattern": case.pattern, "vector": case.vector,
            "dtype": case.dtype, "level": level, "ms": ms, "dense_ms": dense["dense_ms"],
            "speedup": dense["dense_ms"] / ms, "ideal_speedup": model.dense_ms / bound_ms,
            "byte_ratio": model.dense_bytes / (model.op_bytes if level == "op" else model.kernel_bytes),
            "fraction_of_bound": bound_ms / ms, "rel_error": errors[level], "correct": correct,
            "eager_ms": eager_ms, "dense_eager_ms": dense["dense_eager_ms"], "tflops": model.dense_flops / ms / 1e9,
            "bound_ms": bound_ms, "dense_bound_ms": model.dense_ms, "semi_structured_ms": semi_structured_ms,
            "dense_tf32_ms": dense["dense_tf32_ms"],
            "config": _route(case, config, dtype),
        })
    if check_configs and case.vector > 1 and rows[-1]["correct"]:
        rows[-1].update(_config_check(case, config, weights, x_ts, reference))
    return rows


def _dense_times(dtype_name: str, xs: list[torch.Tensor], dense_weights: list[torch.Tensor]) -> dict[str, float]:
    """torch.matmul (cuBLAS) on the rotated inputs: graph-replayed and eager, and for exact fp32 also in tf32."""
    dense = [lambda x=x, w=w: x @ w.t() for x, w in zip(xs, dense_weights)]
    times = {"dense_eager_ms": median_ms(dense), "dense_ms": graph_median_ms(dense), "dense_tf32_ms": math.nan}
    if dtype_name == "float32":
        with matmul_precision("tf32"):
            times["dense_tf32_ms"] = graph_median_ms(dense)
    return times


def _config_check(
    case: Case, chosen: VectorConfig, weights: list[NMSparseWeight], x_ts: list[torch.Tensor],
    reference: torch.Tensor,
) -> dict:
    """Kernel time (feature-major in and out, CUDA-graph replay over the rotated weights and inputs, so that a
    weight-bound case reads its weight from HBM as in the benchmark) of the model's config and of the sample of
    the tuner's grid (configs that fail to launch or give a wrong result are skipped), and whether the choice is
    within 10%. ``reference`` is the product of ``x_ts[0]`` and ``weights[0]``."""
    precision = input_precision(weights[0].dtype)
    out = torch.empty(case.rows, case.tokens, device=x_ts[0].device, dtype=weights[0].dtype).t()

    def launch(config: VectorConfig, x_t: torch.Tensor, weight: NMSparseWeight) -> None:
        nm_vector_matmul(
            x_t, weight.values, weight.kept_offsets(), weight.n, weight.m, weight.vector, out, config, None, precision
        )

    def time_config(config: VectorConfig) -> float:
        try:
            launch(config, x_ts[0], weights[0])
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a config the device cannot launch (resources) is skipped
            return math.nan
        if not relative_error(out, reference) < TOLERANCE[case.dtype]:
            return math.nan
        return graph_median_ms([lambda x_t=x_t, w=w: launch(config, x_t, w) for x_t, w in zip(x_ts, weights)])

    chosen_ms = time_config(chosen)
    timed = [(time_config(config), config) for config in sample_configs(case.tokens, case.vector, weights[0].dtype)]
    timed = [(ms, config) for ms, config in timed if not math.isnan(ms)] + [(chosen_ms, chosen)]
    best_ms, best = min(timed, key=lambda pair: pair[0])
    return {
        "config_chosen_ms": chosen_ms, "config_best_ms": best_ms, "config_best": _describe(best),
        "configs_tried": len(timed), "config_within_10pct": within(chosen_ms, best_ms),
    }


def _semi_structured_ms(xs: list[torch.Tensor], weights: list[NMSparseWeight]) -> float:
    """PyTorch's own 2:4 path (cuSPARSELt/CUTLASS) on the same masked weights, eager (compare with ``eager_ms``);
    NaN where it is unavailable."""
    try:
        from torch.sparse import to_sparse_semi_structured

        packed = [to_sparse_semi_structured(w.to_dense()) for w in weights]
        return median_ms([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, packed)])
    except (RuntimeError, ValueError, NotImplementedError):
        return math.nan


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` in float64; inf where ``actual`` is not finite."""
    actual, reference = actual.double(), reference.double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    return float((actual - reference).norm() / reference.norm().clamp_min(1e-30))


def rotation_sets(set_bytes: int, l2_bytes: int) -> int:
    """How many input sets of ``set_bytes`` to rotate so that none is still in L2 when it comes round again."""
    return min(32, max(2, math.ceil(2 * l2_bytes / set_bytes) + 1))


def rotated_dense(dense: torch.Tensor, sets: int) -> list[torch.Tensor]:
    """``dense`` and ``sets - 1`` fresh weights of its shape and scale (``K ** -0.5``) for the dense baseline."""
    scale = dense.shape[1] ** -0.5
    return [dense] + [torch.randn_like(dense) * scale for _ in range(sets - 1)]


def _route(case: Case, config: VectorConfig, dtype: torch.dtype) -> str:
    """What ran the case: the vector-wise kernel's config, the element-wise kernel's, or (V = 1 beyond the
    kernel's token range) cuBLAS on the weight's dense expansion."""
    if case.vector > 1:
        return _describe(config)
    if expands_to_dense(case.tokens, dtype, scaled=False):
        return "dense expansion + cuBLAS"
    return f"element-wise {_describe(config)}"


def _describe(config) -> str:
    return (
        f"bm{config.block_m} bn{config.block_n} bk{config.block_k} w{config.num_warps} s{config.num_stages} "
        f"sk{config.split_k}{' wf' if config.weight_first else ''}"
    )
