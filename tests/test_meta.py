"""Weights without values (issue 15, point 4): every format moves to the meta device, pruning and ``from_dense`` work
there and under FakeTensorMode, and a model initialised on the meta device (as transformers and accelerate do for
large models) is sparsified into a shape-only skeleton of the documented placeholder structure, into which the
real sparse weights load (``load_state_dict(..., assign=True)``, ``to_empty`` then ``load_state_dict``,
``load_safetensors``, ``load_pretrained``) to give the outputs of the model they came from. Value checks are skipped
on meta; shape, dtype and device checks, and their clear errors, are kept."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import nmspmm
from nmspmm import BlockShuffledWeight, CSRWeight, NMSparseWeight
from nmspmm.prune import magnitude_mask, prune, prune_block_shuffled, prune_csr, wanda_mask

PRUNERS = {
    "2:4": lambda w: prune(w, "2:4"),
    "24:32 V16": lambda w: prune(w, "24:32", vector=16),  # n > m - n: the dropped positions are stored
    "csr": lambda w: prune_csr(w, 0.7),
    "block": lambda w: prune_block_shuffled(w, 0.5, (16, 16)),
}
# (sparsify's arguments) for every format; the shapes of the tiny Llama below fit each.
SPARSIFY = {
    "2:4": {"pattern": "2:4"},
    "8:32 V16": {"pattern": "8:32", "vector": 16},
    "csr": {"pattern": "csr", "sparsity": 0.7},
    "block": {"pattern": "block", "sparsity": 0.5, "block": (16, 16)},
}


def state_layout(weight: nmspmm.SparseWeight) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in weight.state_tensors().items()}


def no_meta_tensors(model: nn.Module) -> bool:
    return not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


@pytest.mark.parametrize("kind", PRUNERS)
def test_every_format_moves_to_meta_keeping_shapes_and_dtypes(kind: str) -> None:
    weight = PRUNERS[kind](torch.randn(64, 128))
    moved = weight.to("meta")
    assert type(moved) is type(weight) and moved.device.type == "meta" and moved.shape_only
    assert state_layout(moved) == state_layout(weight) and moved.state_fields() == weight.state_fields()
    assert moved.nbytes == weight.nbytes
    half = weight.to("meta", torch.float16)
    assert half.dtype == torch.float16 and half.values.shape == weight.values.shape
    assert moved.to_dense().shape == moved.mask().shape == (64, 128) and moved.to_dense().is_meta
    assert state_layout(copy.deepcopy(moved)) == state_layout(moved)  # pickles: no checksum of absent bytes
    assert repr(moved).endswith(f"device=meta, nbytes={weight.nbytes})")


@pytest.mark.parametrize("kind", PRUNERS)
def test_pruning_on_meta_gives_the_shapes_of_pruning_real_values(kind: str) -> None:
    real = PRUNERS[kind](torch.randn(64, 128, dtype=torch.bfloat16))
    skeleton = PRUNERS[kind](torch.empty(64, 128, dtype=torch.bfloat16, device="meta"))
    assert skeleton.device.type == "meta" and skeleton.shape_only
    assert state_layout(skeleton) == state_layout(real) and skeleton.state_fields() == real.state_fields()


def test_nm_masks_and_from_dense_on_meta() -> None:
    weight = torch.empty(64, 128, device="meta")
    mask = magnitude_mask(weight, "8:32", vector=16)
    assert mask.is_meta and mask.shape == (64, 128) and mask.dtype == torch.bool
    norms = wanda_mask(weight, torch.empty(128, device="meta"), "8:32", vector=16)
    assert norms.is_meta and norms.shape == (64, 128)
    compressed = NMSparseWeight.from_dense(weight, mask.int(), "8:32", vector=16)
    assert compressed.shape_only and state_layout(compressed) == state_layout(prune(torch.randn(64, 128), "8:32", 16))
    permutation = nmspmm.prune.search_permutation(weight, "8:32", 16)  # nothing to search: the identity
    assert permutation.is_meta and permutation.shape == (128,)


@pytest.mark.parametrize("kind", PRUNERS)
def test_placeholder_structure_is_the_documented_one(kind: str) -> None:
    """On a real device the placeholder is a valid weight: N:M keeps the first n of every m, CSR the first nnz
    entries in row-major order, block the first blocks in row-major block order under the identity permutation."""
    real = PRUNERS[kind](torch.randn(64, 128))
    fields = {key: value for key, value in real.state_fields().items() if key != "dtype"}
    placeholder = type(real).placeholder(torch.zeros_like(real.values), fields)
    assert state_layout(placeholder) == state_layout(real)
    mask = placeholder.mask()
    if isinstance(real, NMSparseWeight):
        expected = (torch.arange(128) % real.m < real.n).expand(64, 128)
    elif isinstance(real, CSRWeight):
        expected = (torch.arange(64 * 128) < real.nnz).view(64, 128)
    else:
        assert placeholder.row_permutation.tolist() == list(range(64))
        blocks = (torch.arange(4 * 8) < real.block_count).view(4, 8)
        expected = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(mask, expected)


def test_value_checks_are_skipped_on_meta_but_shape_dtype_and_device_checks_are_kept() -> None:
    values = torch.empty(64, 64, device="meta")
    offsets = torch.empty(64, 32, 2, dtype=torch.uint8, device="meta")
    assert NMSparseWeight(values, offsets, "2:4", 1, (64, 128)).shape_only  # the offsets are not read
    with pytest.raises(ValueError, match=r"offsets: expected shape \(64, 32, 2\)"):
        NMSparseWeight(values, offsets[:, :16], "2:4", 1, (64, 128))
    with pytest.raises(TypeError, match="offsets: expected a uint8 tensor"):
        NMSparseWeight(values, offsets.int(), "2:4", 1, (64, 128))
    with pytest.raises(ValueError, match="offsets: on cpu, but values are on meta"):
        NMSparseWeight(values, torch.zeros(64, 32, 2, dtype=torch.uint8), "2:4", 1, (64, 128))
    with pytest.raises(TypeError, match="values: expected a float16, bfloat16 or float32 tensor"):
        NMSparseWeight(values.int(), offsets, "2:4", 1, (64, 128))
    with pytest.raises(ValueError, match="col_indices: expected shape"):
        CSRWeight(torch.empty(10, device="meta"), torch.empty(9, dtype=torch.int32, device="meta"),
                  torch.empty(65, dtype=torch.int32, device="meta"), (64, 128))
    with pytest.raises(ValueError, match="weight: in_features K=102 must be divisible by m=4"):
        prune(torch.empty(64, 102, device="meta"), "2:4")
    with pytest.raises(ValueError, match="sparsity: expected a float in"):
        prune_csr(torch.empty(64, 128, device="meta"), 1.5)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        NMSparseWeight.from_dense(torch.empty(64, 128, device="meta"), torch.empty(64, 128, device="meta"), "2:4")


def test_mask_without_values_is_refused_where_it_fixes_the_count_with_an_error_naming_it() -> None:
    weight = torch.empty(64, 128, device="meta")
    mask = torch.empty(64, 128, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"mask: holds no values .*prune_csr\(weight, sparsity\)"):
        CSRWeight.from_dense(weight, mask)
    with pytest.raises(ValueError, match=r"mask: holds no values .*prune_block_shuffled\("):
        BlockShuffledWeight.from_dense(weight, mask, (16, 16))


def test_saving_a_weight_without_values_names_it(tmp_path) -> None:
    skeleton = prune(torch.empty(64, 128, device="meta"), "2:4")
    with pytest.raises(ValueError, match="up.values: holds no values to save"):
        nmspmm.save_safetensors({"up": skeleton}, tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(128, 64))
    with pytest.raises(ValueError, match="0.weight: holds no values to save"):
        nmspmm.save_pretrained(model, tmp_path / "m.safetensors")


def test_fake_tensor_mode() -> None:
    real = prune(torch.randn(64, 128), "24:32", vector=16)
    kept_offsets = real.kept_offsets()
    with FakeTensorMode() as mode:
        fake = NMSparseWeight(mode.from_tensor(real.values), mode.from_tensor(real.offsets), "24:32", 16, (64, 128))
        assert fake.shape_only and fake.to_dense().shape == (64, 128)
        assert fake.kept_offsets().shape == kept_offsets.shape
        weight = torch.empty(64, 128)
        for kind, pruner in PRUNERS.items():
            assert pruner(weight).shape_only, kind
        layer = nmspmm.SparseLinear.from_dense(nn.Linear(128, 64), "2:4")
        assert layer.values.shape == (64, 64)


def dense_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))


@pytest.mark.parametrize("kind", SPARSIFY)
@pytest.mark.parametrize("load", ["assign", "to_empty", "load_safetensors"])
def test_module_skeleton_on_meta_loads_real_sparse_weights(kind: str, load: str, tmp_path) -> None:
    torch.manual_seed(0)
    real = dense_mlp()
    report = nmspmm.sparsify(real, **SPARSIFY[kind])
    with torch.device("meta"):  # sparsify inside the context too: nothing it builds may escape to another device
        skeleton = dense_mlp()
        assert nmspmm.sparsify(skeleton, **SPARSIFY[kind]).swapped == report.swapped == ["0", "2", "4"]
    for name in report.swapped:
        module = skeleton.get_submodule(name)
        assert type(module) is type(real.get_submodule(name)) and module.values.is_meta
    state = {key: tensor.clone() for key, tensor in real.state_dict().items()}
    if load == "assign":
        skeleton.load_state_dict(state, assign=True)
    elif load == "to_empty":
        skeleton.to_empty(device="cpu")
        skeleton.load_state_dict(state)
    else:
        path = tmp_path / "weights.safetensors"
        nmspmm.save_safetensors({name: real.get_submodule(name).weight for name in report.swapped}, path)
        loaded = {
            f"{name}.{field}": tensor
            for name, weight in nmspmm.load_safetensors(path).items()
            for field, tensor in weight.state_tensors().items()
        }
        biases = {key: tensor for key, tensor in state.items() if key.endswith("bias")}
        skeleton.load_state_dict({**loaded, **biases}, assign=True)
    assert no_meta_tensors(skeleton)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.equal(skeleton(x), real(x))
    for name in report.swapped:
        assert torch.equal(skeleton.get_submodule(name).to_dense(), real.get_submodule(name).to_dense())


@pytest.mark.parametrize("kind", SPARSIFY)
def test_to_empty_alone_gives_the_placeholder_structure(kind: str) -> None:
    """Uninitialised index tensors could point anywhere; the placeholder keeps every product in bounds."""
    with torch.device("meta"):
        skeleton = dense_mlp()
    nmspmm.sparsify(skeleton, **SPARSIFY[kind])
    skeleton.to_empty(device="cpu")
    assert no_meta_tensors(skeleton)
    for name in ("0", "2", "4"):
        module = skeleton.get_submodule(name)
        weight = module.weight
        type(weight).from_state(weight.state_tensors(), weight.state_fields(), allow_nonfinite=True)  # in bounds
        placeholder = type(weight).placeholder(torch.zeros_like(module.values), module.fields)
        assert torch.equal(weight.mask(), placeholder.mask())
        if isinstance(module, nmspmm.SparseLinear):
            assert torch.equal(module.kept_offsets, placeholder.kept_offsets())


def test_partial_state_dict_into_a_meta_skeleton_is_a_clear_error() -> None:
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(128, 64))
    nmspmm.sparsify(skeleton, "2:4")
    values = prune(torch.randn(64, 128), "2:4").values
    expected = "state_dict: 0.values and 0.offsets .*offsets: on meta, but values are on cpu"
    with pytest.raises(ValueError, match=expected):
        skeleton.load_state_dict({"0.values": values}, strict=False, assign=True)


def tiny_llama(tie: bool, device: str | None = None) -> nn.Module:
    """The tiny Llama of tests/test_hf_generate.py (random biases), built on ``device`` (meta: no values)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=tie,
    )
    if device == "meta":
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.02)
    return model


