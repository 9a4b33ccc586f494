"""The MLX kernels under test, behind one injectable object, so tests can stand in a backend that is wrong,
raises or crashes for chosen shapes."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..core import intercept
from ..core.intercept import Call


class Kernels:
    """The MLX kernels under test. Probes reach MLX only through these (the rules' rewrites included, through
    `KernelCall`), so a test double can make chosen shapes wrong or unsupported."""

    def quantized_matmul(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None = None,
                         **params: Any) -> mx.array:
        return intercept.original("quantized_matmul")(x, w, scales, biases, **params)

    def scaled_dot_product_attention(self, q: mx.array, k: mx.array, v: mx.array, **params: Any) -> mx.array:
        return intercept.original("scaled_dot_product_attention")(q, k, v, **params)

    def gather_qmm(self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None = None,
                   **params: Any) -> mx.array:
        return mx.gather_qmm(x, w, scales, biases, **params)


class KernelCall(Call):
    """An intercepted call whose "original" is the kernel under test, so a rule's rewrites run on it."""

    __slots__ = ("kernels",)

    def __init__(self, api: str, operands: dict[str, mx.array], params: dict[str, Any], kernels: Kernels):
        super().__init__(api, operands, params)
        self.kernels = kernels

    def run_original(self, **overrides: Any) -> mx.array:
        return getattr(self.kernels, self.api)(**{**self.operands, **self.params, **overrides})
