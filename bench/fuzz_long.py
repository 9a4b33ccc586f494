"""The long differential fuzz run (issue 15 item 11): thousands of `bench/fuzz.py` cases per family, with
the larger KV lengths (up to 3000), recorded as JSON and markdown under bench/results/.

    python -m bench.fuzz_long [--count 1500] [--seed 1] [--out bench/results/fuzz_long_cpu]

Exit status 0 when every case is correct, 1 when any fails (each failure is listed in the record).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("MLXREWRITE_PROFILE", "off")  # the source-derived policy, as in the test suite

from bench import fuzz  # noqa: E402
from bench.record import header, write  # noqa: E402


def run_family(family: str, count: int, seed: int) -> dict:
    start = time.perf_counter()
    outcomes = [fuzz.run(case) for case in fuzz.cases(count, seed, family, large=True)]
    failed = [o for o in outcomes if not o.ok]
    crashed = [o for o in failed if o.error is not None]
    def worst(err: str) -> dict:
        return {dtype: max((getattr(o, err) for o in outcomes if o.case.dtype == dtype and getattr(o, err) is not None),
                           default=None) for dtype in fuzz.DTYPES}

    return {
        "cases": count, "failed": len(failed), "crashed": len(crashed), "seconds": round(time.perf_counter() - start, 1),
        "rewrites": dict(collections.Counter(o.fired for o in outcomes)),
        "max_err_vs_reference": worst("err_reference"), "max_err_vs_plain": worst("err_plain"),
        "tolerance": fuzz.TOLERANCE,
        "failures": [fuzz.describe(o) for o in failed],
    }


def markdown(record: dict) -> str:
    lines = [f"# Long differential fuzz ({record['device']}, MLX {record['mlx']}, {record['date']})", "",
             f"`python -m bench.fuzz_long --count {record['count']} --seed {record['seed']}`; cases from "
             "`bench/fuzz.py` with KV lengths up to 3000.", "",
             "Errors are max |out - expected| / max |expected| (f32 / f16 / bf16); tolerances "
             + " / ".join(f"{t:g}" for t in fuzz.TOLERANCE.values()) + ".", "",
             "| family | cases | failed | crashed | seconds | rewrites that ran | max err vs reference | max err vs plain |",
             "|---|---|---|---|---|---|---|---|"]
    for family, r in record["families"].items():
        errs = [" / ".join("-" if e is None else f"{e:.1e}" for e in r[key].values())
                for key in ("max_err_vs_reference", "max_err_vs_plain")]
        fired = ", ".join(f"{k} {v}" for k, v in sorted(r["rewrites"].items()))
        lines.append(f"| {family} | {r['cases']} | {r['failed']} | {r['crashed']} | {r['seconds']} | {fired} | "
                     f"{errs[0]} | {errs[1]} |")
    failures = [f for r in record["families"].values() for f in r["failures"]]
    lines += ["", "Failures:" if failures else "No failures."] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1500, help="cases per family")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/fuzz_long_cpu", help="path without extension")
    args = parser.parse_args(argv)
    record = {**header(), "count": args.count, "seed": args.seed,
              "families": {family: run_family(family, args.count, args.seed) for family in ("qmm", "sdpa")}}
    if not write(args.out, record, markdown(record), "fuzz_long"):
        return 2
    return int(any(r["failed"] for r in record["families"].values()))


if __name__ == "__main__":
    sys.exit(main())
