"""A Hugging Face Llama sparsified with nmspmm generates exactly like the dense model holding the same pruned weights
(with 8-bit values too: the dense model then holds the dequantized weights).

The model is tiny (2 layers, hidden 64) so that, on the CPU, every product of the 14 projections runs through the
Triton kernels under the interpreter (``backend="triton"``) in a few seconds; on CUDA the kernels always run.
The dense reference path of the N:M ops is patched to raise, so the test fails if it were taken instead.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nmspmm  # noqa: E402
import nmspmm.ops.nm  # noqa: E402
from conftest import DEVICE, TOLERANCE, relative_error  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = 2
BATCH, PROMPT, NEW_TOKENS = 2, 5, 5
SPARSE_MODULES = (nmspmm.SparseLinear, nmspmm.QuantizedSparseLinear)


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,  # the attention projections carry a bias: the kernels' bias path runs too
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=DEVICE, dtype=torch.float32).eval()
    with torch.no_grad():  # Hugging Face initialises biases to zero; random ones are a stronger check
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.02)
    return model


def count_sparse_calls(model: torch.nn.Module) -> list[int]:
    """A one-element counter of N:M module forward calls in ``model``, kept up by forward hooks."""
    calls = [0]

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, SPARSE_MODULES):
            module.register_forward_hook(hook)
    return calls


def no_reference(*args: object, **kwargs: object) -> torch.Tensor:
    raise AssertionError("the dense reference path ran instead of the Triton kernels")


@pytest.mark.parametrize(("pattern", "vector", "kept", "weight_dtype"), [
    ("8:32", 16, 0.25, None), ("2:4", 1, 0.5, None), ("8:32", 16, 0.25, torch.int8),
    ("2:4", 1, 0.5, torch.float8_e4m3fn),
])
def test_sparsified_llama_generates_like_dense_with_pruned_weights(
    pattern: str, vector: int, kept: float, weight_dtype: torch.dtype | None
) -> None:
    dense = tiny_llama()
    sparse = copy.deepcopy(dense)
    reference = copy.deepcopy(dense)
    report = nmspmm.sparsify(sparse.model, pattern, vector=vector, weight_dtype=weight_dtype)

    expected = {f"layers.{layer}.{projection}" for layer in range(LAYERS) for projection in PROJECTIONS}
    assert set(report.swapped) == expected and len(report.swapped) == 14
    assert report.skipped == {}
    module_type = nmspmm.SparseLinear if weight_dtype is None else nmspmm.QuantizedSparseLinear
    sparse_modules = [module for module in sparse.modules() if isinstance(module, SPARSE_MODULES)]
    assert len(sparse_modules) == 14 and all(type(module) is module_type for module in sparse_modules)
    assert all(module.pattern == pattern and module.vector == vector for module in sparse_modules)
    assert isinstance(sparse.lm_head, torch.nn.Linear)  # sparsify saw sparse.model only
    if DEVICE == "cpu":
        for module in sparse_modules:
            module.backend = "triton"  # the CPU default is the dense reference; run the kernels interpreted

    with torch.no_grad():
        for name in report.swapped:
            module = sparse.model.get_submodule(name)
            pruned = module.to_dense()
            linear = reference.model.get_submodule(name)
            assert type(linear) is torch.nn.Linear and linear.weight.shape == pruned.shape
            linear.weight.data.copy_(pruned)
            # Kept positions (an int8 value may round to zero, so count the structure, not the nonzeros).
            assert module.weight.mask().float().mean().item() == pytest.approx(kept)
            assert not bool(pruned[~module.weight.mask()].any())

    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 97, (BATCH, PROMPT), generator=generator).to(DEVICE)
    settings = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,  # no sequence stops early, so both runs take the same steps
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    calls = count_sparse_calls(sparse)
    tolerance = TOLERANCE[torch.float32]
    assert callable(nmspmm.ops.nm._reference)  # renamed? then this test must be updated
    with torch.no_grad():
        want_logits = reference(prompt).logits
        want = reference.generate(prompt, **settings)
        with mock.patch.object(nmspmm.ops.nm, "_reference", side_effect=no_reference) as patched:
            got_logits = sparse(prompt).logits
            assert calls[0] == 14
            got = sparse.generate(prompt, **settings)
        assert patched.call_count == 0

    # One prefill over the prompt, then one step per new token but the last: 14 products each.
    assert calls[0] == 14 * (1 + 1 + NEW_TOKENS - 1)
    assert got_logits.shape == (BATCH, PROMPT, 97)
    assert relative_error(got_logits, want_logits) < tolerance
    # The pruned model differs from the dense one (the comparison is not vacuous).
    assert relative_error(dense(prompt).logits.detach(), want_logits) > 1e-2

    assert want.sequences.shape == (BATCH, PROMPT + NEW_TOKENS)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for step, (got_step, want_step) in enumerate(zip(got.logits, want.logits)):
        assert got_step.shape == (BATCH, 97)
        assert relative_error(got_step, want_step) < tolerance, f"step {step}"
