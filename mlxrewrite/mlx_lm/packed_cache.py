"""mlx-lm's `QuantizedKVCache` with one buffer instead of six, so a decode step adds a token in two ops.

GPU decode at batch 1 is host-bound: every op costs several microseconds to build and launch. mlx-lm's
quantized cache adds a token with two quantize calls and six slice updates per layer (a float cache: two
slice updates), which made an 8-bit cache slower than a float one even with a fused attention kernel.
Here a layer's cache is one uint32 buffer (B, H, N, width), a row holding K's packed words, V's, and their
scales and biases (`kv_layout.Row`); a token is one `kv_pack` (one kernel on CUDA) and one slice update.
Attention gets what `update_and_fetch` returns: mlx-lm's (weights, scales, biases) tuples, as views of the
buffer, made only when read (`Fetched`, while mlx-lm's attention goes through a dispatcher); the fused
kernel reads the buffer itself, so a step it serves makes no view. The numbers are mlx-lm's, bitwise (`kv_pack` is
`mx.quantize`'s, and verified so on the device before its kernel is used).

The object stays an mlx-lm `QuantizedKVCache` to every reader: `keys`, `values`, `state` (and so
`save_prompt_cache`, which writes it as mlx-lm's class, and loading back), `offset`, `trim`, `nbytes` (the
memory it holds: mlx-lm's count, and more where its rows are padded). Assigning `keys`/`values`/`state`
repacks once. `pack(cache)` turns mlx-lm's object into this class in place (one copy of what it holds,
once); the mlx-lm wrapper does that on CUDA, where the kernel runs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache as MlxLmQuantizedKVCache

from ..backends.kernels import kv_layout, kv_pack
from ..core import guard, regions
from ..core.regions import LazyOperand

Parts = kv_layout.Parts
# mlx-lm's quantized attention, the one reader of a fetch (its models call it through `base`'s module
# global): while a dispatcher stands in for it, the fetch is lazy (a `Fetched`), since the dispatcher
# makes it a tuple wherever the function itself runs
ATTENTION = "mlx_lm.models.base:quantized_scaled_dot_product_attention"


class Fetched(LazyOperand):
    """What `update_and_fetch` returns for K (which 0) or V (1): mlx-lm's (weights, scales, biases) of the
    cache's rows so far, made when first read (iterating, indexing). The fused attention rule reads `packed`
    instead, the buffer itself: a decode step it serves makes no view of the cache. The buffer is the value
    of this update (later updates do not show through)."""

    __slots__ = ("packed", "which", "region_layout", "_pair")

    def __init__(self, packed: kv_layout.Packed, which: int, region_layout: tuple, pair: list):
        self.packed, self.which, self.region_layout, self._pair = packed, which, region_layout, pair

    def materialise(self) -> Parts:
        if not self._pair:  # K's and V's views are made together, once
            self._pair.extend(self.packed.parts())
        return self._pair[self.which]

    def __len__(self) -> int:
        return 3


class _Half:
    """`keys` or `values` of a packed cache: mlx-lm's (weights, scales, biases) of that half, read as views of
    the packed buffer; assigning one keeps it until the next update packs it."""

    def __init__(self, which: int):
        self.which = which

    def __get__(self, cache: "QuantizedKVCache | None", owner: type | None = None) -> Any:
        return self if cache is None else cache._half(self.which)

    def __set__(self, cache: "QuantizedKVCache", value: Parts | None) -> None:
        cache._set_half(self.which, value)


class QuantizedKVCache(MlxLmQuantizedKVCache):
    """A packed `QuantizedKVCache` (named as mlx-lm's so that saved caches load as mlx-lm's)."""

    # set by `pack`: _plain ([keys, values] as assigned, packed at the next update) or _kv (the buffer, None
    # while empty) and _row (its kv_layout.Row), _layout (its fetches' region layout, made at the first
    # update after the buffer is replaced), _chain (the fused kernel's counters for its next launch over
    # this cache: kv_layout.Chain, new with each packing and each copy)

    keys = _Half(0)
    values = _Half(1)

    def _half(self, which: int) -> Parts | None:
        if self._plain is not None:
            return self._plain[which]
        return None if self._kv is None else self._rows(self._kv.shape[2]).parts()[which]

    def _set_half(self, which: int, value: Parts | None) -> None:
        """Keep mlx-lm's tuples as assigned (`state`'s setter assigns one half, then the other); the next
        update packs them."""
        plain = list(self._plain or (self._half(0), self._half(1)))
        plain[which] = value
        self._plain, self._kv, self._layout = plain, None, None

    def _pack(self) -> None:
        keys, values = self._plain
        self._plain = None
        if keys is None or values is None:
            return
        _check_packable(keys, values, self.group_size, self.bits)
        self._chain = kv_layout.Chain()
        k_dim, v_dim = (parts[1].shape[-1] * self.group_size for parts in (keys, values))
        self._row = kv_layout.Row.of(k_dim, v_dim, self.group_size, self.bits, keys[1].dtype)
        self._kv = self._row.join(keys, values)

    def _rows(self, n: int) -> kv_layout.Packed:
        """Rows [:n] of the buffer (`parts()`: mlx-lm's tuples of K and of V, as views)."""
        return kv_layout.Packed(self._kv, n, self._row)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Fetched, Fetched]:
        packing = self._plain is not None
        if packing:
            self._pack()
        prev, n = self.offset, keys.shape[2]
        end = prev + n
        kv = self._kv
        if kv is None or end > kv.shape[2]:
            self._grow(keys, values, n)
            kv = self._kv
        if packing:
            self._settle()
        kv[:, :, prev:end] = kv_pack.kv_pack(keys, values, self.group_size, self.bits, self._row)
        self.offset = end
        # a copy of the array object (not of data): the next update's slice update rebinds the cache's own
        packed = kv_layout.Packed(kv.__copy__(), end, self._row, self._chain)
        if not regions.installed(ATTENTION):  # mlx-lm's attention would get them as they are: tuples now
            return packed.parts()
        layout = self._layout or self._region_layout()
        pair: list = []
        return Fetched(packed, 0, layout, pair), Fetched(packed, 1, layout, pair)

    def _region_layout(self) -> tuple:
        """What fixes the arrays of this cache's fetches but their rows: a region keys them by it."""
        self._layout = (self._kv.shape[:2], self._row)  # the row fixes the buffer's width
        return self._layout

    def _settle(self) -> None:
        """Evaluate the packed (and grown) buffer now, so that mlx-lm's go before the next layer packs: one
        layer's copies alive at a time, not the whole cache's (inside mx.compile there is nothing to do)."""
        try:
            mx.eval(self._kv)
        except (RuntimeError, ValueError) as error:
            if not guard.is_transformation_error(error):
                raise

    def _grow(self, keys: mx.array, values: mx.array, n: int) -> None:
        """mlx-lm's growth: by whole steps, the buffer first cut to the offset when it is not a step's end."""
        B, H = keys.shape[:2]
        steps = (self.step + n - 1) // self.step * self.step
        if self._kv is None:
            self._row = kv_layout.Row.of(keys.shape[-1], values.shape[-1], self.group_size, self.bits, keys.dtype)
            self._kv = mx.zeros((B, H, steps, self._row.width), dtype=mx.uint32)
            return
        kv = self._kv[..., :self.offset, :] if self.offset % self.step else self._kv
        self._kv = mx.concatenate([kv, mx.zeros((B, H, steps, self._row.width), dtype=mx.uint32)], axis=-2)

    @property
    def nbytes(self) -> int:
        """The memory the cache holds: its buffer, padding included (mlx-lm's count where rows need none)."""
        return self._kv.nbytes if self._plain is None and self._kv is not None else super().nbytes

    def keys_and_values(self) -> tuple[Parts, Parts]:
        if self._plain is not None:
            self._pack()
        return self._rows(self.offset).parts()


