"""Backward kernels of ``Y = X @ W.T`` for an N:M sparse ``W`` (values ``[N, KEPT]``, uint8 kept offsets
``[N // V, KEPT]``, KEPT = K * n / m; kept entry ``kk`` of V-group ``g`` sits in input column
``(kk // n) * m + kept_offsets[g, kk]``).

* ``dX = dY @ W`` (:func:`nm_grad_input`), two methods:

  - ``"scatter"`` (V >= 16): a tile of tokens times one V-group gives a dense partial product over the
    group's kept entries (tensor cores, sparse FLOPs only); different V-groups may keep the same input
    column, so partials are added into an fp32 ``dX`` with atomics (order-dependent rounding).
  - ``"dense"`` (any V, the default for V = 1): each program owns a tile of ``dX`` and rebuilds the
    matching dense tile of ``W`` in registers, finding every column's kept index by a binary search over
    the ascending offsets (log2(n) + 2 gathers), then runs a dense tensor-core product over all N rows.
    No atomics, deterministic, dense FLOPs (m / n times the sparse count).

* ``dValues`` (:func:`nm_grad_values`), the SDDMM: ``dValues[r, kk] = sum_t dY[t, r] * X[t, column]``,
  the gradient of the kept weights only. V >= 16: a tile of rows of one V-group shares its gathered
  columns, so it is a dense product ``dY^T @ X_gathered`` over token blocks. V = 1: every row has its own
  columns, so FMA units (SIMT) over a 3-D tile.

``X`` is read feature-major (``x_t = X.T``, [K, M]) as in the forward kernels, so every gathered
feature is one contiguous row of tokens. Accumulation is fp32 throughout; fp32 inputs multiply as
``input_precision`` says (``"ieee"`` FMA by default; ``nmspmm.ops`` passes ``"tf32x3"`` or ``"tf32"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreter_active, launch, upcasts_bf16

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BackwardConfig:
    """Tile shape and pipelining of one backward launch.

    ``block_m``: tokens per tile (the reduction chunk in :func:`nm_grad_values`); ``block_n``: weight rows
    per tile (the reduction chunk in :func:`nm_grad_input`; must divide V where a tile stays inside one
    V-group); ``block_k``: kept entries per tile, or dense input columns for the ``"dense"`` method.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def default_backward_config(kernel: str, vector: int) -> BackwardConfig:
    """Simple starting tiles (not tuned) for ``kernel`` in {"grad_input_scatter", "grad_input_dense",
    "grad_values"}; small ones under the interpreter, which runs every program in Python."""
    if interpreter_active():
        if kernel == "grad_values" and vector == 1:
            return BackwardConfig(16, 16, 8, num_stages=1)
        return BackwardConfig(16, 32 if vector == 1 else min(vector, 32), 32, num_stages=1)
    if kernel == "grad_input_scatter":
        return BackwardConfig(64, min(vector, 64), 64, num_warps=4, num_stages=3)
    if kernel == "grad_input_dense":
        return BackwardConfig(64, 32, 64, num_warps=4, num_stages=3)
    if kernel == "grad_values":
        if vector == 1:
            return BackwardConfig(32, 16, 8, num_warps=4, num_stages=2)
        return BackwardConfig(64, min(vector, 64), 64, num_warps=4, num_stages=3)
    raise ValueError(f"kernel: expected grad_input_scatter, grad_input_dense or grad_values, got {kernel!r}")


