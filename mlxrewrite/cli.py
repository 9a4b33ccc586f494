"""Command line: `mlxrewrite example` runs the built-in GQA example; `mlxrewrite audit FILE.py:FUNC`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(target: str):
    """`FILE.py:FUNC` or `package.module:FUNC` -> (module, function name)."""
    location, _, name = target.rpartition(":")
    if not location or not name:
        raise SystemExit(f"mlxrewrite: expected FILE.py:FUNC or module:FUNC, got {target!r}")
    if location.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(location).stem, location)
        if spec is None or not Path(location).exists():
            raise SystemExit(f"mlxrewrite: no such file {location!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return module, name


def audit_command(args: argparse.Namespace) -> int:
    import mlxrewrite

    module, name = _load(args.target)
    fn = getattr(module, name, None)
    builder = getattr(module, args.inputs, None)
    if not callable(fn) or not callable(builder):
        missing = name if not callable(fn) else args.inputs
        print(f"mlxrewrite: {args.target.rpartition(':')[0]} has no function {missing!r}", file=sys.stderr)
        return 2
    built = builder()
    call_args, call_kwargs = built if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], dict) \
        else (tuple(built), {})
    report = mlxrewrite.audit(fn, *call_args, **call_kwargs)
    print(report.to_json() if args.json else report)
    return 0 if report.clean else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxrewrite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    example = sub.add_parser("example", help="run a built-in example (default: gqa_quantized_attention)")
    example.add_argument("name", nargs="?", default="gqa_quantized_attention")
    audit = sub.add_parser("audit", help="audit FILE.py:FUNC (exit 0 clean, 1 hazards, 2 usage error)")
    audit.add_argument("target")
    audit.add_argument("--inputs", default="example_inputs", help="zero-argument builder of the arguments")
    audit.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "example":
        path = EXAMPLES / f"{args.name}.py"
        if not path.exists():
            print(f"mlxrewrite: no example {args.name!r} in {EXAMPLES}", file=sys.stderr)
            return 2
        runpy.run_path(str(path), run_name="__main__")
        return 0
    return audit_command(args)


if __name__ == "__main__":
    sys.exit(main())
