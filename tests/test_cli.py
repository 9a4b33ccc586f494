"""The command lines and the package as installed: usage and environment errors exit 2 with one line (never
a traceback), the shipped examples and config are found, and the package imports without the doctor and
from a plain checkout."""

import importlib.util
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mlxrewrite
import mlxrewrite.mlx_lm.__main__ as mlx_lm_main
from mlxrewrite import cli
from mlxrewrite.audit_mlx_lm import load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "mlxrewrite.examples.gqa_quantized_attention:attention"


def one_line_error(capsys, message: str) -> None:
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("mlxrewrite") and message in err, err
    assert "Traceback" not in out + err


@pytest.fixture
def no_mlx_lm(monkeypatch):
    """mlx-lm as if not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_lm" else real(name, *a))


@pytest.mark.parametrize("value", ["32", 0, True, 4.0])
def test_config_sizes_that_are_not_positive_integers_are_usage_errors(value, tmp_path, capsys):
    config = {**load_config(cli.config_path("llama3_8b")), "num_attention_heads": value}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.main(["audit", "--mlx-lm-config", str(tmp_path / "c.json"), "--kv-bits", "8"]) == 2
    one_line_error(capsys, f"'num_attention_heads' must be a positive integer, got {value!r}")


def test_a_config_that_fails_inside_mlx_with_a_long_message_is_one_line(tmp_path, capsys):
    config = {**load_config(cli.config_path("llama3_8b")), "rope_theta": "500000"}  # MLX lists rope()'s signatures
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.main(["audit", "--mlx-lm-config", str(tmp_path / "c.json")]) == 2
    one_line_error(capsys, "cannot trace prefill (P=8): TypeError: rope(): incompatible function arguments")


def test_mlx_lm_missing_is_one_line(no_mlx_lm, capsys):
    assert cli.main(["audit", "--mlx-lm-config", "llama3_8b"]) == 2
    one_line_error(capsys, "pip install 'mlxrewrite[mlx-lm]'")
    assert mlx_lm_main.main(["generate", "--model", "x"]) == 2
    one_line_error(capsys, "pip install 'mlxrewrite[mlx-lm]'")


@pytest.mark.parametrize("out", ["{tmp}/no/such/dir/p.json", "{tmp}"], ids=["no directory", "a directory"])
def test_doctor_out_that_cannot_be_written_fails_before_measuring(out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mlxrewrite.doctor.command", lambda args: pytest.fail("the doctor ran"))
    assert cli.main(["doctor", "--quick", "--out", out.format(tmp=tmp_path)]) == 2
    one_line_error(capsys, "cannot write")


def test_unknown_example_lists_the_built_in_ones(capsys):
    assert cli.main(["example", "no_such_example"]) == 2
    one_line_error(capsys, "built-in examples: batched_mask_attention, gqa_quantized_attention")


def test_closed_stdout_is_one_line_not_a_traceback():
    """`mlxrewrite audit ... | head`: the reader goes away before the report is written."""
    child = subprocess.Popen([sys.executable, "-m", "mlxrewrite", "audit", EXAMPLE], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd="/")
    child.stdout.close()
    err = child.stderr.read()
    assert child.wait(timeout=120) == 2
    assert err == "mlxrewrite: stdout was closed before the output ended\n"


def test_shipped_config_by_name_keeps_the_real_head_dim(capsys):
    assert cli.main(["audit", "--mlx-lm-config", "llama3_8b", "--kv-bits", "8", "--batch", "1", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert "head_dim 128" in data["target"]
    decode = next(f for f in data["findings"] if f["step"].startswith("decode") and f["shapes"]["x"][-1] == 128)
    assert decode["shapes"]["w"] == [1, 2, 1, 9, 32] and decode["kernel_shapes"]["w"] == [1, 2, 4, 9, 32]
    assert decode["kernel_strides"]["w"][2] == 0


def test_audit_text_shows_the_strides_the_kernel_sees(capsys):
    assert cli.main(["audit", EXAMPLE]) == 1
    text = capsys.readouterr().out
    assert "w: uint32[1, 4, 1, 2048, 64], seen as [1, 4, 4, 2048, 64] strides [524288, 131072, 0*, 64, 1]" in text
    assert "at mlxrewrite/examples/gqa_quantized_attention.py:33" in text or "gqa_quantized_attention.py:33" in text
    assert "note: on cpu, MLX computes these calls right" in text
    assert max(map(len, text.splitlines())) <= 110


def test_import_leaves_the_doctor_unloaded_until_used():
    code = ("import sys, mlxrewrite; assert 'mlxrewrite.doctor' not in sys.modules; "
            "assert callable(mlxrewrite.doctor) and 'mlxrewrite.doctor' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_plain_checkout_imports_without_installing():
    """No install: site-packages (for MLX) on the path without its .pth files (so no editable finder)."""
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
            "import mlxrewrite, mlxrewrite.rules; assert mlxrewrite.rules.__file__.startswith(sys.path[0]); "
            "print(len(mlxrewrite.default_rules()))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(len(mlxrewrite.default_rules())), done.stderr
