"""sdpa-noop-mask: drop a scaled_dot_product_attention mask that provably changes nothing.

Hazard: `mx.fast.scaled_dot_product_attention(..., mask=m)` with `m` all True (bool) or all zero
(additive) takes the masked path although `mask=None` means the same. mlx-lm's batched cache builds
such masks every step.

Evidence: H100, MLX 0.32.4: decode (L=1) 1.5-3.2x slower with the mask (the CUDA vector kernel rejects
array masks; bool masks are also converted to additive -inf masks first). Metal: divergent
probabilities reported with 4-bit Gemma models (mlx-vlm #1322, #1310).

Rewrite: drop_mask, the same call with `mask=None`.

Must not fire: unless the mask is proven constant by evaluating its producer chain once (built only
from constants: mx.ones, mx.full, comparisons and broadcasts of constants, ...). A mask that depends on
an input or declared state, that is partly False/nonzero, or that would broadcast the output to a
larger shape, is kept. The one exception is opt-in: eager mode with `check_values=True` (the mlx-lm
wrapper's `check_masks=True`) checks a runtime mask's values once per forward pass and drops it for
that pass only when it is all True / all zero.
"""

from __future__ import annotations

import mlx.core as mx

from mlxrewrite.core.facts import Facts, Read
from mlxrewrite.core.intercept import Call
from mlxrewrite.core.pattern import CallPattern
from mlxrewrite.core.rule import Decision, Decline, Rule

NAME = "sdpa-noop-mask"


def guard(facts: Facts) -> Decision | Decline:
    if not facts.present("mask"):
        return Decline(NAME, "no array mask")
    if facts.present("q") and not facts.derive("mask fits the scores", _fits, Read("shape", "mask"), Read("shape", "q"), Read("shape", "k")):
        return Decline(NAME, "the mask would broadcast the output to a larger shape")
    summary = facts.const("mask")
    if summary is None:
        return Decline(NAME, "the mask's values are not known (not built from constants; eager mode checks them "
                             "only with check_values=True)")
    how = "is constant and" if summary.source == "constant" else f"was checked at run time ({summary.source}):"
    kind = "bool" if facts.dtype("mask") == mx.bool_ else "additive"
    if kind == "bool" and summary.all_true:
        return Decision(NAME, "drop_mask", f"bool mask {how} all True")
    if kind == "additive" and summary.all_zero:
        return Decision(NAME, "drop_mask", f"additive mask {how} all zero")
    return Decline(NAME, f"the {kind} mask changes the result ({summary})")


def _fits(mask_shape: tuple, q_shape: tuple, k_shape: tuple) -> bool:
    """The mask broadcasts to the scores' shape (B, Hq, Lq, Lk) without enlarging it."""
    scores = q_shape[:-1] + (k_shape[-2],)
    if len(mask_shape) > len(scores):
        return False
    return all(m in (1, s) for m, s in zip(reversed(mask_shape), reversed(scores)))


def drop_mask(call: Call, decision: Decision) -> mx.array:
    return call.run_original(mask=None)


RULE = Rule(
    name=NAME,
    severity="warning",
    hazard="scaled_dot_product_attention with an all-True / all-zero mask takes the slower masked path "
           "(1.5-3.2x on H100 decode) and diverges numerically on Metal",
    pattern=CallPattern("scaled_dot_product_attention"),
    guard=guard,
    rewrites={"drop_mask": drop_mask},
    doc=__doc__,
    needs={"mask": 0},
    probes="mlxrewrite.rules.sdpa_probes",  # reported only: how much slower the masked path is here
)
