"""Command line: `mlxrewrite example` runs a built-in example; `mlxrewrite audit FILE.py:FUNC`; `mlxrewrite doctor`.

Exit status: 0 ok (audit: clean), 1 hazards found (audit), 2 a usage or environment error, told in one line
on stderr (also a closed stdout, as in `mlxrewrite audit ... | head`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import runpy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .audit import Case, Report

PACKAGE = Path(__file__).resolve().parent
EXAMPLES = PACKAGE / "examples"
CONFIGS = PACKAGE / "configs"  # mlx-lm configs shipped for `audit --mlx-lm-config NAME`


class UsageError(Exception):
    """A problem with the command line or with what it names: one line on stderr, exit status 2."""


def _load(target: str):
    """`FILE.py:FUNC` or `package.module:FUNC` -> (module, function name)."""
    location, _, name = target.rpartition(":")
    if not location or not name:
        raise UsageError(f"expected FILE.py:FUNC or module:FUNC, got {target!r}")
    try:
        if location.endswith(".py"):
            if not Path(location).is_file():
                raise UsageError(f"no such file {location!r}")
            spec = importlib.util.spec_from_file_location(Path(location).stem, location)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` would, so modules of the current directory load
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(location)
    except UsageError:
        raise
    except (Exception, SystemExit) as error:
        raise UsageError(f"cannot load {location!r}: {type(error).__name__}: {error}") from error
    return module, name


def _function_case(target: str, builder_name: str) -> "Case":
    """The function named by `target`, with the arguments its builder returns: `args` or `(args, kwargs)`."""
    from .audit import Case

    module, name = _load(target)
    fn, builder = getattr(module, name, None), getattr(module, builder_name, None)
    for what, found in ((name, fn), (builder_name, builder)):
        if not callable(found):
            raise UsageError(f"{target.rpartition(':')[0]} has no function {what!r}")
    try:
        built = builder()
    except Exception as error:
        raise UsageError(f"inputs builder {builder_name!r} raised {type(error).__name__}: {error}") from error
    is_pair = isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], dict)
    call_args, call_kwargs = built if is_pair else (built if isinstance(built, tuple) else (built,), {})
    return Case(name, fn, tuple(call_args), call_kwargs)


def _audit_cases(args: argparse.Namespace) -> tuple[str, list["Case"], list[str]]:
    """(what is audited, the cases to audit, notes for its report) from the command line."""
    if (args.target is None) == (args.mlx_lm_config is None):
        raise UsageError("give either FILE.py:FUNC or --mlx-lm-config CONFIG.json")
    if args.target is not None:
        return args.target, [_function_case(args.target, args.inputs)], []
    if importlib.util.find_spec("mlx_lm") is None:
        from .mlx_lm import MLX_LM_MISSING

        raise UsageError(f"--mlx-lm-config: {MLX_LM_MISSING}")
    from .audit_mlx_lm import FIX_NOTE, ConfigError, Options, config_cases

    try:
        options = Options(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, batch=args.batch,
                          prompt_len=args.prompt_len, num_draft_tokens=args.num_draft_tokens,
                          full_size=args.full_size)
        return (*config_cases(config_path(args.mlx_lm_config), options), [FIX_NOTE])
    except ConfigError as error:
        raise UsageError(str(error)) from error


def config_path(name: str) -> Path:
    """An mlx-lm config file, or the name of one shipped with mlxrewrite (`llama3_8b`: `CONFIGS/NAME.json`)."""
    shipped = CONFIGS / f"{name}.json"
    return Path(name) if Path(name).exists() or not shipped.is_file() else shipped


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def _audit_case(case: "Case") -> "Report":
    try:
        return case.audit()
    except Exception as error:  # the audited code failed: say so on one line, as for any usage error
        raise UsageError(f"cannot trace {case.name}: {type(error).__name__}: {error}") from error


def _pictures(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The pictures asked for, (file, format); fails before the audit when they cannot be drawn."""
    from .core.render import dot_program

    pictures = [(Path(path), fmt) for fmt, path in (("dot", args.dot), ("svg", args.svg), ("png", args.png)) if path]
    if (args.svg or args.png) and dot_program() is None:
        raise UsageError("--svg/--png need a Graphviz program: `pip install 'mlxrewrite[render]'` (graphviz-pure) or Graphviz's dot, "
                         "or write --dot FILE instead")
    return pictures


def _write_pictures(pictures: list[tuple[Path, str]], cases: list["Case"], report: "Report") -> None:
    """The first step with findings (else the first step), beside its rewritten graph."""
    from .audit import picture_dot
    from .core.render import RenderError, write_picture

    index = next((i for i, step in enumerate(report.steps) if step.findings), 0)
    dot = picture_dot(report.steps[index], cases[index].rewritten_graph())
    for path, fmt in pictures:
        try:
            write_picture(dot, path, fmt)
        except (RenderError, OSError) as error:
            raise UsageError(str(error)) from error
        print(f"mlxrewrite: wrote {path} ({report.steps[index].name})", file=sys.stderr)


