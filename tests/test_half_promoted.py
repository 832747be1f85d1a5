"""Half-precision models whose RoPE is computed in float32 by torch's type promotion (OLMo 2 in fp16: q is
cast to float32 to meet float32 cos/sin, and so is rotate_half(q)). The rotation is found through the casts,
rescaled and fused; onnxscript's mixed-precision RMSNorm fusion is kept type-consistent."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.hf_models import ARCHS, export_hf_onnx, ort_logits  # noqa: E402
from posrewrite import api  # noqa: E402


def _ids(n):
    return np.random.default_rng(n).integers(3, 128, size=(1, n))


@pytest.fixture(scope="module")
def olmo2_fp16():
    return export_hf_onnx("olmo2", dtype=torch.float16)


def test_found_through_casts(olmo2_fp16):
    found = api.inspect(olmo2_fp16)
    assert not found.refusals
    (site,) = found.sites
    assert site.rotations == 4 and site.base == pytest.approx(ARCHS["olmo2"].base)
    assert api.check(olmo2_fp16, max_length=4096).safe  # angles are float32 in this export


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_fused_runs_and_matches(olmo2_fp16, target, tmp_path):
    out = tmp_path / f"{target}.onnx"
    result = api.rewrite(olmo2_fp16, output=out, fuse=target)
    assert result.validation.ok
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("Cos") == ops.count("Sin") == 0
    for n in (16, 100):
        ref, got = ort_logits(olmo2_fp16, _ids(n)), ort_logits(out, _ids(n))
        assert float(np.max(np.abs(ref - got))) <= 5e-3 * (1 + float(np.max(np.abs(ref))))


def test_rescaled_matches_fp32_rescale(olmo2_fp16, tmp_path):
    """The fp16 export rescaled with YaRN follows the fp32 export rescaled the same way (fp16 noise apart)."""
    L = ARCHS["olmo2"].max_position_embeddings
    kw = dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L)
    half, full = tmp_path / "half.onnx", tmp_path / "full.onnx"
    api.rewrite(olmo2_fp16, output=half, **kw)
    api.rewrite(export_hf_onnx("olmo2"), output=full, **kw)
    ids = _ids(3 * L)
    ref = ort_logits(full, ids)
    assert float(np.max(np.abs(ort_logits(half, ids) - ref))) <= 2e-2 * (1 + float(np.max(np.abs(ref))))
