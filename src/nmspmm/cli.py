"""The ``nmspmm`` command line: ``demo``, ``bench`` (N:M), ``bench-formats`` (CSR, SDDMM, block-shuffled),
``models`` (a LLaMA-layout model end to end, eager and compiled) and ``host`` (host time per eager call)."""

from __future__ import annotations

import argparse


def _layer(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer as NxK, like 4096x11008, got {text!r}") from None
    return rows, cols


def _shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, rows, cols = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape as MxNxK, like 16x4096x4096, got {text!r}") from None
    if min(tokens, rows, cols) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes in MxNxK, got {text!r}")
    return tokens, rows, cols


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _pattern(text: str) -> str:
    from .formats.pattern import parse_pattern

    try:
        parse_pattern(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _vector(text: str) -> int:
    from .formats.pattern import SUPPORTED_VECTORS

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in SUPPORTED_VECTORS:
        raise argparse.ArgumentTypeError(f"expected a vector length in {SUPPORTED_VECTORS}, got {text!r}")
    return value


def _require_gpu(parser: argparse.ArgumentParser, command: str) -> None:
    """Exit with status 2 and a one-line message where ``command`` needs a CUDA GPU and torch sees none."""
    import torch

    if not torch.cuda.is_available():
        parser.exit(2, f"nmspmm {command}: error: needs a CUDA GPU, and torch sees none (demo runs on the CPU)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``nmspmm`` parser: every subcommand and option, with its help and default."""
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="nmspmm", description="N:M sparse matrix products for PyTorch")
    parser.add_argument("--version", action="version", version=f"nmspmm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    demo = commands.add_parser(
        "demo", help="prune a layer, run it sparse and dense, print error and speed (CPU or GPU)", **defaults
    )
    demo.add_argument("--pattern", type=_pattern, default="8:32", help="n:m pattern")
    demo.add_argument("--vector", type=_vector, default=64, help="vector length V")
    demo.add_argument("--tokens", type=_positive, default=2048, help="tokens M (at most 256 on the CPU)")
    demo.add_argument(
        "--shape", type=_positive, nargs=2, default=(4096, 4096), metavar=("N", "K"), help="the layer's N and K"
    )
    bench = commands.add_parser(
        "bench", help="check and time nmspmm beside cuBLAS on the paper's suite (GPU)", **defaults
    )
    bench.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    bench.add_argument("--tokens", type=int, nargs="+", help="token counts M (default: the suite's)")
    bench.add_argument("--layers", type=_layer, nargs="+", help="layers as NxK (default: the suite's 20)")
    bench.add_argument("--patterns", nargs="+", help="n:m patterns (default: the suite's 8)")
    bench.add_argument("--vectors", type=int, nargs="+", help="vector lengths V (default: 32 64 128)")
    bench.add_argument("--dtypes", nargs="+", help="bfloat16 float16 float32 tf32 (default: bfloat16)")
    bench.add_argument("--decode", action="store_true", help="add the decode token counts 1, 8, 16, 64")
    bench.add_argument("--out-dir", default="benchmarks/results", help="where <device>.csv and .png go")
    bench.add_argument("--no-plot", action="store_true", help="write the CSV only")
    bench.add_argument(
        "--check-configs", action="store_true",
        help="also time a sample of the tuner's configs per case: is the model's choice within 10%% of the best?",
    )
    formats = commands.add_parser(
        "bench-formats", help="CSR SpMM/SDDMM vs cuSPARSE and dense, block-shuffled vs dense and N:M (GPU)",
        **defaults,
    )
    formats.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    formats.add_argument("--kinds", nargs="+", help="csr sddmm block bitmap (default: all)")
    formats.add_argument("--tokens", type=int, nargs="+", help="token counts M (SDDMM: the depth)")
    formats.add_argument("--layers", type=_layer, nargs="+", help="layers as NxK (default: the suite's 20)")
    formats.add_argument("--sparsities", type=float, nargs="+", help="fractions pruned, like 0.9")
    formats.add_argument("--dtypes", nargs="+", help="bfloat16 float16 float32 tf32")
    formats.add_argument("--blocks", type=_layer, nargs="+", help="block shapes as NxK, like 32x32")
    formats.add_argument("--out-dir", default="benchmarks/results", help="where <device>-formats.csv and .png go")
    formats.add_argument("--no-plot", action="store_true", help="write the CSV only")
    models = commands.add_parser(
        "models", help="a LLaMA-layout model (transformers), sparse vs dense: prefill and generate, eager and "
        "compiled (GPU)", **defaults,
    )
    models.add_argument("--patterns", type=_pattern, nargs="+", default=["2:4", "8:32", "4:32"], help="n:m patterns")
    models.add_argument("--vector", type=_vector, default=64, help="vector length V")
    models.add_argument("--intermediate", type=_positive, nargs="+", default=[11008, 14336], help="MLP sizes")
    models.add_argument("--layers", type=_positive, default=4, help="decoder layers")
    models.add_argument("--batches", type=_positive, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    models.add_argument("--new-tokens", type=_positive, default=128, help="tokens generated per decode call (>= 2)")
    models.add_argument("--prompt", type=_positive, default=128, help="prompt tokens before decoding")
    models.add_argument("--prefill-tokens", type=_positive, default=2048, help="tokens of the prefill forward")
    models.add_argument(
        "--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"], help="how the model runs"
    )
    models.add_argument(
        "--phases", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"], help="what is timed"
    )
    models.add_argument(
        "--weight-dtype", choices=["float8_e4m3fn", "int8"], help="8-bit kept values for the sparse models"
    )
    models.add_argument("--out-dir", default="benchmarks/results", help="where <device>-models.csv goes")
    quantized = commands.add_parser(
        "bench-quantized", help="N:M weights with 8-bit values vs bf16 N:M, dense bf16 and dense fp8 (GPU)",
        **defaults,
    )
    quantized.add_argument("--tokens", type=_positive, nargs="+", default=[1, 8, 16, 64, 256, 1024, 4096],
                           help="token counts M")
    quantized.add_argument("--layers", type=_layer, nargs="+",
                           default=[(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)], help="layers as NxK")
    quantized.add_argument("--patterns", type=_pattern, nargs="+", default=["8:32"], help="n:m patterns")
    quantized.add_argument("--vector", type=_vector, default=64, help="vector length V")
    quantized.add_argument("--out-dir", default="benchmarks/results", help="where <device>-quantized.csv and .png go")
    quantized.add_argument("--no-plot", action="store_true", help="write the CSV only")
    host = commands.add_parser(
        "host", help="host time per eager call, nmspmm vs torch, at short GPU shapes (GPU)", **defaults
    )
    host.add_argument(
        "--shapes", type=_shape, nargs="+", default=[(1, 256, 256), (16, 4096, 4096), (256, 4096, 4096)],
        help="MxNxK shapes",
    )
    host.add_argument("--calls", type=_positive, default=200, help="calls per timed batch")
    host.add_argument("--repeats", type=_positive, default=5, help="timed batches, the minimum is kept")
    host.add_argument("--out-dir", default="benchmarks/results", help="where <device>-host.csv goes")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv`` names (``sys.argv[1:]`` by default)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.shape[0], args.shape[1], args.tokens, args.pattern, args.vector)
    elif args.command == "bench":
        from .bench import quick_cases, run, suite_cases

        _require_gpu(parser, args.command)
        if args.quick:
            cases = quick_cases()
        else:
            cases = suite_cases(args.tokens, args.layers, args.patterns, args.vectors, args.dtypes, args.decode)
        run(cases, args.out_dir, make_plot=not args.no_plot, check_configs=args.check_configs)
    elif args.command == "bench-formats":
        from .bench.formats import format_cases, quick_format_cases, run_formats

        _require_gpu(parser, args.command)
        if args.quick:
            cases = quick_format_cases()
        else:
            cases = format_cases(args.kinds, args.tokens, args.layers, args.sparsities, args.dtypes, args.blocks)
        run_formats(cases, args.out_dir, make_plot=not args.no_plot)
    elif args.command == "models":
        from .bench.models import check_models_arguments, run_models

        import torch

        selection = (
            tuple(args.patterns), args.vector, tuple(args.intermediate), args.layers, tuple(args.batches),
            args.new_tokens, args.prompt, args.prefill_tokens, tuple(args.modes), tuple(args.phases),
        )
        weight_dtype = None if args.weight_dtype is None else getattr(torch, args.weight_dtype)
        try:
            check_models_arguments(*selection, weight_dtype=weight_dtype)
        except (TypeError, ValueError) as error:
            parser.error(f"models: {error}")
        _require_gpu(parser, args.command)
        run_models(*selection, args.out_dir, weight_dtype=weight_dtype)
    elif args.command == "bench-quantized":
        from .bench.quantized import run_quantized

        _require_gpu(parser, args.command)
        run_quantized(args.tokens, args.layers, args.patterns, args.vector, args.out_dir, make_plot=not args.no_plot)
    elif args.command == "host":
        from .bench.host import check_shapes, run_host

        try:
            check_shapes(args.shapes)
        except ValueError as error:
            parser.error(f"host: {error}")
        _require_gpu(parser, args.command)
        run_host(tuple(args.shapes), args.calls, args.repeats, args.out_dir)

if __name__ == "__main__":
    main()
