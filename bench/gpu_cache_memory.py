"""Peak memory of a quantized-cache decode, step by step: mlx-lm's six-buffer layout against the packed cache.

Run (GPU machine): python3 -m bench.gpu_cache_memory OUT_DIR [--prompt=8192]
A 16-layer MHA llama (head_dim 128, fp16), float prefill, `to_quantized(bits=8)`, then decode steps wrapped
with `packed_cache=False` and with the default (packed on CUDA). Per step: the peak memory of that step
(`mx.get_peak_memory` after a reset) above what was active before the decode, in GB, and the cache's bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

import mlxrewrite.mlx_lm as mrl
from bench import record

PROMPT = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--prompt=")), 8192))


def main() -> None:
    out_dir = Path(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                                        intermediate_size=8192, num_attention_heads=16, num_key_value_heads=16,
                                        head_dim=128, rms_norm_eps=1e-5, vocab_size=32000))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 1000, (1, PROMPT + 8))
    rows = {}
    for label, packed in (("mlx-lm's layout", False), ("packed", None)):
        cache = make_prompt_cache(model)
        for start in range(0, PROMPT, 4096):
            mx.eval(model(tokens[:, start:min(PROMPT, start + 4096)], cache=cache))
        cache = [c.to_quantized(group_size=64, bits=8) for c in cache]
        mx.eval([c.state for c in cache])
        mrl.wrap(model, packed_cache=packed)
        base = mx.get_active_memory()
        cache_gb = sum(a.nbytes for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)) / 1e9
        steps = []
        for t in range(PROMPT, PROMPT + 8):
            mx.reset_peak_memory()
            mx.eval(model(tokens[:, t:t + 1], cache=cache))
            steps.append(round((mx.get_peak_memory() - base) / 1e9, 3))
        mrl.unwrap(model)
        rows[label] = {"cache_gb": round(cache_gb, 3), "step_peak_above_start_gb": steps}
        del cache
    record.write_json(out_dir, f"cache_memory_n{PROMPT}.json", {"prompt": PROMPT, "rows": rows})


if __name__ == "__main__":
    main()
