"""Built-in rules, one module each. Installed as `mlxrewrite.rules`."""

from .fused_quantized_attention import RULE as FUSED_QUANTIZED_ATTENTION
from .quantized_matmul_broadcast import RULE as QUANTIZED_MATMUL_BROADCAST
from .sdpa_noop_mask import RULE as SDPA_NOOP_MASK

BUILTIN_RULES = [FUSED_QUANTIZED_ATTENTION, QUANTIZED_MATMUL_BROADCAST, SDPA_NOOP_MASK]

__all__ = ["BUILTIN_RULES", "FUSED_QUANTIZED_ATTENTION", "QUANTIZED_MATMUL_BROADCAST", "SDPA_NOOP_MASK"]
