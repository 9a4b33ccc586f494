"""mlxrewrite.trace and the Graph IR: printing, networkx and DOT views, call sites, kwargs; audit reports."""

import json
import re
from pathlib import Path

import mlx.core as mx
import networkx as nx
import pytest

import mlxrewrite
from mlxrewrite import TraceError

THIS_FILE = str(Path(__file__).resolve())
QUANT = mx.quantize(mx.random.normal((1, 2, 128, 128)), group_size=64, bits=8)
XQ = mx.random.normal((1, 2, 3, 4, 128))


def _line_of(marker):
    lines = Path(__file__).read_text().splitlines()
    (number,) = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(marker)]
    return number


def gqa_like(x, w, s, b):
    keys = [mx.expand_dims(a, -3) for a in (w, s, b)]
    scores = mx.quantized_matmul(x, *keys, transpose=True, group_size=64, bits=8)  # <- qmm call site
    return mx.softmax(scores, axis=-1)


def broadcast_fn(x):
    return mx.exp(mx.broadcast_to(x[:, None], (2, 4, 3)))


def test_print_shows_ops_types_and_stride_annotations():
    graph = mlxrewrite.trace(broadcast_fn, mx.ones((2, 3)))
    text = str(graph)
    assert text.startswith("{ lambda ") and text.rstrip().endswith("}")
    for op in ("ExpandDims", "Broadcast", "Exp"):
        assert op in text
    (bline,) = [ln for ln in text.splitlines() if "= Broadcast[(2,4,3)]" in ln]
    assert "float32[2,4,3]{3,0,1}" in bline, text  # the broadcast dim has stride 0
    (eline,) = [ln for ln in text.splitlines() if "= Exp " in ln]
    assert "{" not in eline.split("=")[0]  # a row-major result carries no annotation
    assert "consts" not in text
    assert "consts" in str(mlxrewrite.trace(lambda x: x * 2.0, mx.ones(3)))
    assert repr(graph) == f"<Graph: 1 inputs, {len(graph.nodes)} ops, 1 outputs>"


def test_print_shows_call_site_location():
    graph = mlxrewrite.trace(gqa_like, XQ, *QUANT)
    (line,) = [ln for ln in str(graph).splitlines() if "QuantizedMatmul" in ln]
    assert line.endswith(f"# {THIS_FILE}:{_line_of('# <- qmm call site')}")


def test_values_have_shape_dtype_strides():
    graph = mlxrewrite.trace(broadcast_fn, mx.ones((2, 3)))
    (node,) = graph.find("Broadcast")
    value = graph.values[node.outputs[0]]
    assert value.shape == (2, 4, 3) and value.dtype == mx.float32 and value.strides == (3, 0, 1)
    assert value.type_str == "float32[2,4,3]"
    assert graph.values[graph.inputs[0]].kind == "input"
    assert graph.producer(node.outputs[0]) is node
    assert [c.op for c in graph.consumers(node.outputs[0])] == ["Exp"]
    assert graph.depends_on_inputs(graph.outputs[0])
    assert list(graph) == graph.nodes


def test_to_networkx_is_a_bipartite_dag():
    graph = mlxrewrite.trace(gqa_like, XQ, *QUANT)
    g = graph.to_networkx()
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    kinds = nx.get_node_attributes(g, "kind")
    ops = {n for n, k in kinds.items() if k == "op"}
    values = {n for n, k in kinds.items() if k == "value"}
    assert ops == {node.key for node in graph.nodes}
    assert values == set(graph.values)
    assert all((u in ops) != (v in ops) for u, v in g.edges)  # op -> value -> op only
    assert {g.nodes[n]["node"].op for n in ops} >= {"ExpandDims", "QuantizedMatmul", "Softmax"}
    # the output is reachable from every input
    assert all(nx.has_path(g, name, graph.outputs[0]) for name in graph.inputs)
    g.remove_node(graph.outputs[0])  # a copy: the graph itself is untouched
    assert graph.outputs[0] in graph.nx


def test_to_dot():
    graph = mlxrewrite.trace(gqa_like, XQ, *QUANT)
    (qmm,) = graph.find("QuantizedMatmul")
    dot = graph.to_dot(highlight=[qmm.key], title="gqa")
    assert dot.startswith("digraph G {") and dot.rstrip().endswith("}")
    assert 'label="gqa"' in dot
    lines = dot.splitlines()
    (qline,) = [ln for ln in lines if ln.strip().startswith(f"{qmm.key} [")]
    assert "fillcolor=" in qline and "color=red" in qline
    assert f"test_graph.py:{_line_of('# <- qmm call site')}" in qline  # the call site in the label
    others = [ln for ln in lines if re.match(r"\s*op\d+ \[", ln) and not ln.strip().startswith(f"{qmm.key} [")]
    assert len(others) == len(graph.nodes) - 1 and not any("color=red" in ln for ln in others)
    # every edge source is a declared node
    declared = {m.group(1) for m in re.finditer(r'^\s*("[^"]+"|\w+) \[', dot, re.M)}
    for m in re.finditer(r'^\s*("[^"]+"|\w+) -> (\w+)', dot, re.M):
        assert m.group(1) in declared, m.group(0)
        assert m.group(2) in declared, m.group(0)
    assert "color=red" not in graph.to_dot()


