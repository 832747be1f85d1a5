"""`--fuse ort` on decode-style exports (Optimum's layout: input_ids, attention_mask, position_ids,
past_key_values.* in; logits, present.* out). The reference is the original export run in onnxruntime on the
same feeds (prefill and decode steps, with and without left padding)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from fixtures.llama_graph import build_llama
from posrewrite import api

_EPS32 = float(np.finfo(np.float32).eps)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _gqa_attributes(path) -> list[dict]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} | {"inputs": list(n.input)}
            for n in graph.node if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("form", ["rotary_inside", "rotary_outside", "views_unproven"])
def test_optimum_layout_fused_equals_original(form, tmp_path, monkeypatch):
    """GroupQueryAttention per layer (no Softmax left), residual + RMSNorm pairs fused; logits and presents equal
    the original's within fp32 round-off at every non-padded position, prefill, decode and left padding (where
    Optimum's position_ids are cumsum(mask) - 1, not past + i). RoPE inside GroupQueryAttention (do_rotary=1,
    the graph's position_ids as its position_ids input); when the probe of the kernel's rotary contract says no
    (simulated here), the RotaryEmbedding nodes stay before it and the note says why. q/k/v and the output are
    the projections' / o_proj's own tensors; where the reshapes between are not proven views (simulated), the
    [B, S, N*D] views are written instead."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from fixtures.hf_models import export_optimum_layout, optimum_feeds, ort_session
    from posrewrite.passes.onnx.attention import cache_probe, cache_views

    rotary_inside = form != "rotary_outside"
    if not rotary_inside:
        monkeypatch.setattr(cache_probe, "rotary_probe", lambda *a: "simulated: the kernel rotates differently")
    if form == "views_unproven":
        monkeypatch.setattr(cache_views, "flat_projection", lambda *a: None)
        monkeypatch.setattr(cache_views, "flat_output", lambda *a: None)
    src = export_optimum_layout(num_layers=2)
    out = tmp_path / "fused.onnx"
    result = api.rewrite(src, output=out, fuse="ort")
    assert any("GroupQueryAttention" in c for c in result.changes), result.notes
    ops = _ops(out)
    assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0 and ops["MultiHeadAttention"] == 0
    assert ops["SkipSimplifiedLayerNormalization"] == 4  # 2 layers x (attention, MLP) residual pairs
    assert ops["Cos"] == ops["Sin"] == 0
    # q/k/v straight from their projections, the output straight into o_proj: no head transposes left
    assert (ops["Transpose"] == 0) == (form != "views_unproven"), ops
    assert any("head reshapes/transposes kept around 2" in c for c in result.changes) == (form == "views_unproven")
    gqa = _gqa_attributes(out)
    # one mask for both layers (the export writes one per layer), its clamp folded into constants; the cache is
    # not concatenated just to read the total length
    assert len({g["inputs"][10] for g in gqa}) == 1 and ops["Max"] == 0, gqa
    graph = onnx.load(str(out), load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "Concat" and any("past" in i for i in n.input)]
    if rotary_inside:
        assert ops["RotaryEmbedding"] == 0
        assert all(g.get("do_rotary") == 1 and g["inputs"][9] for g in gqa), gqa  # position_ids given
        assert any("RoPE inside 2" in c for c in result.changes), result.changes
    else:
        assert ops["RotaryEmbedding"] == 4
        assert all(not g.get("do_rotary") for g in gqa), gqa
        assert any("RotaryEmbedding before 2: simulated" in c for c in result.changes), result.changes
    original, fused = ort_session(src), ort_session(out)
    for batch, past, seq, pad in ((1, 0, 9, 0), (2, 0, 9, 3), (2, 9, 1, 3), (1, 20, 4, 0), (2, 6, 3, 0)):
        feeds = optimum_feeds(src, batch=batch, past=past, seq=seq, left_pad=pad)
        ref, got = original.run(None, feeds), fused.run(None, feeds)
        keep = feeds["attention_mask"].astype(bool)
        for k, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert np.all(np.isfinite(b))
            # logits: [B, S, V] at the new positions; presents: [B, Hkv, T, D] at every position
            diff = np.abs(a - b)[keep[:, past:]] if k == 0 else np.abs(a - b).transpose(0, 2, 1, 3)[keep]
            tol = 64 * _EPS32 * max(1.0, float(np.max(np.abs(a))))
            assert float(diff.max()) <= tol, f"batch={batch} past={past} seq={seq} pad={pad} output {k}"


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_only_where_the_bias_masks_the_future(causal, tmp_path):
    """A bias that masks only padding (not future keys) is not GroupQueryAttention's contract: refused, with
    the reason in the notes; a causal + padding bias is fused."""
    src = build_llama(tmp_path / "m" / "model.onnx", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128,
                      vocab=128, causal=causal)
    out = tmp_path / "fused.onnx"
    result = api.rewrite(src, output=out, fuse="ort", validate=False)
    ops = _ops(out)
    if causal:
        assert ops["GroupQueryAttention"] == 2 and ops["Softmax"] == 0
    else:
        assert ops["GroupQueryAttention"] == 0
        assert any("not causal" in n for n in result.notes), result.notes


