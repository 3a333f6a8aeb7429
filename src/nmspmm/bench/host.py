"""Host (CPU) time of one eager call, nmspmm against the torch call it replaces, at shapes where the GPU
work is short, so that the host's dispatch and launch path decides.

Each timed call gets a fresh ``x`` (a list of distinct inputs is made first and cycled), and the device is
synchronized only at the ends of a batch of calls: the time per call is the batch's wall time over its count,
the minimum over several batches after a warm-up. While the GPU keeps up with the launches, that is the host's
cost per call; where the GPU work is longer than it, the figure is the GPU's time instead.

Cases: N:M weights ("8:32 V=64", "2:4 V=1") without gradients (``nmspmm.linear`` under ``torch.no_grad()``
against ``F.linear`` with the dense weight) and with them (``nmspmm.SparseLinear``, its values requiring grad,
forward only, against ``nn.Linear``), 8:32 V=64 with int8 values ("8:32 V=64 int8"), and CSR (90% pruned) and
block-shuffled weights (32x32 blocks, 75% pruned, identity row permutation) without gradients.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..progress import progress
from .report import device_slug, merge_csv
from .runner import relative_error

SHAPES = ((1, 256, 256), (16, 4096, 4096), (256, 4096, 4096))
NM_FORMATS = (("8:32", 64), ("2:4", 1))
CSR_SPARSITY = 0.9
BLOCK_SPARSITY = 0.75
BLOCK = (32, 32)
CALLS = 200  # calls per timed batch
REPEATS = 5  # timed batches (the minimum is kept)
WARMUP = 20
INPUTS = 16  # distinct x tensors, cycled
TOLERANCE = 1.5e-2  # bf16, relative norm error against the float64 product with the densified weight
KEY = ("cpu", "case", "grad", "shape")


@dataclass(frozen=True)
class HostCase:
    """One eager call ``y = x[M, K] @ W[N, K].T``: ``kind`` "nm" (``pattern`` at vector length ``vector``, its kept
    values in the 8-bit dtype named by ``values`` if given), "csr" or "block" (``sparsity`` pruned, ``block``
    tiles); ``grad``: autograd records the call (N:M with unquantized values only)."""

    kind: str
    tokens: int
    rows: int
    cols: int
    grad: bool = False
    pattern: str = ""
    vector: int = 1
    sparsity: float = 0.0
    block: tuple[int, int] = (0, 0)
    values: str = ""

    @property
    def label(self) -> str:
        """The case column: '8:32 V=64', '8:32 V=64 int8', 'csr 90%', 'block 32x32 75%'."""
        if self.kind == "nm":
            return f"{self.pattern} V={self.vector}" + (f" {self.values}" if self.values else "")
        if self.kind == "csr":
            return f"csr {self.sparsity:.0%}"
        return f"block {self.block[0]}x{self.block[1]} {self.sparsity:.0%}"

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.rows}x{self.cols}"


def check_shapes(shapes: tuple[tuple[int, int, int], ...] | list[tuple[int, int, int]]) -> None:
    """Raise ValueError unless every shape is (M, N, K) of positive ints that every format's case fits: N a
    multiple of 64 (V=64 and the 32-row blocks) and K of 32 (the 8:32 pattern and 32-column blocks)."""
    if not shapes:
        raise ValueError("shapes: expected at least one (M, N, K)")
    for shape in shapes:
        if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
            raise ValueError(f"shapes: expected (M, N, K) of three positive ints, got {shape!r}")
        _, rows, cols = shape
        if rows % 64 or cols % 32:
            raise ValueError(f"shapes: N must be a multiple of 64 and K of 32 for every format, got {shape!r}")


def host_cases(shapes: tuple[tuple[int, int, int], ...] | list[tuple[int, int, int]] = SHAPES) -> list[HostCase]:
    """Every case at every shape: the N:M formats without and with gradients, 8:32 V=64 with int8 values without,
    then CSR and block without."""
    check_shapes(shapes)
    cases = []
    for tokens, rows, cols in shapes:
        for grad in (False, True):
            cases += [HostCase("nm", tokens, rows, cols, grad, pattern, vector) for pattern, vector in NM_FORMATS]
        cases.append(HostCase("nm", tokens, rows, cols, pattern="8:32", vector=64, values="int8"))
        cases.append(HostCase("csr", tokens, rows, cols, sparsity=CSR_SPARSITY))
        cases.append(HostCase("block", tokens, rows, cols, sparsity=BLOCK_SPARSITY, block=BLOCK))
    return cases


def host_time_us(
    function: Callable[[torch.Tensor], object],
    inputs: list[torch.Tensor],
    calls: int = CALLS,
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    synchronize: Callable[[], None] = lambda: None,
) -> float:
    """Microseconds per call of ``function``: the minimum over ``repeats`` batches of ``calls`` calls (each on
    the next of ``inputs``, cycled) of the batch's wall time over ``calls``, with ``synchronize`` only before
    and after each batch; ``warmup`` calls first."""
    for i in range(warmup):
        function(inputs[i % len(inputs)])
    synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            function(inputs[i % len(inputs)])
        synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def cpu_model() -> str:
    """The host processor's name: /proc/cpuinfo's first 'model name', else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def case_functions(
    case: HostCase, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, inputs: int = INPUTS
) -> tuple[Callable[[torch.Tensor], object], Callable[[torch.Tensor], object], list[torch.Tensor], float]:
    """The nmspmm call and the torch call of ``case`` (each taking x), the distinct inputs, and the relative
    error of nmspmm's output against the float64 product with the densified weight (checked before timing)."""
    from ..nn import SparseLinear
    from ..ops import linear
    from ..prune import prune, prune_block_shuffled, prune_csr

    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(case.rows, case.cols, device=device, dtype=dtype, generator=generator) * case.cols**-0.5
    xs = [
        torch.randn(case.tokens, case.cols, device=device, dtype=dtype, generator=generator) for _ in range(inputs)
    ]
    if case.kind == "nm":
        sparse = prune(weight, case.pattern, case.vector)
        if case.values:
            sparse = sparse.quantize(getattr(torch, case.values))
    elif case.kind == "csr":
        sparse = prune_csr(weight, sparsity=case.sparsity)
    elif case.kind == "block":
        sparse = prune_block_shuffled(weight, sparsity=case.sparsity, block=case.block, search=False)
    else:
        raise ValueError(f"kind: expected 'nm', 'csr' or 'block', got {case.kind!r}")
    if case.grad:
        if case.kind != "nm" or case.values:
            raise ValueError(f"grad: timed for unquantized N:M weights only, got {case.label!r}")
        module = SparseLinear(sparse)
        baseline = torch.nn.Linear(case.cols, case.rows, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            baseline.weight.copy_(weight)
        if not (module.values.requires_grad and baseline.weight.requires_grad):
            raise RuntimeError("grad: the weights of a grad-enabled case must require grad")

        def ours(x: torch.Tensor) -> object:
            return module(x)

        def theirs(x: torch.Tensor) -> object:
            return baseline(x)
    else:

        def ours(x: torch.Tensor) -> object:
            with torch.no_grad():
                return linear(x, sparse)

        def theirs(x: torch.Tensor) -> object:
            with torch.no_grad():
                return F.linear(x, weight)

    with torch.no_grad():
        error = relative_error(ours(xs[0]), xs[0].double() @ sparse.to_dense().double().t())
    return ours, theirs, xs, error


def host_row(
    stamp: dict[str, str], case: HostCase, nmspmm_us: float, torch_us: float, calls: int, repeats: int
) -> dict:
    """The result row of one case."""
    return {
        **stamp, "case": case.label, "grad": case.grad, "shape": case.shape, "M": case.tokens, "N": case.rows,
        "K": case.cols, "nmspmm_us": nmspmm_us, "torch_us": torch_us, "ratio": nmspmm_us / torch_us,
        "calls": calls, "repeats": repeats,
    }


def write_host_csv(rows: list[dict], out_dir: str | Path, device: str) -> Path:
    """Merge ``rows`` into ``<out_dir>/<device slug>-host.csv`` (rows of the same cpu, case, grad and shape
    replaced, so hosts of one GPU model keep their own rows); return the path."""
    out = Path(out_dir) / f"{device_slug(device)}-host.csv"
    merge_csv(rows, out, KEY)
    return out


def format_host_rows(rows: list[dict]) -> str:
    """The terminal table: case, grad, shape, nmspmm and torch us per call, and their ratio."""
    lines = [f"{'case':>16} {'grad':>5} {'shape':>14} {'nmspmm us':>10} {'torch us':>9} {'ratio':>6}"]
    for r in rows:
        lines.append(
            f"{r['case']:>16} {str(r['grad']):>5} {r['shape']:>14} {float(r['nmspmm_us']):10.1f} "
            f"{float(r['torch_us']):9.1f} {float(r['ratio']):6.2f}"
        )
    return "\n".join(lines)


def run_host(
    shapes: tuple[tuple[int, int, int], ...] = SHAPES,
    calls: int = CALLS,
    repeats: int = REPEATS,
    out_dir: str | Path = "benchmarks/results",
) -> list[dict]:
    """Time every case of :func:`host_cases` on the current CUDA device (each checked first: a wrong result
    raises RuntimeError), merge the rows into ``<out_dir>/<device>-host.csv``, print the table; return the rows.
    The torch baseline of a shape and grad mode is timed once and shared by its cases."""
    shapes = tuple(tuple(shape) for shape in shapes)
    cases = host_cases(shapes)
    for name, value in (("calls", calls), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("nmspmm host needs a CUDA GPU; none is visible to torch")
    from .runner import environment

    stamp = {**environment(), "cpu": cpu_model()}
    baselines: dict[tuple[str, bool], float] = {}
    rows = []
    for done, case in enumerate(cases):
        progress(done, len(cases), f"{case.label} grad={case.grad} {case.shape}")
        ours, theirs, xs, error = case_functions(case)
        if not error < TOLERANCE:
            raise RuntimeError(f"{case.label} at {case.shape}: relative error {error:.2e} (allowed {TOLERANCE})")
        sync = torch.cuda.synchronize
        nmspmm_us = host_time_us(ours, xs, calls, repeats, synchronize=sync)
        if (case.shape, case.grad) not in baselines:
            baselines[(case.shape, case.grad)] = host_time_us(theirs, xs, calls, repeats, synchronize=sync)
        rows.append(host_row(stamp, case, nmspmm_us, baselines[(case.shape, case.grad)], calls, repeats))
    progress(len(cases), len(cases), "done")
    out = write_host_csv(rows, out_dir, stamp["device"])
    print(f"host: {stamp['cpu']}; device: {stamp['device']}")
    print(format_host_rows(rows))
    print(f"\nresults: {out}")
    return rows
