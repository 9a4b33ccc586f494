"""`mlxrewrite doctor` on the command line: measure (or --show the cached profile), print the table or JSON."""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
from pathlib import Path

from ..backends.device import device_backend, load_profile, profile_path
from .report import render
from .session import BUDGET_S, run

WATCHDOG_S = 300  # past the budget, the command ends with a traceback if an in-process kernel hangs


def command(args: argparse.Namespace) -> int:
    """`mlxrewrite doctor`: measure (resuming an unfinished cached profile unless --fresh), or --show the
    cached profile; print the table or JSON; exit 0."""
    if args.show:
        profile = load_profile(device_backend())
        if profile is None:
            where = profile_path(device_backend()) or "MLXREWRITE_PROFILE=off"
            print(f"mlxrewrite: no profile for this device ({where}); run `mlxrewrite doctor`", file=sys.stderr)
            return 0
    else:
        budget_s = BUDGET_S if args.budget is None else args.budget
        faulthandler.dump_traceback_later(budget_s + WATCHDOG_S, exit=True, file=sys.__stderr__)
        try:
            profile = run(quick=args.quick, save=not args.no_cache, budget_s=budget_s, fresh=args.fresh)
        finally:
            faulthandler.cancel_dump_traceback_later()
    if args.out:
        Path(args.out).write_text(json.dumps(profile.to_dict(), indent=1))
    print(json.dumps(profile.to_dict(), indent=1) if args.json else render(profile))
    return 0
