"""Where a wrapped decode step's Python time goes: cProfile of decode steps with an 8-bit cache (GPU machine).

Run: python3 bench/gpu_profile_step.py [--head-dim=128] [--kv-heads=4]; prints the top functions by own time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import mlx.core as mx

import mlxrewrite.mlx_lm as mrl
from bench.gpu_fused_decode import build, option
from mlx_lm.models.cache import make_prompt_cache


def main() -> None:
    model = mrl.wrap(build(int(option("kv-heads", "4"))))
    tokens = mx.random.randint(0, 1000, (1, 4096 + 40))
    cache = make_prompt_cache(model)
    mx.eval(model(tokens[:, :4096], cache=cache))
    cache = [c.to_quantized(group_size=64, bits=8) for c in cache]
    for t in range(4096, 4106):  # warm: analyses, kernel compiles
        mx.eval(model(tokens[:, t:t + 1], cache=cache))
    profile = cProfile.Profile()
    profile.enable()
    for t in range(4106, 4136):
        logits = model(tokens[:, t:t + 1], cache=cache)
        mx.eval(logits)
    profile.disable()
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
