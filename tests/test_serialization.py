"""Saving and loading the formats: NMSparseWeight through torch.save/torch.load (weights-only) and safetensors
files, including files that were corrupted or tampered with; CSRWeight and BlockShuffledWeight through their
state (state_tensors, state_fields, from_state) and torch.save/torch.load, tampered indices included."""

from __future__ import annotations

import copy
import io
import json
import pickle
import random
import re
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nmspmm
from conftest import block_weight, csr_weight, rewrite_zip_entry
from nmspmm import NMSparseWeight, load_safetensors, prune, save_safetensors
from nmspmm.formats.block_shuffled import BlockShuffledWeight
from nmspmm.formats.csr import CSRWeight
from nmspmm.formats import load_safetensors as formats_load_safetensors
from nmspmm.formats import save_safetensors as formats_save_safetensors

N, K = 128, 64
CASES = [
    ("2:4", 16, torch.float16),
    ("5:8", 1, torch.bfloat16),
    ("8:32", 128, torch.float32),
    ("63:64", 32, torch.float16),
]


def make(pattern: str = "3:8", vector: int = 16, dtype: torch.dtype = torch.float32) -> NMSparseWeight:
    return prune(torch.randn(N, K, dtype=dtype), pattern, vector)


def assert_same(loaded: NMSparseWeight, original: NMSparseWeight) -> None:
    assert isinstance(loaded, NMSparseWeight)
    assert (loaded.pattern, loaded.vector, loaded.shape, loaded.dtype, loaded.device) == (
        original.pattern,
        original.vector,
        original.shape,
        original.dtype,
        original.device,
    )
    assert torch.equal(loaded.values, original.values)
    assert torch.equal(loaded.offsets, original.offsets)
    assert torch.equal(loaded.to_dense(), original.to_dense())


# ---- torch.save / torch.load -------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "vector", "dtype"), CASES)
def test_torch_save_load_default_weights_only(tmp_path: Path, pattern: str, vector: int, dtype: torch.dtype) -> None:
    weight = make(pattern, vector, dtype)
    torch.save(weight, tmp_path / "w.pt")
    assert_same(torch.load(tmp_path / "w.pt"), weight)
    assert_same(torch.load(tmp_path / "w.pt", weights_only=True), weight)