def _check_packable(keys: Parts, values: Parts, group_size: int, bits: int) -> None:
    """mlx-lm's layout as its own update makes it: (weights, scales, biases) each, over the same rows, with
    one scales dtype (else packing would change the dtype of the state), words and groups of one head dim at
    the cache's bits and group size (else the row's parts would be cut at the wrong columns)."""
    if len(keys) != 3 or len(values) != 3 or keys[0].shape[:3] != values[0].shape[:3] or \
            len({a.dtype for a in (*keys[1:], *values[1:])}) != 1 or \
            any(p[0].shape[-1] * 32 != bits * group_size * p[1].shape[-1] for p in (keys, values)):
        raise ValueError(f"a packed QuantizedKVCache ({bits} bits, group size {group_size}) takes (weights, "
                         "scales, biases) for keys and for values over the same rows, with one scales dtype and "
                         f"words for its groups; got keys {[(a.shape, a.dtype) for a in keys]}, "
                         f"values {[(a.shape, a.dtype) for a in values]}")


def pack(cache: MlxLmQuantizedKVCache) -> QuantizedKVCache:
    """Turn mlx-lm's quantized cache into a packed one, in place (the same object); returns it. ValueError
    (and the cache left as it was) where its buffers are not mlx-lm's layout."""
    if type(cache) is not MlxLmQuantizedKVCache:
        raise TypeError(f"pack expects mlx-lm's QuantizedKVCache, got {type(cache).__name__}")
    if cache.keys is not None:
        _check_packable(cache.keys, cache.values, cache.group_size, cache.bits)
    plain = [vars(cache).pop("keys"), vars(cache).pop("values")]
    cache.__class__ = QuantizedKVCache
    cache._plain, cache._kv, cache._row, cache._layout = plain, None, None, None
    cache._chain = kv_layout.Chain()
    return cache


def is_packed(cache: Any) -> bool:
    return type(cache) is QuantizedKVCache
