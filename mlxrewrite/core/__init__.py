"""The pipeline, one module per stage, in order:

1. trace (`trace.py`): run the function under `mx.export_function`, with the hazardous calls intercepted
   (`intercept.py`) and the inputs flattened to a signature, the cache key (`signature.py`).
2. graph + facts (`graph.py`, with strides from `layout.py` and constant summaries from `constants.py`):
   the IR the rules read, through `facts.py`.
3. rules (`rule.py`, `pattern.py`, `decide.py`; the rules themselves are `mlxrewrite.rules`): a plan, one
   decision or decline per call.
4. lower (`lower.py`, with `bindings.py` for subgraph placeholders and `guard.py` checking every result):
   the plan applied at the call sites.
5. mx.compile (`compiler.py`): the lowered function compiled, cached per signature.

Beside it, `eager.py` (with `regions.py`) applies the same rules call by call, without tracing. `log.py`
writes `MLXREWRITE_LOGS`; `render.py` prints a graph (listing, DOT, pictures).
"""
