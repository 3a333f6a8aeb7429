"""The ``nmspmm`` command line: ``demo``, ``bench`` (N:M), ``bench-formats`` (CSR, SDDMM, block-shuffled), ``llama``."""

from __future__ import annotations

import argparse


def _layer(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer as NxK, like 4096x11008, got {text!r}") from None
    return rows, cols


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nmspmm", description="N:M sparse matrix products for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="prune a layer, run it sparse and dense, print error and speed")
    demo.add_argument("--pattern", default="8:32")
    demo.add_argument("--vector", type=int, default=64)
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("N", "K"))
    bench = commands.add_parser("bench", help="check and time nmspmm beside cuBLAS on the paper's suite")
    bench.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    bench.add_argument("--tokens", type=int, nargs="+", help="token counts M (default: the suite's)")
    bench.add_argument("--layers", type=_layer, nargs="+", help="layers as NxK (default: the suite's 20)")
    bench.add_argument("--patterns", nargs="+", help="n:m patterns (default: the suite's 8)")
    bench.add_argument("--vectors", type=int, nargs="+", help="vector lengths V (default: 32 64 128)")
    bench.add_argument("--dtypes", nargs="+", help="bfloat16 float16 float32 tf32 (default: bfloat16)")
    bench.add_argument("--decode", action="store_true", help="add the decode token counts 1, 8, 16, 64")
    bench.add_argument("--out-dir", default="benchmarks/results", help="where <device>.csv and .png go")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument(
        "--check-configs", action="store_true",
        help="also time a sample of the tuner's configs per case: is the model's choice within 10%% of the best?",
    )
    formats = commands.add_parser(
        "bench-formats", help="CSR SpMM/SDDMM vs cuSPARSE and dense, block-shuffled vs dense and N:M"
    )
    formats.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    formats.add_argument("--kinds", nargs="+", help="csr sddmm block (default: all)")
    formats.add_argument("--tokens", type=int, nargs="+", help="token counts M (SDDMM: the depth)")
    formats.add_argument("--layers", type=_layer, nargs="+", help="layers as NxK (default: the suite's 20)")
    formats.add_argument("--sparsities", type=float, nargs="+", help="fractions pruned, like 0.9")
    formats.add_argument("--dtypes", nargs="+", help="bfloat16 float16 float32 tf32")
    formats.add_argument("--blocks", type=_layer, nargs="+", help="block shapes as NxK, like 32x32")
    formats.add_argument("--out-dir", default="benchmarks/results", help="where <device>-formats.csv and .png go")
    formats.add_argument("--no-plot", action="store_true")
    llama = commands.add_parser("llama", help="prefill and decode latency of a LLaMA-layout decoder, sparse vs dense")
    llama.add_argument("--patterns", nargs="+", default=["2:4", "8:32", "4:32"])
    llama.add_argument("--vector", type=int, default=64)
    llama.add_argument("--layers", type=int, default=4)
    llama.add_argument("--intermediate", type=int, default=11008)
    llama.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.shape[0], args.shape[1], args.tokens, args.pattern, args.vector)
    elif args.command == "bench":
        from .bench import quick_cases, run, suite_cases

        if args.quick:
            cases = quick_cases()
        else:
            cases = suite_cases(args.tokens, args.layers, args.patterns, args.vectors, args.dtypes, args.decode)
        run(cases, args.out_dir, make_plot=not args.no_plot, check_configs=args.check_configs)
    elif args.command == "bench-formats":
        from .bench.formats import format_cases, quick_format_cases, run_formats

        if args.quick:
            cases = quick_format_cases()
        else:
            cases = format_cases(args.kinds, args.tokens, args.layers, args.sparsities, args.dtypes, args.blocks)
        run_formats(cases, args.out_dir, make_plot=not args.no_plot)
    elif args.command == "llama":
        from .bench.llama import run_llama_latency

        run_llama_latency(
            tuple(args.patterns), args.vector, args.layers, args.intermediate, out_dir=args.out_dir
        )


if __name__ == "__main__":
    main()
