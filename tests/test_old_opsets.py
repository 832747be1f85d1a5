"""Models at opset 11 / 12, where Unsqueeze, Split and ReduceMean take `axes` / `split` as attributes.

Detection evaluates constant cones and probe inputs at the model's own opset (an opset-11 `Unsqueeze(axes=)`
run at a later opset raised TypeError and the site was lost). Expected values come from the numbers the
models were built with (fixtures/old_opsets.py), not from the graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from fixtures.old_opsets import alibi_attention, alibi_slopes, rope_attention
from posrewrite import api
from posrewrite.passes.onnx.detect_other import detect_other_encodings

OPSETS = [11, 12]


def _save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize("opset", OPSETS)
def test_rope_angles_through_an_old_unsqueeze(opset, tmp_path):
    """inv_freq = 1 / base ** Unsqueeze(arange(0, d, 2) / d, axes=[0]): folded at the model's opset."""
    base, head_dim = 5000.0, 8
    path = _save(rope_attention(opset, base=base, head_dim=head_dim), tmp_path / "rope.onnx")
    found = api.inspect(path)
    assert [type(s).__name__ for s in found.sites] == ["RopeSite"], found.refusals
    site = found.sites[0]
    assert site.base == pytest.approx(base, rel=1e-5)
    assert site.rotary_dim == head_dim


@pytest.mark.parametrize("opset", OPSETS)
def test_alibi_probe_through_an_old_unsqueeze(opset, tmp_path):
    """slopes * Unsqueeze(arange(seq), axes=[0, 1]): the probe evaluates the key positions at the model's opset."""
    heads = 4
    path = _save(alibi_attention(opset, heads=heads), tmp_path / "alibi.onnx")
    sites, refusals = detect_other_encodings(ir.load(path))
    assert refusals == []
    assert [s.kind for s in sites] == ["alibi"]
    site = sites[0]
    assert site.source == "computed" and site.num_heads == heads
    np.testing.assert_allclose(site.slopes, alibi_slopes(heads), rtol=1e-6)