def audit_command(args: argparse.Namespace) -> int:
    from .audit import Report

    pictures = _pictures(args)
    target, cases, notes = _audit_cases(args)
    report = Report.combine([_audit_case(case) for case in cases], target)
    report.notes = notes if report.findings else []
    print(report.to_json() if args.json else report)
    if args.declines and not args.json:
        print(report.explain_declines())
    if pictures:
        _write_pictures(pictures, cases, report)
    return 0 if report.clean else 1


def _add_audit_parser(sub) -> None:
    audit = sub.add_parser(
        "audit", help="audit FILE.py:FUNC or an mlx-lm config for hazards (exit 0 clean, 1 hazards, 2 usage error)",
        description="Find hazardous MLX graph patterns. Exit status: 0 clean, 1 hazards found, 2 usage error "
                    "(or the audited code failed). docs/audit.md describes the output.")
    audit.add_argument("target", nargs="?", help="FILE.py:FUNC or package.module:FUNC")
    audit.add_argument("--inputs", default="example_inputs", metavar="BUILDER",
                       help="zero-argument function beside FUNC returning its arguments: a tuple, or (args, kwargs)")
    audit.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/audit.md)")
    audit.add_argument("--declines", action="store_true", help="also say why each rule that did not fire at a call "
                                                                "declined there")
    for fmt in ("dot", "svg", "png"):
        audit.add_argument(f"--{fmt}", metavar="FILE", help=f"write a {fmt.upper()} picture: hazards in red, "
                           "the rewritten graph beside it")
    lm = audit.add_argument_group("mlx-lm models (random weights; no download)")
    lm.add_argument("--mlx-lm-config", metavar="CONFIG.json", help="an mlx-lm config.json to build and audit, or "
                    f"the name of one shipped with mlxrewrite ({', '.join(shipped_configs())})")
    lm.add_argument("--kv-bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="quantize the KV cache (as mlx-lm)")
    lm.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128))
    lm.add_argument("--batch", type=int, default=2, help="batch of the batched decode step (1: leave it out)")
    lm.add_argument("--prompt-len", type=int, default=8)
    lm.add_argument("--num-draft-tokens", type=int, default=2, help="speculative verification runs this many + 1")
    lm.add_argument("--full-size", action="store_true", help="keep the config's sizes (default: a tiny model "
                    "with the same attention geometry)")


def _add_doctor_parser(sub) -> None:
    doctor = sub.add_parser(
        "doctor", help="self-test this MLX backend's kernels; write the profile the rules consult (exit 0)",
        description="Run the kernels the rules depend on against a dequantize-then-float reference, time each "
                    "rewrite, print what is wrong, unsupported and fastest, and cache the profile for this device "
                    "and MLX version (MLXREWRITE_PROFILE=PATH|off overrides where). docs/doctor.md explains it.")
    doctor.add_argument("--quick", action="store_true", help="a few buckets only (a smoke test)")
    doctor.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop measuring after this long, JIT compiles included; what is left stays "
                             "'not measured' and keeps the source-derived policy (default: doctor.BUDGET_S, 50)")
    doctor.add_argument("--json", action="store_true", help="print the profile as JSON instead of the table")
    doctor.add_argument("--out", metavar="FILE", help="also write the profile (JSON) to FILE")
    doctor.add_argument("--no-cache", action="store_true", help="measure, but leave the cached profile as it is")
    doctor.add_argument("--show", action="store_true", help="show the cached profile; measure nothing")
    doctor.add_argument("--fresh", action="store_true", help="measure every bucket again (by default a run keeps "
                        "what the cached profile measured and probes only the rest, if anything is left)")


def _check_writable(path: str) -> None:
    """Fail before a long run rather than after it: FILE must be creatable in an existing directory."""
    target = Path(path)
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"cannot write {path!r}: {'it is a directory' if target.is_dir() else 'no writable directory'}")


def _example(name: str) -> int:
    path = EXAMPLES / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        known = ", ".join(sorted(p.stem for p in EXAMPLES.glob("[!_]*.py")))
        raise UsageError(f"no example {name!r}; built-in examples: {known}")
    runpy.run_path(str(path), run_name="__main__")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        if args.out:
            _check_writable(args.out)
        from .doctor import command

        return command(args)
    if args.command == "example":
        return _example(args.name)
    return audit_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxrewrite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    example = sub.add_parser("example", help="run a built-in example (default: gqa_quantized_attention)")
    example.add_argument("name", nargs="?", default="gqa_quantized_attention")
    _add_audit_parser(sub)
    _add_doctor_parser(sub)
    args = parser.parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except UsageError as error:
        first_line = str(error).partition("\n")[0]  # one line, always (MLX's messages can run to several)
        print(f"mlxrewrite: {first_line}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more can be written there
        print("mlxrewrite: stdout was closed before the output ended", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
