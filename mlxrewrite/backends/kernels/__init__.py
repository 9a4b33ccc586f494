"""Custom kernels the rewrite rules call. Importable without CUDA: kernel objects are built on first use."""

from .quantized_sdpa import chunk_size, quantized_sdpa, reference

__all__ = ["chunk_size", "quantized_sdpa", "reference"]
