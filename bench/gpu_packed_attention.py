"""The fused kernel's packed form on the GPU: bitwise the six-part form over the same cache.

Run (GPU machine): python3 -m bench.gpu_packed_attention OUT_DIR
`quantized_sdpa_packed` reads rows [:n] of a packed cache's buffer (longer than n, as the cache grows it)
where `quantized_sdpa` reads the six views `kv_layout.Row.split` makes of it; the kernel is the same,
only its addressing differs, so the outputs must be bitwise equal. Over dtypes, bits, group sizes, head
dims, query heads per kv head, M (decode and verification), masks, sinks and unaligned n; each point also
against float32 attention over the dequantized cache (bench.gpu_fused_attention.dense). Chained launches (a
packed cache's: counters from the previous launch, nothing zero-filled) must give the same bits, three in a
row built before one evaluation, and so must two launches given the same counters in turn (a compiled
call reuses the counters array it captured; the merging block leaves its counter at zero again).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import mlx.core as mx

from bench import record
from bench.gpu_fused_attention import dense, make_mask
from mlxrewrite.backends.kernels import kv_layout, kv_pack, quantized_sdpa, quantized_sdpa_packed
from mlxrewrite.backends.kernels import quantized_sdpa_cuda as cuda


# each point compiles two kernel instantiations (packed and six-part forms): a few seconds each
GRID = [*itertools.product((mx.float16, mx.bfloat16, mx.float32), (4, 8), (64,), (128,), (4,), (1,), ("none",),
                           (False,), (4093,)),
        (mx.float16, 8, 64, 128, 4, 16, "causal", False, 4093), (mx.float16, 4, 64, 64, 1, 1, "none", False, 300),
        (mx.float16, 8, 32, 256, 8, 4, "bool", True, 300), (mx.bfloat16, 4, 128, 128, 16, 1, "additive", False, 33),
        (mx.float16, 8, 32, 96, 2, 3, "bool", False, 70000), (mx.float16, 8, 64, 128, 4, 1, "none", False, 256),
        (mx.float16, 8, 64, 128, 4, 1, "none", True, 32768)]


def point(dtype, bits: int, gs: int, D: int, rep: int, M: int, mask_kind: str, sinks: bool, n: int) -> dict:
    B, Hkv = 1 if rep > 1 else 2, 2
    Hq, cap = Hkv * rep, -(-(n + 1) // 256) * 256
    keys, values = (mx.random.normal((B, Hkv, cap, D)).astype(dtype) for _ in range(2))
    packed = kv_pack.packed(keys, values, gs, bits, n)
    k, v = packed.parts()
    q = mx.random.normal((B, Hq, M, D)).astype(dtype)
    mask = {"none": None, "causal": "causal"}.get(mask_kind) or make_mask(mask_kind, B, Hq, M, n, dtype)
    sk = mx.random.normal((Hq,)).astype(dtype) if sinks else None
    common = dict(scale=D ** -0.5, group_size=gs, bits=bits, mask=mask, sinks=sk)
    got = quantized_sdpa_packed(q, packed, **common)
    want = quantized_sdpa(q, k, v, **common)
    chain = kv_layout.Chain()  # three chained launches built before any is evaluated: one graph, ordered by the chain
    chained = [quantized_sdpa_packed(q, packed._replace(chain=chain), **common) for _ in range(3)]
    reused = kv_layout.Chain()  # counters used again in turn, as a compiled call reuses the array it captured:
    start = cuda.chain_counters(B, Hkv)  # each merging block sets its counter back to zero
    mx.eval(start)
    again = []
    for _ in range(2):
        reused.counters = start
        again.append(quantized_sdpa_packed(q, packed._replace(chain=reused), **common))
        mx.eval(again[-1])
    ref = dense(q, k, v, scale=D ** -0.5, gs=gs, bits=bits, mask=mask, sinks=sk)
    err = (mx.max(mx.abs(got.astype(mx.float32) - ref)) / mx.max(mx.abs(ref))).item()
    return dict(dtype=str(dtype).split(".")[-1], bits=bits, gs=gs, D=D, rep=rep, M=M, mask=mask_kind, sinks=sinks,
                n=n, bitwise_six_parts=mx.array_equal(got, want).item(),
                bitwise_chained=all(mx.array_equal(c, want).item() for c in chained),
                bitwise_counters_reused=all(mx.array_equal(c, want).item() for c in again),
                rel_err_vs_float32=round(err, 7))


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    mx.random.seed(0)
    rows = []
    for args in GRID:
        rows.append(point(*args))
    bad = [r for r in rows if not (r["bitwise_six_parts"] and r["bitwise_chained"] and r["bitwise_counters_reused"])]
    record.write_json(out_dir, "packed_attention.json", {"points": len(rows), "bitwise": len(rows) - len(bad),
                                                          "max_rel_err_vs_float32": max(r["rel_err_vs_float32"] for r in rows),
                                                          "not_bitwise": bad, "rows": rows})


if __name__ == "__main__":
    main()