def _check_common(values_shape: tuple[int, ...], kept_offsets: torch.Tensor, n: int, m: int, vector: int) -> None:
    """Checks shared by both launchers: the values' ``(N, KEPT)`` against the offsets, pattern and vector."""
    rows, kept = values_shape
    if vector not in (1, 16, 32, 64, 128):
        raise ValueError(f"vector: expected one of 1, 16, 32, 64, 128, got {vector}")
    if not 1 <= n < m or kept % n:
        raise ValueError(f"pattern: need 1 <= n < m and n | KEPT, got n={n}, m={m}, KEPT={kept}")
    if rows % vector:
        raise ValueError(f"vector: V={vector} must divide N={rows}")
    if kept_offsets.dtype != torch.uint8 or tuple(kept_offsets.shape) != (rows // vector, kept):
        raise ValueError(
            f"kept_offsets: expected uint8 [{rows // vector}, {kept}], "
            f"got {kept_offsets.dtype} {tuple(kept_offsets.shape)}"
        )


def _input_precision(dtype: torch.dtype, input_precision: str) -> tuple[str, bool]:
    """(precision for tl.dot, whether to upcast bf16 tiles): the interpreter's bf16 tl.dot is wrong."""
    upcast = upcasts_bf16(dtype)
    return ("ieee" if upcast else input_precision), upcast


# ---------------------------------------------------------------------------------------------------------
# dX = dY @ W, "scatter": sparse partial products per V-group, atomically added into fp32 dX.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _nm_grad_input_scatter_kernel(
    dy_ptr, values_ptr, offsets_ptr, dx_ptr,
    M, KEPT, NUM_GROUPS,
    stride_dym, stride_dyn, stride_vn, stride_vk, stride_dxm, stride_dxk,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dX[tokens, columns(g, kk-block)] += dY[tokens, rows of V-group g] @ values[rows, kk-block]."""
    # kk-blocks vary fastest, so programs running together share one dY tile (and one V-group's values).
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(KEPT, BLOCK_K)
    pid_k = pid % num_pid_k
    pid_g = (pid // num_pid_k) % NUM_GROUPS
    pid_m = pid // (num_pid_k * NUM_GROUPS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = kk < KEPT
    offset = tl.load(offsets_ptr + pid_g * KEPT + kk, mask=k_valid, other=0).to(tl.int32)
    column = (kk // N_KEEP) * GROUP + offset

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, VECTOR, BLOCK_N):
        rows = pid_g * VECTOR + r0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn, mask=m_valid[:, None], other=0.0
        )
        w = tl.load(
            values_ptr + rows[:, None] * stride_vn + kk[None, :] * stride_vk, mask=k_valid[None, :], other=0.0
        )
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    # Kept columns within one V-group are distinct, so collisions come only from other programs.
    tl.atomic_add(
        dx_ptr + offs_m[:, None] * stride_dxm + column[None, :] * stride_dxk, acc,
        mask=m_valid[:, None] & k_valid[None, :], sem="relaxed",
    )


def _grad_input_scatter(
    grad_y: torch.Tensor, values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int,
    out: torch.Tensor, config: BackwardConfig, input_precision: str,
) -> torch.Tensor:
    """Launch the scatter kernel into ``out`` (zeroed here); an fp32 ``out`` takes the atomics itself,
    any other dtype gets them through an fp32 buffer that is cast at the end."""
    tokens = grad_y.shape[0]
    rows, kept = values.shape
    if vector % config.block_n:
        raise ValueError(f"config: block_n={config.block_n} must divide vector={vector}")
    target = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    target.zero_()
    precision, upcast = _input_precision(values.dtype, input_precision)
    groups = rows // vector
    grid = (cdiv(tokens, config.block_m) * groups * cdiv(kept, config.block_k),)
    launch(
        _nm_grad_input_scatter_kernel, grid,
        (
            grad_y, values, kept_offsets, target, tokens, kept, groups, grad_y.stride(0), grad_y.stride(1),
            values.stride(0), values.stride(1), target.stride(0), target.stride(1),
        ),
        dict(
            N_KEEP=n, GROUP=m, VECTOR=vector, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            INPUT_PRECISION=precision, UPCAST=upcast,
        ),
        config.num_warps, config.num_stages,
    )
    if target is not out:
        out.copy_(target)
    return out


# ---------------------------------------------------------------------------------------------------------
# dX = dY @ W, "dense": dense tiles of W rebuilt in registers (binary search over kept offsets).
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _nm_grad_input_dense_kernel(
    dy_ptr, values_ptr, offsets_ptr, dx_ptr,
    M, N, K, KEPT,
    stride_dym, stride_dyn, stride_vn, stride_vk, stride_dxm, stride_dxk,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr,
    SEARCH_TOP: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dX[tokens, columns] = sum over row blocks of dY[tokens, rows] @ W_dense[rows, columns]."""
    # Column blocks vary fastest, so programs running together share one band of dY.
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_k = pid % num_pid_k
    pid_m = pid // num_pid_k

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_valid = cols < K
    position = (cols % GROUP)[None, :]
    group_base = ((cols // GROUP) * N_KEEP)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_valid = rows < N
        valid = r_valid[:, None] & c_valid[None, :]
        entry = (rows // VECTOR)[:, None] * KEPT + group_base  # first kept entry of the column's group of m
        # lower bound: index = how many kept offsets of the group are < position (they are ascending).
        index = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
        for s in tl.static_range(SEARCH_STEPS):
            probe = index + ((SEARCH_TOP >> s) - 1)
            probed = tl.load(offsets_ptr + entry + probe, mask=valid & (probe < N_KEEP), other=GROUP).to(tl.int32)
            index = tl.where(probed < position, index + (SEARCH_TOP >> s), index)
        found = valid & (index < N_KEEP)
        found = found & (tl.load(offsets_ptr + entry + index, mask=found, other=GROUP).to(tl.int32) == position)
        kept_entry = group_base + index
        w = tl.load(values_ptr + rows[:, None] * stride_vn + kept_entry * stride_vk, mask=found, other=0.0)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn,
            mask=m_valid[:, None] & r_valid[None, :], other=0.0,
        )
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
        mask=m_valid[:, None] & c_valid[None, :],
    )


def _grad_input_dense(
    grad_y: torch.Tensor, values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int,
    out: torch.Tensor, config: BackwardConfig, input_precision: str,
) -> torch.Tensor:
    """Launch the dense-rebuild kernel, writing every element of ``out`` once (no zeroing needed)."""
    tokens, cols = out.shape
    rows, kept = values.shape
    precision, upcast = _input_precision(values.dtype, input_precision)
    grid = (cdiv(tokens, config.block_m) * cdiv(cols, config.block_k),)
    launch(
        _nm_grad_input_dense_kernel, grid,
        (
            grad_y, values, kept_offsets, out, tokens, rows, cols, kept, grad_y.stride(0), grad_y.stride(1),
            values.stride(0), values.stride(1), out.stride(0), out.stride(1),
        ),
        dict(
            N_KEEP=n, GROUP=m, VECTOR=vector, SEARCH_TOP=1 << (n.bit_length() - 1), SEARCH_STEPS=n.bit_length(),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, INPUT_PRECISION=precision,
            UPCAST=upcast,
        ),
        config.num_warps, config.num_stages,
    )
    return out


def nm_grad_input(
    grad_y: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    vector: int,
    cols: int,
    out: torch.Tensor | None = None,
    *,
    method: str | None = None,
    config: BackwardConfig | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``dX = grad_y @ W`` ([M, cols]) for the N:M ``W`` given as ``values`` [N, KEPT] and uint8
    ``kept_offsets`` [N // V, KEPT]; ``grad_y`` is [M, N] with any strides and ``values``' dtype.

    Returns ``dX`` in ``grad_y``'s dtype, or writes it into ``out`` ([M, cols], any strides, any float
    dtype; an fp32 ``out`` lets the scatter method accumulate in place). ``method`` is ``"scatter"``
    (V >= 16 only; the default there) or ``"dense"`` (the default for V = 1); see the module docstring.
    """
    tokens, rows = grad_y.shape
    _check_common(tuple(values.shape), kept_offsets, n, m, vector)
    if values.shape[0] != rows:
        raise ValueError(f"grad_y: expected [M, {values.shape[0]}], got {tuple(grad_y.shape)}")
    if cols != values.shape[1] // n * m:
        raise ValueError(f"cols: expected KEPT / n * m = {values.shape[1] // n * m}, got {cols}")
    if grad_y.dtype != values.dtype or values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad_y: dtype {grad_y.dtype} must match values' dtype {values.dtype} (fp16/bf16/fp32)")
    if out is None:
        out = torch.empty((tokens, cols), dtype=grad_y.dtype, device=grad_y.device)
    elif tuple(out.shape) != (tokens, cols) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out: expected a float tensor [{tokens}, {cols}], got {out.dtype} {tuple(out.shape)}")
    method = method or ("dense" if vector == 1 else "scatter")
    if method not in ("scatter", "dense") or (method == "scatter" and vector == 1):
        raise ValueError(f"method: expected 'dense', or 'scatter' with V >= 16; got {method!r} with V={vector}")
    if tokens == 0:
        return out
    kept_offsets = kept_offsets.contiguous()
    if method == "scatter":
        config = config or default_backward_config("grad_input_scatter", vector)
        return _grad_input_scatter(grad_y, values, kept_offsets, n, m, vector, out, config, input_precision)
    config = config or default_backward_config("grad_input_dense", vector)
    return _grad_input_dense(grad_y, values, kept_offsets, n, m, vector, out, config, input_precision)


# ---------------------------------------------------------------------------------------------------------
# dValues: SDDMM, the dense gradient dY^T @ X sampled at the kept positions.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _nm_grad_values_vector_kernel(
    xt_ptr, dy_ptr, offsets_ptr, dv_ptr,
    M, KEPT,
    stride_xk, stride_xm, stride_dym, stride_dyn, stride_dvn, stride_dvk,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr, VECTOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dValues[rows, kk-block] = sum over token blocks of dY^T[rows, tokens] @ X[tokens, columns(g, kk)]:
    all BLOCK_N rows lie in one V-group, so they share the gathered columns."""
    # kk-blocks vary fastest, so programs running together share one band of dY columns.
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(KEPT, BLOCK_K)
    pid_k = pid % num_pid_k
    pid_n = pid // num_pid_k

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = kk < KEPT
    group = (pid_n * BLOCK_N) // VECTOR
    offset = tl.load(offsets_ptr + group * KEPT + kk, mask=k_valid, other=0).to(tl.int32)
    column = (kk // N_KEEP) * GROUP + offset

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, M, BLOCK_M):
        offs_m = t0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        dyt = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + offs_m[None, :] * stride_dym, mask=m_valid[None, :], other=0.0
        )
        x = tl.load(
            xt_ptr + column[None, :] * stride_xk + offs_m[:, None] * stride_xm,
            mask=m_valid[:, None] & k_valid[None, :], other=0.0,
        )
        if UPCAST:
            dyt = dyt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)
    tl.store(
        dv_ptr + rows[:, None] * stride_dvn + kk[None, :] * stride_dvk, acc.to(dv_ptr.dtype.element_ty),
        mask=k_valid[None, :],
    )


def _grad_values_vector(
    x_t: torch.Tensor, grad_y: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int,
    out: torch.Tensor, config: BackwardConfig, input_precision: str,
) -> torch.Tensor:
    """Launch the tensor-core SDDMM (V >= 16); each tile of rows must stay inside one V-group."""
    tokens = x_t.shape[1]
    rows, kept = out.shape
    if vector % config.block_n:
        raise ValueError(f"config: block_n={config.block_n} must divide vector={vector}")
    precision, upcast = _input_precision(grad_y.dtype, input_precision)
    grid = (rows // config.block_n * cdiv(kept, config.block_k),)
    launch(
        _nm_grad_values_vector_kernel, grid,
        (
            x_t, grad_y, kept_offsets, out, tokens, kept, x_t.stride(0), x_t.stride(1), grad_y.stride(0),
            grad_y.stride(1), out.stride(0), out.stride(1),
        ),
        dict(
            N_KEEP=n, GROUP=m, VECTOR=vector, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            INPUT_PRECISION=precision, UPCAST=upcast,
        ),
        config.num_warps, config.num_stages,
    )
    return out


@triton.jit
def _nm_grad_values_element_kernel(
    xt_ptr, dy_ptr, offsets_ptr, dv_ptr,
    M, N, KEPT,
    stride_xk, stride_xm, stride_dym, stride_dyn, stride_dvn, stride_dvk,
    N_KEEP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """V = 1: dValues[r, kk] = sum_t dY[t, r] * X[t, column(r, kk)] with per-row columns, on FMA units.
    Per-thread partial sums live in a [tokens, rows, kept] tile that is reduced once at the end."""
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(KEPT, BLOCK_K)
    pid_k = pid % num_pid_k
    pid_n = pid // num_pid_k

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = (rows < N)[:, None] & (kk < KEPT)[None, :]
    offset = tl.load(offsets_ptr + rows[:, None] * KEPT + kk[None, :], mask=valid, other=0).to(tl.int32)
    column = (kk // N_KEEP)[None, :] * GROUP + offset

    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, M, BLOCK_M):
        offs_m = t0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn,
            mask=m_valid[:, None] & (rows < N)[None, :], other=0.0,
        ).to(tl.float32)
        x = tl.load(
            xt_ptr + column[None, :, :] * stride_xk + offs_m[:, None, None] * stride_xm,
            mask=m_valid[:, None, None] & valid[None, :, :], other=0.0,
        ).to(tl.float32)
        acc += x * dy[:, :, None]
    tl.store(
        dv_ptr + rows[:, None] * stride_dvn + kk[None, :] * stride_dvk,
        tl.sum(acc, axis=0).to(dv_ptr.dtype.element_ty), mask=valid,
    )


def _grad_values_element(
    x_t: torch.Tensor, grad_y: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int,
    out: torch.Tensor, config: BackwardConfig,
) -> torch.Tensor:
    """Launch the SIMT SDDMM (V = 1); rows need not fill the last tile."""
    tokens = x_t.shape[1]
    rows, kept = out.shape
    grid = (cdiv(rows, config.block_n) * cdiv(kept, config.block_k),)
    launch(
        _nm_grad_values_element_kernel, grid,
        (
            x_t, grad_y, kept_offsets, out, tokens, rows, kept, x_t.stride(0), x_t.stride(1), grad_y.stride(0),
            grad_y.stride(1), out.stride(0), out.stride(1),
        ),
        dict(
            N_KEEP=n, GROUP=m, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        ),
        config.num_warps, config.num_stages,
    )
    return out


def nm_grad_values(
    x_t: torch.Tensor,
    grad_y: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    vector: int,
    out: torch.Tensor | None = None,
    *,
    config: BackwardConfig | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``dValues`` [N, KEPT]: ``(grad_y.T @ X)`` at the kept positions only, for ``x_t = X.T`` [K, M] and
    ``grad_y`` [M, N] (both any strides, same dtype; feature-major ``x_t`` keeps the gathers coalesced).

    Returns it in ``grad_y``'s dtype, or writes it into ``out`` ([N, KEPT], any strides, any float dtype).
    """
    cols, tokens = x_t.shape
    rows = grad_y.shape[1]
    kept = cols // m * n
    _check_common((rows, kept), kept_offsets, n, m, vector)
    if grad_y.shape[0] != tokens or cols % m:
        raise ValueError(f"x_t [K, M] and grad_y [M, N] disagree: {tuple(x_t.shape)}, {tuple(grad_y.shape)}")
    if grad_y.dtype != x_t.dtype or grad_y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grad_y: dtype {grad_y.dtype} must match x_t's dtype {x_t.dtype} (fp16/bf16/fp32)")
    if out is None:
        out = torch.empty((rows, kept), dtype=grad_y.dtype, device=grad_y.device)
    elif tuple(out.shape) != (rows, kept) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out: expected a float tensor [{rows}, {kept}], got {out.dtype} {tuple(out.shape)}")
    kept_offsets = kept_offsets.contiguous()
    config = config or default_backward_config("grad_values", vector)
    if vector == 1:
        return _grad_values_element(x_t, grad_y, kept_offsets, n, m, out, config)
    return _grad_values_vector(x_t, grad_y, kept_offsets, n, m, vector, out, config, input_precision)
