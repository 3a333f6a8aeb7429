"""A sparsified model's round trip and its way back to dense: :func:`save_pretrained` writes every tensor of the
model to one safetensors file, with the format and fields of each sparse layer in its header;
:func:`load_pretrained` rebuilds those layers inside a freshly built dense model of the same architecture (no
``sparsify`` call to repeat) and loads everything, validated; :func:`densify` swaps sparse layers back for
``nn.Linear``.

The file's sparse weights are described as :func:`nmspmm.save_safetensors` describes them (its ``"nmspmm"``
metadata entry); the model's other tensors sit beside them, and one more entry, ``"nmspmm_model"``, is a JSON
object::

    {"format": "nmspmm-model", "version": 1,
     "modules": {"<module name>": "SparseLinear" | "QuantizedSparseLinear" | "CSRLinear" | "BitmapLinear"
                                  | "BlockShuffledLinear", ...},
     "aliases": {"<state key>": "<state key stored in its place>", ...},
     "checksums": {"<state key>": <CRC-32 of its bytes>, ...}}

``aliases`` lists state-dict entries that share their tensor with another (tied embeddings), stored once.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .formats.base import checksum, verify_checksums
from .formats.serialization import (
    METADATA_KEY, read_header, readable_path, rebuild_weights, unshared_cpu, weights_payload, writable_path,
)
from .nn import SPARSE_MODULES, replace_module

MODEL_KEY = "nmspmm_model"
MODEL_FORMAT = "nmspmm-model"
MODEL_VERSION = 1
MODULES_BY_NAME: dict[str, type] = {cls.__name__: cls for cls in SPARSE_MODULES}


def save_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s whole state dict (CPU copies) to the safetensors file ``path``, with what
    :func:`load_pretrained` needs to rebuild each sparse layer: its module class, weight format and fields."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    sparse = {name: module for name, module in model.named_modules() if type(module) in SPARSE_MODULES}
    storages: set[int] = set()
    tensors, header = weights_payload({name: module.weight for name, module in sparse.items()}, storages)
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in model.state_dict().items():
        if key in tensors:
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if identity in stored:
            aliases[key] = stored[identity]
            continue
        stored[identity] = key
        tensors[key] = unshared_cpu(tensor, storages, key)
    model_header = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION,
        "modules": {name: type(module).__name__ for name, module in sparse.items()}, "aliases": aliases,
        "checksums": {key: checksum(tensor) for key, tensor in tensors.items()},
    }
    metadata = {METADATA_KEY: json.dumps(header), MODEL_KEY: json.dumps(model_header)}
    save_file(tensors, writable_path(path), metadata=metadata)


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a :func:`save_pretrained` file into ``model``, a freshly built dense model of the same architecture:
    each recorded sparse layer replaces the ``nn.Linear`` of its name (on that layer's device and dtype), then
    every tensor is loaded (``strict``: a missing or unexpected key is an error). Returns ``model``. Raises
    ValueError for a file nmspmm did not write, a corrupted one (NaN or infinite sparse values too: the layers'
    state dicts refuse them), or a model it does not fit.

    A model built on the meta device (wholly or in part, as transformers and accelerate build large models) is
    loaded by assignment: each of its meta tensors becomes the file's, on the CPU and in the model's dtype, the
    others move to their own devices, and tied tensors stay tied. Buffers outside the state dict (non-persistent
    ones, such as Llama's rotary frequencies) are in no file and stay as the model built them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = readable_path(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"path: {path!r} is not a readable safetensors file ({error})") from error
    model_header = _read_model_header(metadata, path)
    weights = rebuild_weights(read_header(metadata, path), tensors, path)
    if set(weights) != set(model_header["modules"]):
        raise ValueError(
            f"path: {path!r} metadata: the sparse layers {sorted(model_header['modules'])} and the sparse weights "
            f"{sorted(weights)} differ"
        )
    for name, class_name in model_header["modules"].items():
        layer = _sparse_layer(model, name, MODULES_BY_NAME[class_name], weights[name], tensors, path)
        replace_module(model, name, layer)
    verify_checksums(tensors, model_header["checksums"], f"path {path!r}")
    for alias, source in model_header["aliases"].items():
        if source not in tensors:
            raise ValueError(f"path: {path!r} metadata: alias {alias!r} names {source!r}, which the file lacks")
        tensors[alias] = tensors[source]
    targets = model.state_dict()
    assign = any(tensor.is_meta for tensor in targets.values())
    if assign:
        tensors = {key: _placed(tensor, targets.get(key)) for key, tensor in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as error:
        raise ValueError(f"path: {path!r} does not fit the model: {error}") from error
    if assign:  # each assigned key got a Parameter of its own: tie the aliases to their sources again
        for alias, source in model_header["aliases"].items():
            owner, _, name = alias.rpartition(".")
            source_owner, _, source_name = source.rpartition(".")
            setattr(model.get_submodule(owner), name, getattr(model.get_submodule(source_owner), source_name))
    return model


def _placed(tensor: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """A file's ``tensor`` as loading by assignment puts it in place of the model's ``target``: in the target's
    dtype, on its device unless that is meta (then on the CPU, where the file was read); unchanged without a
    target (a key the model lacks, which the strict load names)."""
    if target is None:
        return tensor
    return tensor.to(device=tensor.device if target.is_meta else target.device, dtype=target.dtype)


def _read_model_header(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """Parse and check the ``"nmspmm_model"`` metadata entry; raise ValueError naming ``path`` if it is wrong."""
    if MODEL_KEY not in metadata:
        raise ValueError(f"path: {path!r} was not written by nmspmm.save_pretrained (no {MODEL_KEY!r} metadata entry)")
    try:
        header = json.loads(metadata[MODEL_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"path: {path!r} has malformed {MODEL_KEY!r} metadata ({error})") from error
    if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT or header.get("version") != MODEL_VERSION:
        raise ValueError(
            f"path: {path!r} metadata: expected format {MODEL_FORMAT!r} version {MODEL_VERSION}, got {header!r}"
        )
    modules, aliases = header.get("modules"), header.get("aliases")
    if not isinstance(modules, dict) or any(value not in MODULES_BY_NAME for value in modules.values()):
        raise ValueError(
            f"path: {path!r} metadata: expected 'modules' mapping names to one of {sorted(MODULES_BY_NAME)}, "
            f"got {modules!r}"
        )
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"path: {path!r} metadata: expected 'aliases' mapping state keys to keys, got {aliases!r}")
    checksums = header.get("checksums")
    if not isinstance(checksums, dict) or not all(isinstance(v, int) for v in checksums.values()):
        raise ValueError(f"path: {path!r} metadata: expected 'checksums' mapping keys to ints, got {checksums!r}")
    return header


def _sparse_layer(
    model: nn.Module, name: str, cls: type, weight: Any, tensors: dict[str, torch.Tensor], path: str
) -> nn.Module:
    """The sparse layer ``cls`` over ``weight`` (and the file's bias) that replaces the ``nn.Linear`` ``name``;
    ValueError naming ``path`` when the file's weight or bias does not make one (another format, a bias of
    another dtype)."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model: has no module {name!r}, where the file holds a sparse layer") from None
    if type(linear) is not nn.Linear:
        raise ValueError(
            f"model: expected an nn.Linear at {name!r} (load into a freshly built dense model), got "
            f"{type(linear).__name__}"
        )
    if tuple(linear.weight.shape) != tuple(weight.shape):
        raise ValueError(
            f"model: the layer {name!r} is {tuple(linear.weight.shape)}, the file's sparse weight {tuple(weight.shape)}"
        )
    bias = tensors.get(f"{name}.bias")
    if (bias is None) != (linear.bias is None):
        raise ValueError(f"model: the layer {name!r} {'has' if linear.bias is not None else 'has no'} bias, the file "
                         f"{'has none' if bias is None else 'has one'}")
    try:
        layer = cls(weight, bias)
    except (TypeError, ValueError) as error:
        raise ValueError(f"path: {path!r} layer {name!r} is inconsistent: {error}") from error
    layer = layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if isinstance(layer.values, nn.Parameter):  # quantized values are a buffer, never trained
        layer.values.requires_grad_(linear.weight.requires_grad)
    return layer


def densify(model: nn.Module) -> list[str]:
    """Replace, in place, every sparse layer of ``model`` (:class:`SparseLinear`, :class:`QuantizedSparseLinear`
    (dequantized), :class:`CSRLinear`, :class:`BitmapLinear`, :class:`BlockShuffledLinear`) by an ``nn.Linear``
    holding its dense weight (zeros where pruned) and bias, on the same device and dtype; returns the names
    replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model) in SPARSE_MODULES:
        raise ValueError("model: is itself a sparse layer; call its .to_dense() for the dense weight")
    names = [name for name, module in model.named_modules() if type(module) in SPARSE_MODULES]
    for name in names:
        sparse = model.get_submodule(name)
        dense = nn.Linear(
            sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
            device=sparse.values.device, dtype=sparse.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(sparse.to_dense())
            if sparse.bias is not None:
                dense.bias.copy_(sparse.bias)
        dense.weight.requires_grad_(sparse.values.requires_grad)
        replace_module(model, name, dense)
    return names
