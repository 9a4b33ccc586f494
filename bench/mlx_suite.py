"""MLX's own tests as a regression check (issue 15 item 12): test_quantized.py, test_fast_sdpa.py and
test_compile.py from MLX's `python/tests` (vendored in bench/mlx_tests/, MIT, see its README), run as
written and with their calls routed through mlxrewrite, compared test by test.

    python -m bench.mlx_suite [--modes baseline,compile,eager] [--files test_quantized,...] [--out PATH]

Modes (each file runs in its own child process per mode):
- `baseline`: unrouted.
- `compile`: the test module's `mx` is a copy of `mlx.core` in which every `mx.quantized_matmul` and
  `mx.fast.scaled_dot_product_attention` call runs through a `mlxrewrite.compile`d function (its arrays as
  arguments, so gradients and vmap reach them), and `mx.compile` is `mlxrewrite.compile`.
- `eager`: the test module's code reaches the dispatchers (`intercept.instrument`), and every test runs as
  one forward pass of an `EagerRewriter(check_values=True)`.

A test that passes in the baseline and fails in a routed mode is a new failure, unless it is one of the
documented differences of `mlxrewrite.compile` from `mx.compile` (`KNOWN`, docs/limits.md): those are
listed apart. Exit status 1 when there is any other, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
import types
import unittest
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("MLXREWRITE_PROFILE", "off")

HERE = Path(__file__).resolve().parent
UPSTREAM = HERE / "mlx_tests"
FILES = ("test_quantized", "test_fast_sdpa", "test_compile")
MODES = ("baseline", "compile", "eager")
_TWICE = "the function body runs twice per new signature (exporter, then mx.compile): it counts 4 traces, not 2"
_LENIENT = "a function mx.compile refuses runs unchanged with a FallbackWarning instead of raising ValueError"
KNOWN = {  # (mode, test id) -> the documented difference (docs/limits.md, "As a drop-in for mx.compile")
    ("compile", "test_compile.TestCompile.test_compile_with_constant"): _TWICE,
    ("compile", "test_compile.TestCompile.test_compile_release_on_another_thread"): _TWICE,
    ("compile", "test_compile.TestCompile.test_compile_without_captured_inputs"): _LENIENT,
    ("compile", "test_compile.TestCompile.test_unsupported_input_types"): _LENIENT,
}


# ---- routing (in the child) ---------------------------------------------------------------------------

def compiled_namespace(routers: list) -> types.ModuleType:
    """`mlx.core` with the intercepted APIs and `compile` going through `mlxrewrite.compile` (each
    `mlxrewrite.compile`d function is appended to `routers`, to say afterwards what ran through them)."""
    import mlx.core as mx

    import mlxrewrite
    from mlxrewrite import intercept

    core = types.ModuleType(mx.__name__, mx.__doc__)
    vars(core).update(vars(mx))
    fast = types.ModuleType(mx.fast.__name__, mx.fast.__doc__)
    vars(fast).update(vars(mx.fast))
    core.fast = fast
    for name, spec in intercept.APIS.items():
        target = core if spec.module is mx else fast
        routers.append(_through_compile(mlxrewrite, spec))
        setattr(target, spec.attr, routers[-1])

    def compile_(fun: Callable, inputs: Any = None, outputs: Any = None, shapeless: bool = False) -> Callable:
        routers.append(mlxrewrite.compile(fun, inputs=inputs, outputs=outputs, shapeless=shapeless))
        return routers[-1]

    core.compile = compile_
    return core


def _through_compile(mlxrewrite: types.ModuleType, spec: Any) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:  # looked up per call: the dispatcher while mlxrewrite traces
        return getattr(spec.module, spec.attr)(*args, **kwargs)

    return mlxrewrite.compile(call)


def route(module: types.ModuleType, suite: unittest.TestSuite, mode: str) -> Callable[[], dict]:
    """Route the module's calls as `mode` says; returns what tells afterwards how much was routed."""
    if mode == "compile":
        routers: list = []
        module.mx = compiled_namespace(routers)
        return lambda: _compiled_report(routers)
    if mode == "eager":
        from mlxrewrite import intercept
        from mlxrewrite.core.eager import EagerRewriter

        intercept.instrument(module)
        rewriter = EagerRewriter(check_values=True)
        for test in _tests(suite):
            method = getattr(test, test._testMethodName)
            setattr(test, test._testMethodName,
                    lambda method=method: rewriter.run(method, (), {}, patch_mlx=False))
        return lambda: {"call traces": rewriter.traces, "calls": rewriter.calls}
    return dict


def _compiled_report(routers: list) -> dict:
    """How many functions went through mlxrewrite.compile, their traces and the rewrites that fired."""
    fired: dict[str, int] = {}
    for router in routers:  # explain() lists every call site of every signature: "... at f:12: rule -> fold: why"
        for what in re.findall(r" at \S+: ([\w-]+ -> \w+): ", router.explain()):
            fired[what] = fired.get(what, 0) + 1
    return {"compiled functions": len(routers), "traces": sum(r.traces for r in routers),
            "rewritten call sites": fired}


