"""BitmapWeight: round trips against an independent reference of the layout (bitmap words, block offsets) on odd
shapes, hand-built layouts, storage size, pruning (the entries prune_csr keeps), every argument check of the
constructor and from_dense, saving (torch.save weights-only, safetensors, state) and weights without values."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nmspmm
from conftest import DEVICE, rewrite_zip_entry
from nmspmm import load_safetensors, save_safetensors
from nmspmm.formats import BitmapWeight, CSRWeight
from nmspmm.formats.bitmap import BLOCK_INPUTS, WORD_BITS
from nmspmm.prune import prune_bitmap, prune_csr

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 45), (33, 200), (64, 300), (5, 128), (3, 129)]


def reference_bitmap(mask: torch.Tensor) -> torch.Tensor:
    """The bitmap word by word in Python ints (as int32: bit 31 is the sign)."""
    rows, cols = mask.shape
    kept = mask.cpu().tolist()
    words = []
    for r in range(rows):
        row = []
        for w in range(-(-cols // WORD_BITS)):
            word = sum(1 << j for j in range(WORD_BITS) if WORD_BITS * w + j < cols and kept[r][WORD_BITS * w + j])
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


def reference_block_offsets(mask: torch.Tensor) -> torch.Tensor:
    """Entry [r, b]: the kept entries before row r's input 128 * b in row-major order."""
    rows, cols = mask.shape
    before = torch.nn.functional.pad(mask.cpu().flatten().long().cumsum(0), (1, 0))
    starts = torch.arange(rows)[:, None] * cols + torch.arange(-(-cols // BLOCK_INPUTS))[None, :] * BLOCK_INPUTS
    return before[starts].int()


def random_mask(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """A random mask with empty rows (every third from row 2) and a full row 0 where there are rows to spare."""
    mask = torch.rand(rows, cols, generator=generator) < density
    if rows > 2:
        mask[2::3] = False
        mask[0] = True
    return mask.to(DEVICE)


def assert_layout(weight: BitmapWeight, dense: torch.Tensor, mask: torch.Tensor) -> None:
    """The weight holds exactly ``dense`` under ``mask``, in the documented layout."""
    rows, cols = mask.shape
    assert weight.shape == (rows, cols) and weight.dtype == dense.dtype and weight.nnz == int(mask.sum())
    assert weight.bitmap.dtype == weight.block_offsets.dtype == torch.int32
    assert torch.equal(weight.mask(), mask)
    assert torch.equal(weight.to_dense(), torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=DEVICE)))
    assert torch.equal(weight.values, dense[mask])
    assert torch.equal(weight.bitmap.cpu(), reference_bitmap(mask))
    assert torch.equal(weight.block_offsets.cpu(), reference_block_offsets(mask))


# ---- round trips and the layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_round_trip_on_odd_shapes(rows, cols, density):
    generator = torch.Generator().manual_seed(rows * 1000 + cols + int(density * 10))
    dtype = DTYPES[(rows + cols) % 3]
    dense = torch.randn(rows, cols, generator=generator).to(dtype).to(DEVICE)
    mask = random_mask(rows, cols, density, generator)
    weight = BitmapWeight.from_dense(dense, mask)
    assert_layout(weight, dense, mask)
    assert weight.sparsity == pytest.approx(1 - weight.nnz / (rows * cols))
    # Integer 0/1 masks and non-contiguous weights compress the same.
    again = BitmapWeight.from_dense(dense.t().contiguous().t(), mask.to(torch.uint8))
    assert torch.equal(again.values, weight.values) and torch.equal(again.bitmap, weight.bitmap)


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 45), (3, 129), (2, 256)])
def test_empty_and_full_weights(rows, cols):
    dense = torch.randn(rows, cols, device=DEVICE)
    empty = BitmapWeight.from_dense(dense, torch.zeros(rows, cols, dtype=torch.bool, device=DEVICE))
    assert empty.nnz == 0 and empty.sparsity == 1.0 and empty.values.shape == (0,)
    assert not bool(empty.bitmap.any()) and not bool(empty.block_offsets.any())
    assert torch.equal(empty.to_dense(), torch.zeros(rows, cols, device=DEVICE)) and not bool(empty.mask().any())
    full_mask = torch.ones(rows, cols, dtype=torch.bool, device=DEVICE)
    full = BitmapWeight.from_dense(dense, full_mask)
    assert_layout(full, dense, full_mask)
    assert full.nnz == rows * cols and torch.equal(full.to_dense(), dense)
    if cols >= WORD_BITS:
        assert bool((full.bitmap[:, : cols // WORD_BITS] == -1).all())  # whole words: all 32 bits, bit 31 the sign


def test_words_with_bit_31_set():
    dense = torch.randn(6, 200, device=DEVICE)
    mask = torch.zeros(6, 200, dtype=torch.bool, device=DEVICE)
    mask[:, 31::WORD_BITS] = True  # the last input of every whole word
    mask[3, 0] = True
    weight = BitmapWeight.from_dense(dense, mask)
    assert_layout(weight, dense, mask)
    assert bool((weight.bitmap[:, :6] < 0).all()) and int(weight.bitmap[0, 0]) == -(2**31)
    assert int(weight.bitmap[3, 0]) == -(2**31) + 1 and int(weight.bitmap[0, 6]) == 0  # inputs 192..199: none


def test_hand_built_2x40_layout():
    dense = torch.arange(1, 81, dtype=torch.float32, device=DEVICE).view(2, 40)
    mask = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    mask[0, [0, 3, 31, 32, 39]] = True
    mask[1, [5, 33]] = True
    weight = BitmapWeight.from_dense(dense, mask)
    assert weight.bitmap.tolist() == [[1 + 8 - 2**31, 1 + 128], [32, 2]]
    assert weight.block_offsets.tolist() == [[0], [5]]
    assert weight.values.tolist() == [1, 4, 32, 33, 40, 46, 74]
    assert weight.nbytes == 7 * 4 + 2 * 2 * 4 + 2 * 1 * 4 + 16
    built = BitmapWeight(weight.values.clone(), weight.bitmap.clone(), weight.block_offsets.clone(), (2, 40))
    assert torch.equal(built.to_dense(), dense * mask)


def test_hand_built_block_offsets_over_several_blocks():
    dense = torch.randn(2, 260, device=DEVICE)
    mask = torch.zeros(2, 260, dtype=torch.bool, device=DEVICE)
    mask[0, [1, 130, 259]] = True
    mask[1, [0, 127, 128, 256]] = True
    weight = BitmapWeight.from_dense(dense, mask)
    assert weight.block_offsets.tolist() == [[0, 1, 2], [3, 5, 6]]
    assert weight.bitmap.tolist() == [[2, 0, 0, 0, 4, 0, 0, 0, 8], [1, 0, 0, -(2**31), 1, 0, 0, 0, 1]]


def test_nbytes_counts_the_three_tensors_and_the_shape():
    weight = BitmapWeight.from_dense(torch.randn(33, 200, device=DEVICE).half(), random_mask(33, 200, 0.3,
                                     torch.Generator().manual_seed(0)))
    assert weight.nbytes == weight.nnz * 2 + 33 * 7 * 4 + 33 * 2 * 4 + 16


def test_moves_repr_and_shared_structure():
    weight = BitmapWeight.from_dense(torch.randn(12, 70, device=DEVICE), torch.rand(12, 70, device=DEVICE) < 0.4)
    half = weight.to(torch.float16)
    assert type(half) is BitmapWeight and half.dtype == torch.float16 and half.bitmap.dtype == torch.int32
    assert torch.equal(half.to_dense(), weight.to_dense().half())
    assert weight.cpu().device.type == "cpu" and torch.equal(weight.cpu().bitmap, weight.bitmap.cpu())
    assert repr(weight).startswith(f"BitmapWeight(shape=(12, 70), nnz={weight.nnz}, sparsity=")
    twin = weight._with_values(torch.ones_like(weight.values))
    assert twin.bitmap is weight.bitmap and twin._derived is weight._derived
    assert torch.equal(twin.to_dense(), weight.mask().float())
    trusted = BitmapWeight._trusted(weight.values, weight.bitmap, weight.block_offsets, weight.shape)
    assert torch.equal(trusted.to_dense(), weight.to_dense())


def test_to_dense_is_differentiable_in_values():
    weight = BitmapWeight.from_dense(torch.randn(5, 40, device=DEVICE), torch.rand(5, 40, device=DEVICE) < 0.5)
    values = weight.values.clone().requires_grad_()
    (weight._with_values(values).to_dense() * 3).sum().backward()
    assert torch.equal(values.grad, torch.full_like(values, 3))


# ---- pruning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_bitmap_keeps_the_entries_prune_csr_keeps(sparsity, dtype):
    dense = torch.randn(45, 140, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    bitmap, csr = prune_bitmap(dense, sparsity), prune_csr(dense, sparsity)
    assert isinstance(bitmap, BitmapWeight) and bitmap.nnz == csr.nnz == round((1 - sparsity) * 45 * 140)
    assert torch.equal(bitmap.mask(), csr.mask()) and torch.equal(bitmap.values, csr.values)
    assert torch.equal(bitmap.to_dense(), csr.to_dense())


def test_prune_bitmap_detaches_and_checks_its_arguments():
    dense = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    assert not prune_bitmap(dense, 0.5).values.requires_grad
    with pytest.raises(ValueError, match=r"sparsity: expected a float in \[0, 1\), got 1.0"):
        prune_bitmap(dense, 1.0)
    poisoned = dense.detach().clone()
    poisoned[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight: expected finite values, got nan at row 1, column 2"):
        prune_bitmap(poisoned, 0.5)


def test_deprecated_prune_method_calls_prune_bitmap():
    weight = torch.randn(32, 64, device=DEVICE)
    with pytest.warns(DeprecationWarning, match=r"BitmapWeight.prune is deprecated; call nmspmm.prune.prune_bitmap"):
        old = BitmapWeight.prune(weight, 0.75)
    assert torch.equal(old.to_dense(), prune_bitmap(weight, 0.75).to_dense())
    assert nmspmm.prune.prune_bitmap is prune_bitmap


# ---- argument checks ----------------------------------------------------------------------------------------


def _weight() -> BitmapWeight:
    """6 x 300: 10 words a row (the last holds inputs 288..299), 3 blocks; row 1 keeps input 31."""
    mask = torch.rand(6, 300, generator=torch.Generator().manual_seed(3)) < 0.4
    mask[1, 31] = True
    return BitmapWeight.from_dense(torch.randn(6, 300).to(DEVICE), mask.to(DEVICE))


def _set_word(row: int, word: int, value: int):
    def change(v, b, o, s):
        b = b.clone()
        b[row, word] = value
        return v, b, o, s

    return change


def _shift_offset(v, b, o, s):
    o = o.clone()
    o[3, 1] += 1
    return v, b, o, s


def _field_cases() -> list[object]:
    """pytest params of (change to (values, bitmap, block_offsets, shape), error, message)."""
    cases = [
        (lambda v, b, o, s: (v.double(), b, o, s), TypeError, r"values: expected a float16, .*got torch.float64"),
        (lambda v, b, o, s: (v.int(), b, o, s), TypeError, r"values: expected a float16, .*got torch.int32"),
        (lambda v, b, o, s: (v.tolist(), b, o, s), TypeError, r"values: expected a float16, .*got list"),
        (lambda v, b, o, s: (v.view(1, -1), b, o, s), ValueError, r"values: expected a 1-D \[nnz\] tensor"),
        (lambda v, b, o, s: (v, b.long(), o, s), TypeError, r"bitmap: expected an int32 tensor, got torch.int64"),
        (lambda v, b, o, s: (v, b.tolist(), o, s), TypeError, r"bitmap: expected an int32 tensor, got list"),
        (lambda v, b, o, s: (v, b[:, :-1], o, s), ValueError, r"bitmap: expected shape \(6, 10\), got \(6, 9\)"),
        (lambda v, b, o, s: (v, b.t(), o, s), ValueError, r"bitmap: expected shape \(6, 10\), got \(10, 6\)"),
        (lambda v, b, o, s: (v, b, o.short(), s), TypeError, r"block_offsets: expected an int32 tensor, got .*int16"),
        (lambda v, b, o, s: (v, b, o[:-1], s), ValueError, r"block_offsets: expected shape \(6, 3\), got \(5, 3\)"),
        (lambda v, b, o, s: (v, b, o, (6, 288)), ValueError, r"bitmap: expected shape \(6, 9\), got \(6, 10\)"),
        (lambda v, b, o, s: (v, b, o[:, :2], s), ValueError, r"block_offsets: expected shape \(6, 3\), got \(6, 2\)"),
        (lambda v, b, o, s: (v, b.to("meta"), o, s), ValueError, r"bitmap: on meta, but values are on"),
        (lambda v, b, o, s: (v, b, o.to("meta"), s), ValueError, r"block_offsets: on meta, but values are on"),
        (_set_word(2, 9, 1 << 12), ValueError, r"bitmap: bits at inputs >= K=300 must be zero, but word 9 of row 2 "
                                               r"is 0x00001000 \(it keeps inputs up to 300\)"),
        (_set_word(4, 9, -(2**31)), ValueError, r"bitmap: bits at inputs >= K=300 .*word 9 of row 4 is 0x80000000"),
        (_shift_offset, ValueError, r"block_offsets: expected the index in values of each row's first kept entry .*"
                                    r"block_offsets\[3, 1\] is \d+, not \d+"),
        (lambda v, b, o, s: (v[:-1], b, o, s), ValueError, r"values: expected nnz=\d+ entries \(the bits set in"),
        (lambda v, b, o, s: (torch.cat([v, v[:1]]), b, o, s), ValueError, r"values: expected nnz=\d+ entries"),
        (_set_word(1, 0, 0), ValueError, r"values: expected nnz=\d+ entries \(the bits set in bitmap\), got"),
        (lambda v, b, o, s: (v, b, o, (6,)), ValueError, r"shape: expected \(N, K\) with N, K > 0, got \(6,\)"),
        (lambda v, b, o, s: (v, b, o, (0, 300)), ValueError, r"shape: expected \(N, K\) with N, K > 0"),
        (lambda v, b, o, s: (v, b, o, ("6", 300)), TypeError, r"shape: expected \(N, K\) as two ints"),
        (lambda v, b, o, s: (v, b, o, 6), TypeError, r"shape: expected \(N, K\) as two ints, got int 6"),
    ]  # fmt: skip
    return [pytest.param(*case, id=f"{i}-{case[2][:30]}") for i, case in enumerate(cases)]


@pytest.mark.parametrize("change,error,message", _field_cases())
def test_constructor_rejects_bad_fields(change, error, message):
    weight = _weight()
    fields = change(weight.values, weight.bitmap, weight.block_offsets, weight.shape)
    with pytest.raises(error, match=message):
        BitmapWeight(*fields)


def test_constructor_refuses_non_finite_values_unless_allowed():
    weight = _weight()
    values = weight.values.clone()
    values[[0, 4]] = torch.tensor([float("inf"), float("nan")], device=DEVICE)
    with pytest.raises(ValueError, match=r"values: expected finite values, found 2 NaN or infinite"):
        BitmapWeight(values, weight.bitmap, weight.block_offsets, weight.shape)
    allowed = BitmapWeight(values, weight.bitmap, weight.block_offsets, weight.shape, allow_nonfinite=True)
    assert allowed.nnz == weight.nnz


def test_constructor_refuses_overlapping_storage():
    weight = BitmapWeight.from_dense(torch.randn(4, 40, device=DEVICE), torch.ones(4, 40, dtype=torch.bool,
                                                                                     device=DEVICE))
    bitmap = weight.bitmap[:1].expand(4, 2)  # every row reads row 0's words
    with pytest.raises(ValueError, match=r"bitmap: its elements overlap in memory"):
        BitmapWeight(weight.values, bitmap, weight.block_offsets, weight.shape)


def test_more_than_int32_indices_address_is_refused():
    values = torch.empty(2**31, device="meta")
    bitmap = torch.empty(2**16, 2**11, dtype=torch.int32, device="meta")
    offsets = torch.empty(2**16, 2**9, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"values: holds 2147483648 entries, more than int32 indices address"):
        BitmapWeight(values, bitmap, offsets, (2**16, 2**16))
    assert BitmapWeight(values[:-1], bitmap, offsets, (2**16, 2**16)).shape_only


def test_from_dense_rejects_bad_input():
    dense = torch.randn(8, 10, device=DEVICE)
    mask = torch.rand(8, 10, device=DEVICE) < 0.5
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 10\) like weight, got \(8, 9\)"):
        BitmapWeight.from_dense(dense, mask[:, :9])
    with pytest.raises(ValueError, match=r"mask: on meta, but weight is on"):
        BitmapWeight.from_dense(dense, mask.to("meta"))
    with pytest.raises(TypeError, match=r"mask: expected a bool \(or 0/1 integer\) tensor, got torch.float32"):
        BitmapWeight.from_dense(dense, mask.float())
    with pytest.raises(TypeError, match=r"mask: expected a bool \(or 0/1 integer\) tensor, got torch.int64"):
        BitmapWeight.from_dense(dense, mask.long() * 2)
    with pytest.raises(TypeError, match=r"weight: expected dtype float16, bfloat16 or float32, got torch.float64"):
        BitmapWeight.from_dense(dense.double(), mask)
    with pytest.raises(ValueError, match=r"weight: expected a 2-D \[out_features, in_features\] matrix"):
        BitmapWeight.from_dense(dense[0], mask[0])
    poisoned = dense.clone()
    poisoned[2, 3] = float("inf")
    mask[2, 3] = True
    with pytest.raises(ValueError, match=r"weight: kept entries must be finite, got inf at row 2, column 3"):
        BitmapWeight.from_dense(poisoned, mask)
    mask[2, 3] = False
    assert BitmapWeight.from_dense(poisoned, mask).nnz == int(mask.sum())  # pruned entries may be anything


@pytest.mark.gpu
def test_validation_on_cuda_and_mismatched_devices():
    weight = _weight().cuda()
    assert weight.device.type == "cuda" and torch.equal(weight.cpu().to_dense(), weight.to_dense().cpu())
    with pytest.raises(ValueError, match=r"bitmap: on cpu, but values are on cuda"):
        BitmapWeight(weight.values, weight.bitmap.cpu(), weight.block_offsets, weight.shape)
    with pytest.raises(ValueError, match=r"block_offsets: on cpu, but values are on cuda"):
        BitmapWeight(weight.values, weight.bitmap, weight.block_offsets.cpu(), weight.shape)
    for change, error, message in (case.values for case in _field_cases()):
        with pytest.raises(error, match=message):
            BitmapWeight(*change(weight.values, weight.bitmap, weight.block_offsets, weight.shape))


# ---- saving and loading -------------------------------------------------------------------------------------


def test_state_round_trip():
    weight = _weight().to(torch.bfloat16)
    tensors, fields = weight.state_tensors(), weight.state_fields()
    assert set(tensors) == set(BitmapWeight.STATE_TENSORS) == {"values", "bitmap", "block_offsets"}
    assert fields == {"shape": [6, 300], "dtype": "bfloat16"} and set(fields) == set(BitmapWeight.STATE_FIELDS)
    assert torch.equal(BitmapWeight.from_state(tensors, fields).to_dense(), weight.to_dense())
    with pytest.raises(ValueError, match=r"dtype: metadata says 'float16', but the stored values are torch.bfloat16"):
        BitmapWeight.from_state(tensors, {**fields, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"bitmap: expected shape \(7, 10\), got \(6, 10\)"):
        BitmapWeight.from_state(tensors, {**fields, "shape": [7, 300]})


def test_torch_save_load_weights_only():
    weight = _weight().cpu().to(torch.float16)
    buffer = io.BytesIO()
    torch.save({"layer": weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["layer"]
    assert isinstance(loaded, BitmapWeight) and loaded.shape == weight.shape and loaded.dtype == torch.float16
    for name, tensor in weight.state_tensors().items():
        assert torch.equal(getattr(loaded, name), tensor)
    assert torch.equal(pickle.loads(pickle.dumps(weight)).to_dense(), weight.to_dense())

    weight.block_offsets[2, 2] += 1  # tampered after validation: loading must refuse it
    buffer = io.BytesIO()
    torch.save(weight, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"block_offsets: .*block_offsets\[2, 2\]"):
        torch.load(buffer, weights_only=True)


def test_torch_load_refuses_tampered_bytes(tmp_path: Path):
    weight = _weight().cpu()
    path = tmp_path / "w.pt"
    torch.save(weight, path)
    tampered = weight.bitmap.clone()
    tampered[0, 9] |= 1 << 20  # input 308 of K=300
    rewrite_zip_entry(path, weight.bitmap.numpy().tobytes(), tampered.numpy().tobytes())
    with pytest.raises(ValueError, match=r"bitmap: bits at inputs >= K=300 must be zero"):
        torch.load(path, weights_only=True)
    torch.save(weight, path)  # a flipped value bit still validates: the checksum tells
    flipped = weight.values.clone()
    flipped.view(torch.int32)[0] ^= 1 << 20
    rewrite_zip_entry(path, weight.values.numpy().tobytes(), flipped.numpy().tobytes())
    with pytest.raises(ValueError, match=r"values: its bytes do not match .*the pickled BitmapWeight is corrupted"):
        torch.load(path, weights_only=True)


def test_torch_load_refuses_an_instance_built_without_the_constructor(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save(_weight().cpu(), path)
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    rewrite_zip_entry(path, pickled, b"\x80\x02cnmspmm.formats.bitmap\nBitmapWeight\n)\x81.")
    with pytest.raises(pickle.UnpicklingError, match="BitmapWeight"):
        torch.load(path)


def test_safetensors_round_trip_and_tampered_file(tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = {"a": _weight(), "b": prune_bitmap(torch.randn(3, 129, device=DEVICE).bfloat16(), 0.6)}
    path = tmp_path / "w.safetensors"
    save_safetensors(weights, path)
    loaded = load_safetensors(path, device=DEVICE)
    assert list(loaded) == ["a", "b"]
    for name, weight in weights.items():
        assert type(loaded[name]) is BitmapWeight and loaded[name].dtype == weight.dtype
        for field, tensor in weight.state_tensors().items():
            assert torch.equal(getattr(loaded[name], field), tensor)
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    assert sorted(tensors) == ["a.bitmap", "a.block_offsets", "a.values", "b.bitmap", "b.block_offsets", "b.values"]
    tensors["b.block_offsets"][1, 0] += 1
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"weight 'b' is inconsistent: block_offsets: .*block_offsets\[1, 0\]"):
        load_safetensors(path)


# ---- weights without values ---------------------------------------------------------------------------------


def _layout(weight: BitmapWeight) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in weight.state_tensors().items()}


def test_pruning_on_meta_gives_a_shape_only_weight_of_the_real_layout():
    real = prune_bitmap(torch.randn(64, 300, dtype=torch.bfloat16), 0.7)
    skeleton = prune_bitmap(torch.empty(64, 300, dtype=torch.bfloat16, device="meta"), 0.7)
    assert type(skeleton) is BitmapWeight and skeleton.device.type == "meta" and skeleton.shape_only
    assert _layout(skeleton) == _layout(real) and skeleton.state_fields() == real.state_fields()
    assert skeleton.nbytes == real.nbytes and skeleton.nnz == real.nnz
    assert skeleton.to_dense().is_meta and skeleton.to_dense().shape == skeleton.mask().shape == (64, 300)
    moved = real.to("meta")
    assert moved.shape_only and _layout(moved) == _layout(real)
    assert repr(moved).endswith(f"device=meta, nbytes={real.nbytes})")
    with FakeTensorMode():
        fake = prune_bitmap(torch.empty(64, 300), 0.7)
    assert fake.shape_only and _layout(fake) == _layout(real.to(torch.float32))


def test_placeholder_is_the_first_entries_in_row_major_order():
    real = prune_bitmap(torch.randn(64, 300), 0.7)
    placeholder = BitmapWeight.placeholder(torch.zeros_like(real.values), {"shape": [64, 300]})
    assert _layout(placeholder) == _layout(real) and not placeholder.shape_only  # validated on a real device
    assert torch.equal(placeholder.mask(), (torch.arange(64 * 300) < real.nnz).view(64, 300))


def test_meta_checks_shapes_dtypes_and_devices_only():
    values = torch.empty(10, device="meta")
    bitmap = torch.empty(4, 2, dtype=torch.int32, device="meta")
    offsets = torch.empty(4, 1, dtype=torch.int32, device="meta")
    assert BitmapWeight(values, bitmap, offsets, (4, 40)).shape_only  # counts are not read
    with pytest.raises(ValueError, match=r"bitmap: expected shape \(4, 2\), got \(4, 1\)"):
        BitmapWeight(values, bitmap[:, :1], offsets, (4, 40))
    with pytest.raises(TypeError, match=r"block_offsets: expected an int32 tensor, got torch.int64"):
        BitmapWeight(values, bitmap, offsets.long(), (4, 40))
    with pytest.raises(ValueError, match=r"block_offsets: on cpu, but values are on meta"):
        BitmapWeight(values, bitmap, torch.zeros(4, 1, dtype=torch.int32), (4, 40))
    with pytest.raises(ValueError, match=r"mask: holds no values .*prune_bitmap\(weight, sparsity\)"):
        BitmapWeight.from_dense(torch.empty(4, 40, device="meta"), torch.empty(4, 40, dtype=torch.bool,
                                                                                device="meta"))


def test_csr_and_bitmap_are_exported_side_by_side():
    assert nmspmm.formats.BitmapWeight is BitmapWeight and "BitmapWeight" in nmspmm.formats.__all__
    assert "prune_bitmap" in nmspmm.prune.__all__ and CSRWeight.STATE_FIELDS == BitmapWeight.STATE_FIELDS
