"""Backend facts the rules consult: where MLX's own dispatch sends a call, and which rewrite runs there.

Every threshold here is read from MLX's C++ source (v0.32.1; see docs/design.md, "Sources"):
- Metal `QuantizedMatmul::eval_gpu`: the vector kernels (qmv/qvm) run when M < `vector_limit`, which is 4
  for transpose=False and `get_qmv_batch_limit(K, N, device)` for transpose=True (table below).
- CUDA `QuantizedMatmul::eval_gpu`: every kernel (qmv and qmm) indexes a broadcast weight as "matrix 0 for
  every batch", so all M are affected; w/scales/biases must be dense with row-major last two dims or MLX
  raises "No implementation for problem shape" (it never copies them).
- CPU: correct for every M (measured); the rule still rewrites so that a graph audited on CPU behaves as
  it will on a GPU, and because fold is also faster there (bench/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

# get_qmv_batch_limit(K, N): (small: K,N <= 2048; mid: <= 4096; large), by (generation floor, 'd' class)
_QMV_LIMITS = [  # (min generation, size class test, (small, mid, large)), checked in this order
    (17, "not d", (33, 25, 13)),
    (15, "not d", (13, 15, 13)),
    (13, "d", (32, 18, 12)),
    (13, "any", (14, 10, 6)),
    (0, "d", (32, 18, 12)),
    (0, "any", (18, 12, 10)),
]
MAX_QMV_LIMIT = 33


@dataclass(frozen=True)
class Backend:
    """The device a call runs on, with what we know of its architecture."""

    kind: str  # "cpu" | "metal" | "cuda"
    arch: str = ""

    @classmethod
    def current(cls) -> "Backend":
        device = mx.default_device()
        if device.type == mx.cpu:
            return cls("cpu")
        if mx.metal.is_available():
            return cls("metal", _metal_arch())
        return cls("cuda")


def _metal_arch() -> str:
    try:
        return str(mx.metal.device_info().get("architecture", ""))
    except (AttributeError, RuntimeError):
        return ""


def metal_vector_limit(k: int, n: int, transpose: bool, arch: str) -> int:
    """MLX's Metal threshold: M below this runs the vector kernel (the one that misreads stride-0 batches)."""
    if not transpose:
        return 4
    size = 0 if k <= 2048 and n <= 2048 else 1 if k <= 4096 and n <= 4096 else 2
    match = re.search(r"g(\d+)([a-z])", arch)
    if not match:
        return MAX_QMV_LIMIT  # unknown chip: assume the largest limit MLX uses anywhere
    gen, size_class = int(match.group(1)), match.group(2)
    for min_gen, class_test, limits in _QMV_LIMITS:
        class_ok = class_test == "any" or (size_class == "d") == (class_test == "d")
        if gen >= min_gen and class_ok:
            return limits[size]
    return MAX_QMV_LIMIT


def qmm_hazard_applies(backend: Backend, m: int, k: int, n: int, transpose: bool) -> tuple[bool, str]:
    """Does MLX's kernel for this call read stride-0 weight batches wrongly? (answer, reason)."""
    if backend.kind == "metal":
        limit = metal_vector_limit(k, n, transpose, backend.arch)
        if m < limit:
            return True, f"Metal vector kernel runs for M={m} < {limit} (get_qmv_batch_limit)"
        return False, f"Metal matrix kernel runs for M={m} >= {limit}; it handles broadcast batches"
    if backend.kind == "cuda":
        return True, "CUDA kernels use matrix 0 for every batch of a broadcast weight (any M)"
    return True, "CPU is correct, but the rewrite keeps CPU and GPU graphs alike and is faster"


def needs_dense_weights(backend: Backend) -> bool:
    """CUDA never copies quantized weights: they must be dense with row-major last two dims, or MLX raises
    "No implementation for problem shape" (a sliced KV cache is not dense). Metal and CPU copy them."""
    return backend.kind == "cuda"
