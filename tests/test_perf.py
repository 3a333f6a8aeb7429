"""The performance model's counts and bounds, on made-up ceilings (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nmspmm.perf import (
    DeviceCeilings, _columns_per_sm, model_bitmap_case, model_block_case, model_case, model_csr_case,
    model_sddmm_case,
)

# L2 far faster than anything else, so that each test sees the floor it is about; test_l2_* set a real one.
CEILINGS = DeviceCeilings(
    "test", {"bfloat16": 800.0, "float16": 800.0, "float32": 50.0, "tf32": 400.0}, copy_tbps=3.0, l2_tbps=1e6,
    torch_version="", multiprocessors=132, launch_us=0.0,
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


@pytest.mark.parametrize("vector", [1, 64])
@pytest.mark.parametrize("values_dtype", [torch.float8_e4m3fn, torch.int8])
def test_8_bit_values_count_one_byte_each_and_the_scales(values_dtype, vector):
    bf16 = model_case(1, 4096, 4096, 8, 32, vector, torch.bfloat16, "bfloat16", CEILINGS)
    quantized = model_case(1, 4096, 4096, 8, 32, vector, torch.bfloat16, "bfloat16", CEILINGS, values_dtype)
    kept = 4096 // 32 * 8
    assert bf16.kernel_bytes - quantized.kernel_bytes == 4096 * kept * (2 - 1) - 4 * 4096
    assert quantized.dense_flops == bf16.dense_flops and quantized.kernel_bytes < bf16.kernel_bytes


def test_launch_cost_is_added_to_every_bound():
    launched = dataclasses.replace(CEILINGS, launch_us=2.0)
    decode = model_case(1, 4096, 4096, 8, 32, 64, torch.bfloat16, "bfloat16", launched)
    assert decode.kernel_ms == pytest.approx(2e-3 + decode.kernel_bytes / 3e9)
    assert decode.dense_ms == pytest.approx(2e-3 + decode.dense_bytes / 3e9)
    # The fixed cost weighs on the short sparse product more than on the dense one.
    assert 1 < decode.ideal_speedup < decode.dense_bytes / decode.kernel_bytes
    large = model_case(4096, 4096, 4096, 8, 32, 64, torch.bfloat16, "bfloat16", launched)
    expected = (2e-3 + large.dense_flops / 800e9) / (2e-3 + large.sparse_flops / 800e9)
    assert large.ideal_speedup == pytest.approx(expected)


def test_l2_floor_counts_one_gather_of_x_per_tile_of_output_features():
    ceilings = dataclasses.replace(CEILINGS, l2_tbps=7.0)
    kept = 4096 // 32 * 8
    for vector, tiles in ((64, 4096 // 64), (128, 4096 // 128), (256, 4096 // 128)):
        model = model_case(4096, 4096, 4096, 8, 32, vector, torch.bfloat16, "bfloat16", ceilings)
        weight = 4096 * kept * 2 + 4096 // vector * kept
        l2_bytes = 4096 * kept * 2 * tiles + weight * (4096 // 256) + 4096 * 4096 * 2
        assert model.kernel_ms == pytest.approx(l2_bytes / 7e9)
        assert model.op_ms == pytest.approx((l2_bytes + 2 * 4096 * 4096 * 2) / 7e9)
    # At V=64 the gathers, not the arithmetic, bound 8:32: the ideal is well under m/n = 4.
    assert model_case(4096, 4096, 4096, 8, 32, 64, torch.bfloat16, "bfloat16", ceilings).ideal_speedup < 2.5


def test_l2_floor_of_block_and_csr_gathers():
    ceilings = dataclasses.replace(CEILINGS, l2_tbps=7.0)
    block = model_block_case(2048, 4096, 4096, 4096, (32, 32), torch.float16, "float16", ceilings)
    weight = 4096 * 32 * 32 * 2 + 4096 * 4 + (4096 // 32 + 1) * 4 + 4096 * 4
    assert block.kernel_ms == pytest.approx((4096 * 32 * 2048 * 2 + weight * 16 + 2048 * 4096 * 2) / 7e9)
    nnz = 4096 * 4096 // 10
    csr = model_csr_case(4096, 4096, 4096, nnz, torch.bfloat16, "bfloat16", ceilings)
    weight = nnz * 6 + 4097 * 4
    # Each of the 132 SMs runs 31 rows, which at 10% density use all but 0.9**31 of the 4096 columns.
    gathered = 132 * 4096 * (1 - 0.9 ** (4096 / 132)) * 4096 * 2
    assert csr.kernel_ms == pytest.approx((gathered + weight * 64 + 4096 * 4096 * 2) / 7e9)
    # Very sparse: the rows of an SM share hardly any column, and the floor nears one gather per nonzero.
    assert 132 * _columns_per_sm(4096, 4096, 1000, ceilings) == pytest.approx(1000, rel=0.01)


def test_exact_fp32_multiplies_at_a_third_of_the_tf32_rate():
    model = model_case(4096, 4096, 4096, 8, 32, 32, torch.float32, "float32", CEILINGS)
    assert model.dense_ms == pytest.approx(2 * 4096**3 / 50e9)
    assert model.kernel_ms == pytest.approx(2 * 4096**3 / 4 / (400e9 / 3))
    slow_tf32 = dataclasses.replace(CEILINGS, matmul_tflops={**CEILINGS.matmul_tflops, "tf32": 120.0})
    fma_bound = model_case(4096, 4096, 4096, 8, 32, 32, torch.float32, "float32", slow_tf32)
    assert fma_bound.ideal_speedup == pytest.approx(4)


def test_tensor_core_rate_rejects_an_unknown_precision():
    from nmspmm.perf import tensor_core_tflops

    assert tensor_core_tflops("bfloat16", CEILINGS) == 800.0
    with pytest.raises(ValueError, match=r"precision: expected one of \['bfloat16', .*\], got 'int8'"):
        tensor_core_tflops("int8", CEILINGS)


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


def test_sddmm_bound_is_the_cheaper_algorithm():
    # Half precision at 50%: the dense tiles on tensor cores beat dot products on FMA units by 8x.
    half = model_sddmm_case(4096, 4096, 4096, 4096 * 4096 // 2, torch.bfloat16, "bfloat16", CEILINGS)
    assert half.kernel_ms == pytest.approx(2 * 4096**3 / 800e9)
    assert half.ideal_speedup == pytest.approx(1.0)
    # Exact fp32 at 2%: 2% of the products on FMA units (50) beat all of them at a third of tf32 (400 / 3).
    exact = model_sddmm_case(4096, 4096, 4096, 4096 * 4096 // 50, torch.float32, "float32", CEILINGS)
    assert exact.kernel_ms == pytest.approx(2 * 4096 * 4096 * 4096 / 50 / 50e9)
    # With a real L2, the tiles' operand reads (depth x 256 rows per 128 x 128 tile) bound them.
    ceilings = dataclasses.replace(CEILINGS, l2_tbps=7.0)
    tiled = model_sddmm_case(4096, 4096, 4096, 4096 * 4096 // 2, torch.bfloat16, "bfloat16", ceilings)
    assert tiled.kernel_ms == pytest.approx((4096**3 * 2 / 64 + 4096 * 4096 // 2 * 6) / 7e9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vector", [16, 32, 64, 128])
def test_configs_for_the_suite_fit_the_kernel(monkeypatch, dtype, vector):
    """Every suite shape and token count (decode included) gets a launchable config on a 132-SM device: tiles
    that stay inside a V-group and divide N, pipelined operand tiles within the H100's shared memory, and split-K
    only for few tokens."""
    from nmspmm.bench.cases import load_suite
    from nmspmm.kernels import nm_vector

    monkeypatch.setattr(nm_vector, "multiprocessors", lambda device: 132)
    suite = load_suite()
    for tokens in suite["tokens_M"] + suite["decode_tokens_M"] + [7, 333]:
        for rows, cols in suite["layers_NK"]:
            kept = cols // 32 * 8
            # __wrapped__: the uncached choice, so the made-up SM count never reaches the cache a GPU run uses.
            config = nm_vector._choose_vector_config.__wrapped__(
                tokens, rows, kept, vector, dtype, torch.device("cuda"), False
            )
            assert vector % config.block_n == 0 and rows % config.block_n == 0
            assert config.split_k == 1 or tokens <= 64
            assert config.block_m >= min(tokens, 16)
            element = torch.finfo(dtype).bits // 8
            staged = config.num_stages * config.block_k * (config.block_m + config.block_n) * element
            assert staged <= 232448, (tokens, rows, config)


def test_few_token_tiles_widen_and_split_where_the_grid_is_short():
    from nmspmm.kernels.nm_vector import _few_tokens_config

    def tile(tokens, rows, kept, dtype=torch.bfloat16):
        config = _few_tokens_config(tokens, rows, kept, 64, dtype, 132)
        return config.block_m, config.block_n, config.block_k, config.num_stages, config.split_k

    assert tile(16, 4096, 2048) == (16, 32, 256, 3, 2)  # 128 tiles, 64K weights each: split two ways
    assert tile(16, 11008, 2048) == (16, 32, 128, 3, 1)  # 344 tiles: shorter K steps, no split
    assert tile(1, 8192, 2752) == (16, 64, 128, 3, 4)  # one token: 64-wide tiles, 128 features per SM
    assert tile(1, 2048, 2816) == (16, 64, 128, 3, 8)  # at most 8 ways
    assert tile(1, 22016, 2048) == (16, 64, 128, 3, 1)  # 22016 rows already give 167 per SM
    assert tile(1, 2048, 256) == (16, 32, 256, 3, 1)  # a short row keeps the 16-token tiles: no split
    assert tile(1, 8192, 2752, torch.float32) == (16, 32, 128, 3, 2)  # fp32 keeps the 16-token rule
    assert tile(64, 4096, 2048) == (64, 64, 128, 3, 4)  # 64 tiles of 64 features, split four ways
    assert tile(64, 4096, 512) == (64, 64, 128, 3, 1)  # 32K weights a tile: not worth a second launch
    assert tile(64, 11008, 2048) == (64, 64, 128, 3, 1)  # 172 tiles fill the SMs
    assert tile(64, 4096, 2048, torch.float32)[2] == 64


def test_eight_bit_values_take_64_by_128_decode_tiles_split_to_three_programs_per_sm(monkeypatch):
    from nmspmm.kernels import nm_vector

    monkeypatch.setattr(nm_vector, "multiprocessors", lambda device: 132)

    def tile(tokens, rows, kept, eight_bit=True, dtype=torch.bfloat16):
        config = nm_vector._choose_vector_config.__wrapped__(
            tokens, rows, kept, 64, dtype, torch.device("cuda"), False, eight_bit
        )
        return config.block_m, config.block_n, config.block_k, config.split_k, config.weight_first

    assert tile(1, 4096, 1024) == (16, 64, 128, 4, True)  # 64 tiles: 256 programs
    assert tile(16, 11008, 1024) == (16, 64, 128, 2, True)  # 172 tiles: 344 programs
    assert tile(1, 14336, 1024)[3] == 1  # 224 tiles: a split would exceed three programs per SM
    assert tile(1, 4096, 256)[3] == 2 and tile(1, 4096, 128)[3] == 1  # every share keeps a whole K step
    assert tile(64, 4096, 1024) == tile(64, 4096, 1024, eight_bit=False)  # from 17 tokens the activations' tiles
    assert tile(1, 4096, 1024, dtype=torch.float32) == tile(1, 4096, 1024, False, torch.float32)


def test_element_wise_tiles_gather_where_half_the_inputs_are_kept():
    from nmspmm.kernels.nm_element import gathers_tile

    assert gathers_tile(2, 4, 128) and gathers_tile(4, 8, 128) and gathers_tile(16, 32, 128)
    assert not gathers_tile(8, 32, 128) and not gathers_tile(3, 8, 128)  # a quarter / three eighths kept
    assert not gathers_tile(6, 8, 128) and not gathers_tile(3, 4, 128)  # 96 kept values: no power-of-two block
    assert gathers_tile(32, 64, 64) and not gathers_tile(30, 64, 64)


def test_v64_half_tiles_follow_the_grid_size():
    from nmspmm.kernels.nm_vector import _half_tile_v64

    assert _half_tile_v64(256, 4096, 132) == (64, 128, 8, 3, True)  # 128 tiles of 128 tokens: one wave
    assert _half_tile_v64(512, 4096, 132) == (64, 64, 4, 3, True)  # 256: two waves
    assert _half_tile_v64(256, 11008, 132) == (128, 64, 4, 3, True)  # 344: more
    assert _half_tile_v64(4096, 4096, 132) == (128, 64, 4, 3, True)


@pytest.mark.parametrize("pattern,stored", [("2:4", 2), ("3:4", 1), ("8:32", 8)])
def test_element_wise_nm_multiplies_the_expanded_tile_and_reads_the_stored_bytes(pattern, stored):
    # V=1 expands each tile to dense: the dense FLOPs on tensor cores, x read without a transpose, and per group
    # of m the kept values plus min(n, m - n) stored offsets.
    n, m = (int(part) for part in pattern.split(":"))
    model = model_case(64, 4096, 4096, n, m, 1, torch.bfloat16, "bfloat16", CEILINGS)
    assert model.sparse_flops == model.dense_flops
    assert model.op_bytes == model.kernel_bytes
    groups = 4096 * 4096 // m
    assert model.kernel_bytes - model.dense_bytes + 4096 * 4096 * 2 == groups * (2 * n + stored)
    decode = model_case(1, 4096, 4096, n, m, 1, torch.bfloat16, "bfloat16", CEILINGS)
    assert decode.ideal_speedup == pytest.approx(decode.dense_bytes / decode.kernel_bytes, rel=0.02)


@pytest.mark.parametrize("tokens,rows", [(65, 4096), (4096, 4096), (256, 11008)])
def test_products_beyond_the_kernels_range_count_the_dense_expansion(tokens, rows):
    # bf16 V=1 and bitmaps beyond 64 tokens: a pass reads the stored weight and writes it dense, the dense product
    # follows at its bound, then a check reads x or y, whichever is smaller (made-up launch cost: 2 us each of 4).
    launched = dataclasses.replace(CEILINGS, launch_us=2.0)
    cols, size, copy = 4096, 2, launched.copy_tbps * 1e9
    stored = rows * cols // 4 * (2 * 2 + 2)
    nnz = rows * cols // 2
    bitmap_stored = nnz * size + rows * cols // 32 * 4 + rows * cols // 128 * 4
    for model, weight in (
        (model_case(tokens, rows, cols, 2, 4, 1, torch.bfloat16, "bfloat16", launched), stored),
        (model_bitmap_case(tokens, rows, cols, nnz, torch.bfloat16, "bfloat16", launched), bitmap_stored),
    ):
        dense = model_case(tokens, rows, cols, 2, 4, 64, torch.bfloat16, "bfloat16", launched).dense_ms
        expected = dense + 3 * 0.002 + (weight + rows * cols * size + tokens * min(rows, cols) * size) / copy
        assert model.kernel_ms == pytest.approx(expected) and model.op_ms == model.kernel_ms
        assert model.dense_ms == pytest.approx(dense) and model.ideal_speedup < 1
        assert model.kernel_bytes == weight + rows * cols * size + model.dense_bytes + tokens * min(rows, cols) * size


def test_fp32_and_8_bit_products_keep_the_kernels_model_beyond_64_tokens():
    fp32 = model_case(4096, 4096, 4096, 2, 4, 1, torch.float32, "float32", CEILINGS)
    eight_bit = model_case(4096, 4096, 4096, 2, 4, 1, torch.bfloat16, "bfloat16", CEILINGS, torch.int8)
    for model in (fp32, eight_bit):
        assert model.kernel_bytes < model.dense_bytes  # the stored weight only, no dense copy
    assert eight_bit.kernel_ms == pytest.approx(eight_bit.dense_ms)  # both arithmetic-bound, dense FLOPs


def test_bitmap_counts_its_bytes_and_the_dense_flops():
    # Values, one bit per weight and an int32 block offset per 128 inputs; tiles are expanded and multiplied whole.
    nnz = 4096 * 4096 * 3 // 10
    decode = model_bitmap_case(1, 4096, 4096, nnz, torch.bfloat16, "bfloat16", CEILINGS)
    weight = nnz * 2 + 4096 * 128 * 4 + 4096 * 32 * 4
    assert decode.kernel_bytes == (4096 + 4096) * 2 + weight
    assert decode.op_bytes == decode.kernel_bytes  # x read as stored
    assert decode.ideal_speedup == pytest.approx(decode.dense_ms / decode.kernel_ms)
    prefill = model_bitmap_case(4096, 4096, 4096, nnz, torch.bfloat16, "bfloat16", CEILINGS)
    assert prefill.sparse_flops == prefill.dense_flops == 2 * 4096**3