def test_torch_save_load_inside_a_state_dict(tmp_path: Path) -> None:
    weights = {f"layers.{i}.weight": make(*case) for i, case in enumerate(CASES)}
    torch.save({"weights": weights, "step": 3}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert loaded["step"] == 3 and loaded["weights"].keys() == weights.keys()
    for name, weight in weights.items():
        assert_same(loaded["weights"][name], weight)


def test_pickle_and_deepcopy_rebuild_through_the_constructor() -> None:
    weight = make("6:8", 16)
    assert_same(pickle.loads(pickle.dumps(weight)), weight)
    duplicate = copy.deepcopy(weight)
    assert_same(duplicate, weight)
    assert duplicate.values.data_ptr() != weight.values.data_ptr()


@pytest.mark.parametrize(
    ("pattern", "tamper", "message"),
    [
        ("3:8", lambda o: o.fill_(8), r"offsets: every offset must be < m=8, got max 8"),
        ("6:8", lambda o: o.fill_(255), r"offsets: every offset must be < m=8, got max 255"),
        ("3:8", lambda o: o.flip(-1), r"offsets: must be strictly ascending"),
        ("6:8", lambda o: o.flip(-1), r"offsets: must be strictly ascending"),
    ],
)
def test_torch_load_refuses_tampered_offsets(tmp_path: Path, pattern: str, tamper, message: str) -> None:
    weight = make(pattern, 16)
    path = tmp_path / "w.pt"
    torch.save(weight, path)
    tampered = tamper(weight.offsets.clone()).contiguous()
    rewrite_zip_entry(path, weight.offsets.numpy().tobytes(), tampered.numpy().tobytes())
    with pytest.raises(ValueError, match=message):
        torch.load(path)


def test_torch_load_refuses_an_instance_built_without_the_constructor(tmp_path: Path) -> None:
    # A crafted pickle that creates the class through __new__ alone (NEWOBJ, no BUILD) would skip validation:
    # the weights-only unpickler must refuse it because only the rebuild function is allowlisted, not the class.
    path = tmp_path / "w.pt"
    torch.save(make(), path)
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    crafted = b"\x80\x02cnmspmm.formats.nm\nNMSparseWeight\n)\x81."
    rewrite_zip_entry(path, pickled, crafted)
    with pytest.raises(pickle.UnpicklingError, match="NMSparseWeight"):
        torch.load(path)


# ---- safetensors --------------------------------------------------------------------------------------------


def test_exported_from_formats() -> None:
    assert formats_save_safetensors is save_safetensors and formats_load_safetensors is load_safetensors


def test_safetensors_round_trip_named_weights(tmp_path: Path) -> None:
    weights = {f"model.layers.{i}.mlp.weight": make(*case) for i, case in enumerate(CASES)}
    save_safetensors(weights, tmp_path / "w.safetensors")
    loaded = load_safetensors(tmp_path / "w.safetensors")
    assert list(loaded) == list(weights)
    for name, weight in weights.items():
        assert_same(loaded[name], weight)


def test_safetensors_single_weight_is_named_weight(tmp_path: Path) -> None:
    weight = make("31:32", 64, torch.bfloat16)
    save_safetensors(weight, str(tmp_path / "w.safetensors"))
    loaded = load_safetensors(str(tmp_path / "w.safetensors"), device=torch.device("cpu"))
    assert list(loaded) == ["weight"]
    assert_same(loaded["weight"], weight)


def test_safetensors_weights_sharing_tensors(tmp_path: Path) -> None:
    weight = make("2:4", 16, torch.float16)
    weights = {"tied": weight, "embedding": weight, "cast": weight.to(torch.float16)}
    save_safetensors(weights, tmp_path / "w.safetensors")
    loaded = load_safetensors(tmp_path / "w.safetensors")
    for name in weights:
        assert_same(loaded[name], weight)


def test_safetensors_file_layout(tmp_path: Path) -> None:
    weight = make("8:32", 16, torch.float16)
    save_safetensors({"a": weight}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as file:
        assert sorted(file.keys()) == ["a.offsets", "a.values"]
        header = json.loads(file.metadata()["nmspmm"])
    fields = {"format": "NMSparseWeight", "pattern": "8:32", "vector": 16, "shape": [N, K], "dtype": "float16"}
    assert header == {
        "format": "nmspmm",
        "version": 4,
        "weights": {"a": fields},
        "checksums": {
            "a.values": zlib.crc32(weight.values.view(torch.uint8).numpy().tobytes()),
            "a.offsets": zlib.crc32(weight.offsets.numpy().tobytes()),
        },
        "field_checksums": {"a": zlib.crc32(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())},
    }


def test_save_safetensors_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(TypeError, match=r"weights: expected an NMSparseWeight.* or a mapping .*got list"):
        save_safetensors([make()], path)
    with pytest.raises(TypeError, match=r"weights: expected NMSparseWeight.* values, got Tensor for 'a'"):
        save_safetensors({"a": torch.ones(2)}, path)
    with pytest.raises(TypeError, match=r"weights: expected string names, got int 0"):
        save_safetensors({0: make()}, path)
    with pytest.raises(ValueError, match=r"weights: expected non-empty names"):
        save_safetensors({"": make()}, path)


# Helpers that rewrite a valid file: read its tensors and header, change them, write them back.


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, json.loads(file.metadata()["nmspmm"])


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict | str) -> None:
    save_file(tensors, path, metadata={"nmspmm": header if isinstance(header, str) else json.dumps(header)})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": make("3:8", 16), "b": make("6:8", 32, torch.float16)}, path)
    return path


def _edit_header(key: str, value: object):
    def edit(tensors: dict, header: dict) -> None:
        header[key] = value

    return edit


def _edit_weight(field: str, value: object):
    def edit(tensors: dict, header: dict) -> None:
        header["weights"]["b"][field] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_header("version", 1), r"expected a format version in \(2, 3, 4\), got 1"),
        (_edit_header("format", "other"), r"expected format 'nmspmm', got 'other'"),
        (
            _edit_weight("format", "Dense"),
            r"metadata of weight 'b': expected a format in \['BitmapWeight', 'BlockShuffledWeight', 'CSRWeight', "
            r"'NMSparseWeight', 'QuantizedNMWeight'\], got 'Dense'",
        ),
        (_edit_header("weights", []), r"expected a 'weights' object, got \[\]"),
        (_edit_weight("pattern", "2:8"), r"weight 'b' is inconsistent: values: expected shape \(128, 16\)"),
        (_edit_weight("pattern", "12:16"), r"weight 'b' is inconsistent: offsets: expected shape \(4, 4, 4\)"),
        (_edit_weight("pattern", "6-8"), r"weight 'b' is inconsistent: pattern: expected 'n:m'"),
        (_edit_weight("vector", 16), r"weight 'b' is inconsistent: offsets: expected shape \(8, 8, 2\)"),
        (_edit_weight("vector", "32"), r"weight 'b' is inconsistent: vector: expected an int"),
        (_edit_weight("shape", [64, 128]), r"weight 'b' is inconsistent: values: expected shape \(64, 96\)"),
        (_edit_weight("shape", [128, 64, 1]), r"weight 'b' is inconsistent: shape: expected \(N, K\)"),
        (
            _edit_weight("dtype", "float32"),
            r"weight 'b' is inconsistent: dtype: metadata says 'float32', but the stored values are torch.float16",
        ),
        (_edit_weight("dtype", "int8"), r"weight 'b' is inconsistent: dtype: metadata says 'int8'"),
        (lambda t, h: h["weights"]["b"].pop("dtype"), r"metadata of weight 'b': expected the fields"),
        (lambda t, h: t.pop("b.offsets"), r"does not hold the tensors .*missing \['b.offsets'\], unexpected \[\]"),
        (lambda t, h: t.update(extra=torch.ones(1)), r"missing \[\], unexpected \['extra'\]"),
        (lambda t, h: h["weights"].pop("a"), r"missing \[\], unexpected \['a.offsets', 'a.values'\]"),
        (lambda t, h: t.update({"b.offsets": t["b.offsets"].long()}), r"offsets: expected a uint8 tensor"),
        (lambda t, h: t["b.offsets"].fill_(9), r"weight 'b' is inconsistent: offsets: every offset must be < m=8"),
        (lambda t, h: t["a.offsets"][1, 2].copy_(t["a.offsets"][1, 2].flip(-1)), r"V-group 1, input group 2"),
    ],
)
def test_load_safetensors_refuses_inconsistent_files(saved: Path, edit, message: str) -> None:
    tensors, header = _read(saved)
    edit(tensors, header)
    _write(saved, tensors, header)
    with pytest.raises(ValueError, match=rf"^path: '{re.escape(str(saved))}'.*{message}"):
        load_safetensors(saved)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, r"was not written by nmspmm \(no 'nmspmm' metadata entry\)"),
        ({"format": "pt"}, r"was not written by nmspmm"),
        ({"nmspmm": "{not json"}, r"has malformed 'nmspmm' metadata"),
        ({"nmspmm": "[1, 2]"}, r"expected format 'nmspmm', got \[1, 2\]"),
    ],
)
def test_load_safetensors_refuses_foreign_files(tmp_path: Path, metadata: dict | None, message: str) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.randn(4, 4)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=rf"^path: '{re.escape(str(path))}'.*{message}"):
        load_safetensors(path)


