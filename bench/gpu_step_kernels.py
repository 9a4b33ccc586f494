"""GPU time of one decode step, kernel by kernel: the float cache against kv8 wrapped (packed cache).

Run (GPU machine), once per variant, under ncu:
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
      python3 -m bench.gpu_step_kernels float|kv8 [--prompt=4096] > OUT/step_kernels_VARIANT.csv
then here: python -m bench.gpu_step_kernels --summarize OUT/step_kernels_float.csv OUT/step_kernels_kv8.csv
The model and cache are bench.gpu_step_profile's (16 layers, 16 q / 4 kv heads, head dim 128, fp16); after a
few warm steps one step is profiled (cuProfilerStart / Stop around it). ncu runs each kernel alone, so the
sum is the step's GPU work without overlap or idle time: what the GPU must do per token, against which the
host's time per step (gpu_step_profile) tells which side a variant waits on.
"""

from __future__ import annotations

import csv
import ctypes
import json
import sys
from collections import defaultdict


def profile(variant: str) -> None:
    import mlx.core as mx

    from bench.gpu_step_profile import PROMPT, _prepared

    model, cache, tokens = _prepared(None if variant == "float" else 8)
    for t in range(PROMPT, PROMPT + 4):
        mx.eval(model(tokens[:, t:t + 1], cache=cache))
    cuda = ctypes.CDLL("libcuda.so.1")
    mx.synchronize()
    cuda.cuProfilerStart()
    mx.eval(model(tokens[:, PROMPT + 4:PROMPT + 5], cache=cache))
    mx.synchronize()
    cuda.cuProfilerStop()


def summarize(paths: list[str]) -> dict:
    """Per file: the step's kernels (count, total us) and, by kernel name, count and us."""
    out = {}
    for path in paths:
        with open(path) as f:
            lines = [line for line in f if line.startswith('"')]
        by_name: dict[str, list[float]] = defaultdict(list)
        for row in csv.DictReader(lines):
            if row.get("Metric Name") == "gpu__time_duration.sum":
                us = float(row["Metric Value"].replace(",", "")) / (1000 if row["Metric Unit"] in ("nsecond", "ns") else 1)
                by_name[row["Kernel Name"].split("(")[0][:80]].append(us)
        out[path] = {"kernels": sum(map(len, by_name.values())), "us": round(sum(map(sum, by_name.values())), 1),
                     "by_name": {k: (len(v), round(sum(v), 1)) for k, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))}}
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        print(json.dumps(summarize(sys.argv[2:]), indent=1))
    else:
        profile(sys.argv[1])
