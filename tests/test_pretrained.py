"""nmspmm.save_pretrained / load_pretrained (a sparsified model rebuilt inside a fresh dense one, every format,
tied weights) and nmspmm.densify, with the errors for files and models that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error


def _llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(DEVICE).eval()


def _sparsified(seed: int = 0) -> nn.Module:
    model = _llama(seed)
    nmspmm.sparsify(model.model, "8:32", vector=16, skip=lambda name, module: "mlp" in name)
    nmspmm.sparsify(model.model, "csr", sparsity=0.7, skip=lambda name, module: "down_proj" in name)
    nmspmm.sparsify(model.model, "block", sparsity=0.5, block=(16, 16))
    return model


def test_round_trip_into_a_fresh_dense_model(tmp_path):
    sparse = _sparsified()
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(sparse, path)
    fresh = _llama(seed=1)
    assert nmspmm.load_pretrained(fresh, path) is fresh
    for name, module in sparse.named_modules():
        assert type(fresh.get_submodule(name)) is type(module), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    ids = torch.randint(97, (2, 9), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, sparse(ids).logits)
    with safe_open(str(path), framework="pt") as file:
        header = json.loads(file.metadata()["nmspmm_model"])
        weights = json.loads(file.metadata()["nmspmm"])["weights"]
    assert set(weights) == set(header["modules"]) and len(weights) == 14
    assert header["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(header["modules"].values()) == {"SparseLinear", "CSRLinear", "BlockShuffledLinear"}


def test_densify_gives_the_same_model_in_nn_linear(tmp_path):
    sparse = _sparsified()
    ids = torch.randint(97, (2, 9), device=DEVICE)
    with torch.no_grad():
        expected = sparse(ids).logits
    names = nmspmm.densify(sparse)
    assert len(names) == 14
    assert all(type(sparse.get_submodule(name)) is nn.Linear for name in names)
    with torch.no_grad():
        assert relative_error(sparse(ids).logits, expected) < TOLERANCE[torch.float32]
    assert nmspmm.densify(sparse) == []


def test_load_refuses_what_does_not_fit(tmp_path):
    sparse = _sparsified()
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(sparse, path)
    with pytest.raises(ValueError, match=r"expected an nn.Linear at 'model.layers.0.self_attn.q_proj' \(load into a "
                       r"freshly built dense model\), got SparseLinear"):
        nmspmm.load_pretrained(_sparsified(), path)
    wider = _llama(seed=1)
    wider.model.layers[0].self_attn.q_proj = nn.Linear(64, 32, bias=False, device=DEVICE)
    with pytest.raises(ValueError, match=r"the layer 'model.layers.0.self_attn.q_proj' is \(32, 64\), the file's"):
        nmspmm.load_pretrained(wider, path)
    weights_only = tmp_path / "weights.safetensors"
    nmspmm.save_safetensors({"w": nmspmm.prune(torch.randn(32, 64), "2:4", 16)}, weights_only)
    with pytest.raises(ValueError, match=r"was not written by nmspmm.save_pretrained"):
        nmspmm.load_pretrained(_llama(seed=1), weights_only)
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got str"):
        nmspmm.load_pretrained("model", path)


def _saved(tmp_path) -> tuple[object, dict, dict]:
    """A save_pretrained file of the sparsified model, its metadata and its tensors (to edit)."""
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(_sparsified(), path)
    with safe_open(str(path), framework="pt") as file:
        return path, file.metadata(), {key: file.get_tensor(key) for key in file.keys()}


def test_load_refuses_a_corrupted_file(tmp_path):
    path, metadata, tensors = _saved(tmp_path)
    tensors["model.layers.0.self_attn.q_proj.offsets"][0, 0] = 40  # an offset beyond m=32
    corrupted = tmp_path / "corrupted.safetensors"
    save_file(tensors, str(corrupted), metadata=metadata)
    with pytest.raises(ValueError, match=r"offsets: every offset must be < m=32"):
        nmspmm.load_pretrained(_llama(seed=1), corrupted)
    header = json.loads(metadata["nmspmm_model"])
    header["modules"]["model.layers.0.self_attn.q_proj"] = "DenseLinear"
    save_file(tensors, str(corrupted), metadata={**metadata, "nmspmm_model": json.dumps(header)})
    with pytest.raises(ValueError, match=r"expected 'modules' mapping names to one of"):
        nmspmm.load_pretrained(_llama(seed=1), corrupted)


def test_load_refuses_a_dense_tensor_changed_after_saving(tmp_path):
    path, metadata, tensors = _saved(tmp_path)
    tensors["model.norm.weight"][0] += 1.0  # still a valid model: only the checksum tells
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"model.norm.weight: its bytes do not match the checksum saved with them"):
        nmspmm.load_pretrained(_llama(seed=1), path)
