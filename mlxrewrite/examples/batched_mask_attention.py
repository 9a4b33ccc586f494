"""SDPA with masks like mlx-lm's batched cache builds: which ones mlxrewrite drops, which it keeps.

Run: mlxrewrite example batched_mask_attention
A constant all-True (bool) or all-zero (additive) mask is dropped: the output equals mask=None. A causal
mask, a partly-False mask and a mask built from an input are kept: the output is mx.compile's, bitwise.
"""

import mlx.core as mx

import mlxrewrite

B, HQ, HKV, L, N, D = 2, 8, 2, 4, 256, 64  # L=4: a causal mask is partly False (at L=1 it is all True)


def attend(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)


def all_true(q, k, v, lengths):
    return attend(q, k, v, mx.ones((B, 1, L, N), dtype=mx.bool_))


def all_zero_additive(q, k, v, lengths):
    return attend(q, k, v, mx.zeros((B, 1, L, N), dtype=q.dtype))


def full_true_broadcast(q, k, v, lengths):
    return attend(q, k, v, mx.broadcast_to(mx.full((1, 1, 1, N), True), (B, 1, L, N)))


def causal(q, k, v, lengths):
    return attend(q, k, v, mx.arange(N - L, N)[:, None] >= mx.arange(N)[None])


def padded_from_input(q, k, v, lengths):
    """A left-padding mask built from runtime lengths: True only where the value says so."""
    return attend(q, k, v, (mx.arange(N)[None] >= (N - lengths)[:, None])[:, None, None, :])


def main() -> None:
    mx.random.seed(0)
    q, k, v = mx.random.normal((B, HQ, L, D)), mx.random.normal((B, HKV, N, D)), mx.random.normal((B, HKV, N, D))
    lengths = mx.array([N, N - 100])
    no_mask = attend(q, k, v, None)
    for fn in (all_true, all_zero_additive, full_true_broadcast, causal, padded_from_input):
        rewritten = mlxrewrite.compile(fn)
        out = rewritten(q, k, v, lengths)
        dropped = "drop_mask" in rewritten.explain()
        same_as_compile = mx.array_equal(out, mx.compile(fn)(q, k, v, lengths)).item()
        print(f"{fn.__name__:22s} mask dropped: {dropped!s:5s}  max|out - mask=None| "
              f"{mx.max(mx.abs(out - no_mask)).item():.2e}  bitwise == mx.compile(fn): {same_as_compile}")


if __name__ == "__main__":
    main()
