"""The rewrite pipeline (posrewrite.pipeline): passes composed by onnx_ir's PassManager, one shared report.

References are independent of the passes: RoPE inverse frequencies from the paper's formula written here
(theta_i = base^(-2i/d)), node counts of the graph, and onnx_ir's own PassManager semantics."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from posrewrite import api, errors, io
from posrewrite.options import RewriteOptions
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass, cleanup_passes
from posrewrite.passes.onnx.rope.rescale import RescaleRopePass, SitePlan
from posrewrite.pipeline import NOTHING_CHANGED, build_pipeline, run_passes
from posrewrite.plan import make_plan
from posrewrite.sites.rope import AngleSource


def _inv_freq(base: float, dim: int) -> np.ndarray:
    """RoPE's theta_i = base^(-2i/d), i = 0 .. d/2-1 (Su et al. 2021), in float64."""
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


class _Probe(ReportingPass):
    """Records the RoPE sites the pipeline's detection gives when it runs (what any later pass would read)."""

    def __init__(self, *, context: PipelineContext) -> None:
        super().__init__(context=context)
        self.seen = None

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        self.seen = self.context.detection(model)
        self.notes.append(f"probe saw {len(self.seen.rope_sites)} RoPE site(s)")
        return ir.passes.PassResult(model, False)


def _pipeline(path, **options):
    model = io.load_model(path)
    found = api.detect(model)
    plan = make_plan(RewriteOptions(**options), path, found)
    steps = build_pipeline(plan, found)
    steps.context.seed(model, found)
    return model, found, list(plan.site_plans), steps


def test_plans_are_frozen(llama_onnx):
    _, found, plans, _ = _pipeline(llama_onnx, rope_base=500000.0)
    (plan,) = plans
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.new_length = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.site = found.rope_sites[0]  # type: ignore[misc]


def test_later_pass_sees_the_rewritten_model(llama_onnx):
    """After the rescale reports modified=True, the next pass reads a new detection: the new base, not the
    sites found before the rewrite."""
    model, found, plans, steps = _pipeline(llama_onnx, rope_base=500000.0, validate=False)
    (site,) = found.rope_sites
    np.testing.assert_allclose(site.inv_freq, _inv_freq(10000.0, site.rotary_dim), rtol=1e-6)
    context = steps.context
    rescale = next(p for p in steps.passes if isinstance(p, RescaleRopePass))
    probe = _Probe(context=context)
    run_passes([rescale, probe], model)
    (seen,) = probe.seen.rope_sites
    assert probe.seen is not found and seen is not site
    np.testing.assert_allclose(seen.inv_freq, _inv_freq(500000.0, site.rotary_dim), rtol=1e-6)
    # the same cached detection as long as nothing else is modified
    assert context.detection(model) is probe.seen


def test_plans_made_before_a_rewrite_are_refused(llama_onnx):
    """A rescale whose plans were made before another pass modified the model refuses to run."""
    model, _, plans, steps = _pipeline(llama_onnx, rope_base=500000.0, validate=False)
    context = steps.context
    first = RescaleRopePass(plans=plans, context=context)
    stale = RescaleRopePass(plans=plans, context=context)
    with pytest.raises(ir.passes.PreconditionError, match="rewritten after its plans were made"):
        run_passes([first, stale], model)


