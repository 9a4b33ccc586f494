"""The packed KV cache's layout: two buffers per layer where mlx-lm's `QuantizedKVCache` keeps six.

`words` (B, H, N, K's packed words then V's) and `sb` (B, H, N, K scales, K biases, V scales, V biases).
`join` makes them from mlx-lm's (weights, scales, biases) of K and of V, `split` gives those back as views,
and `Packed` is rows [:n] of a cache's buffers as the fused attention kernel reads them, in place. Defined
once here: the row kernel (kv_pack), the cache (mlxrewrite.mlx_lm.packed_cache) and attention all use it.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

Parts = tuple[mx.array, mx.array, mx.array]  # mlx-lm's (weights, scales, biases) of K or of V


class Chain:
    """The fused kernel's merge counters for its next launch over one packed cache (None before the first):
    each launch takes them and leaves its own, which it zeroes (and it leaves the ones it took at zero
    again). Launches that share a Chain run one after another on the GPU (each reads the previous one's
    output). A copy of a cache gets a new Chain (`copy.deepcopy`, pickle): two launches starting from the
    same counters could run at once and corrupt each other's merge, as the kernel writes them in place."""

    __slots__ = ("counters",)

    def __init__(self) -> None:
        self.counters: mx.array | None = None

    def __deepcopy__(self, memo: dict) -> "Chain":
        return Chain()

    def __reduce__(self) -> tuple:
        return Chain, ()


class Packed(NamedTuple):
    """Rows [:n] of a packed cache's buffers (which may be longer); dims = (K words, K groups, V groups).
    chain: the cache's `Chain` (the CUDA kernel's counters for its next launch over the cache), or None."""

    words: mx.array
    sb: mx.array
    n: int
    dims: tuple[int, int, int]
    chain: Chain | None = None

    def parts(self) -> tuple[Parts, Parts]:
        """mlx-lm's (weights, scales, biases) of K and of V, as views of rows [:n]."""
        full = self.n == self.words.shape[2]
        return split(self.words if full else self.words[:, :, :self.n], self.sb if full else self.sb[:, :, :self.n],
                     *self.dims)


def join(k: Parts, v: Parts) -> tuple[mx.array, mx.array]:
    """The packed layout of K's and V's parts: (words, sb), each concatenated along the last axis."""
    return mx.concatenate([k[0], v[0]], axis=-1), mx.concatenate([k[1], k[2], v[1], v[2]], axis=-1)


def split(words: mx.array, sb: mx.array, k_words: int, k_groups: int, v_groups: int) -> tuple[Parts, Parts]:
    """`join` undone, as views: K's and V's parts (two C++ splits)."""
    kw, vw = mx.split(words, [k_words], axis=-1)
    ks, kb, vs, vb = mx.split(sb, [k_groups, 2 * k_groups, 2 * k_groups + v_groups], axis=-1)
    return (kw, ks, kb), (vw, vs, vb)
