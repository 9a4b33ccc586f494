"""`python -m mlxrewrite.mlx_lm generate ...`: mlx-lm's own `generate` command with the models wrapped.

Every flag of `mlx_lm.generate` works as it does there (`--model`, `--prompt`, `--max-tokens`,
`--kv-bits`, `--kv-group-size`, `--quantized-kv-start`, `--draft-model`, `--num-draft-tokens`, ...):
this runs mlx-lm's `main()` with its loader replaced by one that wraps what it loads (the model and the
draft model). One default differs: with `--kv-bits`, the cache is quantized from the first token
(`--quantized-kv-start 0`) unless `--quantized-kv-start` is given; mlx-lm's own default, 5000, leaves
any prompt shorter than that on a float cache, where there is nothing to rewrite. Our own flags, removed
before mlx-lm parses the rest:
  --check-masks   check runtime SDPA masks once per forward pass and drop all-True ones
  --explain       print what the rules did (call traces, rewrites, coverage) to stderr at the end
  --no-rewrite    load and run without wrapping (for side-by-side comparisons)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from typing import Any, Callable, Iterator

import mlxrewrite.mlx_lm as mrl

OWN_FLAGS = ("--check-masks", "--explain", "--no-rewrite")
USAGE = "usage: python -m mlxrewrite.mlx_lm generate [--check-masks] [--explain] [--no-rewrite] MLX_LM_GENERATE_FLAGS"


class LoadError(Exception):
    """mlx-lm could not load a model (no such path, not a model directory, ...): one line, exit status 2."""


@contextlib.contextmanager
def wrapping_loader(module: Any, wrap: bool, check_masks: bool, loaded: list) -> Iterator[None]:
    """Replace `module.load` with one that wraps each model it returns (unless not `wrap`), and turns a
    failure to load into a `LoadError`."""
    real: Callable = module.load

    def load(*args: Any, **kwargs: Any) -> Any:
        try:
            result = real(*args, **kwargs)
        except Exception as error:
            reason = str(error).partition("\n")[0]
            raise LoadError(f"cannot load {args[0] if args else kwargs.get('path_or_hf_repo')!r}: "
                            f"{type(error).__name__}: {reason}") from error
        if wrap:
            mrl.wrap(result[0], check_masks=check_masks)
            loaded.append(result[0])
        return result

    module.load = load
    try:
        yield
    finally:
        module.load = real


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def generate(argv: list[str]) -> int:
    mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the module; `mlx_lm.generate` is a function

    flags = {flag: flag in argv for flag in OWN_FLAGS}
    rest = [a for a in argv if a not in OWN_FLAGS]
    if _given(rest, "--kv-bits") and not _given(rest, "--quantized-kv-start"):
        rest += ["--quantized-kv-start", "0"]
    loaded: list = []
    saved_argv = sys.argv
    sys.argv = ["mlxrewrite.mlx_lm generate", *rest]
    try:
        with wrapping_loader(mlx_lm_generate, not flags["--no-rewrite"], flags["--check-masks"], loaded):
            mlx_lm_generate.main()
    except LoadError as error:
        print(f"mlxrewrite.mlx_lm: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    if flags["--explain"]:
        for model in loaded:
            print(mrl.explain(model), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0 if argv else 2
    if argv[0] != "generate":
        print(f"mlxrewrite.mlx_lm: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("mlx_lm") is None:
        print(f"mlxrewrite.mlx_lm: {mrl.MLX_LM_MISSING}", file=sys.stderr)
        return 2
    return generate(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
