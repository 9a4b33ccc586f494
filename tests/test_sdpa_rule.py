"""sdpa-noop-mask: masks that provably change nothing are dropped; every other mask is kept."""

import json
from pathlib import Path

import mlx.core as mx
import pytest

import mlxrewrite
from mlxrewrite.audit import audit_graph
from mlxrewrite.core.constants import summarize
from mlxrewrite.core.graph import Graph, dtype_name
from mlxrewrite.core.trace import recognise_sites

NAME = "sdpa-noop-mask"
FIXTURE = Path(__file__).parent / "fixtures" / "sdpa_gpu_trace.json"

B, H, H_KV, L, S, D = 1, 4, 2, 5, 16, 32
SCALE = D**-0.5


def qkv(l=L, b=B):
    mx.random.seed(1)
    return (mx.random.normal((b, H, l, D)), mx.random.normal((b, H_KV, S, D)), mx.random.normal((b, H_KV, S, D)))


def sdpa(mask_fn):
    """An attention whose mask is built by `mask_fn(q)` inside the function."""
    def fn(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask_fn(q))

    return fn


def no_mask(q, k, v):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE)


# ---- dropped -----------------------------------------------------------------------------------------

NOOP_MASKS = {  # q.shape[2] is the query length
    "ones_bool": lambda q: mx.ones((q.shape[2], S), dtype=mx.bool_),
    "ones_bool_4d": lambda q: mx.ones((1, 1, q.shape[2], S), dtype=mx.bool_),
    "zeros_additive": lambda q: mx.zeros((1, 1, q.shape[2], S)),
    "zeros_additive_per_head": lambda q: mx.zeros((1, H, q.shape[2], S)),
    "full_true": lambda q: mx.full((q.shape[2], S), True),
    "broadcast_constant_true": lambda q: mx.broadcast_to(mx.array(True), (B, H, q.shape[2], S)),
    "comparison_of_constants": lambda q: mx.arange(S)[None] >= 0,
    "row_broadcast_ones": lambda q: mx.ones((S,), dtype=mx.bool_),
    "logical_or_with_true": lambda q: (mx.arange(S)[None] > 8) | mx.ones((q.shape[2], S), dtype=mx.bool_),
}


@pytest.mark.parametrize("l", [1, L])
@pytest.mark.parametrize("mask", list(NOOP_MASKS))
def test_noop_mask_is_dropped(mask, l):
    fn = sdpa(NOOP_MASKS[mask])
    q, k, v = qkv(l)
    rewritten = mlxrewrite.compile(fn)
    out = rewritten(q, k, v)
    text = rewritten.explain()
    assert f"{NAME} -> drop_mask" in text, text
    expected = no_mask(q, k, v)
    assert mx.allclose(out, expected, rtol=1e-6, atol=1e-6).item()
    assert mx.allclose(out, fn(q, k, v), rtol=1e-5, atol=1e-6).item()  # and what the user wrote means the same

    before = mlxrewrite.audit(fn, q, k, v)
    (finding,) = before.findings
    assert finding.rule == NAME and finding.severity == "warning"
    assert finding.location.startswith(__file__) and "mask" in finding.shapes
    assert mlxrewrite.audit(rewritten, q, k, v).clean
    # the rewritten graph computes no mask at all: it is the graph of the call without one
    after = rewritten.trace_rewritten(q, k, v)
    assert live_ops(after) == live_ops(mlxrewrite.trace(no_mask, q, k, v))


def live_ops(graph):
    """Ops that the outputs depend on, in tape order. (trace_rewritten also keeps the nodes that compute
    the recorded calls' operands, e.g. the dropped mask, as dead nodes: see the report.)"""
    import networkx as nx

    live = set().union(*(nx.ancestors(graph.nx, name) for name in graph.outputs))
    return [n.op for n in graph.nodes if n.key in live]


# ---- kept ------------------------------------------------------------------------------------------

def causal_arange(q):
    offset = S - q.shape[2]
    return (mx.arange(q.shape[2])[:, None] + offset) >= mx.arange(S)[None]


