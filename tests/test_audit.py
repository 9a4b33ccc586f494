"""Audit: findings per hazard variant and none for clean ones, the JSON schema against docs/audit.md, the
command line (exit codes 0/1/2, pictures, mlx-lm configs) and `mlxrewrite.testing.assert_no_hazards`.

The functions below are also audit targets for the command line (`tests/test_audit.py:FUNC --inputs ...`).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite import CallPattern, Decline, Rule
from mlxrewrite.audit import Report, picture_dot, rule_evidence
from mlxrewrite.audit_mlx_lm import Options, config_cases, shrink_config
from mlxrewrite.cli import main
from mlxrewrite.mlx_lm.tiny import TINY_CONFIGS
from mlxrewrite.testing import assert_no_hazards

THIS = Path(__file__).resolve()
REPO = THIS.parents[1]
LLAMA3_8B = REPO / "mlxrewrite" / "configs" / "llama3_8b.json"
QMM, SDPA = "quantized-matmul-broadcast-weights", "sdpa-noop-mask"
N, D, GROUP = 64, 64, 64


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(THIS.read_text().splitlines(), 1) if text.endswith(marker))


# ---- audit targets: quantized_matmul -------------------------------------------------------------------

def quantized(shape, bits=8, seed=0):
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal(shape), group_size=GROUP, bits=bits)


def gqa_inputs():
    """GQA scores: queries of 2 KV heads x 3 repeats, M=2, against an 8-bit key cache."""
    mx.random.seed(1)
    return (mx.random.normal((1, 6, 2, D)), *quantized((1, 2, N, D)))


def gqa_expand_dims(q, w, scales, biases):
    """mlx-lm's quantized attention: expand_dims(-3) broadcast against (B, n_kv, n_rep, M, D) queries."""
    q = q.reshape(1, 2, 3, q.shape[-2], D)
    keys = [mx.expand_dims(a, -3) for a in (w, scales, biases)]
    return mx.quantized_matmul(q, *keys, transpose=True, group_size=GROUP, bits=8)  # <- gqa hazard


def gqa_sliced_cache(q, w, scales, biases):
    """The same on a cache sliced to its filled length (a view with holes, as mlx-lm's caches are)."""
    return gqa_expand_dims(q, *(a[..., :N - 5, :] for a in (w, scales, biases)))


def _broadcast3(a):
    """(1, 2, N, K) -> the first KV head's matrix, broadcast to (3, N, K)."""
    return mx.broadcast_to(a[0, :1], (3,) + a.shape[2:])


def _dense3(a):
    return mx.concatenate([a[0, :1]] * 3)


def broadcast_to_weights(q, w, scales, biases):
    """An explicit broadcast_to of all three weight operands over a new batch dim."""
    weights = map(_broadcast3, (w, scales, biases))
    return mx.quantized_matmul(q[:, :3], *weights, transpose=True, group_size=GROUP, bits=8)


def only_w_broadcast(q, w, scales, biases):
    """w broadcast, scales/biases dense copies: fold cannot apply, copy does."""
    weights = _broadcast3(w), _dense3(scales), _dense3(biases)
    return mx.quantized_matmul(q[:, :3], *weights, transpose=True, group_size=GROUP, bits=8)


def twice_in_a_loop(q, w, scales, biases):
    """One call site reached twice (as in every layer of a model)."""
    return [gqa_expand_dims(q, w, scales, biases) for _ in range(2)]


def two_d_weights(q, w, scales, biases):
    """Clean: 2-D weights are never broadcast by MLX."""
    return mx.quantized_matmul(q, w[0, 0], scales[0, 0], biases[0, 0], transpose=True, group_size=GROUP, bits=8)


def equal_batch_dims(q, w, scales, biases):
    """Clean: weights with their own (dense) batch dims, equal to those of x."""
    return mx.quantized_matmul(q[:, :2], w[0], scales[0], biases[0], transpose=True, group_size=GROUP, bits=8)


# ---- audit targets: scaled_dot_product_attention -------------------------------------------------------

def sdpa_inputs():
    mx.random.seed(2)
    q, k, v = (mx.random.normal(s) for s in ((2, 4, 1, D), (2, 2, N, D), (2, 2, N, D)))
    return (q, k, v), {"lengths": mx.array([N, N - 10])}


def attend(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)  # <- sdpa call


def sdpa_all_true(q, k, v, lengths):
    return attend(q, k, v, mx.ones((2, 1, 1, N), dtype=mx.bool_))


def sdpa_all_zero_additive(q, k, v, lengths):
    return attend(q, k, v, mx.zeros((2, 1, 1, N), dtype=q.dtype))


def sdpa_no_mask(q, k, v, lengths):
    """Clean: mask=None."""
    return attend(q, k, v, None)