def test_rewrites_never_read_untouched_weights(tmp_path, monkeypatch):
    """Rescale and --fuse ort on an export with external data: no weight is read into memory (the data file is
    copied file to file); only the small tensors a pass rewrites are."""
    src = build_llama(tmp_path / "m" / "model.onnx", layers=2, hidden=256, heads=8, kv_heads=2, intermediate=512,
                      vocab=512)
    read: list[str] = []

    def guard(method):
        def wrapped(self, *args, **kwargs):
            if self.nbytes > 16384:
                read.append(self.name)
            return method(self, *args, **kwargs)

        return wrapped

    for name in ("numpy", "tobytes", "__array__"):
        monkeypatch.setattr(ir.ExternalTensor, name, guard(getattr(ir.ExternalTensor, name)))
    api.rewrite(src, output=tmp_path / "r.onnx", rope_scale=2.0, rope_method="yarn", original_max_positions=4096,
                validate=False)
    api.rewrite(src, output=tmp_path / "f.onnx", fuse="ort", validate=False)
    assert read == []
    assert _ops(tmp_path / "f.onnx")["GroupQueryAttention"] == 2


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_head_reshape_is_read_as_a_view_only_when_proven(order):
    """x [B, S, 2*4] -> Reshape(x, [dim a of x, dim b of x, 2, 4]) -> Transpose(0, 2, 1, 3): GroupQueryAttention
    may read x itself only when (a, b) = (0, 1); with batch and sequence swapped the heads are other data."""
    from types import SimpleNamespace

    from posrewrite.passes.onnx.attention import cache_views

    x = ir.Value(name="x", shape=ir.Shape(["B", "S", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.node("Shape", [x])
    picks = [ir.node("Gather", [shape.outputs[0], ir.Value(name=f"i{k}", const_value=ir.tensor(np.array([k])))])
             for k in order]
    heads = ir.Value(name="hd", const_value=ir.tensor(np.array([2, 4], np.int64)))
    target = ir.node("Concat", [picks[0].outputs[0], picks[1].outputs[0], heads], {"axis": 0})
    reshape = ir.node("Reshape", [x, target.outputs[0]])
    transpose = ir.node("Transpose", [reshape.outputs[0]], {"perm": [0, 2, 1, 3]})
    att = SimpleNamespace(out=ir.Value(name="out"), q_rot=SimpleNamespace(inputs=[transpose.outputs[0]]),
                          k_rot=SimpleNamespace(inputs=[ir.Value(name="k")]), heads=2, kv_heads=2, head_size=4)
    found = cache_views.flat_projection(cache_views.Dims(att), transpose.outputs[0], 2)
    assert (found is x) == (order == (0, 1))
