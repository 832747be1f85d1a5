"""--max-positions on length-limited encodings: the original fails in onnxruntime at 4x its table, the
rewritten model runs there, and within the table its logits are unchanged (and equal HF torch's)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx_ir as ir  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as ORTFail  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as ORTInvalidArgument  # noqa: E402

from fixtures.other_models import (  # noqa: E402
    TABLE,
    export_module_onnx,
    export_other_onnx,
    module_logits,
    ort_run,
    torch_logits,
)
from posrewrite.passes.onnx.detect import detect_other_encodings  # noqa: E402
from posrewrite.passes.onnx.extend_tables import ExtendTablesPass  # noqa: E402

LONG = 4 * TABLE


def ids(n, seed=0):
    return np.random.default_rng(seed).integers(3, 100, size=(1, n))


def extend(path, out, **kw):
    model = ir.load(path)
    sites, _ = detect_other_encodings(model)
    p = ExtendTablesPass(sites=sites, **kw)
    result = p(model)
    ir.save(result.model, out)
    return p, result.modified


@pytest.mark.parametrize("source", [("hf", "gpt2"), ("hf", "mpt"), ("hf", "opt"), ("module", "sinusoidal")])
def test_runs_past_table_and_unchanged_within(source, tmp_path):
    kind, name = source
    path = (
        export_other_onnx(name)[0] if kind == "hf" else export_module_onnx(name, mode="table", layout="interleaved")[0]
    )
    with pytest.raises((ORTFail, ORTInvalidArgument)):  # Gather out of range / Add cannot broadcast
        ort_run(path, ids(LONG))
    p, modified = extend(path, tmp_path / "ext.onnx", max_positions=LONG)
    assert modified and p.changes
    out = ort_run(tmp_path / "ext.onnx", ids(LONG))
    assert out.shape[1] == LONG and np.isfinite(out).all()
    for n in (TABLE // 2, TABLE):
        np.testing.assert_allclose(ort_run(tmp_path / "ext.onnx", ids(n)), ort_run(path, ids(n)), atol=1e-5, rtol=0)
    ref = torch_logits(name, ids(TABLE)) if kind == "hf" else module_logits(name, ids(TABLE), mode="table")
    np.testing.assert_allclose(ort_run(tmp_path / "ext.onnx", ids(TABLE)), ref, atol=1e-4, rtol=1e-4)


def test_sinusoidal_regenerated_rows_equal_the_formula(tmp_path):
    path, _ = export_module_onnx("sinusoidal", mode="table", layout="interleaved")
    extend(path, tmp_path / "ext.onnx", max_positions=LONG)
    # the same module built with a 4x table is the independent reference past the original length
    ref = module_logits("sinusoidal", ids(LONG), mode="table", layout="interleaved", max_len=LONG)
    np.testing.assert_allclose(ort_run(tmp_path / "ext.onnx", ids(LONG)), ref, atol=1e-4, rtol=1e-4)


def test_alibi_mpt_regenerated_equals_longer_hf_model(tmp_path):
    """MPT built with max_seq_len = 4L is what the regenerated table must reproduce past L."""
    import torch
    import transformers

    path, _ = export_other_onnx("mpt")
    extend(path, tmp_path / "ext.onnx", max_positions=LONG)
    model = __import__("fixtures.other_models", fromlist=["build_hf"]).build_hf("mpt")
    model.config.max_seq_len = LONG
    x = torch.as_tensor(ids(LONG))
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits.numpy()
    assert isinstance(model, transformers.MptForCausalLM)
    np.testing.assert_allclose(ort_run(tmp_path / "ext.onnx", ids(LONG)), ref, atol=1e-4, rtol=1e-4)


def test_computed_encodings_are_left_alone(tmp_path):
    path, _ = export_other_onnx("bloom")
    p, modified = extend(path, tmp_path / "ext.onnx", max_positions=LONG)
    assert not modified and any("extrapolates" in n for n in p.notes)
    p, modified = extend(path, tmp_path / "scaled.onnx", alibi_scale=2.0)
    assert modified
    (site,) = detect_other_encodings(ir.load(tmp_path / "scaled.onnx"))[0]
    np.testing.assert_allclose(site.slopes, np.asarray(detect_other_encodings(ir.load(path))[0][0].slopes) / 2)


def test_computed_sinusoid_pos_scale(tmp_path):
    path, _ = export_module_onnx("sinusoidal", mode="computed", layout="concat")
    p, modified = extend(path, tmp_path / "ext.onnx", pos_scale=2.0)
    assert modified
    assert not np.allclose(ort_run(tmp_path / "ext.onnx", ids(8)), ort_run(path, ids(8)))


def test_gpt_neo_mask_buffers_extended(tmp_path):
    """GPT-Neo bakes a causal mask (global layers) and a banded one (local layers, window 16) at T x T and
    slices them by length, one bound as min(seq, T). With --max-positions both grow by their rule in i - j
    and the bound moves. Reference: HF's GPT-Neo built for LONG positions (its masks computed by HF) whose
    position table is the rewritten model's interpolated block."""
    import onnx
    import torch
    import transformers

    from fixtures.other_models import build_hf
    from posrewrite import api

    path, _ = export_other_onnx("gpt_neo")
    with pytest.raises((ORTFail, ORTInvalidArgument)):
        ort_run(path, ids(LONG))
    out = tmp_path / "neo.onnx"
    result = api.rewrite(path, output=out, max_positions=LONG)
    assert result.validation.ok and sum("mask" in c for c in result.changes) == 2
    table = next(onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer
                 if tuple(i.dims) == (TABLE + LONG, 64))
    model = build_hf("gpt_neo")
    config = transformers.GPTNeoConfig(**{**model.config.to_dict(), "max_position_embeddings": LONG})
    longer = transformers.GPTNeoForCausalLM(config).eval()
    state = model.state_dict()
    state["transformer.wpe.weight"] = torch.from_numpy(table[TABLE:].copy())
    longer.load_state_dict(state)
    x = torch.from_numpy(ids(LONG))
    with torch.no_grad():
        ref = longer(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits.numpy()
    np.testing.assert_allclose(ort_run(out, ids(LONG)), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ort_run(out, ids(TABLE)), ort_run(path, ids(TABLE)), atol=1e-5, rtol=0)