def test_load_safetensors_refuses_tampered_offset_bytes(saved: Path) -> None:
    # Edit the raw file: overwrite one byte of b.offsets, found through the safetensors header.
    data = bytearray(saved.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + header_size])["b.offsets"]["data_offsets"]
    data[8 + header_size + random.randrange(start, end)] = random.randrange(8, 256)
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weight 'b' is inconsistent: offsets: every offset must be < m=8"):
        load_safetensors(saved)


def test_load_safetensors_refuses_truncated_and_random_files(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 4, 0):
        saved.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"^path: '{re.escape(str(saved))}' is not a readable safetensors file"):
            load_safetensors(saved)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(random.randbytes(4096))
    with pytest.raises(ValueError, match=rf"^path: '{re.escape(str(noise))}' is not a readable safetensors file"):
        load_safetensors(noise)


def test_load_safetensors_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "absent.safetensors")


def test_torch_load_of_a_buffer() -> None:
    weight = make("1:16", 128, torch.bfloat16)
    buffer = io.BytesIO()
    torch.save(weight, buffer)
    buffer.seek(0)
    assert_same(torch.load(buffer), weight)


def test_safetensors_holds_every_format(tmp_path: Path) -> None:
    dense = torch.randn(64, 96)
    weights = {
        "nm": nmspmm.prune(dense, "2:4", 16),
        "csr": nmspmm.prune.prune_csr(dense.half(), 0.9),
        "blocks": nmspmm.prune.prune_block_shuffled(dense.bfloat16(), 0.75, (16, 32)),
        "bitmap": nmspmm.prune.prune_bitmap(dense, 0.8),
    }
    save_safetensors(weights, tmp_path / "w.safetensors")
    loaded = load_safetensors(tmp_path / "w.safetensors")
    for name, weight in weights.items():
        assert type(loaded[name]) is type(weight)
        assert loaded[name].dtype == weight.dtype and torch.equal(loaded[name].to_dense(), weight.to_dense())
    tensors, header = _read(tmp_path / "w.safetensors")
    tensors["csr.col_indices"][0] = 96
    _write(tmp_path / "w.safetensors", tensors, header)
    with pytest.raises(ValueError, match=r"weight 'csr' is inconsistent"):
        load_safetensors(tmp_path / "w.safetensors")