def test_report_lists_every_pass_in_order_and_claims_the_fused_plan(llama_onnx):
    """rescale + fuse: each pass's lines are in the report in pipeline order; the caller's plan is unchanged,
    the report claims a plan for the fused form whose caches hold cos(n * theta_i) of the new base."""
    model, found, plans, steps = _pipeline(llama_onnx, rope_base=500000.0, fuse="ort", validate=False)
    (plan,) = plans
    before = (plan.site, plan.new_length, plan.inv_freq.copy())
    report = steps.run(model)
    names = [r.name for r in report.passes]
    # SoftmaxGuardPass: for attention --fuse could not fuse (none here: it reports nothing)
    assert names == ["RescaleRopePass", "FuseRotaryPass", "FuseAttentionPass", "SoftmaxGuardPass"]
    assert report.changes == [c for r in report.passes for c in r.changes]
    assert report.notes == [n for r in report.passes for n in r.notes]
    assert all(r.changes for r in report.passes[:2])
    # the caller's plan is what it was; the claim is a new plan for the fused site
    assert (plan.site, plan.new_length) == before[:2] and np.array_equal(plan.inv_freq, before[2])
    (claimed,) = report.rope_plans
    assert isinstance(claimed, SitePlan) and claimed is not plan
    assert claimed.site.angles == AngleSource.FUSED_OP and plan.site.angles == AngleSource.COMPUTED
    cos = ir.convenience.get_const_tensor(claimed.site.cos_cache).numpy().astype(np.float64)
    rows = np.arange(cos.shape[0], dtype=np.float64)[:, None]
    expected = np.cos(rows * _inv_freq(500000.0, found.rope_sites[0].rotary_dim)[None, :])
    # float32 inverse frequencies (relative round-off eps/2, angles up to rows x theta_0 = rows) and float32 cos
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(cos, expected, rtol=0, atol=(cos.shape[0] + 1) * eps)
    assert report.fused_cache_rows == cos.shape[0]
    # the cleanup left no node without a reader
    read = {id(v) for n in model.graph for v in n.inputs if v is not None} | {id(v) for v in model.graph.outputs}
    assert all(any(id(o) in read for o in n.outputs) for n in model.graph)


def test_second_run_is_idempotent(fp16_rope_onnx):
    """--fp32-positions twice on the same model: the second pipeline, built on a new detection, changes
    nothing and says so."""
    path, _ = fp16_rope_onnx
    model, _, _, steps = _pipeline(path, fp32_positions=True, validate=False)
    first = steps.run(model)
    assert first.changes and any(r.modified for r in first.passes)
    nodes = len(list(model.graph))
    found = api.detect(model)
    again = build_pipeline(make_plan(RewriteOptions(fp32_positions=True, validate=False), path, found), found)
    second = again.run(model)
    assert second.changes == [] and second.notes[-1] == NOTHING_CHANGED
    assert not any(r.modified for r in second.passes)
    assert len(list(model.graph)) == nodes


def test_errors_of_a_pass_are_not_wrapped(llama_onnx):
    """A refusal raised inside the PassManager comes out as itself (its exit code), not as onnx_ir's PassError."""
    model = io.load_model(llama_onnx)

    class _Refuse(ReportingPass):
        def run(self, model):
            raise errors.UsageError("refused on purpose")

    with pytest.raises(errors.UsageError, match="refused on purpose"):
        run_passes([*cleanup_passes(), _Refuse()], model)


def test_fusion_after_a_runtime_rescale_of_cached_tables(hf_onnx, tmp_path):
    """GPT-J (a cached sincos table), dynamic x2, then --fuse: the rescale computes the table in the graph in a
    form the detector does not read back; the fusion still replaces every q/k rotation of the original (one
    RotaryEmbedding each), its caches from the runtime inverse frequencies."""
    path = hf_onnx("gptj")
    applications = sum(len(s.applications) for s in api.detect(io.load_model(path)).rope_sites)
    out = tmp_path / "dynamic-fused.onnx"
    result = api.rewrite(path, output=out, rope_scale=2.0, rope_method="dynamic", original_max_positions=64,
                         fuse="ort")
    fused = [n for n in io.load_model(out).graph if n.op_type == "RotaryEmbedding"]
    assert applications == 4 and len(fused) == applications
    assert any("rows = max(position)+1 at run time" in c for c in result.changes)
    assert result.validation is not None and result.validation.ok


