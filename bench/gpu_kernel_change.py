"""A change to the fused kernel's device code that must not change its numbers: old against new, bitwise.

Run (GPU machine): python3 -m bench.gpu_kernel_change OUT_DIR --old=PATH
PATH is an earlier `qsdpa.cuh` (`git show REV:mlxrewrite/backends/kernels/qsdpa.cuh > PATH`). Each point of
bench.gpu_packed_attention's grid (dtypes, bits, group sizes, head dims, query heads per kv head, M, masks,
sinks, unaligned n) runs the six-part form with the current device code and with PATH's; they must be
bitwise equal. Also timed, as a decode step's chain of calls (bench.gpu_chunk_latency), at 4096 and 32768
keys: us per call, old and new, and the new packed form unchained and chained (as a packed cache launches it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx

from bench import record
from bench.gpu_chunk_latency import chain_us
from bench.gpu_packed_attention import GRID
from bench.gpu_fused_attention import make_mask
from mlxrewrite.backends.kernels import clear_caches, kv_layout, kv_pack, quantized_sdpa, quantized_sdpa_packed
from mlxrewrite.backends.kernels import quantized_sdpa_cuda as cuda


def _use(header: Path) -> None:
    cuda._HEADER = cuda._header(header)
    clear_caches()


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    old = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--old=")))
    new = cuda.HEADER_PATH
    rows = []
    for i, (dtype, bits, gs, D, rep, M, mask_kind, sinks, n) in enumerate(GRID):
        mx.random.seed(i)
        B, Hkv = 1 if rep > 1 else 2, 2
        k, v = kv_pack.packed(*(mx.random.normal((B, Hkv, n + 5, D)).astype(dtype) for _ in range(2)), gs, bits,
                              n).parts()
        q = mx.random.normal((B, Hkv * rep, M, D)).astype(dtype)
        mask = {"none": None, "causal": "causal"}.get(mask_kind) or make_mask(mask_kind, B, Hkv * rep, M, n, dtype)
        sk = mx.random.normal((Hkv * rep,)).astype(dtype) if sinks else None
        outs = []
        for header in (old, new):
            _use(header)
            outs.append(quantized_sdpa(q, k, v, scale=D ** -0.5, group_size=gs, bits=bits, mask=mask, sinks=sk))
            mx.eval(outs[-1])
        rows.append(dict(dtype=str(dtype).split(".")[-1], bits=bits, gs=gs, D=D, rep=rep, M=M, mask=mask_kind,
                         sinks=sinks, n=n, bitwise=mx.array_equal(*outs).item()))
        print(rows[-1], flush=True)
    timing = []
    for n in (4096, 32768):
        cache = kv_pack.packed(*(mx.random.normal((1, 4, n, 128)).astype(mx.float16) for _ in range(2)), 64, 8)
        k, v = cache.parts()
        row = {"N": n}
        for label, header in (("old", old), ("new", new)):
            _use(header)
            row[f"{label}_us"] = chain_us(lambda q: quantized_sdpa(q, k, v, scale=128 ** -0.5, group_size=64, bits=8))
        for label, chain in (("new_packed", None), ("new_packed_chained", kv_layout.Chain())):  # as a packed cache launches
            packed = cache._replace(chain=chain)
            row[f"{label}_us"] = chain_us(lambda q: quantized_sdpa_packed(q, packed, scale=128 ** -0.5, group_size=64,
                                                                          bits=8))
        timing.append(row)
        print(row, flush=True)
    bad = [r for r in rows if not r["bitwise"]]
    record.write_json(out_dir, "kernel_change.json", {"old": old.name, "points": len(rows), "bitwise": len(rows) - len(bad),
                                                      "not_bitwise": bad, "rows": rows, "chain_us": timing})


if __name__ == "__main__":
    main()
