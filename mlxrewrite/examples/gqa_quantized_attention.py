"""The GQA quantized-KV attention of mlx-lm (8-bit keys, 4-bit values), before and after mlxrewrite.

Run: mlxrewrite example gqa_quantized_attention
Shows the audit of the original function, what the rewrite did (explain), the audit of the result, and
the error of both against the dequantize-then-float reference.

It is also the one GQA fixture of the project: the tests, bench/ and the doctor's probes build their GQA
calls from `broadcast_cache`, `make_attention` and `example_inputs` (heads, bits, group size, dtype).
"""

import mlx.core as mx

import mlxrewrite

B, N_KV, N_REP, D, GROUP = 1, 4, 4, 256, 64
KEY_BITS, VALUE_BITS = 8, 4


def broadcast_cache(w, scales, biases):
    """A quantized cache as mlx-lm hands it to quantized_matmul: with a repeat dim of size 1 (`expand_dims(-3)`)
    that MLX broadcasts against each kv head's query heads, with stride 0 (the hazard)."""
    return [mx.expand_dims(a, -3) for a in (w, scales, biases)]


def make_attention(key_bits=KEY_BITS, value_bits=VALUE_BITS, group_size=GROUP):
    """mlx-lm's quantized_scaled_dot_product_attention for pre-scaled queries, as shipped (the hazardous
    pattern), for caches of any number of kv heads quantized with these bits and group size."""

    def attention(queries, k_w, k_s, k_b, v_w, v_s, v_b):
        b, h, m, d = queries.shape
        q = queries.reshape(b, k_w.shape[-3], h // k_w.shape[-3], m, d)
        keys, values = broadcast_cache(k_w, k_s, k_b), broadcast_cache(v_w, v_s, v_b)
        scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=key_bits)
        scores = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(scores, *values, transpose=False, group_size=group_size, bits=value_bits)
        return out.reshape(b, h, m, d)

    return attention


attention = make_attention()


def reference(queries, keys, values):
    """Float attention on the dequantized cache."""
    b, h, m, d = queries.shape
    q = queries.reshape(b, keys.shape[1], h // keys.shape[1], m, d)
    scores = mx.softmax(q @ mx.expand_dims(keys, 2).swapaxes(-1, -2), axis=-1, precise=True)
    return (scores @ mx.expand_dims(values, 2)).reshape(b, h, m, d)


def example_inputs(n: int = 2048, m: int = 2, *, d: int = D, n_kv: int = N_KV, key_bits: int = KEY_BITS,
                   value_bits: int = VALUE_BITS, group_size: int = GROUP, dtype=mx.float32):
    """(queries, *keys, *values) of `attention`: B x n_kv * N_REP pre-scaled query heads of M rows, and a cache
    of n rows per kv head, quantized (seeded: the same numbers every call)."""
    mx.random.seed(0)
    keys = mx.random.normal((B, n_kv, n, d)).astype(dtype)
    values = mx.random.normal((B, n_kv, n, d)).astype(dtype)
    queries = (mx.random.normal((B, n_kv * N_REP, m, d)) * d**-0.5).astype(dtype)
    k_q = mx.quantize(keys, group_size=group_size, bits=key_bits)
    v_q = mx.quantize(values, group_size=group_size, bits=value_bits)
    return (queries, *k_q, *v_q)


def main() -> None:
    args = example_inputs()
    queries, k_w, k_s, k_b, v_w, v_s, v_b = args
    keys = mx.dequantize(k_w, k_s, k_b, group_size=GROUP, bits=8)
    values = mx.dequantize(v_w, v_s, v_b, group_size=GROUP, bits=4)
    expected = reference(queries, keys, values)

    print("== audit of the function as written")
    print(mlxrewrite.audit(attention, *args))
    rewritten = mlxrewrite.compile(attention)
    out = rewritten(*args)
    print("\n== explain")
    print(rewritten.explain())
    print("\n== audit of the rewritten function")
    print(mlxrewrite.audit(rewritten, *args))
    err_before = mx.max(mx.abs(attention(*args) - expected)).item()
    err_after = mx.max(mx.abs(out - expected)).item()
    print(f"\nmax |out - dequantized float reference| on {mx.default_device()}: "
          f"as written {err_before:.2e}, rewritten {err_after:.2e}")


if __name__ == "__main__":
    main()
