"""Where the issue-15 checks (bench/fuzz_long.py, bench/mlx_suite.py) write their record: JSON and markdown
beside each other, headed by the device, MLX's version and the date of the run."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx


def header() -> dict:
    return {"device": f"{mx.default_device()} ({platform.processor() or platform.machine()})", "mlx": mx.__version__,
            "date": datetime.date.today().isoformat()}


def write(out: str, record: dict, markdown: str, tool: str) -> bool:
    """`out`.json and `out`.md; False (said on stderr, one line) when they cannot be written."""
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown)
    except OSError as error:
        print(f"{tool}: cannot write {path}: {error}", file=sys.stderr)
        return False
    print(markdown)
    return True


def write_json(out_dir: Path, name: str, fields: dict) -> None:
    """The GPU scripts' record: the device by name (`mx.device_info`), MLX's version and the date, then
    `fields`; printed as one JSON line and written to `out_dir`/`name`."""
    record = {**header(), **fields}
    record["device"] = mx.device_info().get("device_name", record["device"])
    print(json.dumps(record))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(record, indent=1))
