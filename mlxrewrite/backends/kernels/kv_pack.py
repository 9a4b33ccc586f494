"""New K/V rows of a quantized cache in one call: `mx.quantize` of both, laid out as packed cache rows.

mlx-lm's `QuantizedKVCache` keeps six buffers per layer (K and V weights, scales, biases) and adds each token
with two quantize calls and six slice updates: on a GPU decode step, where every op costs the host several
microseconds, that is more than the attention itself. A packed cache (mlxrewrite.mlx_lm.packed_cache)
keeps one buffer (`kv_layout`); `kv_pack` gives one token's (or a prompt's) rows of it, which the cache
writes with one slice update, or (`in_place_writer`, on CUDA) the kernel writes into the buffer itself. The
numbers are `mx.quantize`'s, bitwise.

`reference` is the definition in MLX ops. The CUDA kernel (kv_pack_cuda) is used only where `verified`
found it bitwise equal to the installed `mx.quantize` on this device, for that dtype, bits, group size and
head dims, over a battery of values (ranges from 1e-4 to 1e3, constant and zero groups, one-signed groups,
a transposed view).
"""

from __future__ import annotations

import functools
from functools import lru_cache
from typing import Callable

import mlx.core as mx

from . import kv_pack_cuda as cuda
from .kv_layout import Chain, Packed, Row
from .quantized_sdpa import on_cuda


def reference(keys: mx.array, values: mx.array, group_size: int, bits: int, row: Row | None = None) -> mx.array:
    """The packed rows of `mx.quantize` of keys and values (B, H, n, D), laid out as `row` (by default the
    row of keys' dtype; another row's dtype takes the scales cast to it, as mlx-lm's buffers would)."""
    row = row or Row.of(keys.shape[-1], values.shape[-1], group_size, bits, keys.dtype)
    return row.join(mx.quantize(keys, group_size=group_size, bits=bits),
                    mx.quantize(values, group_size=group_size, bits=bits))


def kv_pack(keys: mx.array, values: mx.array, group_size: int, bits: int, row: Row | None = None) -> mx.array:
    """`reference`'s rows: the CUDA kernel where `verified` (and `row` is that of keys' dtype), else `reference`."""
    launch = None
    if on_cuda() and (row is None or row.dtype == keys.dtype):
        launch = _launcher(keys.shape, values.shape, keys.dtype, values.dtype, group_size, bits)
    return launch(keys, values) if launch is not None else reference(keys, values, group_size, bits, row)


def in_place_writer(keys: mx.array, values: mx.array, group_size: int, bits: int,
                    row: Row) -> Callable[[mx.array, mx.array, mx.array, mx.array], mx.array] | None:
    """The kernel writing `kv_pack`'s rows of keys and values like these straight into a buffer of `row`s:
    `write(keys, values, kv, at)` fills rows `at` .. `at` + n of `kv` in place and returns the row count after
    them (int32, 0-d). None where it does not serve them (not CUDA, another row dtype, not `verified`).

    MLX does not know the buffer is written: the caller must make every reader of those rows take the count
    (or wait for it), and must own the rows (no other array may show them: mlxrewrite.mlx_lm.packed_cache)."""
    if not on_cuda() or row.dtype != keys.dtype:
        return None
    return _launcher(keys.shape, values.shape, keys.dtype, values.dtype, group_size, bits, True)


def packed(keys: mx.array, values: mx.array, group_size: int, bits: int, n: int | None = None,
           chain: Chain | None = None) -> Packed:
    """Rows [:n] (default all) of a packed cache holding keys and values (B, H, N, D) quantized (`reference`)."""
    row = Row.of(keys.shape[-1], values.shape[-1], group_size, bits, keys.dtype)
    return Packed(reference(keys, values, group_size, bits, row), keys.shape[2] if n is None else n, row, chain)


