"""Markdown from a directory of results (`python -m bench.report DIR... [--full] [--replot]`), for READMEs.

Each case's headline table (or, with --full, its whole table), its goals with verdicts, and its plot.
Only files written by `python -m bench` are read; other JSON (e.g. gpu_rules_*.json) is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

from bench import CASES
from bench.common import Result


def load(dirs: list[Path]) -> list[tuple[Path, Result]]:
    """Every result in `dirs`, in suite order, then by device."""
    found = []
    for directory in dirs:
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("case") in CASES and "headline" in data:
                found.append((path, Result.from_json(data)))
    return sorted(found, key=lambda item: (CASES.index(item[1].case), item[1].env.slug))


def markdown(path: Path, result: Result, full: bool, base: Path) -> str:
    env = result.env
    lines = [f"### {result.case}: {result.title}", "",
             f"{env.device_name} ({env.backend}), {env.dtype}, MLX {env.mlx}, mlxrewrite {env.mlxrewrite} "
             f"@ {env.commit}, {env.date}{', --quick grid' if result.quick else ''}. "
             f"Source: `{os.path.relpath(path, base)}`.", "",
             (result.table if full else result.headline).markdown(), ""]
    lines += [f"- {note}" for note in result.notes]
    lines += [f"- goal **{g.verdict}**: {g.text}" + (f" ({g.detail})" if g.detail else "") for g in result.goals]
    plot = path.with_suffix(".png")
    if plot.exists():
        lines += ["", f"![{result.case} on {env.device_name}]({os.path.relpath(plot, base)})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="directories of results from python -m bench")
    parser.add_argument("--full", action="store_true", help="whole tables instead of headline tables")
    parser.add_argument("--replot", action="store_true", help="(re)draw each result's PNG from its JSON first")
    parser.add_argument("--relative-to", type=Path, default=Path.cwd(),
                        help="directory that links are written relative to (where the Markdown will live)")
    args = parser.parse_args(argv)
    results = load(args.dirs)
    if not results:
        parser.error(f"no results from python -m bench in {', '.join(map(str, args.dirs))}")
    for path, result in results if args.replot else ():
        importlib.import_module(f"bench.case_{result.case}").plot(result, path.with_suffix(".png"))
    print("\n".join(markdown(path, result, args.full, args.relative_to) for path, result in results))


if __name__ == "__main__":
    main()
