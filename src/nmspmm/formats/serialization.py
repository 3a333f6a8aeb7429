"""Save and load sparse weights (any nmspmm format) as safetensors files.

A file holds, per weight ``<name>`` of any format (:class:`NMSparseWeight`, :class:`QuantizedNMWeight`,
:class:`CSRWeight`, :class:`BlockShuffledWeight`, :class:`BitmapWeight`), its tensors as ``<name>.<field>`` (for
N:M: ``values`` and ``offsets``, and ``scales`` when quantized), and one metadata entry, ``"nmspmm"``, a JSON
object::

    {"format": "nmspmm", "version": 4,
     "weights": {"<name>": {"format": "NMSparseWeight", "pattern": "8:32", "vector": 16, "shape": [N, K],
                            "dtype": "float16"}, ...},
     "checksums": {"<name>.<field>": <CRC-32 of its bytes>, ...},
     "field_checksums": {"<name>": <CRC-32 of its fields as canonical JSON>, ...}}

Loading rebuilds every weight through its class's validating constructor, so a file whose indices or shapes
were tampered with is refused with a ValueError rather than producing wrong products.
(Plain ``torch.save`` / ``torch.load`` also work, with the default ``weights_only=True``.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .base import checksum, fields_checksum, verify_checksums, verify_fields
from .bitmap import BitmapWeight
from .block_shuffled import BlockShuffledWeight
from .csr import CSRWeight
from .nm import NMSparseWeight
from .pattern import holds_values
from .quantized import QuantizedNMWeight

FILE_FORMAT = "nmspmm"
FORMAT_VERSION = 4
# Version 2 files (before checksums) still load, unchecked; version 3 (before field checksums) without the fields'.
READABLE_VERSIONS = (2, 3, 4)
METADATA_KEY = "nmspmm"
DEFAULT_NAME = "weight"
SparseWeight = NMSparseWeight | QuantizedNMWeight | CSRWeight | BlockShuffledWeight | BitmapWeight
WEIGHT_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (NMSparseWeight, QuantizedNMWeight, CSRWeight, BlockShuffledWeight, BitmapWeight)
}
_CLASS_NAMES = ", ".join(WEIGHT_CLASSES)


def save_safetensors(weights: Mapping[str, SparseWeight] | SparseWeight, path: str | os.PathLike[str]) -> None:
    """Write named sparse weights (a single weight is stored as ``"weight"``) to a safetensors file at ``path``,
    tensors moved to the CPU, with the metadata :func:`load_safetensors` needs to rebuild and check them."""
    if isinstance(weights, tuple(WEIGHT_CLASSES.values())):
        weights = {DEFAULT_NAME: weights}
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights: expected an {_CLASS_NAMES} or a mapping of names to them, got {type(weights).__name__}"
        )
    tensors, header = weights_payload(weights, set())
    save_file(tensors, writable_path(path), metadata={METADATA_KEY: json.dumps(header)})


def writable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, after checking that a file can be written there: not a directory, in one that
    exists (else a clear error naming it, where safetensors gives a bare I/O error)."""
    path = _path_string(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a directory; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path: the directory {parent!r} of {path!r} does not exist")
    return path


def readable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, after checking that it names an existing file (a clear error naming it otherwise)."""
    path = _path_string(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a directory; expected a safetensors file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path!r} does not exist")
    return path


def _path_string(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def weights_payload(
    weights: Mapping[str, SparseWeight], storages: set[int]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The CPU tensors (``<name>.<field>``, none sharing a storage in ``storages``, which is updated) and the
    metadata header that describe named sparse weights, as :func:`save_safetensors` writes them."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, weight in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"weights: expected string names, got {type(name).__name__} {name!r}")
        if not name:
            raise ValueError("weights: expected non-empty names, got ''")
        if type(weight).__name__ not in WEIGHT_CLASSES:
            raise TypeError(f"weights: expected {_CLASS_NAMES} values, got {type(weight).__name__} for {name!r}")
        for field, tensor in weight.state_tensors().items():
            tensors[f"{name}.{field}"] = unshared_cpu(tensor, storages, f"{name}.{field}")
        described[name] = {"format": type(weight).__name__, **weight.state_fields()}
    checksums = {key: checksum(tensor) for key, tensor in tensors.items()}
    field_checksums = {name: fields_checksum(fields) for name, fields in described.items()}
    header = {"format": FILE_FORMAT, "version": FORMAT_VERSION, "weights": described, "checksums": checksums}
    return tensors, {**header, "field_checksums": field_checksums}


def unshared_cpu(tensor: torch.Tensor, storages: set[int], name: str) -> torch.Tensor:
    """``tensor`` (saved as ``name``) on the CPU, copied if its storage was already taken (safetensors refuses
    shared memory, which arises when one weight is saved under two names or with its ``.to(same dtype)`` twin);
    a ValueError naming it if it has no values to save (a skeleton's, on the meta device)."""
    if not holds_values(tensor):
        raise ValueError(
            f"{name}: holds no values to save (on the meta device or fake: a shape-only skeleton); load or "
            "initialise its weights first"
        )
    tensor = tensor.detach().cpu().contiguous()
    storage = tensor.untyped_storage().data_ptr()
    if storage in storages:
        return tensor.clone()
    storages.add(storage)
    return tensor


def load_safetensors(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, allow_nonfinite: bool = False
) -> dict[str, SparseWeight]:
    """Read the sparse weights that :func:`save_safetensors` wrote to ``path``, validate each on the CPU and
    move it to ``device``; raise ValueError for a file that nmspmm did not write or that is corrupted. NaN or
    infinite values are refused unless ``allow_nonfinite``."""
    path = readable_path(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            header = read_header(file.metadata(), path)
            expected = {
                f"{name}.{field}"
                for name, fields in header["weights"].items()
                for field in WEIGHT_CLASSES[fields["format"]].STATE_TENSORS
            }
            stored = set(file.keys())
            if stored != expected:
                missing, extra = sorted(expected - stored), sorted(stored - expected)
                raise ValueError(
                    f"path: {path!r} does not hold the tensors its metadata describes "
                    f"(missing {missing}, unexpected {extra})"
                )
            tensors = {key: file.get_tensor(key) for key in sorted(stored)}
    except SafetensorError as error:
        raise ValueError(f"path: {path!r} is not a readable safetensors file ({error})") from error
    rebuilt = rebuild_weights(header, tensors, path, allow_nonfinite)
    return {name: weight.to(device) for name, weight in rebuilt.items()}


def rebuild_weights(
    header: dict[str, Any], tensors: dict[str, torch.Tensor], path: str, allow_nonfinite: bool = False
) -> dict[str, SparseWeight]:
    """The weights a checked header (:func:`read_header`) describes, each rebuilt (and so validated) from its
    tensors in ``tensors`` (which may hold others too); raise ValueError naming the weight and ``path``."""
    weights = {
        name: _rebuild(name, fields, tensors, path, allow_nonfinite) for name, fields in header["weights"].items()
    }
    # After validation, which names what a change breaks; the checksums catch a change that still validates.
    where = f"path {path!r}"
    verify_checksums(tensors, header.get("checksums"), where)
    field_checksums = header.get("field_checksums", {})
    for name, weight in weights.items():
        if header["version"] >= 4 and name not in field_checksums:
            raise ValueError(f"path: {path!r} metadata: no field checksum for weight {name!r}: the file is corrupted")
        fields = {"format": type(weight).__name__, **weight.state_fields()}
        verify_fields(fields, field_checksums.get(name), f"{where} (weight {name!r})")
    return weights


def read_header(metadata: dict[str, str] | None, path: str) -> dict[str, Any]:
    """Parse and check the ``"nmspmm"`` metadata entry; raise ValueError naming ``path`` if it is wrong."""
    if not metadata or METADATA_KEY not in metadata:
        raise ValueError(f"path: {path!r} was not written by nmspmm (no {METADATA_KEY!r} metadata entry)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"path: {path!r} has malformed {METADATA_KEY!r} metadata ({error})") from error
    if not isinstance(header, dict) or header.get("format") != FILE_FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"path: {path!r} metadata: expected format {FILE_FORMAT!r}, got {got!r}")
    if header.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"path: {path!r} metadata: expected a format version in {READABLE_VERSIONS}, got {header.get('version')!r}"
        )
    checksums = header.get("checksums")
    if header["version"] >= 3 and (
        not isinstance(checksums, dict) or not all(isinstance(c, int) for c in checksums.values())
    ):
        raise ValueError(f"path: {path!r} metadata: expected a 'checksums' object of ints, got {checksums!r}")
    weights = header.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"path: {path!r} metadata: expected a 'weights' object, got {weights!r}")
    field_checksums = header.get("field_checksums")
    if header["version"] >= 4 and (
        not isinstance(field_checksums, dict) or not all(isinstance(c, int) for c in field_checksums.values())
    ):
        got = field_checksums
        raise ValueError(f"path: {path!r} metadata: expected a 'field_checksums' object of ints, got {got!r}")
    for name, fields in weights.items():
        cls = WEIGHT_CLASSES.get(fields.get("format")) if isinstance(fields, dict) else None
        if cls is None:
            got = fields.get("format") if isinstance(fields, dict) else fields
            raise ValueError(
                f"path: {path!r} metadata of weight {name!r}: expected a format in {sorted(WEIGHT_CLASSES)}, "
                f"got {got!r}"
            )
        if set(fields) != {"format", *cls.STATE_FIELDS}:
            raise ValueError(
                f"path: {path!r} metadata of weight {name!r}: expected the fields "
                f"{sorted({'format', *cls.STATE_FIELDS})}, got {fields!r}"
            )
    return header


def _rebuild(
    name: str, fields: dict[str, Any], tensors: dict[str, torch.Tensor], path: str, allow_nonfinite: bool
) -> SparseWeight:
    """Construct (and so validate) one weight from its metadata and tensors; raise ValueError naming it."""
    cls = WEIGHT_CLASSES[fields["format"]]
    missing = [f"{name}.{field}" for field in cls.STATE_TENSORS if f"{name}.{field}" not in tensors]
    if missing:
        raise ValueError(f"path: {path!r} does not hold the tensors its metadata describes (missing {missing})")
    own = {field: tensors[f"{name}.{field}"] for field in cls.STATE_TENSORS}
    state = {key: value for key, value in fields.items() if key != "format"}
    try:
        return cls.from_state(own, state, allow_nonfinite=allow_nonfinite)
    except (TypeError, ValueError) as error:
        raise ValueError(f"path: {path!r} weight {name!r} is inconsistent: {error}") from error