def sdpa_runtime_mask(q, k, v, lengths):
    """Clean: a padding mask built from an input; its values are not known when tracing."""
    return attend(q, k, v, (mx.arange(N)[None] >= (N - lengths)[:, None])[:, None, None, :])


def sdpa_partly_false(q, k, v, lengths):
    """Clean: a constant mask that really masks something."""
    return attend(q, k, v, mx.arange(N)[None, None, None, :] < N - 3)


def raising_inputs():
    raise ValueError("no test data today")


def fails_to_trace(q, w, scales, biases):
    return q @ w  # uint32 weights: MLX refuses


HAZARDS = [
    (gqa_expand_dims, gqa_inputs, QMM, "fold"),
    (gqa_sliced_cache, gqa_inputs, QMM, "fold"),
    (broadcast_to_weights, gqa_inputs, QMM, "fold"),
    (only_w_broadcast, gqa_inputs, QMM, "copy"),
    (sdpa_all_true, sdpa_inputs, SDPA, "drop_mask"),
    (sdpa_all_zero_additive, sdpa_inputs, SDPA, "drop_mask"),
]
CLEAN = [(two_d_weights, gqa_inputs), (equal_batch_dims, gqa_inputs), (sdpa_no_mask, sdpa_inputs),
         (sdpa_runtime_mask, sdpa_inputs), (sdpa_partly_false, sdpa_inputs)]


def call(fn, builder):
    built = builder()
    args, kwargs = built if isinstance(built[-1], dict) else (built, {})
    return mlxrewrite.audit(fn, *args, **kwargs)


# ---- findings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, builder, rule, rewrite", HAZARDS, ids=[h[0].__name__ for h in HAZARDS])
def test_each_hazard_variant_is_found(fn, builder, rule, rewrite):
    report = call(fn, builder)
    (finding,) = report.findings
    assert (finding.rule, finding.rewrite, finding.step) == (rule, rewrite, fn.__name__)
    assert f"'{rewrite}'" in finding.fix
    assert re.search(r"MLX \d+\.\d+", finding.evidence), finding.evidence  # where it was measured
    assert report.steps[0].call_sites == 1 and report.mlx_version == mx.__version__


@pytest.mark.parametrize("fn, builder", CLEAN, ids=[c[0].__name__ for c in CLEAN])
def test_clean_variants_have_no_findings(fn, builder):
    report = call(fn, builder)
    assert report.clean and report.call_sites == 1, str(report)


