"""`python -m mlxrewrite.mlx_lm generate`: mlx-lm's generate flags, with the loaded models wrapped."""

import subprocess
import sys

import pytest

from mlxrewrite.mlx_lm.__main__ import main
from mlxrewrite.mlx_lm.tiny import save_tiny

FLAGS = ["--prompt", "w1 w2 w3 w4 w5", "--max-tokens", "10", "--kv-bits", "8", "--quantized-kv-start", "0",
         "--ignore-chat-template", "--temp", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "llama"))


def generated_text(output: str) -> str:
    return output.split("==========")[1].strip()


def test_generate_wraps_and_matches_unwrapped(model_dir, capsys):
    assert main(["generate", "--model", model_dir, *FLAGS, "--no-rewrite"]) == 0
    plain = capsys.readouterr()
    assert main(["generate", "--model", model_dir, *FLAGS, "--explain"]) == 0
    wrapped = capsys.readouterr()
    assert generated_text(wrapped.out) == generated_text(plain.out) != ""
    assert "quantized-matmul-broadcast-weights -> fold" in wrapped.err
    assert "mlxrewrite" not in plain.err


def test_speculative_generate_with_a_draft_model(model_dir, capsys):
    flags = [*FLAGS, "--draft-model", model_dir, "--num-draft-tokens", "3"]
    assert main(["generate", "--model", model_dir, *flags, "--no-rewrite"]) == 0
    plain = generated_text(capsys.readouterr().out)
    assert main(["generate", "--model", model_dir, *flags, "--explain"]) == 0
    out, err = capsys.readouterr()
    assert generated_text(out) == plain
    assert err.count("mlxrewrite.mlx_lm: mlx_lm.models.llama.Model") == 2  # the model and the draft model
    assert "x: float32[1,2,2,4,64]" in err  # a 4-token verification pass went through the rule


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlxrewrite.mlx_lm: cannot load '{tmp_path / 'none'}'") and err.count("\n") == 1, err


def test_usage_errors(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2
    done = subprocess.run([sys.executable, "-m", "mlxrewrite.mlx_lm", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--check-masks" in done.stdout
