"""mlx-lm's `QuantizedKVCache` with two buffers instead of six, so a decode step adds a token in three ops.

GPU decode at batch 1 is host-bound: every op costs several microseconds to build and launch. mlx-lm's
quantized cache adds a token with two quantize calls and six slice updates per layer (a float cache: two
slice updates), which made an 8-bit cache slower than a float one even with a fused attention kernel.
Here a layer's cache is `words` (B, H, N, K's packed words | V's) and `sb` (B, H, N, K scales | K biases |
V scales | V biases); a token is one `kv_pack` (one kernel on CUDA) and two slice updates. Attention gets
what `update_and_fetch` returns: mlx-lm's (weights, scales, biases) tuples, as views of the two buffers,
made only when read (`Fetched`, while mlx-lm's attention goes through a dispatcher); the fused kernel reads
the buffers themselves, so a step it serves makes no view. The numbers are mlx-lm's, bitwise (`kv_pack` is
`mx.quantize`'s, and verified so on the device before its kernel is used).

The object stays an mlx-lm `QuantizedKVCache` to every reader: `keys`, `values`, `state` (and so
`save_prompt_cache`, which writes it as mlx-lm's class, and loading back), `offset`, `trim`, `nbytes`.
Assigning `keys`/`values`/`state` repacks once. `pack(cache)` turns mlx-lm's object into this class in
place (one copy of what it holds, once); the mlx-lm wrapper does that on CUDA, where the kernel runs.
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
    instead, the buffers themselves: a decode step it serves makes no view of the cache. The buffers are
    the values of this update (later updates do not show through)."""

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
    the packed buffers; assigning one keeps it until the next update packs it."""

    def __init__(self, which: int):
        self.which = which

    def __get__(self, cache: "QuantizedKVCache | None", owner: type | None = None) -> Any:
        return self if cache is None else cache._half(self.which)

    def __set__(self, cache: "QuantizedKVCache", value: Parts | None) -> None:
        cache._set_half(self.which, value)


class QuantizedKVCache(MlxLmQuantizedKVCache):
    """A packed `QuantizedKVCache` (named as mlx-lm's so that saved caches load as mlx-lm's)."""

    # set by `pack`: _plain ([keys, values] as assigned, packed at the next update) or _words and _sb (None
    # while empty), _dims (K words, K groups, V groups: where `kv_layout.split` cuts), _layout (its fetches'
    # region layout, made at the first update after the buffers are replaced), _chain (the fused kernel's
    # counters for its next launch over this cache: kv_layout.Chain, new with each packing and each copy)

    keys = _Half(0)
    values = _Half(1)

    def _half(self, which: int) -> Parts | None:
        if self._plain is not None:
            return self._plain[which]
        return None if self._words is None else self._rows(self._words.shape[2]).parts()[which]

    def _set_half(self, which: int, value: Parts | None) -> None:
        """Keep mlx-lm's tuples as assigned (`state`'s setter assigns one half, then the other); the next
        update packs them."""
        plain = list(self._plain or (self._half(0), self._half(1)))
        plain[which] = value
        self._plain, self._words, self._sb, self._layout = plain, None, None, None

    def _pack(self) -> None:
        keys, values = self._plain
        self._plain = None
        if keys is None or values is None:
            return
        _check_packable(keys, values)
        self._chain = kv_layout.Chain()
        self._dims = (keys[0].shape[-1], keys[1].shape[-1], values[1].shape[-1])
        self._words, self._sb = kv_layout.join(keys, values)

    def _rows(self, n: int) -> kv_layout.Packed:
        """Rows [:n] of the buffers (`parts()`: mlx-lm's tuples of K and of V, as views)."""
        return kv_layout.Packed(self._words, self._sb, n, self._dims)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Fetched, Fetched]:
        packing = self._plain is not None
        if packing:
            self._pack()
        prev, n = self.offset, keys.shape[2]
        end = prev + n
        words = self._words
        if words is None or end > words.shape[2]:
            self._grow(keys, values, n)
            words = self._words
        if packing:
            self._settle()
        rows, sb_rows = kv_pack.kv_pack(keys, values, self.group_size, self.bits)
        sb = self._sb
        words[:, :, prev:end] = rows
        sb[:, :, prev:end] = sb_rows
        self.offset = end
        # copies of the array objects (not of data): the next update's slice update rebinds the cache's own
        packed = kv_layout.Packed(words.__copy__(), sb.__copy__(), end, self._dims, self._chain)
        if not regions.installed(ATTENTION):  # mlx-lm's attention would get them as they are: tuples now
            return packed.parts()
        layout = self._layout or self._region_layout()
        pair: list = []
        return Fetched(packed, 0, layout, pair), Fetched(packed, 1, layout, pair)

    def _region_layout(self) -> tuple:
        """What fixes the arrays of this cache's fetches but their rows: a region keys them by it (the dtype by
        name: the cache must deep-copy)."""
        self._layout = (self._words.shape[:2], self._words.shape[3], self._sb.shape[3], str(self._sb.dtype), self._dims)
        return self._layout

    def _settle(self) -> None:
        """Evaluate the packed (and grown) buffers now, so that mlx-lm's go before the next layer packs: one
        layer's copies alive at a time, not the whole cache's (inside mx.compile there is nothing to do)."""
        try:
            mx.eval(self._words, self._sb)
        except (RuntimeError, ValueError) as error:
            if not guard.is_transformation_error(error):
                raise

    def _grow(self, keys: mx.array, values: mx.array, n: int) -> None:
        """mlx-lm's growth: by whole steps, the buffers first cut to the offset when it is not a step's end."""
        B, H, _, dk = keys.shape
        dv = values.shape[-1]
        steps = (self.step + n - 1) // self.step * self.step
        per_word = 32 // self.bits
        new_words = mx.zeros((B, H, steps, (dk + dv) // per_word), dtype=mx.uint32)
        new_sb = mx.zeros((B, H, steps, 2 * (dk + dv) // self.group_size), dtype=keys.dtype)
        if self._words is None:
            self._dims = (dk // per_word, dk // self.group_size, dv // self.group_size)
            self._words, self._sb = new_words, new_sb
            return
        if self.offset % self.step:
            self._words, self._sb = self._words[..., :self.offset, :], self._sb[..., :self.offset, :]
        self._words = mx.concatenate([self._words, new_words], axis=-2)
        self._sb = mx.concatenate([self._sb, new_sb], axis=-2)

    def keys_and_values(self) -> tuple[Parts, Parts]:
        if self._plain is not None:
            self._pack()
        return self._rows(self.offset).parts()


def _check_packable(keys: Parts, values: Parts) -> None:
    """mlx-lm's layout as its own update makes it: (weights, scales, biases) each, over the same rows, with
    one scales dtype (else packing would change the dtype of the state)."""
    if len(keys) != 3 or len(values) != 3 or keys[0].shape[:3] != values[0].shape[:3] or \
            len({a.dtype for a in (*keys[1:], *values[1:])}) != 1:
        raise ValueError("a packed QuantizedKVCache takes (weights, scales, biases) for keys and for values over "
                         f"the same rows, with one scales dtype; got keys {[(a.shape, a.dtype) for a in keys]}, "
                         f"values {[(a.shape, a.dtype) for a in values]}")


def pack(cache: MlxLmQuantizedKVCache) -> QuantizedKVCache:
    """Turn mlx-lm's quantized cache into a packed one, in place (the same object); returns it. ValueError
    (and the cache left as it was) where its buffers are not mlx-lm's layout."""
    if type(cache) is not MlxLmQuantizedKVCache:
        raise TypeError(f"pack expects mlx-lm's QuantizedKVCache, got {type(cache).__name__}")
    if cache.keys is not None:
        _check_packable(cache.keys, cache.values)
    plain = [vars(cache).pop("keys"), vars(cache).pop("values")]
    cache.__class__ = QuantizedKVCache
    cache._plain, cache._words, cache._sb, cache._dims, cache._layout = plain, None, None, None, None
    cache._chain = kv_layout.Chain()
    return cache


def is_packed(cache: Any) -> bool:
    return type(cache) is QuantizedKVCache
