"""End-to-end latency of a LLaMA-architecture decoder (built from a transformers config with random bf16
weights), dense against sparsified: prefill and single-token decode steps."""

from __future__ import annotations

import copy
import csv
import datetime
from pathlib import Path

import torch

from ..nn import sparsify
from .report import device_slug
from .runner import environment, median_ms


def build_llama(hidden: int = 4096, intermediate: int = 11008, layers: int = 4, heads: int = 32) -> torch.nn.Module:
    """A LlamaModel (no LM head) with random weights in bf16 on the GPU."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return LlamaModel(config).to(device="cuda", dtype=torch.bfloat16).eval()


@torch.no_grad()
def _latencies(model: torch.nn.Module, prefill_tokens: int, decode_batches: tuple[int, ...], past: int) -> dict:
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    results = {}
    prompts = [torch.randint(vocab, (1, prefill_tokens), device="cuda") for _ in range(3)]
    results[f"prefill_{prefill_tokens}"] = median_ms([lambda p=p: model(input_ids=p, use_cache=False) for p in prompts])
    for batch in decode_batches:
        cache = DynamicCache()
        model(input_ids=torch.randint(vocab, (batch, past), device="cuda"), past_key_values=cache, use_cache=True)
        steps = [torch.randint(vocab, (batch, 1), device="cuda") for _ in range(3)]

        def step(token: torch.Tensor) -> None:
            model(input_ids=token, past_key_values=cache, use_cache=True)
            cache.crop(-token.shape[1])

        results[f"decode_batch{batch}"] = median_ms([lambda t=t: step(t) for t in steps])
    return results


def run_llama_latency(
    patterns: tuple[str, ...] = ("2:4", "8:32", "4:32"), vector: int = 64, layers: int = 4,
    intermediate: int = 11008, prefill_tokens: int = 2048, decode_batches: tuple[int, ...] = (1, 16),
    past: int = 512, out_dir: str | Path = "benchmarks/results",
) -> list[dict]:
    """Time the dense decoder, then each sparsified copy (all attention and MLP projections), and write
    ``<out_dir>/<device>-llama.csv``; return the rows."""
    dense = build_llama(layers=layers, intermediate=intermediate)
    stamp = environment()
    dense_times = _latencies(dense, prefill_tokens, decode_batches, past)
    rows = []
    for pattern in patterns:
        model = copy.deepcopy(dense)
        report = sparsify(model, pattern, vector=vector)
        times = _latencies(model, prefill_tokens, decode_batches, past)
        for phase, ms in times.items():
            rows.append({
                **stamp, "model": f"llama h4096 i{intermediate} x{layers} layers", "pattern": pattern,
                "vector": vector, "phase": phase, "ms": ms, "dense_ms": dense_times[phase],
                "speedup": dense_times[phase] / ms, "layers_swapped": len(report.swapped),
                "weight_bytes_dense": report.dense_bytes, "weight_bytes_sparse": report.sparse_bytes,
            })
        del model
        torch.cuda.empty_cache()
    out = Path(out_dir) / f"{device_slug(stamp['device'])}-llama.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'pattern':>7} {'phase':>16} {'sparse ms':>10} {'dense ms':>9} {'speedup':>7}")
    for r in rows:
        print(f"{r['pattern']:>7} {r['phase']:>16} {r['ms']:10.3f} {r['dense_ms']:9.3f} {r['speedup']:7.2f}")
    print(f"results: {out} ({datetime.date.today()})")
    return rows
