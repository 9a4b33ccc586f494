"""Command line: run cases, print their tables and goal verdicts, write JSON + PNG per case.

    python -m bench all --quick                 # the whole suite in a few minutes on a laptop CPU
    python -m bench gqa sdpa --out DIR          # full grids (meant for a GPU)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time
from pathlib import Path

from bench import CASES
from bench.common import Env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", choices=(*CASES, "all"), metavar="CASE",
                        help=f"one or more of {', '.join(CASES)}, or all")
    parser.add_argument("--quick", action="store_true", help="reduced grids and iterations")
    parser.add_argument("--out", type=Path, help="output directory (default bench/results/<device>)")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="cases with a row grid (gqa) start no new row after S seconds; the rows left out "
                             "are listed in the result's notes")
    args = parser.parse_args(argv)
    env = Env.detect()
    out = args.out or Path(__file__).parent / "results" / env.slug
    out.mkdir(parents=True, exist_ok=True)
    names = CASES if "all" in args.cases else tuple(dict.fromkeys(args.cases))
    print(f"{env.device_name} ({env.backend}), MLX {env.mlx}, mlxrewrite {env.mlxrewrite} @ {env.commit}, "
          f"{env.dtype}, roofline {env.roofline_bytes_per_s or 'unknown'} B/s -> {out}")
    for name in names:
        case = importlib.import_module(f"bench.case_{name}")
        start = time.perf_counter()
        budgeted = "budget_s" in inspect.signature(case.run).parameters
        result = case.run(env, args.quick, budget_s=args.budget_s) if budgeted else case.run(env, args.quick)
        if result is None:  # the case printed why it was skipped
            continue
        result.print()
        path = result.write(out)
        try:
            case.plot(result, path.with_suffix(".png"))
            wrote = f"{path} and {path.with_suffix('.png').name}"
        except ImportError as error:  # matplotlib missing: the JSON is the result, the plot can be redrawn
            wrote = f"{path} (no PNG: {error})"
        print(f"wrote {wrote} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
