"""mlx-lm's `QuantizedKVCache` with one buffer instead of six, so a decode step adds a token in one op.

GPU decode at batch 1 is host-bound: every op costs several microseconds to build and launch. mlx-lm's
quantized cache adds a token with two quantize calls and six slice updates per layer (a float cache: two
slice updates), which made an 8-bit cache slower than a float one even with a fused attention kernel.
Here a layer's cache is one uint32 buffer (B, H, N, width), a row holding K's packed words, V's, and their
scales and biases (`kv_layout.Row`); a token is one `kv_pack` (one kernel on CUDA) and one slice update, or,
on CUDA while the fused kernel serves the cache, one kernel writing the rows into the buffer in place
(`kv_pack.in_place_writer`). Attention gets what `update_and_fetch` returns: mlx-lm's (weights, scales,
biases) tuples, as views of the buffer, made only when read (`Fetched`, while mlx-lm's attention goes
through a dispatcher); the fused kernel reads the buffer itself, so a step it serves makes no view. The
numbers are mlx-lm's, bitwise (`kv_pack` is `mx.quantize`'s, and verified so on the device, in place too,
before its kernel is used).

An in-place write is one MLX does not see, so two rules keep every array bitwise what it was when handed
out. Rows are written in place only where no array shows them: after a read of `keys`/`values`/`state`
(views of the whole buffer), a copy (`copy`, `deepcopy`, pickle: the copy shares the buffer's data), a trim
below rows a fetch showed, or a fetch read as views, the next update writes by ops (a buffer of its own
where one is shared, which MLX makes), and the one after writes in place again. And what reads the rows
after a write takes the write's row count (`Packed.count`: the fused kernel's row-count operand) or waits
for it (`Packed.parts`, a growth, an update by ops).

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
_EVERY_ROW = float("inf")  # `_owned_from` once views of the whole buffer were made
# mlx-lm's quantized attention, the one reader of a fetch (its models call it through `base`'s module
# global): while a dispatcher stands in for it, the fetch is lazy (a `Fetched`), since the dispatcher
# makes it a tuple wherever the function itself runs
ATTENTION = "mlx_lm.models.base:quantized_scaled_dot_product_attention"


class Fetched(LazyOperand):
    """What `update_and_fetch` returns for K (which 0) or V (1): mlx-lm's (weights, scales, biases) of the
    cache's rows so far, made when first read (iterating, indexing). The fused attention rule reads `packed`
    instead, the buffer itself: a decode step it serves makes no view of the cache. The buffer is the value
    of this update (later updates do not show through)."""

    __slots__ = ("packed", "which", "region_layout", "_pair", "_cache")

    def __init__(self, packed: kv_layout.Packed, which: int, region_layout: tuple, pair: list,
                 cache: "QuantizedKVCache"):
        self.packed, self.which, self.region_layout, self._pair, self._cache = packed, which, region_layout, pair, cache

    def materialise(self) -> Parts:
        if not self._pair:  # K's and V's views are made together, once
            self._cache._viewed = True  # its next update writes by ops, which views need not wait for
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
        if self._kv is None:
            return None
        self._owned_from = _EVERY_ROW  # views of the whole buffer: no row may be written in place any more
        return self._rows(self._kv.shape[2]).parts()[which]

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
        self._new_buffer()

    def _rows(self, n: int) -> kv_layout.Packed:
        """Rows [:n] of the buffer (`parts()`: mlx-lm's tuples of K and of V, as views)."""
        return kv_layout.Packed(self._kv, n, self._row, None, self._count)

    def _new_buffer(self) -> None:
        """The buffer was just made: no array shows any of its rows, and no write into it is pending."""
        self._owned_from, self._count, self._count_at, self._viewed = 0, None, -1, False

    def _wait_for_writes(self) -> None:
        """Wait for the last in-place write (MLX does not know it wrote the buffer, so an op that reads the buffer
        and not the count could run before it: those, the rare ones, wait)."""
        if self._count is not None:
            self._evaluate(self._count)

    def __getstate__(self) -> dict:
        """Copies (`copy.copy`, `copy.deepcopy`, pickle) share the buffer's data with this cache until one writes:
        so neither writes rows in place any more (each writes a buffer of its own next), and the copy gets its
        own kernel chain."""
        self._wait_for_writes()
        self._owned_from = _EVERY_ROW
        return {**vars(self), "_chain": kv_layout.Chain(), "_count": None, "_count_at": -1}

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Fetched, Fetched]:
        packing = self._plain is not None
        if packing:
            self._pack()
        prev, n = self.offset, keys.shape[2]
        end = prev + n
        if self._kv is None or end > self._kv.shape[2]:
            self._grow(keys, values, n)
        if packing:
            self._settle()
        lazy = regions.installed(ATTENTION)
        # in place: rows no array shows, where the last fetch was read by the kernel alone (a fetch made into
        # views would make each step wait for the write: a site the fused kernel does not serve writes by ops)
        write = kv_pack.in_place_writer(keys, values, self.group_size, self.bits, self._row) \
            if lazy and prev >= self._owned_from and not self._viewed else None
        self._viewed = False
        if write is not None:  # the update's one op
            count = self._count if self._count is not None and self._count_at == prev else \
                mx.array(prev, dtype=mx.int32)
            self._count = write(keys, values, self._kv, count)
        else:
            self._wait_for_writes()
            self._kv[:, :, prev:end] = kv_pack.kv_pack(keys, values, self.group_size, self.bits, self._row)
            self._count = None
        self._count_at = self.offset = self._owned_from = end  # what this fetch shows
        # a copy of the array object (not of data): a later slice update rebinds the cache's own
        packed = kv_layout.Packed(self._kv.__copy__(), end, self._row, self._chain, self._count)
        if not lazy:  # mlx-lm's attention would get them as they are: tuples now
            return packed.parts()
        layout = self._layout or self._region_layout()
        pair: list = []
        return Fetched(packed, 0, layout, pair, self), Fetched(packed, 1, layout, pair, self)

    def _region_layout(self) -> tuple:
        """What fixes the arrays of this cache's fetches but their rows: a region keys them by it."""
        self._layout = (self._kv.shape[:2], self._row)  # the row fixes the buffer's width
        return self._layout

    def _settle(self) -> None:
        """Evaluate the packed (and grown) buffer now, so that mlx-lm's go before the next layer packs: one
        layer's copies alive at a time, not the whole cache's."""
        self._evaluate(self._kv)

    @staticmethod
    def _evaluate(array: mx.array) -> None:
        """mx.eval, where there is anything to do (inside mx.compile there is not)."""
        try:
            mx.eval(array)
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
        else:
            self._wait_for_writes()
            kv = self._kv[..., :self.offset, :] if self.offset % self.step else self._kv
            self._kv = mx.concatenate([kv, mx.zeros((B, H, steps, self._row.width), dtype=mx.uint32)], axis=-2)
        self._new_buffer()

    @property
    def nbytes(self) -> int:
        """The memory the cache holds: its buffer, padding included (mlx-lm's count where rows need none)."""
        return self._kv.nbytes if self._plain is None and self._kv is not None else super().nbytes

    def keys_and_values(self) -> tuple[Parts, Parts]:
        if self._plain is not None:
            self._pack()
        self._owned_from = max(self._owned_from, self.offset)
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
    cache._new_buffer()
    return cache


def is_packed(cache: Any) -> bool:
    return type(cache) is QuantizedKVCache