def test_alibi_fp32_is_its_own_step():
    """An fp16 BLOOM (one ALiBi site, no RoPE) with --fp32-positions: the RoPE step changes nothing, the ALiBi
    step rewrites the one site once (and does not see its own output as another site)."""
    from fixtures.other_models import export_other_onnx

    path, _ = export_other_onnx("bloom", dtype="float16")
    model = io.load_model(path)
    found = api.detect(model)
    alibi = [s for s in found.sites if s.kind == "alibi"]
    steps = build_pipeline(make_plan(RewriteOptions(fp32_positions=True, validate=False), path, found), found)
    report = steps.run(model)
    records = {r.name: r for r in report.passes}
    assert list(records) == ["Fp32PositionsPass", "Fp32AlibiPass", "Fp32ScoreBiasPass"]
    assert not records["Fp32PositionsPass"].modified and not records["Fp32PositionsPass"].changes
    # BLOOM's bias is read as ALiBi: the score-bias step (biases classified by value) has nothing left
    assert not records["Fp32ScoreBiasPass"].modified and not records["Fp32ScoreBiasPass"].changes
    assert records["Fp32AlibiPass"].modified and len(alibi) == 1
    assert len(records["Fp32AlibiPass"].changes) == len(alibi) and not records["Fp32AlibiPass"].notes


class _HalveInvFreq(ir.passes.InPlacePass):
    """A foreign onnx_ir pass (not a posrewrite pass; it shares no context): halves the RoPE inverse frequencies
    held by one initializer or Constant node, as a user's own pass between two posrewrite passes could."""

    def __init__(self, value: ir.Value) -> None:
        super().__init__()
        self.value = value

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = self.value
        half = ir.tensor(value.const_value.numpy() / 2)
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant":
            producer.attributes["value"] = ir.AttrTensor("value", half)
        value.const_value = half
        return ir.passes.PassResult(model, True)


def test_a_foreign_pass_between_two_posrewrite_passes_drops_the_cached_detection(llama_onnx):
    """A plain onnx_ir pass that halves inv_freq between the start of the pipeline and the RoPE fusion: the
    fusion must build its caches from the model as it is now (cos(n * theta_i / 2), theta_i from the paper's
    formula), not from the detection cached before the foreign pass ran."""
    from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass

    model, found, _, steps = _pipeline(llama_onnx, fuse="ort", validate=False)
    (site,) = found.rope_sites
    assert site.inv_freq_value is not None and site.inv_freq_value.const_value is not None
    fuse = next(p for p in steps.passes if isinstance(p, FuseRotaryPass))
    run_passes([_HalveInvFreq(site.inv_freq_value), fuse], model)
    nodes = steps.context.report.fused_rotary_nodes
    assert nodes and all(n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft" for n in nodes)
    # com.microsoft.RotaryEmbedding(input, position_ids, cos_cache, sin_cache)
    (cos,) = {id(n.inputs[2]): ir.convenience.get_const_tensor(n.inputs[2]).numpy() for n in nodes}.values()
    cos = cos.astype(np.float64)
    rows = np.arange(cos.shape[0], dtype=np.float64)[:, None]
    expected = np.cos(rows * _inv_freq(10000.0, site.rotary_dim)[None, :] / 2)
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(cos, expected, rtol=0, atol=(cos.shape[0] + 1) * eps)


def test_fingerprint_sees_in_place_changes_and_nothing_else(llama_onnx):
    """The detection cache's key: unchanged by reading the model; changed by a new node, a rewired input, an
    attribute, and the bytes of a small constant changed in place."""
    from posrewrite.passes.onnx._infra import model_fingerprint

    model = io.load_model(llama_onnx)
    first = model_fingerprint(model)
    api.detect(model)
    assert model_fingerprint(model) == first
    (site,) = api.detect(model).rope_sites
    arr = site.inv_freq_value.const_value.numpy().copy()
    site.inv_freq_value.const_value = ir.Tensor(arr)  # an in-memory tensor over an array we hold
    first = model_fingerprint(model)
    assert first == model_fingerprint(model)
    arr[0] *= 2  # the bytes changed in place, the tensor object is the same
    assert model_fingerprint(model) != first
    arr[0] /= 2
    assert model_fingerprint(model) == first
    node = next(iter(model.graph))
    node.attributes["posrewrite_test"] = ir.AttrInt64("posrewrite_test", 1)
    second = model_fingerprint(model)
    assert second != first
    extra = ir.node("Identity", [model.graph.inputs[0]])
    model.graph.append(extra)
    assert model_fingerprint(model) != second