def with_rotary_frequencies(model: nn.Module, like: nn.Module) -> None:
    """``torch.device("meta")`` puts Llama's rotary frequencies, buffers it computes when built and keeps in no
    state dict, on meta too (transformers recomputes them when it loads a checkpoint): here they come from the
    model the skeleton stands for. Nothing of nmspmm's is touched."""
    rotary = model.model.rotary_emb
    for name, buffer in like.model.rotary_emb.named_buffers(recurse=False):
        setattr(rotary, name, buffer.clone())


@pytest.mark.parametrize("kind", SPARSIFY)
@pytest.mark.parametrize("load", ["assign", "to_empty"])
def test_llama_on_meta_sparsified_then_loaded_gives_the_sparse_models_outputs(kind: str, load: str) -> None:
    real = tiny_llama(tie=False)
    report = nmspmm.sparsify(real.model, **SPARSIFY[kind])
    assert len(report.swapped) == 14
    skeleton = tiny_llama(tie=False, device="meta")
    skeleton_report = nmspmm.sparsify(skeleton.model, **SPARSIFY[kind])
    assert skeleton_report.swapped == report.swapped and skeleton_report.sparse_bytes == report.sparse_bytes
    state = {key: tensor.clone() for key, tensor in real.state_dict().items()}
    if load == "assign":
        skeleton.load_state_dict(state, assign=True)
    else:
        skeleton.to_empty(device="cpu")
        skeleton.load_state_dict(state)
    with_rotary_frequencies(skeleton, real)
    assert no_meta_tensors(skeleton)
    ids = torch.randint(97, (2, 7))
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, real(ids).logits)


def test_load_pretrained_into_a_meta_model(tmp_path) -> None:
    real = tiny_llama(tie=True)
    nmspmm.sparsify(real.model, "8:32", vector=16, skip=lambda name, module: "mlp" in name)
    nmspmm.sparsify(real.model, "csr", sparsity=0.7, skip=lambda name, module: "down_proj" in name)
    nmspmm.sparsify(real.model, "block", sparsity=0.5, block=(16, 16))
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(real, path)
    fresh = tiny_llama(tie=True, device="meta")
    assert nmspmm.load_pretrained(fresh, path) is fresh
    with_rotary_frequencies(fresh, real)
    assert no_meta_tensors(fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    for name, module in real.named_modules():
        assert type(fresh.get_submodule(name)) is type(module), name
    ids = torch.randint(97, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, real(ids).logits)
