"""The differential fuzz (bench/fuzz.py), CI-sized: seeded GQA quantized matmul and SDPA mask cases through
mlxrewrite.compile and eager mode, against the dequantize-then-float (float attention) reference and the plain
function (issue 15 item 11; `python -m bench.fuzz_long` runs thousands)."""

import dataclasses

import mlx.core as mx
import pytest

from bench import fuzz

COUNT = 300  # per family: about 10 s each on 2 CPU cores


@pytest.fixture(scope="module")
def qmm_outcomes():
    return [fuzz.run(case) for case in fuzz.cases(COUNT, 0, "qmm")]


@pytest.fixture(scope="module")
def sdpa_outcomes():
    return [fuzz.run(case) for case in fuzz.cases(COUNT, 0, "sdpa")]


def failures(outcomes):
    return [fuzz.describe(o) for o in outcomes if not o.ok]


def test_qmm_fuzz_is_clean(qmm_outcomes):
    assert failures(qmm_outcomes) == []


def test_qmm_fuzz_covers_the_space(qmm_outcomes):
    cases = [o.case for o in qmm_outcomes]
    for field, wanted in (("layout", fuzz.QMM_LAYOUTS), ("route", fuzz.ROUTES), ("dtype", fuzz.DTYPES),
                          ("path", ("compile", "eager")), ("bits", (4, 8)), ("group", (32, 64, 128)),
                          ("d", (64, 128, 256)), ("transpose", (True, False)), ("sliced", (True, False))):
        assert {getattr(c, field) for c in cases} >= set(wanted), field
    assert {o.fired for o in qmm_outcomes} >= {"fold", "copy", "dequantize", "none"}
    assert any(c.n % 32 for c in cases) and max(c.n for c in cases) > 512 and {1, 16} <= {c.m for c in cases}


def test_sdpa_fuzz_is_clean(sdpa_outcomes):
    assert failures(sdpa_outcomes) == []


def test_sdpa_fuzz_covers_the_masks(sdpa_outcomes):
    assert {o.case.mask for o in sdpa_outcomes} == set(fuzz.MASKS)
    assert {o.case.path for o in sdpa_outcomes} == set(fuzz.PATHS)
    dropped = {o.case.mask for o in sdpa_outcomes if o.fired == "drop_mask"}
    assert {"all_true", "zero"} <= dropped  # constant no-op masks, in every path
    assert dropped <= {"all_true", "zero", "input_bool", "input_additive", "derived", "padded"}  # never a real one


def test_the_fuzz_catches_a_wrong_rewrite(monkeypatch):
    """The checker is not vacuous: a rewrite that reads kv head 0 for every head (the CUDA defect) fails."""
    wrong = fuzz.forced("fold")

    def head_zero(call, decision):
        w, s, b = (call.operands[k] for k in ("w", "scales", "biases"))
        first = [mx.broadcast_to(a[:, :1], a.shape) for a in (w, s, b)]
        return call.run_original(w=first[0], scales=first[1], biases=first[2])

    monkeypatch.setattr(fuzz, "forced", lambda rewrite: dataclasses.replace(wrong, rewrites={"fold": head_zero}))
    case = fuzz.QmmCase(seed=1, b=1, n_kv=2, n_rep=2, m=2, n=100, d=64, bits=8, group=64, transpose=True,
                        dtype="float32", layout="expand_dims", sliced=False, route="cpu", force="fold", path="compile")
    outcome = fuzz.run(case)
    assert outcome.fired == "fold" and not outcome.ok and outcome.err_reference > 0.1
