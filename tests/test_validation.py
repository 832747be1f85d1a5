"""Validation you can trust (issue 12): fused interleaved models equal the original, the validator's own
oracle catches injected faults and passes correct rewrites."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from posrewrite import api

REL = 1e-5  # of the logits' magnitude: fp32 round-off of a fusion is ~1e-6 of it on the fixtures


def _ids(n: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 128, size=(batch, n))


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("arch", ["cohere", "glm", "gptj"])
def test_interleaved_fused_with_position_ids_equals_original(arch, target, hf_onnx, tmp_path):
    """With a position_ids input, `--fuse ort` puts MultiHeadAttention after the RotaryEmbedding nodes; onnxscript's
    MHA rule re-creates those nodes without `interleaved`: the written nodes must say interleaved=1 and the logits
    stay the original's."""
    from fixtures.hf_models import ort_logits

    src = hf_onnx(arch, with_position_ids=True)
    out = tmp_path / f"fused-{target}.onnx"
    api.rewrite(src, output=out, fuse=target, validate=False)
    nodes = [n for n in onnx.load(out, load_external_data=False).graph.node if n.op_type == "RotaryEmbedding"]
    assert nodes
    for node in nodes:
        assert {a.name: a.i for a in node.attribute}.get("interleaved") == 1, node
    for n in (7, 40):
        ids = _ids(n)
        ref, got = ort_logits(src, ids), ort_logits(out, ids)
        assert np.max(np.abs(ref - got)) <= REL * np.max(np.abs(ref)), (arch, target, n)
