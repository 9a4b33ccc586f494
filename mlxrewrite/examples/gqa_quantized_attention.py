"""The GQA quantized-KV attention of mlx-lm (8-bit keys, 4-bit values), before and after mlxrewrite.

Run: mlxrewrite example gqa_quantized_attention
Shows the audit of the original function, what the rewrite did (explain), the audit of the result, and
the error of both against the dequantize-then-float reference.
"""

import mlx.core as mx

import mlxrewrite

B, N_KV, N_REP, D, GROUP = 1, 4, 4, 256, 64


def attention(queries, k_w, k_s, k_b, v_w, v_s, v_b):
    """mlx-lm's quantized_scaled_dot_product_attention, as shipped (the hazardous pattern)."""
    b, h, m, d = queries.shape
    q = queries.reshape(b, N_KV, N_REP, m, d)
    keys = [mx.expand_dims(a, -3) for a in (k_w, k_s, k_b)]
    values = [mx.expand_dims(a, -3) for a in (v_w, v_s, v_b)]
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=GROUP, bits=8)
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *values, transpose=False, group_size=GROUP, bits=4)
    return out.reshape(b, h, m, d)


def reference(queries, keys, values):
    """Float attention on the dequantized cache."""
    b, h, m, d = queries.shape
    q = queries.reshape(b, N_KV, N_REP, m, d)
    scores = mx.softmax(q @ mx.expand_dims(keys, 2).swapaxes(-1, -2), axis=-1, precise=True)
    return (scores @ mx.expand_dims(values, 2)).reshape(b, h, m, d)


def example_inputs(n: int = 2048, m: int = 2):
    mx.random.seed(0)
    keys = mx.random.normal((B, N_KV, n, D))
    values = mx.random.normal((B, N_KV, n, D))
    queries = mx.random.normal((B, N_KV * N_REP, m, D)) * D**-0.5
    k_q = mx.quantize(keys, group_size=GROUP, bits=8)
    v_q = mx.quantize(values, group_size=GROUP, bits=4)
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
