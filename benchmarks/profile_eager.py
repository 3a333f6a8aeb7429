"""Where an eager Hugging Face decode step spends its host time, dense against sparse: the same
LlamaForCausalLM built from a config (random bf16 weights; 4 layers, hidden 4096, intermediate 11008 by
default), sparsified in place with ``nmspmm.sparsify(model.model, pattern, vector=64)``, then ``generate`` of a
few tokens under cProfile (Python time per function) and torch.profiler (CUDA time per kernel). GPU only."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import nmspmm
from nmspmm.bench.models import build_llama


def profile(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, rows: int) -> None:
    """Warm up, then print cProfile's top ``rows`` functions by own time and the profiler's CUDA kernels."""
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    model.generate(prompt, **options)
    profiler = cProfile.Profile()
    profiler.enable()
    model.generate(prompt, **options)
    torch.cuda.synchronize()
    profiler.disable()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(rows)
    print(report.getvalue())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        model.generate(prompt, **options)
    print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pattern", default="8:32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_eager.py needs a CUDA GPU")
    prompt = torch.randint(32000, (args.batch, 128), device="cuda")
    for name in ("dense", "sparse"):
        model = build_llama(intermediate=args.intermediate)
        if name == "sparse":
            print(nmspmm.sparsify(model.model, args.pattern, vector=64))
        print(f"== {name} ==")
        with torch.no_grad():
            profile(model, prompt, args.tokens, args.rows)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
