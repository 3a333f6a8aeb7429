"""One meaning for non-finite activations (issue 15, point 2): a pruned weight is absent, so a NaN or infinite
input at a feature an output prunes does not reach that output, on every path (the kernels, which never read it,
and the dense reference, which must not compute NaN * 0); at a kept feature it does reach it."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error

BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]


def _weights() -> dict[str, object]:
    torch.manual_seed(0)
    dense = torch.randn(64, 128, device=DEVICE)
    weights = {
        "nm-V16": nmspmm.prune(dense, "2:8", 16),
        "nm-V1": nmspmm.prune(dense, "2:4", 1),
        "csr": nmspmm.prune.prune_csr(dense, 0.8),
        # The kernel expands a bitmap tile by masked loads below density 0.5, by a register gather from it.
        "bitmap": nmspmm.prune.prune_bitmap(dense, 0.8),
        "bitmap-gathered": nmspmm.prune.prune_bitmap(dense, 0.25),
        "block": nmspmm.prune.prune_block_shuffled(dense, 0.5, (16, 16), search=False),
    }
    for name in ("nm-V16", "nm-V1"):  # 8-bit values: to_dense() is the dequantized weight
        weights[f"{name}-int8"] = weights[name].quantize(torch.int8)
        weights[f"{name}-fp8"] = weights[name].quantize(torch.float8_e4m3fn)
    return weights


KINDS = ["nm-V16", "nm-V1", "csr", "bitmap", "bitmap-gathered", "block", "nm-V16-int8", "nm-V16-fp8", "nm-V1-int8",
         "nm-V1-fp8"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_input_reaches_only_the_outputs_that_keep_its_feature(kind, backend, poison):
    weight = _weights()[kind]
    mask = weight.mask()
    # A feature some outputs keep and others prune, so that both meanings are seen.
    feature = int(((mask.sum(0) > 0) & (mask.sum(0) < mask.shape[0])).nonzero()[0])
    x = torch.randn(5, 128, device=DEVICE)
    x[2, feature] = poison
    y = nmspmm.linear(x, weight, backend=backend)
    reaches = mask[:, feature]
    assert not bool(torch.isfinite(y[2, reaches]).any())
    assert bool(torch.isfinite(y[2, ~reaches]).all()) and bool(torch.isfinite(y[[0, 1, 3, 4]]).all())
    clean = x.clone()
    clean[2, feature] = 0.0
    expected = clean.double() @ (weight.to_dense().double() * mask).t()
    assert relative_error(y[2, ~reaches], expected[2, ~reaches]) < TOLERANCE[torch.float32]
    assert relative_error(y[[0, 1, 3, 4]], expected[[0, 1, 3, 4]]) < TOLERANCE[torch.float32]
