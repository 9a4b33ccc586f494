"""mlx-lm's `QuantizedKVCache.update_and_fetch` with less Python, for wrapped models' forward passes.

Decode with a quantized cache is host-bound: every layer and token builds its graph in Python. mlx-lm's
method builds its views with `tree_map` (two nested tree walks per call) and costs 5x what `KVCache`'s does
(106 against 21 us per call on a 2-core CPU, graph building only): more than the fused attention it feeds.
`update_and_fetch` below runs the same MLX ops on the same state, written out: two quantize, six slice
updates, six slices. Growing the buffers (every 256 tokens) goes to mlx-lm's own method. The results and
the state are bitwise mlx-lm's (tests/test_mlx_lm.py).

It is used only where mlx-lm's method is the one it was written against: `VERIFIED` holds hashes of the
source of mlx-lm's `update_and_fetch` and `keys_and_values`. Another mlx-lm keeps its own method, and the
wrapper's `explain` says so.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any, Callable

import mlx.core as mx

VERIFIED = {("e078860718ecc4ac", "ffe4983bd0920305")}  # mlx-lm 0.32.2


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the lean update is not used with the installed mlx-lm, or None where it is."""
    try:
        from mlx_lm.models.cache import QuantizedKVCache
    except ImportError as error:
        return f"mlx-lm is not importable: {error}"
    digests = tuple(hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]
                    for method in (QuantizedKVCache.update_and_fetch, QuantizedKVCache.keys_and_values))
    if digests not in VERIFIED:
        return (f"mlx-lm's QuantizedKVCache.update_and_fetch is not the one the lean update was checked against "
                f"(source {digests[0]}); mlx-lm's own runs")
    return None


def update_and_fetch(cache: Any, original: Callable, keys: mx.array, values: mx.array) -> tuple[tuple, tuple]:
    """`original(keys, values)` (mlx-lm's bound method), with the same ops and state, without tree walks."""
    prev = cache.offset
    stored_keys, stored_values = cache.keys, cache.values
    end = prev + keys.shape[2]
    if stored_keys is None or end > stored_keys[0].shape[2] or len(stored_keys) != 3:
        return original(keys, values)  # a new or grown buffer, or a layout it was not written for
    cache.offset = end
    new_keys = mx.quantize(keys, group_size=cache.group_size, bits=cache.bits)
    new_values = mx.quantize(values, group_size=cache.group_size, bits=cache.bits)
    rows = (Ellipsis, slice(prev, end), slice(None))
    for stored, new in ((stored_keys, new_keys), (stored_values, new_values)):
        stored[0][rows] = new[0]
        stored[1][rows] = new[1]
        stored[2][rows] = new[2]
    if end == stored_keys[0].shape[2]:
        return stored_keys, stored_values
    view = (Ellipsis, slice(None, end), slice(None))
    return ((stored_keys[0][view], stored_keys[1][view], stored_keys[2][view]),
            (stored_values[0][view], stored_values[1][view], stored_values[2][view]))