KEPT_MASKS = {
    "causal_arange": causal_arange,
    "causal_additive": lambda q: mx.where(causal_arange(q), 0.0, -1e9),
    "partly_false": lambda q: mx.ones((q.shape[2], S), dtype=mx.bool_) & (mx.arange(S) != 3)[None],
    "additive_nonzero_constant": lambda q: mx.full((q.shape[2], S), -1.0),
    "additive_one_nonzero": lambda q: mx.zeros((q.shape[2], S)).at[0, 0].add(-5.0),
    "from_input": lambda q: mx.broadcast_to(q[..., :1] > -1e30, q.shape[:3] + (S,)),  # always True, not provably
    "zeros_times_input": lambda q: mx.zeros((q.shape[2], S)) * q[0, 0, :, :1],
}


@pytest.mark.parametrize("mask", list(KEPT_MASKS))
def test_meaningful_mask_is_kept(mask):
    fn = sdpa(KEPT_MASKS[mask])
    q, k, v = qkv()
    rewritten = mlxrewrite.compile(fn)
    out = rewritten(q, k, v)
    text = rewritten.explain()
    assert "no rule matched" in text and "->" not in text.split("signature #1:")[1], text
    assert mx.array_equal(out, mx.compile(fn)(q, k, v)).item()
    assert not [f for f in mlxrewrite.audit(fn, q, k, v).findings if f.rule == NAME]


def test_kept_masks_matter():
    """The kept constant masks really change the result (so dropping them would be wrong)."""
    q, k, v = qkv()
    for name in ("causal_arange", "causal_additive", "partly_false", "additive_one_nonzero"):
        assert not mx.allclose(sdpa(KEPT_MASKS[name])(q, k, v), no_mask(q, k, v), atol=1e-4).item(), name


def test_mask_passed_as_argument_is_kept():
    def fn(q, k, v, mask):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)

    q, k, v = qkv()
    mask = mx.ones((L, S), dtype=mx.bool_)  # all True, but an input: it may change between calls
    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(q, k, v, mask), mx.compile(fn)(q, k, v, mask)).item()
    assert "no rule matched" in rewritten.explain()
    partly = mask & (mx.arange(S) < 10)[None]
    assert mx.array_equal(rewritten(q, k, v, partly), mx.compile(fn)(q, k, v, partly)).item()
    assert rewritten.traces == 1


def test_mask_as_keyword_argument_is_kept():
    def fn(q, k, v, *, mask):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)

    q, k, v = qkv()
    mask = mx.zeros((L, S))
    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(q, k, v, mask=mask), mx.compile(fn)(q, k, v, mask=mask)).item()
    assert "no rule matched" in rewritten.explain()


def test_captured_state_mask_is_kept():
    state = {"mask": mx.ones((L, S), dtype=mx.bool_)}
    fn = sdpa(lambda q: state["mask"])
    q, k, v = qkv()
    rewritten = mlxrewrite.compile(fn, inputs=state)
    out = rewritten(q, k, v)
    assert "no rule matched" in rewritten.explain()
    state["mask"] = causal_arange(q)  # declared state: the new mask must be used
    out2 = rewritten(q, k, v)
    assert mx.array_equal(out2, sdpa(causal_arange)(q, k, v)).item()
    assert not mx.allclose(out, out2).item()


def test_causal_mode_string_is_untouched():
    fn = sdpa(lambda q: "causal")
    q, k, v = qkv()
    rewritten = mlxrewrite.compile(fn)
    assert mx.array_equal(rewritten(q, k, v), mx.compile(fn)(q, k, v)).item()
    assert "no rule matched" in rewritten.explain()


def test_disable_keeps_noop_mask():
    fn = sdpa(NOOP_MASKS["ones_bool"])
    q, k, v = qkv()
    rewritten = mlxrewrite.compile(fn, disable=(NAME,))
    assert mx.array_equal(rewritten(q, k, v), mx.compile(fn)(q, k, v)).item()
    assert "drop_mask" not in rewritten.explain()


