"""The packed KV cache's layout: one buffer per layer where mlx-lm's `QuantizedKVCache` keeps six.

A row of the buffer (B, H, N, width) is uint32 words: K's packed words, V's, then K's scales, K's biases,
V's scales and V's biases as values of the cache's dtype, the row padded to whole 16 bytes (the kernel
loads words 16 bytes at a time). `Row` says where each part sits, makes a buffer's rows from mlx-lm's
(weights, scales, biases) of K and of V (`join`) and gives those back as views (`split`); `Packed` is rows
[:n] of a cache's buffer as the fused attention kernel reads it, in place. Defined once here: the row
kernel (kv_pack), the cache (mlxrewrite.mlx_lm.packed_cache) and attention all use it.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

Parts = tuple[mx.array, mx.array, mx.array]  # mlx-lm's (weights, scales, biases) of K or of V
_ALIGN = 4  # words: a row starts on 16 bytes


class Row(NamedTuple):
    """Where K's and V's parts sit in a packed row (in words, groups; the dtype by name, as a cache must
    deep-copy and pickle)."""

    k_words: int
    v_words: int
    k_groups: int
    v_groups: int
    dtype_name: str

    @classmethod
    def of(cls, k_dim: int, v_dim: int, group_size: int, bits: int, dtype: mx.Dtype) -> "Row":
        """The row of K and V with head dims `k_dim`, `v_dim`, quantized with `group_size` and `bits`."""
        return cls(k_dim * bits // 32, v_dim * bits // 32, k_dim // group_size, v_dim // group_size,
                   str(dtype).rsplit(".", 1)[-1])

    @property
    def dtype(self) -> mx.Dtype:
        """The scales' and biases' dtype."""
        return getattr(mx, self.dtype_name)

    @property
    def words(self) -> int:
        """Packed words of K and V together: where the scales start."""
        return self.k_words + self.v_words

    @property
    def scale_words(self) -> int:
        """Words of the scales and biases."""
        return 2 * (self.k_groups + self.v_groups) * self.dtype.size // 4

    @property
    def width(self) -> int:
        """Words per row, padding included."""
        return -(-(self.words + self.scale_words) // _ALIGN) * _ALIGN

    @property
    def pad(self) -> int:
        """Zero words at the row's end."""
        return self.width - self.words - self.scale_words

    def join(self, k: Parts, v: Parts) -> mx.array:
        """Rows of K's and V's parts (B, H, n, .) in this layout (scales of another dtype cast to this one's)."""
        scales = mx.concatenate([k[1], k[2], v[1], v[2]], axis=-1).astype(self.dtype).view(mx.uint32)
        parts = [k[0], v[0], scales]
        if self.pad:
            parts.append(mx.zeros((*scales.shape[:-1], self.pad), dtype=mx.uint32))
        return mx.concatenate(parts, axis=-1)

    def split(self, rows: mx.array) -> tuple[Parts, Parts]:
        """`join` undone, as views of `rows` (any rows of a buffer): K's and V's parts."""
        kw, vw, scales, _ = mx.split(rows, [self.k_words, self.words, self.words + self.scale_words], axis=-1)
        kg, vg = self.k_groups, self.v_groups
        ks, kb, vs, vb = mx.split(scales.view(self.dtype), [kg, 2 * kg, 2 * kg + vg], axis=-1)
        return (kw, ks, kb), (vw, vs, vb)


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
    """Rows [:n] of a packed cache's buffer `kv` (which may be longer), laid out as `row`.
    chain: the cache's `Chain` (the CUDA kernel's counters for its next launch over the cache), or None.
    count: where the last rows were written into `kv` in place (`kv_pack.in_place_writer`), that write's
    row count (n, as an array): a kernel reading the rows takes it, so that it runs after the write."""

    kv: mx.array
    n: int
    row: Row
    chain: Chain | None = None
    count: mx.array | None = None

    def parts(self) -> tuple[Parts, Parts]:
        """mlx-lm's (weights, scales, biases) of K and of V, as views of rows [:n] (after waiting for an in-place
        write: MLX would not order the views' readers after it)."""
        if self.count is not None:
            mx.eval(self.count)
        return self.row.split(self.kv if self.n == self.kv.shape[2] else self.kv[:, :, :self.n])