def test_checksums_catch_a_change_that_still_validates(tmp_path: Path) -> None:
    # A flipped bit in a value gives another valid weight: only the checksum written with it tells.
    weight = make("6:8", 16)
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": weight}, path)
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    tensors["w.values"].view(torch.int32)[0, 0] ^= 1 << 20
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"w.values: its bytes do not match the checksum saved with them: path"):
        load_safetensors(path)
    pt = tmp_path / "w.pt"
    torch.save(weight, pt)
    flipped = weight.values.clone()
    flipped.view(torch.int32)[0, 0] ^= 1 << 20
    rewrite_zip_entry(pt, weight.values.numpy().tobytes(), flipped.numpy().tobytes())
    with pytest.raises(ValueError, match=r"values: its bytes do not match .*the pickled NMSparseWeight is corrupted"):
        torch.load(pt)


def test_files_written_before_checksums_still_load(tmp_path: Path) -> None:
    weight = make("8:32", 16)
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": weight}, path)
    with safe_open(path, framework="pt") as file:
        header = json.loads(file.metadata()["nmspmm"])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    header["version"] = 2
    del header["checksums"], header["field_checksums"]
    save_file(tensors, str(path), metadata={"nmspmm": json.dumps(header)})
    assert_same(load_safetensors(path)["w"], weight)


def test_files_written_before_field_checksums_still_load(tmp_path: Path) -> None:
    weight = make("8:32", 16)
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": weight}, path)
    with safe_open(path, framework="pt") as file:
        header = json.loads(file.metadata()["nmspmm"])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    header["version"] = 3
    del header["field_checksums"]
    save_file(tensors, str(path), metadata={"nmspmm": json.dumps(header)})
    assert_same(load_safetensors(path)["w"], weight)
    header["version"] = 4  # a current file must carry them
    save_file(tensors, str(path), metadata={"nmspmm": json.dumps(header)})
    with pytest.raises(ValueError, match="expected a 'field_checksums' object of ints, got None"):
        load_safetensors(path)


