"""The performance model's counts and bounds, on made-up ceilings (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from nmspmm.perf import DeviceCeilings, model_block_case, model_case, model_csr_case, model_sddmm_case

CEILINGS = DeviceCeilings(
    "test", {"bfloat16": 800.0, "float16": 800.0, "float32": 50.0, "tf32": 400.0}, copy_tbps=3.0, torch_version=""
)


def test_nm_compute_bound_ideal_is_m_over_n():
    model = model_case(4096, 4096, 4096, 8, 32, 64, torch.bfloat16, "bfloat16", CEILINGS)
    assert model.dense_flops == 2 * 4096**3 and model.sparse_flops == model.dense_flops / 4
    assert model.dense_ms == pytest.approx(2 * 4096**3 / 800e9)
    assert model.ideal_speedup == pytest.approx(4.0)
    assert model.op_bytes - model.kernel_bytes == 2 * 4096 * 4096 * 2


def test_nm_decode_ideal_is_the_byte_ratio():
    model = model_case(1, 4096, 4096, 8, 32, 64, torch.bfloat16, "bfloat16", CEILINGS)
    kept = 4096 // 32 * 8
    weight = 4096 * kept * 2 + 4096 // 64 * kept
    assert model.kernel_bytes == (4096 + 4096) * 2 + weight
    assert model.ideal_speedup == pytest.approx(model.dense_bytes / model.kernel_bytes)


def test_csr_runs_at_the_fma_rate_and_counts_indices():
    nnz = 4096 * 4096 // 10
    model = model_csr_case(4096, 4096, 4096, nnz, torch.bfloat16, "bfloat16", CEILINGS)
    assert model.sparse_flops == 2 * 4096 * nnz
    assert model.kernel_ms == pytest.approx(2 * 4096 * nnz / 50e9)
    decode = model_csr_case(1, 4096, 4096, nnz, torch.bfloat16, "bfloat16", CEILINGS)
    assert decode.kernel_bytes == (4096 + 4096) * 2 + nnz * 6 + 4097 * 4


def test_block_needs_no_transpose():
    model = model_block_case(2048, 4096, 4096, 4096, (32, 32), torch.float16, "float16", CEILINGS)
    assert model.op_bytes == model.kernel_bytes and model.op_ms == model.kernel_ms
    assert model.sparse_flops == 2 * 2048 * 4096 * 32 * 32
    assert model.ideal_speedup == pytest.approx(4.0)


def test_sddmm_against_the_full_dense_product():
    model = model_sddmm_case(4096, 4096, 1024, 4096 * 4096 // 50, torch.float32, "float32", CEILINGS)
    assert model.dense_flops == 2 * 4096 * 4096 * 1024
    assert model.ideal_speedup == pytest.approx(50.0, rel=1e-3)
