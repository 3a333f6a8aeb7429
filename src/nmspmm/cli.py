"""The ``nmspmm`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nmspmm", description="N:M sparse matrix products for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="prune a layer, run it sparse and dense, print error and speed")
    demo.add_argument("--pattern", default="8:32")
    demo.add_argument("--vector", type=int, default=64)
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("N", "K"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.shape[0], args.shape[1], args.tokens, args.pattern, args.vector)


if __name__ == "__main__":
    main()