def test_enlarging_mask_fails_like_the_original():
    # mask batch 2 against q batch 1: MLX refuses it; the rewrite must not silently make it work
    fn = sdpa(lambda q: mx.ones((2, 1, q.shape[2], S), dtype=mx.bool_))
    q, k, v = qkv()
    with pytest.raises(ValueError) as original:
        fn(q, k, v)
    with pytest.raises(ValueError) as rewritten:
        mlxrewrite.compile(fn)(q, k, v)
    assert str(rewritten.value) == str(original.value)


# ---- graph-form traces (the GPU exports ScaledDotProductAttention as one primitive) ----------------

def _dtype(text):
    name = str(text).removeprefix("mlx.core.")
    return mx.bool_ if name in ("bool", "bool_") else getattr(mx, name)


def _typed(entries):
    return [(entry[0], tuple(entry[1]), _dtype(entry[2])) for entry in entries]


def _tuples(arg):
    """JSON arguments -> export arguments: lists become tuples, dtype names become mx dtypes."""
    if isinstance(arg, (list, tuple)):
        return tuple(_tuples(a) for a in arg)
    if isinstance(arg, str) and isinstance(getattr(mx, arg.removeprefix("mlx.core."), None), mx.Dtype):
        return _dtype(arg)
    return arg


def load_events(data):
    """JSON (a list of event dicts, or {"events": [...]}) -> the dicts mx.export_function produces."""
    if isinstance(data, dict):
        data = data["events"]
    events = []
    for event in data:
        kind = event["type"]
        if kind == "inputs":
            events.append({"type": kind, "inputs": _typed(event["inputs"])})
        elif kind == "keyword_inputs":
            keywords = [(e[0], e[1], tuple(e[2]), _dtype(e[3])) for e in event.get("keywords", [])]
            events.append({"type": kind, "keywords": keywords})
        elif kind == "outputs":
            events.append({"type": kind, "outputs": _typed(event["outputs"])})
        elif kind == "constants":
            constants = []
            for c in event["constants"]:
                name, value, dtype = (c["name"], c["value"], c["dtype"]) if isinstance(c, dict) else c
                constants.append((name, mx.array(value, dtype=_dtype(dtype))))
            events.append({"type": kind, "constants": constants})
        elif kind == "primitive":
            events.append({"type": kind, "name": event["name"],
                           "arguments": [_tuples(a) for a in event.get("arguments", [])],
                           "inputs": _typed(event["inputs"]), "outputs": _typed(event["outputs"])})
        else:
            raise ValueError(f"unknown event type {kind!r}")
    return events


def dump_events(events):
    """The inverse of load_events, for real export events."""
    def entries(es):
        return [[n, list(s), dtype_name(d)] for n, s, d in es]

    def plain(arg):
        if isinstance(arg, (list, tuple)):
            return [plain(a) for a in arg]
        if isinstance(arg, mx.Dtype):
            return dtype_name(arg)
        return arg

    out = []
    for e in events:
        kind = e["type"]
        if kind in ("inputs", "outputs"):
            out.append({"type": kind, kind: entries(e[kind])})
        elif kind == "keyword_inputs":
            out.append({"type": kind, "keywords": [[k, n, list(s), dtype_name(d)] for k, n, s, d in e["keywords"]]})
        elif kind == "constants":
            out.append({"type": kind, "constants": [{"name": n, "value": a.tolist(), "dtype": dtype_name(a.dtype)}
                                                    for n, a in e["constants"]]})
        else:
            out.append({"type": kind, "name": e["name"], "arguments": plain(list(e["arguments"])),
                        "inputs": entries(e["inputs"]), "outputs": entries(e["outputs"])})
    return out


def graph_of(events):
    graph = Graph.from_export_events(events)
    graph.calls = recognise_sites(graph)
    return graph