@lru_cache(maxsize=1024)
def _launcher(k_shape: tuple, v_shape: tuple, k_dtype: mx.Dtype, v_dtype: mx.Dtype, group_size: int,
              bits: int, in_place: bool = False) -> Callable | None:
    """The kernel's launch for rows of these shapes (once per shape: a decode step costs one call), or None
    where it does not serve them (K and V of other dtypes or rows, or not verified)."""
    B, H, n, dk = k_shape
    dv = v_shape[-1]
    if k_dtype != v_dtype or v_shape[:3] != (B, H, n) or not verified(k_dtype, bits, group_size, dk, dv):
        return None
    plan = cuda.plan(B, H, n, dk, dv, k_dtype, group_size, bits, in_place)
    return functools.partial(cuda.launch_in_place if in_place else cuda.launch, plan)


NOT_VERIFIED: dict[tuple, str] = {}  # (dtype, bits, group size, K dim, V dim) -> why the kernel is not used


@lru_cache(maxsize=None)
def verified(dtype: mx.Dtype, bits: int, group_size: int, dk: int, dv: int) -> bool:
    """The kernel's rows equal `reference`'s bitwise on this device (a few small arrays, once per process),
    and so do those it writes in place into a buffer (at a row offset, the rows around them untouched, the
    count it returns right); where not, `NOT_VERIFIED` says why."""
    why = None
    if dtype not in cuda.CUDA_TYPES or bits not in (2, 4, 8) or dk % group_size or dv % group_size \
            or group_size % (32 // bits) or group_size * bits > 32 * 32:  # a lane packs each of a group's words
        why = "outside what the kernel covers"
    else:
        try:
            for i, (keys, values) in enumerate(_battery(dtype, dk, dv)):
                got = cuda.launch(cuda.plan(*keys.shape, dv, dtype, group_size, bits), keys, values)
                want = reference(keys, values, group_size, bits)
                if not mx.array_equal(got, want).item():
                    why = f"differs from mx.quantize on battery case {i}"
                    break
                if not _in_place_agrees(keys, values, want, group_size, bits):
                    why = f"its in-place form differs from its rows on battery case {i}"
                    break
        except Exception as error:  # noqa: BLE001 - a kernel that does not build or run here is not used
            why = f"{type(error).__name__}: {str(error)[:200]}"
    if why is not None:
        NOT_VERIFIED[dtype, bits, group_size, dk, dv] = why
    return why is None


def _in_place_agrees(keys: mx.array, values: mx.array, rows: mx.array, group_size: int, bits: int) -> bool:
    """The in-place launch, into a buffer of 3 + n + 2 rows of a marker at row 3, writes `rows` there, leaves
    the others as they were and returns 3 + n."""
    B, H, n, dk = keys.shape
    marker = mx.full((B, H, 3 + n + 2, rows.shape[-1]), 0xA5A5A5A5, dtype=mx.uint32)
    kv = marker + 0  # a buffer of its own, written in place
    count = cuda.launch_in_place(cuda.plan(B, H, n, dk, values.shape[-1], keys.dtype, group_size, bits, True),
                                 keys, values, kv, mx.array(3, dtype=mx.int32))
    mx.eval(count)
    expected = mx.concatenate([marker[:, :, :3], rows, marker[:, :, 3 + n:]], axis=2)
    return count.item() == 3 + n and mx.array_equal(kv, expected).item()


def _battery(dtype: mx.Dtype, dk: int, dv: int) -> list[tuple[mx.array, mx.array]]:
    keys = mx.random.split(mx.random.key(12), 12)
    rows = []
    for i, magnitude in enumerate((1e-4, 0.03, 1.0, 7.0, 1e3)):
        k = mx.random.normal((2, 3, 5, dk), key=keys[2 * i]) * magnitude
        v = mx.random.uniform(-magnitude, magnitude, (2, 3, 5, dv), key=keys[2 * i + 1])
        rows.append((k, v))
    k, v = rows[2]
    rows.append((mx.abs(k) + 0.5, -mx.abs(v)))  # one-signed groups
    rows.append((mx.zeros_like(k).at[:, :, 1].add(3.0), mx.full(v.shape, -2.5)))  # constant and zero groups
    rows.append((k.round(), (v * 4).round()))  # values on a grid: edges land exactly
    out = [(k.astype(dtype), v.astype(dtype)) for k, v in rows]
    k, v = out[3]
    out.append((k, mx.random.normal((2, 5, 3, dv), key=keys[11]).astype(dtype).swapaxes(1, 2)))  # a transposed view, as mlx-lm's
    return out
