"""Custom kernels: fused quantized attention (the rules call it) and the packed cache's rows (`kv_pack`).
Importable without CUDA: kernel objects are built on first use."""

from .quantized_sdpa import chunk_size, clear_caches, packed_attention, quantized_sdpa, quantized_sdpa_packed, reference

__all__ = ["chunk_size", "clear_caches", "packed_attention", "quantized_sdpa", "quantized_sdpa_packed", "reference"]
