"""mlx-lm's own test suite as a check of `mlxrewrite.mlx_lm.wrap`: run it unwrapped, with every model wrapped,
wrapped with check_masks=True, and wrapped with the packed quantized cache (as on CUDA), and compare. Done
means 0 new failures against the unwrapped baseline.

    python -m bench.mlx_lm_suite [--out bench/results/mlx_lm_suite] [--work DIR] [--modes off wrap check_masks packed]

The tests come from the sdist of the installed mlx-lm version on the package index (`pip download
--no-binary :all: --no-deps mlx-lm==VERSION`), which carries `tests/`. The files run are those that need no
downloaded weights (`TEST_FILES`); the one hub model that the generate, prompt-cache and server tests load
(`STAND_IN`) is replaced by a random-weight stand-in that this script builds (a 4-bit qwen2 with a
byte-level tokenizer and a ChatML template), so everything runs offline. Models are wrapped where they are
constructed (`bench/mlx_lm_conftest.py`). test_server.py needs `requests`; without it, it is left out.

Writes `<out>/mlx_lm_suite_<date>.json` and `.md`: per mode the counts, the time, what the wrapped models
did (models wrapped, rewritten calls, value checks, coverage notes) and the tests that fail in that mode but
pass in the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import mlx.core as mx

TEST_FILES = ["test_models.py", "test_generate.py", "test_prompt_cache.py", "test_server.py",
              "test_deepseek_v41.py", "test_muse_spark.py", "test_gated_delta.py"]
STAND_IN = "mlx-community/Qwen1.5-0.5B-Chat-4bit"  # what those tests `load()`; a local dir of that name wins
STAND_IN_CONFIG = dict(model_type="qwen2", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=512,
                       rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=True)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MODES = ("off", "wrap", "check_masks", "packed")
CONFTEST = Path(__file__).with_name("mlx_lm_conftest.py")


def fetch_tests(work: Path) -> tuple[str, Path]:
    """mlx-lm's `tests/` from the sdist of the installed version: (version, tests directory)."""
    version = importlib.metadata.version("mlx-lm")
    download = work / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"mlx-lm=={version}", "-d", str(download)], check=True)
    (archive,) = download.glob("mlx_lm-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name]
        tar.extractall(download, members=members, filter="data")
    (tests,) = download.glob("mlx_lm-*/tests")
    return version, tests


def stand_in_tokenizer():
    """Byte-level BPE with no merges (any text round-trips), ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def prepare(work: Path, tests: Path) -> Path:
    """A run directory: the test files, the conftest that wraps models, the stand-in model."""
    from mlxrewrite.mlx_lm.tiny import save

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "tests").mkdir(parents=True)
    for item in tests.iterdir():
        if item.is_file() and (item.name in TEST_FILES or not item.name.startswith("test_")):
            shutil.copy(item, run / "tests" / item.name)
    if importlib.util.find_spec("requests") is None:
        (run / "tests" / "test_server.py").unlink(missing_ok=True)
    shutil.copy(CONFTEST, run / "conftest.py")
    save(run / STAND_IN, STAND_IN_CONFIG, stand_in_tokenizer(), bits=4)
    return run


def run_mode(run: Path, mode: str) -> dict:
    """pytest over the test files in one mode: per test id its outcome, the counts, the time, the stats."""
    report, stats = run / f"junit_{mode}.xml", run / f"stats_{mode}.json"
    env = {**os.environ, "MLXREWRITE_SUITE": mode, "MLXREWRITE_SUITE_STATS": str(stats),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(report),
                    "tests"], cwd=run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("passed", "failure", "error", "skipped")}
    return {"mode": mode, "seconds": round(seconds, 1), "tests": len(outcomes), "counts": counts,
            "outcomes": outcomes, "stats": json.loads(stats.read_text()) if stats.exists() else None}


def compare(baseline: dict, other: dict) -> dict:
    """Tests that fail in `other` but pass in the baseline, and the reverse."""
    failed = ("failure", "error")
    new = sorted(t for t, o in other["outcomes"].items() if o in failed and baseline["outcomes"].get(t) == "passed")
    fixed = sorted(t for t, o in other["outcomes"].items() if o == "passed" and baseline["outcomes"].get(t) in failed)
    return {"new_failures": new, "newly_passing": fixed}


def markdown(result: dict) -> str:
    lines = [f"# mlx-lm's test suite with every model wrapped ({result['date']})", "",
             f"mlx-lm {result['mlx_lm_version']} (its sdist's tests: {', '.join(result['files'])}), MLX "
             f"{result['mlx_version']}, device {result['device']}, stand-in for {STAND_IN}: random 4-bit qwen2 "
             "built by bench/mlx_lm_suite.py.", "",
             "| mode | tests | passed | failed | errors | skipped | new failures vs off | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in result["modes"]:
        c, new = mode["counts"], mode.get("vs_baseline", {}).get("new_failures")
        lines.append(f"| {mode['mode']} | {mode['tests']} | {c['passed']} | {c['failure']} | {c['error']} | "
                     f"{c['skipped']} | {'-' if new is None else len(new)} | {mode['seconds']} |")
    for mode in result["modes"]:
        stats = mode["stats"]
        if stats and stats["models_wrapped"]:
            checks = sum(n for what, n in stats["calls"].items() if what.startswith("value check"))
            outcomes = {what: n for what, n in stats["calls"].items() if not what.startswith("value check")}
            lines += ["", f"## {mode['mode']}: what the wrapped models did", "",
                      f"{stats['models_wrapped']} models wrapped ({len(stats['by_architecture'])} architectures), "
                      f"{stats['forward_passes']} forward passes; calls: "
                      + "; ".join(f"{k} x{v}" for k, v in sorted(outcomes.items()))
                      + f"; mask value checks: {checks} (per shape in the JSON)"
                      + (f"; quantized caches packed: {stats['caches_packed']}" if stats.get("caches_packed") else "")]
            lines += [f"- not covered: {note}" for note in stats["coverage_notes"]]
        for name in mode.get("vs_baseline", {}).get("new_failures", []):
            lines.append(f"- new failure: {name}")
    baseline = result["modes"][0]
    lines += ["", "## failing in the baseline (unwrapped)", ""]
    lines += [f"- {t}: {o}" for t, o in sorted(baseline["outcomes"].items()) if o in ("failure", "error")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mlx_lm_suite"))
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    if args.modes[0] != "off":
        parser.error("the first mode must be off: the others are compared with it")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        version, tests = fetch_tests(work)
        run = prepare(work, tests)
        files = [f for f in TEST_FILES if (run / "tests" / f).exists()]
        modes = [run_mode(run, mode) for mode in args.modes]
    for mode in modes[1:]:
        mode["vs_baseline"] = compare(modes[0], mode)
    date = datetime.date.today().isoformat()
    result = {"date": date, "mlx_version": mx.__version__, "mlx_lm_version": version,
              "device": str(mx.default_device()), "files": files, "modes": modes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mlx_lm_suite_{date}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"mlx_lm_suite_{date}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(not m["vs_baseline"]["new_failures"] for m in modes[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
