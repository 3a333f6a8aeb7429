"""Offline tuning of the vector-wise kernel's configs on a GPU: for each case, check and time a grid of
configs (kernel level: feature-major x in; both output layouts), write every row to a CSV and print the
best per case. Times replay CUDA graphs (GPU time, as the benchmark's headline), and fp32 multiplies as the
library does (``nmspmm.ops.backend.input_precision``). The table in ``nmspmm.kernels.nm_vector`` is built from its
output;
nothing here runs at import."""

from __future__ import annotations

import argparse
import csv
import itertools
import sys

import torch

import nmspmm
from nmspmm.bench.configs import large_configs, small_configs
from nmspmm.bench.runner import graph_median_ms
from nmspmm.kernels import nm_vector_matmul, transpose
from nmspmm.ops.backend import input_precision

LARGE = [(4096, 4096, 4096), (1024, 11008, 4096), (256, 4096, 11008), (2048, 8192, 22016)]
SMALL = [(1, 4096, 4096), (16, 4096, 4096), (64, 11008, 4096)]
# 65-512 tokens, grids from under one wave of SMs to five: the cases behind kernels.nm_vector._half_tile_v64.
MID = [(tokens, n, k) for n, k in ((4096, 4096), (11008, 4096), (4096, 11008), (2048, 5632)) for tokens in (256, 512)]
SHAPE_SETS = {"large": LARGE, "mid": MID, "small": SMALL}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--patterns", default="16:32,8:32,4:32")
    parser.add_argument("--vectors", default="32,64,128")
    parser.add_argument("--shapes", default="large,small", help="comma-separated: large, mid, small")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPE_SETS)
    if unknown:
        parser.error(f"--shapes: expected names from {sorted(SHAPE_SETS)}, got {sorted(unknown)}")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    rows_out = []
    shapes = [shape for name in args.shapes.split(",") for shape in SHAPE_SETS[name]]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for (tokens, out_f, in_f), pattern, vector in itertools.product(
            shapes, args.patterns.split(","), map(int, args.vectors.split(","))
        ):
            if dtype == torch.float32 and vector != 32 and tokens > 64:
                continue
            weight = nmspmm.prune(torch.randn(out_f, in_f, device="cuda", dtype=dtype), pattern, vector)
            xs = [torch.randn(tokens, in_f, device="cuda", dtype=dtype) for _ in range(4)]
            xts = [transpose(x) for x in xs]
            dense_w = weight.to_dense()
            reference = (xs[0].float() @ dense_w.float().t())
            dense_ms = graph_median_ms([lambda x=x: x @ dense_w.t() for x in xs])
            transpose_ms = graph_median_ms([lambda x=x: transpose(x) for x in xs])
            configs = large_configs(vector, dtype) if tokens > 64 else small_configs(vector, dtype, tokens)
            precision = input_precision(dtype)
            best = {}
            for config in configs:
                for layout in ("row", "feature"):
                    if layout == "row":
                        out = torch.empty(tokens, out_f, device="cuda", dtype=dtype)
                    else:
                        out = torch.empty(out_f, tokens, device="cuda", dtype=dtype).t()
                    try:
                        out.fill_(float("nan"))
                        nm_vector_matmul(
                            xts[0], weight.values, weight.kept_offsets(), weight.n, weight.m, vector, out, config,
                            None, precision,
                        )
                        torch.cuda.synchronize()
                    except Exception as error:  # noqa: BLE001 - out-of-resources configs are skipped
                        print(f"skip {config}: {type(error).__name__}", file=sys.stderr)
                        break
                    err = float((out.float() - reference).norm() / reference.norm())
                    ok = err < (2e-2 if dtype != torch.float32 else 1e-4)
                    ms = float("nan")
                    if ok:
                        ms = graph_median_ms([
                            lambda xt=xt: nm_vector_matmul(
                                xt, weight.values, weight.kept_offsets(), weight.n, weight.m, vector, out, config,
                                None, precision,
                            )
                            for xt in xts
                        ])
                        if ms < best.get(layout, (float("inf"),))[0]:
                            best[layout] = (ms, config)
                    rows_out.append(dict(
                        device=device, dtype=dtype_name, M=tokens, N=out_f, K=in_f, pattern=pattern, vector=vector,
                        layout=layout, block_m=config.block_m, block_n=config.block_n, block_k=config.block_k,
                        warps=config.num_warps, stages=config.num_stages, split_k=config.split_k,
                        weight_first=int(config.weight_first), ms=ms, dense_ms=dense_ms,
                        transpose_ms=transpose_ms, rel_error=err,
                    ))
            for layout, (ms, config) in best.items():
                extra = transpose_ms if layout == "row" else 0.0
                print(f"{dtype_name} {tokens}x{out_f}x{in_f} {pattern} V={vector} {layout}: best {ms:.4f} ms "
                      f"(+T {extra:.4f}) dense {dense_ms:.4f} -> {dense_ms / (ms + extra):.2f}x  "
                      f"bm{config.block_m} bk{config.block_k} w{config.num_warps} s{config.num_stages} "
                      f"sk{config.split_k} wf{int(config.weight_first)}", flush=True)
            with open(args.out, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows_out[0]))
                writer.writeheader()
                writer.writerows(rows_out)


if __name__ == "__main__":
    main()