def synthetic_gpu_events(mask_shape, mask_value=True, mask_dtype="bool"):
    """q, k, v inputs; a constant mask broadcast to `mask_shape`; one ScaledDotProductAttention primitive."""
    q, k = [B, H, L, D], [B, H_KV, S, D]
    return [
        {"type": "inputs", "inputs": [["q", q, "float16"], ["k", k, "float16"], ["v", k, "float16"]]},
        {"type": "keyword_inputs", "keywords": []},
        {"type": "outputs", "outputs": [["out", [B, H, L, D], "float16"]]},
        {"type": "constants", "constants": [{"name": "c", "value": mask_value, "dtype": mask_dtype}]},
        {"type": "primitive", "name": "Broadcast", "arguments": [list(mask_shape)],
         "inputs": [["c", [], mask_dtype]], "outputs": [["m", list(mask_shape), mask_dtype]]},
        {"type": "primitive", "name": "ScaledDotProductAttention", "arguments": [SCALE, False, False, False],
         "inputs": [["q", q, "float16"], ["k", k, "float16"], ["v", k, "float16"],
                    ["m", list(mask_shape), mask_dtype]],
         "outputs": [["out", [B, H, L, D], "float16"]]},
    ]


def test_load_events_roundtrip_of_a_real_export():
    def fn(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mx.ones((L, S), dtype=mx.bool_))

    events = []
    mx.export_function(events.append, fn, *qkv())
    text = json.dumps(dump_events(events))
    loaded = load_events(json.loads(text))
    assert [e["type"] for e in loaded] == [e["type"] for e in events]
    direct, reloaded = graph_of(events), graph_of(loaded)
    assert [(n.op, n.inputs, n.outputs) for n in direct.nodes] == [(n.op, n.inputs, n.outputs) for n in reloaded.nodes]
    assert [_tuples(list(n.args)) for n in direct.nodes] == [_tuples(list(n.args)) for n in reloaded.nodes]
    assert {k: (v.shape, v.dtype, v.strides, v.kind) for k, v in direct.values.items()} == \
        {k: (v.shape, v.dtype, v.strides, v.kind) for k, v in reloaded.values.items()}
    findings = audit_graph(reloaded).findings
    assert [f.rule for f in findings] == [NAME]
    # on CPU the attention is decomposed: the finding is the masking Select that feeds the Softmax
    assert reloaded.nodes[findings[0].node].op == "Select"
    assert findings[0].location == f"graph op{findings[0].node}"


@pytest.mark.parametrize("mask_shape,value,dtype,flagged", [
    ((L, S), True, "bool", True),
    ((B, 1, L, S), True, "bool", True),
    ((B, H, L, S), 0.0, "float16", True),
    ((L, S), False, "bool", False),
    ((L, S), -1.0, "float16", False),
    ((2, 1, L, S), True, "bool", False),   # would broadcast the output to batch 2: kept
    ((1, B, H, L, S), True, "bool", False),  # more dims than the scores: kept
])
def test_graph_form_sdpa_node(mask_shape, value, dtype, flagged):
    graph = graph_of(load_events(synthetic_gpu_events(mask_shape, value, dtype)))
    (node,) = graph.find("ScaledDotProductAttention")
    (site,) = graph.calls
    assert site.source == "graph" and site.node == node.index and site.operands["mask"] == "m"
    report = audit_graph(graph)
    if flagged:
        (finding,) = report.findings
        assert finding.rule == NAME and finding.node == node.index
        assert finding.location == f"graph op{node.index}"
        assert finding.shapes["mask"] == list(mask_shape)
        assert "drop_mask" in finding.fix
    else:
        assert report.clean, str(report)


def test_gpu_trace_fixture():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE.relative_to(Path(__file__).parent.parent)} not recorded yet (made on a GPU)")
    graph = graph_of(load_events(json.loads(FIXTURE.read_text())))
    findings = [f for f in audit_graph(graph).findings if f.rule == NAME]
    assert len(findings) == 1, str(audit_graph(graph))
    node = graph.nodes[findings[0].node]
    if node.op != "ScaledDotProductAttention":
        # MLX fell back to the decomposed attention on that GPU (array mask): then the finding must be
        # the masking step, a Select/Add between the scores Matmul and the Softmax
        assert node.op in ("Select", "Add"), node
        assert graph.producer(node.inputs[1 if node.op == "Select" else 0]).op == "Matmul"
        assert [c.op for c in graph.consumers(node.outputs[0])] == ["Softmax"]
    (site,) = [s for s in graph.calls if s.node == findings[0].node]
    summary = summarize(graph, site.operands["mask"])
    assert summary is not None and (summary.all_true or summary.all_zero)