def _tests(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    found = []
    for item in suite:
        found += _tests(item) if isinstance(item, unittest.TestSuite) else [item]
    return found


class Collect(unittest.TestResult):
    """Each test's outcome by id: pass, fail, error, skip (and the first line of what went wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, list[str]] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        self.outcomes.setdefault(test.id(), ["pass", ""])

    def _bad(self, kind: str, test: Any, err: Any) -> None:
        text = self._exc_info_to_string(err, test).strip().splitlines()
        self.outcomes[test.id()] = [kind, text[-1] if text else ""]

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._bad("fail", test, err)

    def addError(self, test: Any, err: Any) -> None:
        self._bad("error", test, err)

    def addSubTest(self, test: unittest.TestCase, subtest: Any, err: Any) -> None:
        if err is not None:
            self._bad("fail", test, err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self.outcomes[test.id()] = ["skip", reason]


def child(mode: str, name: str) -> dict:
    import warnings

    warnings.simplefilter("ignore")  # fallback warnings are expected; outcomes are what counts
    sys.path.insert(0, str(UPSTREAM))
    import mlxrewrite  # noqa: F401  (before any routing: intercept keeps MLX's own functions)

    module = importlib.import_module(name)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    routed = route(module, suite, mode)
    result = Collect()
    start = time.perf_counter()
    suite.run(result)
    return {"seconds": round(time.perf_counter() - start, 1), "routed": routed(), "outcomes": result.outcomes}


# ---- comparing (in the parent) ------------------------------------------------------------------------

def run_child(mode: str, name: str, timeout_s: int) -> dict:
    command = [sys.executable, "-m", "bench.mlx_suite", "--child", mode, name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"seconds": timeout_s, "outcomes": {}, "crash": f"timed out after {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"seconds": 0, "outcomes": {}, "crash": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def compare(results: dict[str, dict[str, dict]]) -> dict:
    """Per file and routed mode: counts, and the tests that pass in the baseline but not there."""
    summary = {}
    for name, by_mode in results.items():
        base = by_mode.get("baseline", {}).get("outcomes", {})
        summary[name] = {}
        for mode, result in by_mode.items():
            outcomes = result["outcomes"]
            counts = {k: sum(1 for o in outcomes.values() if o[0] == k) for k in ("pass", "fail", "error", "skip")}
            new = {test: o for test, o in outcomes.items() if o[0] in ("fail", "error") and base.get(test, [""])[0] == "pass"}
            known = {test: [*o, KNOWN[mode, test]] for test, o in new.items() if (mode, test) in KNOWN}
            summary[name][mode] = {**counts, "seconds": result["seconds"], "crash": result.get("crash"),
                                   "routed": result.get("routed", {}),
                                   "new_failures": {t: o for t, o in new.items() if t not in known}, "known": known}
    return summary


def markdown(record: dict) -> str:
    lines = [f"# MLX's own tests routed through mlxrewrite ({record['device']}, MLX {record['mlx']}, {record['date']})",
             "", f"Tests: MLX `python/tests` at {record['upstream']} (bench/mlx_tests/). "
             "`python -m bench.mlx_suite`; modes as in its docstring.", "",
             "| file | mode | pass | fail | error | skip | seconds | new failures (pass in baseline) | known differences |",
             "|---|---|---|---|---|---|---|---|---|"]
    details, known = [], []
    for name, by_mode in record["summary"].items():
        for mode, s in by_mode.items():
            new = "crashed: " + s["crash"] if s["crash"] else str(len(s["new_failures"]))
            lines.append(f"| {name} | {mode} | {s['pass']} | {s['fail']} | {s['error']} | {s['skip']} | "
                         f"{s['seconds']} | {new} | {len(s['known'])} |")
            details += [f"- {mode}: `{test}`: {why}" for test, (_, why) in s["new_failures"].items()]
            known += [f"- {mode}: `{test}` ({why}): {reason}" for test, (_, why, reason) in s["known"].items()]
    lines += ["", "What was routed (compile: functions through mlxrewrite.compile, their traces, rewritten call "
              "sites; eager: call traces and outcomes):"]
    lines += [f"- {name} {mode}: {json.dumps(s['routed'])}" for name, by_mode in record["summary"].items()
              for mode, s in by_mode.items() if mode != "baseline"]
    lines += ["", "New failures:" if details else "No new failures."] + details
    lines += ["", "Known differences (docs/limits.md):"] + known if known else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--files", default=",".join(FILES))
    parser.add_argument("--out", default="bench/results/mlx_suite_cpu", help="path without extension")
    parser.add_argument("--timeout-s", type=int, default=900, help="per file and mode")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    modes, files = args.modes.split(","), args.files.split(",")
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(files) - set(FILES))
    if unknown:
        print(f"mlx_suite: unknown mode or file {', '.join(unknown)}; modes: {', '.join(MODES)}; "
              f"files: {', '.join(FILES)}", file=sys.stderr)
        return 2
    from bench.record import header, write

    results = {name: {mode: run_child(mode, name, args.timeout_s) for mode in modes} for name in files}
    record = {**header(), "upstream": (UPSTREAM / "COMMIT").read_text().strip(), "summary": compare(results),
              "outcomes": results}
    if not write(args.out, record, markdown(record), "mlx_suite"):
        return 2
    new = any(s["new_failures"] or s["crash"] for by_mode in record["summary"].values() for s in by_mode.values())
    return int(new)


if __name__ == "__main__":
    sys.exit(main())
