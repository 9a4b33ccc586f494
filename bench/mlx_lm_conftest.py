"""conftest.py for mlx-lm's own test suite (copied there by bench/mlx_lm_suite.py): wraps every mlx-lm model
where it is constructed, by patching each `mlx_lm.models.<arch>.Model.__init__`, never `nn.Module.__call__`.

MLXREWRITE_SUITE selects the mode: "off" (baseline, nothing patched), "wrap", "check_masks" (wrap with
check_masks=True) or "packed" (wrap with packed_cache=True: mlx-lm's quantized caches packed, as on CUDA). With MLXREWRITE_SUITE_STATS=FILE, what the wrapped models did is written there as JSON at
the end: so a run in which the rules never fired cannot pass for a check.
"""

import importlib
import json
import os
import pkgutil
import threading
from collections import Counter

import mlx_lm.models

MODE = os.environ.get("MLXREWRITE_SUITE", "off")
_STATES: list = []  # every wrapped model's WrapState (not the model: models are freed as the tests go)
_DEPTH = threading.local()  # a Model built inside another Model's __init__ is part of it: only the outer is wrapped


def _wrap_on_construction(cls: type) -> None:
    import mlxrewrite.mlx_lm as mrl

    init = cls.__init__

    def __init__(self, *args, **kwargs):
        depth = getattr(_DEPTH, "n", 0)
        _DEPTH.n = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _DEPTH.n = depth
        if depth == 0:
            mrl.wrap(self, check_masks=MODE == "check_masks", packed_cache=True if MODE == "packed" else None)
            _STATES.append(mrl.state(self))

    cls.__init__ = __init__


def _model_classes() -> list[type]:
    classes = []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except BaseException:  # optional packages missing (olmo calls sys.exit): its tests fail alike in every mode
            continue
        model = getattr(module, "Model", None)
        if isinstance(model, type) and model.__module__ == module.__name__:
            classes.append(model)
    return classes


if MODE != "off":
    for model_class in _model_classes():
        _wrap_on_construction(model_class)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MLXREWRITE_SUITE_STATS")
    if not path:
        return
    calls, classes = Counter(), Counter()
    for state in _STATES:
        classes[state.original_class.__module__.rsplit(".", 1)[-1]] += 1
        calls.update(state.rewriter.calls)
    with open(path, "w") as f:
        json.dump({"mode": MODE, "models_wrapped": len(_STATES), "by_architecture": dict(classes),
                   "forward_passes": sum(s.forward_passes for s in _STATES), "calls": dict(calls),
                   "caches_packed": sum(s.packed for s in _STATES),
                   "coverage_notes": sorted({f"{s.original_class.__module__}: {n}" for s in _STATES for n in s.coverage})},
                  f, indent=1)
