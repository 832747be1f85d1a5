"""Exports with a KV cache (the decode-step signature of onnxruntime-genai / Optimum models): past keys and
values are inputs, present ones outputs, positions continue after the past. The reference is HF's model
(same weights) called with a DynamicCache holding the same past."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.hf_models import ARCHS, export_hf_onnx_with_cache, hf_outputs_with_cache, kv_cache_inputs, ort_session  # noqa: E402
from posrewrite import api  # noqa: E402

TOL = 1e-5


def _ort(path, feeds):
    return ort_session(path).run(None, feeds)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_rescale_with_cache_equals_hf(arch, tmp_path):
    """A decode step past L with a rescaled cache model: logits and presents (the rotated new keys) equal HF's
    YaRN model on the same past; whole-model validation ran (decode-style feeds, not skipped)."""
    L = ARCHS[arch].max_position_embeddings
    src = export_hf_onnx_with_cache(arch)
    out = tmp_path / "yarn.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method="yarn", original_max_positions=L)
    whole = [r for r in result.validation.rows if r.site == "model"]
    assert whole and whole[0].ok and "ran" in whole[0].message
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    for past, seq in ((0, L // 2), (L + 3, 5), (3 * L, 1)):
        feeds = kv_cache_inputs(arch, past, seq)
        ref = hf_outputs_with_cache(arch, feeds, rope_parameters=params)
        got = _ort(out, feeds)
        for k, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert float(np.max(np.abs(a - b))) <= TOL, f"{arch} past={past} output {k}"


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_fuse_with_cache_equals_original(target, tmp_path):
    """Fusion of a cache model (RotaryEmbedding with position_ids after the past, attention fused around it
    where onnxscript's rules allow): logits and presents equal the original's and HF's on a decode step."""
    src = export_hf_onnx_with_cache("llama")
    out = tmp_path / "fused.onnx"
    result = api.rewrite(src, output=out, fuse=target)
    compared = [r for r in result.validation.rows if r.site == "model"]
    assert compared and compared[0].max_abs_error is not None  # the cache model was really run
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("Cos") == ops.count("Sin") == 0
    for past, seq in ((9, 4), (40, 1)):
        feeds = kv_cache_inputs("llama", past, seq)
        ref = hf_outputs_with_cache("llama", feeds)
        for k, (a, b) in enumerate(zip(ref, _ort(out, feeds), strict=True)):
            assert float(np.max(np.abs(a - b))) <= TOL, f"past={past} output {k}"
