"""`--fuse ort` also fuses the attention around the fused RoPE: GroupQueryAttention (RoPE inside) where that is
exact (causal mask verified, positions 0..S-1), MultiHeadAttention after RotaryEmbedding otherwise."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from posrewrite import api
from posrewrite.passes.onnx.attention import fuse as fuse_attention
from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass

TOL = 1e-5


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def _ids(n: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(n).integers(3, 128, size=(batch, n))


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("llama", "GroupQueryAttention"),
        ("qwen3", "GroupQueryAttention"),
        ("cohere", "GroupQueryAttention"),
        ("gpt_neox", "MultiHeadAttention"),
        ("glm", "MultiHeadAttention"),
        ("gptj", "MultiHeadAttention"),
    ],
)
def test_attention_fused_and_exact(arch, expected, hf_onnx, tmp_path):
    from fixtures.hf_models import ort_logits

    src = hf_onnx(arch)
    out = tmp_path / "fused.onnx"
    result = api.rewrite(src, output=out, fuse="ort")
    onnx.checker.check_model(onnx.load(out), full_check=True)
    ops = _ops(out)
    assert ops[expected] == 2 and ops["Softmax"] == 0, ops
    assert ops["Cos"] == ops["Sin"] == ops["Neg"] == 0
    assert any("fused attention" in c for c in result.changes)
    for n in (9, 60):
        assert float(np.max(np.abs(ort_logits(out, _ids(n)) - ort_logits(src, _ids(n))))) <= TOL


def test_position_ids_input_keeps_rotary_nodes(llama_pos_onnx, tmp_path):
    """GQA would rotate by 0..S-1 whatever position_ids say: MultiHeadAttention after RotaryEmbedding instead."""
    from fixtures.hf_models import ort_logits

    out = tmp_path / "fused.onnx"
    result = api.rewrite(llama_pos_onnx, output=out, fuse="ort")
    ops = _ops(out)
    assert ops["GroupQueryAttention"] == 0 and ops["MultiHeadAttention"] == 2 and ops["RotaryEmbedding"] == 4
    assert any("position_ids is a model input" in n for n in result.notes)
    ids = _ids(40)
    pos = np.stack([np.arange(40) + 3, np.arange(40) + 11])
    assert float(np.max(np.abs(ort_logits(out, ids, pos) - ort_logits(llama_pos_onnx, ids, pos)))) <= TOL


@pytest.mark.parametrize("arch,with_positions", [("llama", False), ("llama", True), ("gpt_neox", False)])
def test_fuse_onnx_attention23(arch, with_positions, hf_onnx, tmp_path):
    """--fuse onnx: Attention-23 after RotaryEmbedding-23; is_causal only where the mask was verified causal."""
    from fixtures.hf_models import ort_logits

    src = hf_onnx(arch, with_position_ids=with_positions)
    out = tmp_path / "fused23.onnx"
    api.rewrite(src, output=out, fuse="onnx")
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["Attention"] == 2 and ops["RotaryEmbedding"] == 4 and ops["Softmax"] == 0, ops
    causal = [
        any(a.name == "is_causal" and a.i for a in n.attribute) for n in proto.graph.node if n.op_type == "Attention"
    ]
    assert all(causal) != with_positions  # position_ids feed HF's packed-sequence mask: kept as attn_mask
    ids = _ids(40)
    pos = np.stack([np.arange(40) + 3, np.arange(40) + 11]) if with_positions else None
    assert float(np.max(np.abs(ort_logits(out, ids, pos) - ort_logits(src, ids, pos)))) <= TOL


def test_mask_probe_tells_causal_from_sliding(hf_onnx):
    """Gemma 2 alternates sliding-window (32 tokens) and full causal layers: the probe sees both."""
    model = ir.load(str(hf_onnx("gemma2")))
    FuseRotaryPass(sites=api.detect(model).rope_sites, target="ort")(model)
    kinds = set()
    for node in model.graph:
        if node.op_type == "Softmax":
            add = node.inputs[0].producer()
            assert add.op_type == "Add"
            kinds.add(fuse_attention._mask_kind(model, add.inputs[1], (3, 12)))
    assert kinds == {"causal", "sliding window of 32 tokens"}


def test_yarn_rescale_fuse_ort_equals_hf(hf_onnx, tmp_path):
    """One command rescales (YaRN x4), fuses RoPE and attention; the logits are HF's YaRN model's."""
    from fixtures.hf_models import hf_logits, ort_logits

    out = tmp_path / "yarn.onnx"
    result = api.rewrite(
        hf_onnx("llama"), output=out, fuse="ort", rope_scale=4.0, rope_method="yarn", original_max_positions=64
    )
    assert result.validation.ok
    assert _ops(out)["GroupQueryAttention"] == 2
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    for n in (32, 200):
        ids = _ids(n, batch=1)
        assert float(np.max(np.abs(hf_logits("llama", ids, rope_parameters=params) - ort_logits(out, ids)))) <= TOL
