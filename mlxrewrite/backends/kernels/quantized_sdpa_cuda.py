"""CUDA flash-decoding kernel for quantized-KV attention, run through `mx.fast.cuda_kernel`.

One launch. One block per (chunk of N, kv head, row group, batch) streams its packed K/V tiles from HBM
once (16-byte loads, the next tile's loads in flight while the current one is computed) and serves every
query row of that kv head in the block; it writes float32 (max, sum, unnormalised output) per row and chunk.
The last block of a row group to finish (an atomic counter per row group, zeroed by MLX at each launch)
merges the chunks in index order, adds the sinks and writes the output: no second launch. It stages the
chunks' statistics in shared memory first (at most 128 chunks; the default chunking makes at most 64), a
warp per row takes their weights, and each output element's partials are loaded 32 at a time.

Over a packed cache the launches are chained: each takes its counters from the previous launch over that
cache (which zeroed them) and zeroes its own for the next, so MLX zero-fills none of its outputs (two graph
nodes fewer per call), and the chain orders the launches on the GPU (each one's counters are the previous
one's output). The merging block also sets its counter back to zero, so counters used twice in turn (as
`mx.compile` reuses an array it captured) still start from zero.

M-invariance: the chunk size depends on N alone and every per-row choice (tile, shuffle tree, which keys a
thread sums in P.V, the order the key subsets and the chunks are added) depends on D and n_rep alone; M
only sets how many rows a block holds (MBE positions x n_rep heads), so every instruction that touches a
row's numbers is the same whatever M is (explicit fmaf everywhere, fixed reduction trees). A row decoded
alone and the same row inside a verification pass of M = 2..16 give bitwise equal outputs.

The query is scaled as mlx-lm scales it (`queries * scale` in the query's dtype, then float32), so the
kernel takes the unscaled query of mlx-lm's function and gives the numbers of its scaled one.

K/V arrive as strided views of mlx-lm's cache buffer (`ensure_row_contiguous=False`); only their last axis
must be contiguous, which the kernel checks (a violation writes NaN rather than a wrong number).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

THREADS = 256
ROWS_PER_BLOCK = 8  # n_rep * MBMAX <= this (or n_rep alone above 8): bounds the accumulators at 32 floats
_V_REGION = 9216  # floats: one tile of dequantized V (TK x 36 x D/32), reused for the end-of-chunk reduction

HEADER_PATH = Path(__file__).with_name("qsdpa.cuh")  # the kernel's device code

_TEMPLATE = "<T, MT, ST, D, BITS, GS, NREP, MBMAX, MBE, MASK, SINKS>"
# mlx-lm's six parts (N from the K words' shape), or a packed cache's buffer (N from `rows`, its own scalar)
_CALLS = {False: ("qsdpa::split" + _TEMPLATE + "(q, q_shape, q_strides, kw_shape[2], kw, kw_strides, ks, ks_strides, "
                  "kb, kb_strides, vw, vw_strides, vs, vs_strides, vb, vb_strides, {mask}, {sinks}, params, out, work);"),
          True: ("qsdpa::split_packed" + _TEMPLATE + "(q, q_shape, q_strides, kv, kv_strides, {mask}, {sinks}, params, "
                 "rows, out, work{chain});")}
_CHAIN = ", const_cast<int*>(counters), next"  # a chained launch's counters (written in place) and its `next`
_KV_NAMES = {False: ["kw", "ks", "kb", "vw", "vs", "vb"], True: ["kv"]}
CHAIN_SLOTS = 16  # counters per (batch, kv head) of a chained launch (qsdpa.cuh): at most 16 row groups
_ARRAY_MASK = "mask, mask_shape, mask_strides"
_NO_MASK = "static_cast<const MT*>(nullptr), q_shape, q_strides"  # unused when MASK is 0 or 3
_CUDA_TYPES = {mx.float16: ("__half", "f16"), mx.bfloat16: ("__nv_bfloat16", "bf16"), mx.float32: ("float", "f32"),
               mx.bool_: ("bool", "b")}

MASK_NONE, MASK_BOOL, MASK_ADD, MASK_CAUSAL = 0, 1, 2, 3


def _compact(source: str) -> str:
    """The header without comments and indentation."""
    lines = (line.split("//")[0].strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line)


def _header(device_code: Path = HEADER_PATH) -> str:
    """What every instantiation's source starts with. MLX hashes a kernel's whole source each time it
    evaluates it, and builds it anew at each call: the 11 KB header inline cost about 2.6 us per call on an
    H200, an #include of it by path 0.3 us (bench/results/cuda-nvidia-h200/host_cost_n4096.json). The line
    carries the file's hash, so an edited header is a new kernel, not one compiled earlier; a path that
    cannot be written in a C string gets the header inline."""
    text = device_code.read_text()
    path = str(device_code.resolve())
    if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
        return f'#include "{path}"  // sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}\n'
    return _compact(text) + "\n"  # MLX appends its own code to the header's last line


_HEADER = _header()


@lru_cache(maxsize=None)
def _kernel(constants: tuple, array_mask: bool, sinks: bool, shared_memory: int, packed: bool,
            chained: bool = False) -> Any:
    """One kernel object per instantiation, its template arguments written into the source: MLX formats
    template arguments anew on every call, constants in the source cost nothing per call."""
    names = ["q"] + _KV_NAMES[packed] + (["mask"] if array_mask else []) + (["sinks"] if sinks else []) + ["params"] \
        + (["rows"] if packed else []) + (["counters"] if chained else [])
    lines = []
    for name, value in constants:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {name} = {_CUDA_TYPES[value][0]};")
        else:
            lines.append(f"constexpr {'bool' if isinstance(value, bool) else 'int'} {name} = {str(value).lower()};")
    call = _CALLS[packed].format(mask=_ARRAY_MASK if array_mask else _NO_MASK,
                                 sinks="sinks" if sinks else "static_cast<const ST*>(nullptr)",
                                 chain=_CHAIN if chained else "")
    tag = "_".join(_CUDA_TYPES[v][1] if isinstance(v, mx.Dtype) else str(int(v)) for _, v in constants)
    return mx.fast.cuda_kernel(
        name=f"qsdpa{'_packed' if packed else ''}{'_chained' if chained else ''}_{tag}", input_names=names,
        output_names=["out", "work"] + (["next"] if chained else []),
        source="\n".join(lines + [call]), header=_HEADER, ensure_row_contiguous=False, shared_memory=shared_memory)


def geometry(D: int, n_rep: int, M: int) -> tuple[int, int, int]:
    """(keys per tile, MBMAX, MBE): a block serves MBE = min(M, MBMAX) query positions x n_rep heads.

    Only MBE depends on M, and it only sets how many rows a block holds: no row's arithmetic changes.
    """
    nparts = D // 32
    npp = 1 if nparts <= 1 else 2 if nparts <= 2 else 4 if nparts <= 4 else 8
    mbmax = max(1, ROWS_PER_BLOCK // n_rep)
    return THREADS // npp, mbmax, min(M, mbmax)


def row_groups(D: int, n_rep: int, M: int) -> int:
    """Blocks per (chunk, kv head, batch): each holds MBE query positions (a chained launch: at most CHAIN_SLOTS)."""
    return -(-M // geometry(D, n_rep, M)[2])


def shared_bytes(D: int, n_rep: int, M: int) -> int:
    tk, _, mbe = geometry(D, n_rep, M)
    rb = n_rep * mbe
    npp = THREADS // tk
    floats = _V_REGION + rb * 32 * npp + rb * tk + rb * npp + 3 * rb + (rb & 1)
    return 4 * floats + 8 * rb


def plan(B: int, Hq: int, Hkv: int, M: int, D: int, N: int, chunk: int, bits: int, group_size: int,
         dtype: mx.Dtype, mask_kind: int, mask_dtype: mx.Dtype | None, sinks_dtype: mx.Dtype | None,
         packed: bool = False, chained: bool = False) -> tuple:
    """Everything about a launch that depends only on shapes and dtypes (the caller caches it per shape).
    packed: K and V come as a packed cache's buffer (`launch` gets it as `kv`), else as six parts.
    chained (packed only): the launch takes `counters` (`chain_counters`, or the previous chained launch's
    third output, which it zeroes) instead of counters in a zero-filled work buffer, so MLX fills nothing."""
    n_rep = Hq // Hkv
    _, mbmax, mbe = geometry(D, n_rep, M)
    nc = -(-N // chunk)
    nrg = row_groups(D, n_rep, M)
    if chained and (not packed or nrg > CHAIN_SLOTS):
        raise ValueError(f"quantized_sdpa: a chained launch takes a packed cache and at most {CHAIN_SLOTS} row groups")
    shapes, dtypes = [(B, Hq, M, D), (B * Hq * M * nc * (D + 2) + B * Hkv * nrg,)], [dtype, mx.float32]
    if chained:  # the work buffer is not kept past the launch: a verification pass's is megabytes per layer
        shapes.append((B * Hkv * CHAIN_SLOTS,))
        dtypes.append(mx.int32)
    launch_args = dict(output_shapes=shapes, output_dtypes=dtypes, init_value=None if chained else 0,
                       grid=(nrg * nc * THREADS, Hkv, B), threadgroup=(THREADS, 1, 1))
    constants = (("T", dtype), ("MT", mask_dtype or dtype), ("ST", sinks_dtype or dtype), ("D", D), ("BITS", bits),
                 ("GS", group_size), ("NREP", n_rep), ("MBMAX", mbmax), ("MBE", mbe), ("MASK", mask_kind),
                 ("SINKS", sinks_dtype is not None))
    kernel = _kernel(constants, mask_kind in (MASK_BOOL, MASK_ADD), sinks_dtype is not None, shared_bytes(D, n_rep, M),
                     packed, chained)
    return kernel, launch_args


def chain_counters(B: int, Hkv: int) -> mx.array:
    """The zeroed counters that start a chain of launches (over one packed cache's shape)."""
    return mx.zeros((B * Hkv * CHAIN_SLOTS,), dtype=mx.int32)


def launch(plan_: tuple, q: mx.array, kv: Sequence[mx.array], mask: mx.array | None, sinks: mx.array | None,
           *scalars: mx.array) -> mx.array:
    """One launch; K/V (six parts, or a packed cache's buffer), q and mask are passed as the views they are
    (no copies). scalars: `params` (and a packed cache's row count)."""
    kernel, launch_args = plan_
    return kernel(inputs=_inputs(q, kv, mask, sinks, scalars), **launch_args)[0]


def launch_chained(plan_: tuple, q: mx.array, kv: Sequence[mx.array], mask: mx.array | None,
                   sinks: mx.array | None, params: mx.array, rows: mx.array,
                   counters: mx.array) -> tuple[mx.array, mx.array]:
    """A chained launch (plan(chained=True)): (output, the counters for the next launch)."""
    kernel, launch_args = plan_
    out, _, following = kernel(inputs=_inputs(q, kv, mask, sinks, (params, rows, counters)), **launch_args)
    return out, following


def _inputs(q: mx.array, kv: Sequence[mx.array], mask: mx.array | None, sinks: mx.array | None,
            scalars_and_counters: tuple) -> list[mx.array]:
    """A launch's inputs in the kernel's order (`_kernel`'s input names): the optional ones only where given."""
    inputs = [q, *kv]
    if mask is not None:
        inputs.append(mask)
    if sinks is not None:
        inputs.append(sinks)
    inputs += scalars_and_counters
    return inputs
