"""mlxrewrite.intercept: where the dispatchers are visible, and what reaches a handler."""

import threading

import mlx.core as mx

from mlxrewrite import intercept

QMM = intercept.original("quantized_matmul")


def test_mlx_is_patched_only_while_a_handler_context_is_open():
    assert mx.quantized_matmul is QMM
    with intercept.handling(lambda call: call.run_original()):
        assert mx.quantized_matmul is not QMM and mx.quantized_matmul.__wrapped__ is QMM
        with intercept.handling(lambda call: call.run_original()):
            pass
        assert mx.quantized_matmul is not QMM  # nested: still open
    assert mx.quantized_matmul is QMM
    with intercept.handling(lambda call: call.run_original(), patch_mlx=False):
        assert mx.quantized_matmul is QMM


def test_other_threads_calls_run_as_written_while_patched():
    seen = []
    result = {}

    def qmm():
        x, w = mx.ones((2, 64)), mx.quantize(mx.ones((8, 64)), group_size=64, bits=4)
        out = mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=4)
        return mx.array_equal(out, QMM(x, *w, transpose=True, group_size=64, bits=4)).item()

    def other_thread():  # MLX streams are per thread: build and evaluate there
        result["equal"] = qmm()

    with intercept.handling(lambda call: seen.append(call) or call.run_original()):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert qmm()
    assert len(seen) == 1 and seen[0].location.startswith(__file__)
    assert result["equal"]


def test_instrumented_namespace_reaches_the_dispatchers_without_patching_mlx():
    core = intercept.instrumented_mlx()
    q = mx.ones((1, 1, 2, 8))
    seen = []
    with intercept.handling(lambda call: seen.append(call.api) or call.run_original(), patch_mlx=False):
        core.fast.scaled_dot_product_attention(q, q, q, scale=1.0)
        mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0)  # plain MLX: not seen
    assert seen == ["scaled_dot_product_attention"]
    assert core.zeros is mx.zeros and core.fast.rms_norm is mx.fast.rms_norm


def test_gate_admits_calls_by_operand_rank_without_binding():
    spec = intercept.APIS["quantized_matmul"]
    gate = intercept.Gate({"quantized_matmul": [{"x": 3, "w": 3}]})
    x3, x2, w3 = mx.zeros((1, 2, 8)), mx.zeros((2, 8)), mx.zeros((1, 8, 8), mx.uint32)
    assert gate.admits(spec, (x3, w3), {})
    assert gate.admits(spec, (x3,), {"w": w3})
    assert not gate.admits(spec, (x2, w3), {})
    assert not intercept.Gate({}).admits(spec, (x3, w3), {})
    assert intercept.Gate({"quantized_matmul": [{}]}).admits(spec, (x2, x2), {})