def test_calls_record_file_and_line():
    graph = mlxrewrite.trace(gqa_like, XQ, *QUANT)
    python_sites = [s for s in graph.calls if s.source == "python"]
    (site,) = python_sites
    assert site.api == "quantized_matmul"
    assert site.location == f"{THIS_FILE}:{_line_of('# <- qmm call site')}"
    assert site.where() == site.location
    assert site.params == {"transpose": True, "group_size": 64, "bits": 8, "mode": "affine"}
    assert graph.nodes[site.node].op == "QuantizedMatmul"
    assert graph.values[site.operands["x"]].shape == (1, 2, 3, 4, 128)
    assert graph.values[site.operands["w"]].shape == (1, 2, 1, 128, 32)
    assert graph.values[site.output].shape == (1, 2, 3, 4, 128)
    assert site.operands["x"] == graph.inputs[0]


def test_graph_recognises_calls_without_python_records():
    def manual_attention(q, k):
        scores = q @ k.swapaxes(-1, -2)
        scores = mx.where(mx.ones(scores.shape[-2:], dtype=mx.bool_), scores, -1e9)
        return mx.softmax(scores, axis=-1) @ k

    q = mx.random.normal((1, 2, 3, 8))
    graph = mlxrewrite.trace(manual_attention, q, q)
    (site,) = graph.calls
    assert site.source == "graph" and site.params == {"decomposed": "Select"}
    assert site.where() == f"graph op{site.node}"
    report = mlxrewrite.audit(manual_attention, q, q)
    assert [f.rule for f in report.findings] == ["sdpa-noop-mask"]


def test_kwargs_inputs_are_traced():
    def fn(x, *, bias, scale=2.0):
        return x * scale + bias

    x, bias = mx.ones((2, 3)), mx.arange(3, dtype=mx.float32)
    graph = mlxrewrite.trace(fn, x, bias=bias, scale=3.0)
    assert len(graph.inputs) == 2
    assert [graph.values[n].shape for n in graph.inputs] == [(2, 3), (3,)]
    out = graph.outputs[0]
    assert all(nx.has_path(graph.nx, name, out) for name in graph.inputs)
    consts = [v for v in graph.values.values() if v.kind == "constant"]
    assert any(v.data is not None and v.data.size == 1 and v.data.item() == 3.0 for v in consts)


def test_trace_errors():
    with pytest.raises(TraceError, match="exporter"):
        mlxrewrite.trace(lambda x: mx.contiguous(x.T), mx.ones((2, 3)))
    with pytest.raises(ValueError, match="matmul"):
        mlxrewrite.trace(lambda x: x @ x, mx.ones((2, 3)))


def test_trace_of_compiled_function_is_rewritten():
    rewritten = mlxrewrite.compile(gqa_like)
    original = mlxrewrite.trace(gqa_like, XQ, *QUANT)
    after = mlxrewrite.trace(rewritten, XQ, *QUANT)
    (qmm_before,), (qmm_after,) = original.find("QuantizedMatmul"), after.find("QuantizedMatmul")
    assert after.values[qmm_after.inputs[0]].shape == (1, 2, 1, 12, 128)  # 3 repeats folded into M=4
    assert original.values[qmm_before.inputs[0]].shape == (1, 2, 3, 4, 128)


def test_audit_report_text_and_json():
    report = mlxrewrite.audit(gqa_like, XQ, *QUANT)
    assert not report.clean and report.backend == "cpu"
    text = str(report)
    assert text.startswith("audit (cpu): 1 hazard(s) in 1 call site(s)")
    assert "[error] quantized-matmul-broadcast-weights" in text and "fold" in text
    data = json.loads(report.to_json())
    assert data["schema"] == 1 and data["call_sites"] == 1
    (finding,) = data["findings"]
    assert finding["rule"] == "quantized-matmul-broadcast-weights"
    assert finding["location"] == f"{THIS_FILE}:{_line_of('# <- qmm call site')}"
    assert finding["shapes"]["w"] == [1, 2, 1, 128, 32] and finding["dtypes"]["w"] == "uint32"
    assert set(finding) >= {"severity", "op", "node", "strides", "why", "fix"}

    clean = mlxrewrite.audit(lambda x: x + 1, mx.ones(3))
    assert clean.clean and str(clean) == "audit (cpu): no hazards in 0 call site(s)"
    assert json.loads(clean.to_json())["findings"] == []


def test_causal_sdpa_is_one_call_site_on_cpu():
    """CPU exports SDPA decomposed; its masking step must not count as a second call site."""
    q = mx.ones((1, 2, 4, 8))
    graph = mlxrewrite.trace(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask="causal"), q)
    assert [(c.api, c.source) for c in graph.calls] == [("scaled_dot_product_attention", "python")]
    hand_written = mlxrewrite.trace(lambda q: mx.softmax(q @ q.swapaxes(-1, -2) + mx.zeros((4, 4)), axis=-1) @ q, q)
    assert [c.source for c in hand_written.calls] == ["graph"]  # a decomposition with no Python call is kept
