"""Built-in rules, one module each. Installed as `mlxrewrite.rules`. Order matters: subgraph rules go first (the
fused attention replaces the calls inside it), then the first call rule that fires on a call decides it, so the
broadcast rule (stride-0 weights) comes before the CUDA legalisation it subsumes.

Beside the rules, what they share: `qmm_dispatch` (MLX's Metal and CUDA dispatch facts), `qmm_profile` (what a
doctor profile says of quantized_matmul calls), and the rules' doctor probes (`qmm_probes` with `qmm_report`,
`sdpa_probes`), which only the doctor imports."""

from .fused_quantized_attention import RULE as FUSED_QUANTIZED_ATTENTION
from .quantized_matmul_broadcast import RULE as QUANTIZED_MATMUL_BROADCAST
from .quantized_matmul_legalise import RULE as QUANTIZED_MATMUL_LEGALISE
from .sdpa_noop_mask import RULE as SDPA_NOOP_MASK

BUILTIN_RULES = [FUSED_QUANTIZED_ATTENTION, QUANTIZED_MATMUL_BROADCAST, QUANTIZED_MATMUL_LEGALISE, SDPA_NOOP_MASK]

__all__ = ["BUILTIN_RULES", "FUSED_QUANTIZED_ATTENTION", "QUANTIZED_MATMUL_BROADCAST", "QUANTIZED_MATMUL_LEGALISE",
           "SDPA_NOOP_MASK"]
