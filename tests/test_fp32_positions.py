"""--fp32-positions: the dtype trace, the rewrite of half-precision RoPE, and what onnxruntime
computes before and after at 4096 tokens against a float64 reference.

Bound (fixtures.precision_models.ROTARY_BOUND_FACTOR): a float16 rotation whose cos/sin are correctly rounded
from float32 angles is within 2^-9 * (|x| + |rotate_half(x)|) of the exact rotation, element-wise.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fixtures.modules import build_fp16_legacy_rope  # noqa: E402
from fixtures.precision_models import (  # noqa: E402
    bf16_variant,
    build_legacy_rotary,
    ort_rotary,
    reference_rotary,
    rotary_bound,
)
from posrewrite import api, io  # noqa: E402
from posrewrite.math import rope as rope_math  # noqa: E402
from posrewrite.passes.onnx.rope.fp32 import Fp32PositionsPass  # noqa: E402
from posrewrite.passes.onnx.rope.precision import (  # noqa: E402
    needs_fp32_positions,
    rope_site_precision,
    trace_rope_dtypes,
)

N = 4096


@pytest.fixture(scope="module")
def full_fp16():
    return build_fp16_legacy_rope()


@pytest.fixture(scope="module")
def rotary_fp16():
    return build_legacy_rotary(angles="computed")


@pytest.fixture(scope="module")
def rotary_cached():
    return build_legacy_rotary(angles="cached")


def _rewrite(path, out):
    return api.rewrite(path, fp32_positions=True, output=str(out), validate=False)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _qkv(n, info, seed=0):
    rng = np.random.default_rng(seed)
    shape = (1, n, info["num_heads"], info["head_dim"])
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


def _ratio(y, x, info, positions):
    """max |y - exact| / bound over all elements (<= 1: within the stated fp16 bound)."""
    ref = reference_rotary(x, positions, info)
    return float(np.max(np.abs(y.astype(np.float64) - ref) / rotary_bound(x)))


# ------------------------------------------------------------------------------------------ analysis


def test_trace_follows_casts_of_the_legacy_model(full_fp16):
    path, _ = full_fp16
    (site,) = api.detect(io.load_model(path)).rope_sites
    trace = trace_rope_dtypes(site)
    assert trace.position_dtype == "float16"  # Range runs in float32, then Cast to float16
    assert trace.positions[-3:] == ["Range:float32", "Cast:float16", "Unsqueeze:float16"]
    assert (trace.inv_freq_dtype, trace.angle_dtype, trace.cos_sin_dtype, trace.applied_dtype) == ("float16",) * 4
    assert trace.low_precision
    row = rope_site_precision(site, N)
    # reference: numpy's own rounding of the positions 0..N-1 to float16
    half = np.arange(N).astype(np.float16)
    exact = int(np.sum(half.astype(np.float64) == np.arange(N)))
    _, inverse, counts = np.unique(half, return_inverse=True, return_counts=True)
    colliding = int(np.sum(counts[inverse] > 1))
    assert exact < N  # past 2048 only every second integer is a float16
    assert row["exact_positions"] == exact and row["colliding_positions"] == colliding and not row["safe"]
    assert row["max_angle_error"] >= 1.0  # one ulp of an fp16 angle in [2048, 4096) is 2 rad


def test_needs_fp32_positions(full_fp16, llama_onnx, tmp_path):
    path, _ = full_fp16
    assert needs_fp32_positions(api.detect(io.load_model(path)).sites)
    assert not needs_fp32_positions(api.detect(io.load_model(llama_onnx)).sites)
    _rewrite(path, tmp_path / "out.onnx")
    assert not needs_fp32_positions(api.detect(io.load_model(tmp_path / "out.onnx")).sites)


# ------------------------------------------------------------------------------------------ rewrite


def test_rotary_module_at_4096_matches_fp64_within_fp16_bound(rotary_fp16, tmp_path):
    path, info = rotary_fp16
    out = tmp_path / "fp32.onnx"
    result = _rewrite(path, out)
    assert result.modified and "float32" in result.changes[0]
    q, k = _qkv(N, info)
    pos = np.arange(N)
    before = ort_rotary(path, q, k)
    after = ort_rotary(out, q, k)
    for x, yb, ya in zip((q, k), before, after, strict=True):
        assert ya.dtype == np.float16
        assert _ratio(ya, x, info, pos) <= 1.0  # measured ~0.25
        assert _ratio(yb, x, info, pos) > 100.0  # measured ~545: angles off by up to 2.2 rad
    # below 2048 tokens positions are exact in fp16, but the fp16 angles already break the bound
    short = 1024
    assert _ratio(before[0][:, :short], q[:, :short], info, pos[:short]) > 2.0
    rows = api.check(out, max_length=N).sites
    assert rows[0]["safe"] and rows[0]["exact_position_fraction"] == 1.0


def test_rest_of_graph_keeps_its_dtype(rotary_fp16, tmp_path):
    path, _ = rotary_fp16
    out = tmp_path / "fp32.onnx"
    _rewrite(path, out)
    before, after = onnx.load(str(path)), onnx.load(str(out))
    sig = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert sig(before) == sig(after)
    m = io.load_model(out)
    (site,) = api.detect(m).rope_sites
    for app in site.applications:  # q/k and what multiplies them stay float16; one Cast each for cos and sin
        assert app.input.dtype == ir.DataType.FLOAT16 and app.output.dtype == ir.DataType.FLOAT16
        for v in (app.cos, app.sin):
            assert v.dtype == ir.DataType.FLOAT16 and v.producer().op_type == "Cast"
            assert v.producer().inputs[0].dtype == ir.DataType.FLOAT
    casts = [n for n in m.graph if n.op_type == "Cast" and n.outputs[0].dtype == ir.DataType.FLOAT16]
    assert len(casts) == 2
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT for n in m.graph if n.op_type in ("Cos", "Sin"))


def test_full_model_rotated_qk_at_4096(full_fp16, tmp_path):
    """The one-layer fp16 LM: q/k just before and after the rotation are exposed as outputs."""
    path, info = full_fp16
    fixed = tmp_path / "fp32.onnx"
    _rewrite(path, fixed)
    ids = np.random.default_rng(0).integers(3, info["vocab"], (1, N))
    pos = np.arange(N)
    ratios = {}
    for tag, src in (("before", path), ("after", fixed)):
        m = io.load_model(src)
        (site,) = api.detect(m).rope_sites
        pairs = [(a.input.name, a.output.name) for a in site.applications]
        for a in site.applications:
            m.graph.outputs.extend([a.input, a.output])
        exposed = tmp_path / f"{tag}_qk.onnx"
        io.save_model(m, exposed)
        sess = _session(exposed)
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": ids}), strict=True))
        assert np.all(np.isfinite(res["logits"]))
        ratios[tag] = max(_ratio(res[y], res[x], info, pos) for x, y in pairs)
    assert ratios["after"] <= 1.0  # measured ~0.24
    assert ratios["before"] > 100.0  # measured ~490


def test_bf16_variant_is_analysed_and_rewritten_statically(full_fp16, tmp_path):
    """onnxruntime's CPU provider has no bfloat16 Cos/Sin (the original does not even load): analysis and
    rewrite only; the rewritten graph computes cos/sin in float32 and passes the ONNX checker."""
    path, _ = full_fp16
    bf16 = bf16_variant(path)
    rows = api.check(bf16, max_length=8192).sites
    assert rows[0]["position_dtype"] == "bfloat16" and not rows[0]["safe"]
    out = tmp_path / "bf16_fp32.onnx"
    result = _rewrite(bf16, out)
    assert result.modified and "bfloat16" in result.changes[0]
    rows = api.check(out, max_length=8192).sites
    assert rows[0]["safe"] and rows[0]["position_dtype"] == "float32"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    m = io.load_model(out)
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT for n in m.graph if n.op_type in ("Cos", "Sin"))
    with pytest.raises(Exception, match="bfloat16"):  # the original: bfloat16 Sin is not in the ONNX schema
        _session(bf16)


def test_cached_fp16_math_tables_regenerated(rotary_cached, tmp_path):
    path, info = rotary_cached
    n = info["max_positions"]
    (site,) = api.detect(io.load_model(path)).rope_sites
    row = rope_site_precision(site, n)
    assert row["math_dtype"] == "float16" and row["table_dtype"] == "float16" and not row["safe"]
    out = tmp_path / "fp32.onnx"
    result = _rewrite(path, out)
    assert result.modified
    (site2,) = api.detect(io.load_model(out)).rope_sites
    assert rope_site_precision(site2, n)["safe"]
    table = ir.convenience.get_const_tensor(site2.cos_cache).numpy()
    inv = rope_math.default_inv_freq(info["base"], info["rotary_dim"])
    c, _ = rope_math.cos_sin_tables(inv, n, layout="rotate_half")
    np.testing.assert_array_equal(table, c.astype(np.float16))  # correctly rounded from fp32 math
    q, k = _qkv(n, info)
    pos = np.arange(n)
    assert _ratio(ort_rotary(out, q, k, pos)[0], q, info, pos) <= 1.0
    assert _ratio(ort_rotary(path, q, k, pos)[0], q, info, pos) > 2.0


def test_safe_model_is_not_changed(llama_onnx, tmp_path):
    model = io.load_model(llama_onnx)
    before = ir.serde.serialize_model(model).SerializeToString()
    p = Fp32PositionsPass(sites=api.detect(model).sites)
    assert not p(model).modified and p.changes == []
    assert ir.serde.serialize_model(model).SerializeToString() == before
    result = _rewrite(llama_onnx, tmp_path / "same.onnx")
    assert not result.modified
    a = onnx.load(str(llama_onnx), load_external_data=False).graph
    b = onnx.load(str(tmp_path / "same.onnx"), load_external_data=False).graph
    assert a.SerializeToString() == b.SerializeToString()


def test_second_run_changes_nothing(full_fp16, tmp_path):
    path, _ = full_fp16
    _rewrite(path, tmp_path / "once.onnx")
    model = io.load_model(tmp_path / "once.onnx")
    p = Fp32PositionsPass(sites=api.detect(model).sites)
    assert not p(model).modified and not p.changes


def test_rescale_then_fp32_keeps_exact_frequencies(full_fp16, tmp_path):
    """A rescale plan made from fp16-rounded frequencies is recomputed from the exact ones."""
    path, info = full_fp16
    out = tmp_path / "linear.onnx"
    api.rewrite(path, fp32_positions=True, rope_scale=2.0, rope_method="linear", output=str(out), validate=False)
    (site,) = api.detect(io.load_model(out)).rope_sites
    assert site.inv_freq_value.dtype == ir.DataType.FLOAT
    expected = rope_math.default_inv_freq(info["base"], info["rotary_dim"]) / np.float32(2.0)
    np.testing.assert_allclose(site.inv_freq, expected, rtol=2**-23)
    assert api.check(out, max_length=8192).sites[0]["safe"]


def test_alibi_sites_are_left_to_the_alibi_pass(tmp_path):
    """Fp32PositionsPass touches RoPE sites only; the one route to fp32 ALiBi is Fp32AlibiPass."""
    from fixtures.other_models import export_other_onnx
    from posrewrite.passes.onnx.alibi.fp32 import Fp32AlibiPass

    path, _ = export_other_onnx("bloom", dtype="float16")
    model = io.load_model(path)
    sites = api.detect(model).sites
    assert needs_fp32_positions(sites)
    before = ir.serde.serialize_model(model).SerializeToString()
    p = Fp32PositionsPass(sites=sites)
    assert not p(model).modified and not p.changes
    assert ir.serde.serialize_model(model).SerializeToString() == before
    a = Fp32AlibiPass(sites=sites)
    assert a(model).modified and any("ALiBi" in c for c in a.changes)
    io.save_model(model, tmp_path / "fp32.onnx")
    assert not needs_fp32_positions(api.detect(io.load_model(tmp_path / "fp32.onnx")).sites)