# ---- CSRWeight: torch.save / torch.load and its state -------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_csr_torch_save_load_weights_only():
    weight = csr_weight(12, 20, torch.float16)
    buffer = io.BytesIO()
    torch.save({"layer": weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["layer"]
    assert isinstance(loaded, CSRWeight) and loaded.shape == weight.shape
    assert torch.equal(loaded.to_dense(), weight.to_dense())

    weight.col_indices[5] = 20  # tampered after validation: loading must refuse it
    buffer = io.BytesIO()
    torch.save(weight, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, K=20\)"):
        torch.load(buffer, weights_only=True)


@pytest.mark.usefixtures("seeded")
def test_csr_state_round_trip():
    weight = csr_weight(12, 20, torch.bfloat16)
    tensors, fields = weight.state_tensors(), weight.state_fields()
    assert set(tensors) == set(CSRWeight.STATE_TENSORS) and set(fields) == set(CSRWeight.STATE_FIELDS)
    assert fields == {"shape": [12, 20], "dtype": "bfloat16"}
    loaded = CSRWeight.from_state(tensors, fields)
    assert torch.equal(loaded.to_dense(), weight.to_dense())
    with pytest.raises(ValueError, match=r"dtype: metadata says 'float16', but the stored values are torch.bfloat16"):
        CSRWeight.from_state(tensors, {**fields, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"row_offsets: expected shape \(14,\), got \(13,\)"):
        CSRWeight.from_state(tensors, {**fields, "shape": [13, 20]})


# ---- BlockShuffledWeight: its state, torch.save / torch.load and tampered files -----------------------------


def test_block_shuffled_state_round_trip_and_checks():
    sparse, _, _ = block_weight(64, 96, (32, 16), torch.bfloat16)
    again = BlockShuffledWeight.from_state(sparse.state_tensors(), sparse.state_fields())
    assert sparse.state_fields() == {"shape": [64, 96], "dtype": "bfloat16", "block": [32, 16]}
    assert torch.equal(again.to_dense(), sparse.to_dense()) and again.block == (32, 16)
    tensors, state = sparse.state_tensors(), sparse.state_fields()
    with pytest.raises(ValueError, match=r"tensors: expected the fields"):
        BlockShuffledWeight.from_state({k: v for k, v in tensors.items() if k != "row_permutation"}, state)
    with pytest.raises(ValueError, match=r"fields: dtype 'float16' does not match values of torch.bfloat16"):
        BlockShuffledWeight.from_state(tensors, {**state, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"fields: expected the fields"):
        BlockShuffledWeight.from_state(tensors, {**state, "vector": 1})
    with pytest.raises(ValueError, match=r"row_permutation: not a permutation"):
        BlockShuffledWeight.from_state({**tensors, "row_permutation": torch.zeros(64, dtype=torch.int32)}, state)


def test_block_shuffled_torch_save_load_weights_only(tmp_path: Path):
    sparse, _, _ = block_weight(64, 64, (16, 32), torch.float16)
    torch.save({"layer": sparse}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["layer"]
    assert isinstance(loaded, BlockShuffledWeight) and loaded.block == (16, 32)
    for name, tensor in sparse.state_tensors().items():
        assert torch.equal(getattr(loaded, name), tensor)
    assert torch.equal(pickle.loads(pickle.dumps(sparse)).to_dense(), sparse.to_dense())


@pytest.mark.parametrize(
    "field,tamper,match",
    [
        ("row_permutation", lambda t: t.roll(1).index_fill_(0, torch.tensor([0]), 3), r"row_permutation: not a perm"),
        ("block_columns", lambda t: t.flip(0), r"block_columns: must be strictly ascending"),
        ("block_row_offsets", lambda t: t.flip(0), r"block_row_offsets: expected to run from 0"),
    ],
)
def test_block_shuffled_torch_load_refuses_tampered_indices(tmp_path: Path, field, tamper, match):
    sparse, _, _ = block_weight(64, 64, (16, 16), density=0.8, seed=2)
    path = tmp_path / "w.pt"
    torch.save(sparse, path)
    original = getattr(sparse, field)
    rewrite_zip_entry(path, original.numpy().tobytes(), tamper(original.clone()).contiguous().numpy().tobytes())
    with pytest.raises(ValueError, match=match):
        torch.load(path, weights_only=True)


def test_block_shuffled_torch_load_refuses_an_instance_built_without_the_constructor(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save(block_weight(32, 32, (16, 16))[0], path)
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    rewrite_zip_entry(path, pickled, b"\x80\x02cnmspmm.formats.block_shuffled\nBlockShuffledWeight\n)\x81.")
    with pytest.raises(pickle.UnpicklingError, match="BlockShuffledWeight"):
        torch.load(path)