def test_finding_facts():
    (finding,) = call(gqa_expand_dims, gqa_inputs).findings
    assert finding.severity == "error" and finding.op == "quantized_matmul"
    assert finding.location == f"{THIS}:{_line('# <- gqa hazard')}"
    assert finding.shapes == {"x": [1, 2, 3, 2, D], "w": [1, 2, 1, N, D // 4], "scales": [1, 2, 1, N, 1],
                              "biases": [1, 2, 1, N, 1]}
    assert finding.dtypes == {"x": "float32", "w": "uint32", "scales": "float32", "biases": "float32"}
    assert finding.strides["w"] == [2 * N * D // 4, N * D // 4, 1, D // 4, 1]  # the exporter's view ...
    assert f"w strides ({2 * N * D // 4}, {N * D // 4}, 0, {D // 4}, 1)" in finding.why  # ... the kernel's
    assert "Here:" in finding.why and "fold dims (2,)" in finding.why


def test_repeated_call_site_is_printed_once_with_its_count():
    report = call(twice_in_a_loop, gqa_inputs)
    assert len(report.findings) == 2
    text = str(report)
    assert text.count("[error]") == 1 and "(2 calls)" in text and text.count("evidence") == 1


def test_rule_evidence_parses_the_docstring():
    never = {"none": lambda call, decision: call.run_original()}
    rule = Rule("r", "warning", "h", CallPattern("quantized_matmul"), lambda facts: Decline("r", "test"), never,
                doc="Hazard: x.\n\nEvidence: measured\n  on two lines.\n\nRewrite: y.")
    assert rule_evidence(rule) == "measured on two lines."
    assert rule_evidence(Rule("r", "warning", "h", CallPattern("quantized_matmul"), lambda facts: Decline("r", "test"),
                              never)) == ""


# ---- JSON schema -----------------------------------------------------------------------------------------

def documented_keys(section: str) -> list[str]:
    """First-column `keys` of the table under '### section' in docs/audit.md."""
    text = (REPO / "docs" / "audit.md").read_text()
    table = text.split(f"### {section}\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, re.M)


def test_json_keys_are_the_documented_ones():
    data = json.loads(call(gqa_expand_dims, gqa_inputs).to_json())
    assert list(data) == documented_keys("Report")
    assert list(data["steps"][0]) == documented_keys("Step")
    assert list(data["findings"][0]) == documented_keys("Finding")
    assert data["schema"] == 1 and data["mlx_version"] == mx.__version__ and data["backend"] == "cpu"
    assert data["steps"] == [{"name": "gqa_expand_dims", "call_sites": 1, "hazards": 1}]


# ---- command line ----------------------------------------------------------------------------------------

def target(name: str) -> str:
    return f"{THIS}:{name}"


def test_cli_exit_codes_and_json(capsys):
    assert main(["audit", target("gqa_expand_dims"), "--inputs", "gqa_inputs"]) == 1
    assert f"[error] {QMM}" in capsys.readouterr().out
    assert main(["audit", target("sdpa_no_mask"), "--inputs", "sdpa_inputs"]) == 0
    assert capsys.readouterr().out.startswith("audit (cpu): no hazards in 1 call site(s)")
    assert main(["audit", target("sdpa_all_true"), "--inputs", "sdpa_inputs", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == target("sdpa_all_true") and [f["rule"] for f in data["findings"]] == [SDPA]


def test_cli_dotted_module_target(capsys, monkeypatch):
    monkeypatch.chdir(THIS.parent)  # the installed package's module, from any directory
    assert main(["audit", "mlxrewrite.examples.gqa_quantized_attention:attention"]) == 1
    assert capsys.readouterr().out.startswith("audit (cpu): 2 hazard(s) in 2 call site(s)")


USAGE_ERRORS = {
    "no colon": (["nocolon"], "expected FILE.py:FUNC"),
    "no file": (["missing.py:f"], "no such file 'missing.py'"),
    "no module": (["no_such_module_xyz:f"], "cannot load 'no_such_module_xyz': ModuleNotFoundError"),
    "no function": ([target("no_such_fn"), "--inputs", "gqa_inputs"], "has no function 'no_such_fn'"),
    "no builder": ([target("gqa_expand_dims")], "has no function 'example_inputs'"),
    "builder raises": ([target("gqa_expand_dims"), "--inputs", "raising_inputs"],
                       "inputs builder 'raising_inputs' raised ValueError: no test data today"),
    "trace fails": ([target("fails_to_trace"), "--inputs", "gqa_inputs"], "cannot trace fails_to_trace: ValueError"),
    "nothing to audit": ([], "give either FILE.py:FUNC or --mlx-lm-config"),
    "both targets": ([target("gqa_expand_dims"), "--mlx-lm-config", "c.json"], "give either"),
    "no config": (["--mlx-lm-config", "missing.json"], "cannot read mlx-lm config 'missing.json'"),
    "bad json": (["--mlx-lm-config", "{tmp}/bad.json"], "cannot read mlx-lm config"),
    "no model_type": (["--mlx-lm-config", "{tmp}/untyped.json"], "has no 'model_type'"),
    "unknown model": (["--mlx-lm-config", "{tmp}/unknown.json"], "mlx-lm cannot build 'no_such_arch'"),
    "no batch": (["--mlx-lm-config", str(LLAMA3_8B), "--batch", "0"], "batch must be at least 1, got 0"),
    "cache mlx-lm cannot quantize": (["--mlx-lm-config", "{tmp}/gemma3.json", "--kv-bits", "8"],
                                     "cannot make this model's caches (batch 1): RotatingKVCache Quantization NYI"),
}


@pytest.mark.parametrize("argv, message", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_cli_usage_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "untyped.json").write_text('{"hidden_size": 8}')
    (tmp_path / "unknown.json").write_text('{"model_type": "no_such_arch"}')
    (tmp_path / "gemma3.json").write_text(json.dumps(TINY_CONFIGS["gemma3"]))  # sliding-window layers
    assert main(["audit", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mlxrewrite: ") and err.count("\n") == 1 and message in err, err


def test_cli_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", target("gqa_expand_dims"), "--no-such-flag"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_cli_picture_without_graphviz_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("mlxrewrite.core.render.dot_program", lambda: None)
    assert main(["audit", target("gqa_expand_dims"), "--inputs", "gqa_inputs", "--png", str(tmp_path / "g.png")]) == 2
    assert "pip install 'mlxrewrite[render]'" in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_cli_as_a_subprocess():
    done = subprocess.run([sys.executable, "-m", "mlxrewrite", "audit", target("gqa_sliced_cache"), "--inputs",
                           "gqa_inputs", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1, done.stderr
    assert [f["rule"] for f in json.loads(done.stdout)["findings"]] == [QMM] and done.stderr == ""


# ---- pictures --------------------------------------------------------------------------------------------

def test_picture_dot_and_png(tmp_path, capsys):
    dot, png = tmp_path / "g.dot", tmp_path / "g.png"
    argv = ["audit", target("gqa_expand_dims"), "--inputs", "gqa_inputs", "--dot", str(dot), "--png", str(png)]
    assert main(argv) == 1
    assert f"wrote {png}" in capsys.readouterr().err
    text = dot.read_text()
    assert "subgraph cluster_before" in text and "subgraph cluster_after" in text
    hazard_label = f'"QuantizedMatmul\\n{QMM}\\ntest_audit.py:{_line("# <- gqa hazard")}"'
    (hazard_line,) = [line for line in text.splitlines() if hazard_label in line]
    assert hazard_line.lstrip().startswith("b_op") and "color=red" in hazard_line
    after = text.split("subgraph cluster_after", 1)[1]
    assert "0 hazard(s) left" in after and "color=red" not in after and "a_op" in after
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 200  # two graphs side by side


# ---- mlx-lm configs --------------------------------------------------------------------------------------

def test_shrink_keeps_the_attention_geometry():
    config = json.loads(LLAMA3_8B.read_text())
    tiny = shrink_config({**config, "layer_types": ["full"] * 32})
    assert tiny["num_attention_heads"] // tiny["num_key_value_heads"] == 32 // 8
    assert (tiny["num_key_value_heads"], tiny["head_dim"], tiny["num_hidden_layers"]) == (2, 128, 2)  # real head_dim
    assert tiny["hidden_size"] == 8 * 128 and tiny["intermediate_size"] == 2 * 8 * 128 and tiny["vocab_size"] == 512
    assert tiny["layer_types"] == ["full"] * 2 and tiny["rope_theta"] == config["rope_theta"]


def test_mlx_lm_config_audits_each_step(tmp_path, capsys):
    argv = ["audit", "--mlx-lm-config", str(LLAMA3_8B), "--kv-bits", "8", "--kv-group-size", "32", "--batch", "4",
            "--json", "--dot", str(tmp_path / "g.dot")]
    assert main(argv) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(s["name"].split(" (")[0], s["hazards"]) for s in data["steps"]] == [
        ("prefill", 4), ("decode", 4), ("speculative verification", 4), ("batched decode", 2)]
    by_step = {}
    for finding in data["findings"]:
        by_step.setdefault(finding["step"].split(" (")[0], []).append(finding)
    # only the step's own calls: M is the step's token count, not the prompt's
    assert {f["shapes"]["x"][-2] for f in by_step["decode"] if f["location"].endswith(":84")} == {1}
    assert {f["shapes"]["x"][-2] for f in by_step["speculative verification"] if f["location"].endswith(":84")} == {3}
    assert {f["rule"] for f in by_step["batched decode"]} == {SDPA}
    assert "tiny" in data["target"] and "8-bit KV cache" in data["target"] and "wrap(model)" in data["notes"][0]
    assert "subgraph cluster_before" in (tmp_path / "g.dot").read_text()


def test_large_graphs_are_drawn_around_the_hazards():
    decode = config_cases(LLAMA3_8B, Options(kv_bits=8, kv_group_size=32, batch=1))[1][1]
    step = decode.audit().steps[0]
    dot = picture_dot(step, decode.rewritten_graph())
    before = dot.split("subgraph cluster_after")[0]
    assert len(step.graph.nodes) > 150 and 0 < before.count("[shape=box") < len(step.graph.nodes)
    assert '"... ' in before and before.count("color=red") == 4


def test_float_cache_full_size_tiny_config_is_clean(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["audit", "--mlx-lm-config", str(tmp_path / "config.json"), "--full-size", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("audit (cpu): no hazards in ")
    assert "3 steps of llama (full size: 2 layers, hidden 128" in text
    assert "note:" not in text


# ---- pytest helper ---------------------------------------------------------------------------------------

def test_assert_no_hazards_passes_and_returns_the_report():
    (q, k, v), kwargs = sdpa_inputs()
    report = assert_no_hazards(sdpa_no_mask, q, k, v, **kwargs)
    assert isinstance(report, Report) and report.clean


def test_assert_no_hazards_fails_readably():
    with pytest.raises(AssertionError) as failure:
        assert_no_hazards(gqa_expand_dims, *gqa_inputs())
    message = str(failure.value)
    assert message.startswith("gqa_expand_dims has 1 hazardous MLX call(s)")
    for part in (f"[error] {QMM} at", f"test_audit.py:{_line('# <- gqa hazard')}", "why:", "fix:", "'fold'",
                 "evidence"):
        assert part in message, part


def test_declines_say_why_a_rule_did_not_fire(capsys):
    """`audit --declines`: each rule that did not fire at a call says why (here: the fused kernel on CPU)."""
    assert main(["audit", "mlxrewrite/examples/gqa_quantized_attention.py:attention", "--declines"]) == 1
    out = capsys.readouterr().out
    assert "fused-quantized-attention did not fire at mlxrewrite/examples/gqa_quantized_attention.py:35: " \
           "the fused kernel is not verified on cpu" in out
