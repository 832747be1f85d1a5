"""Site descriptions are typed: no `Any` or untyped extras in any site, source or handle type, and every kind of
the angle-source union is what detection produces on a real export of that kind (HF Llama: computed angles;
HF GPT-J: a cached sin|cos table; a `--fuse ort` output: fused caches; the onnxruntime-genai builder's model:
GroupQueryAttention rotating with its own caches)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing

import numpy as np
import pytest

import posrewrite.sites as sites_package
import posrewrite.sites.rope as sites_rope
from posrewrite import api, io
from posrewrite.math import rope as rope_math
from posrewrite.sites.rope import (
    AttentionRotary,
    CachedTable,
    ComputedAngles,
    FusedCaches,
    InvFreqOrigin,
    Layout,
    OnnxCachedHandles,
    OnnxComputedHandles,
    RopeEncoding,
    RopeSite,
)


def _dataclasses_of(module: types.ModuleType) -> list[type]:
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__]


def _site_modules() -> list[types.ModuleType]:
    """Every module of `posrewrite.sites` (found, not listed: a new kind's module is checked too) and the fx sites."""
    names = [m.name for m in pkgutil.iter_modules(sites_package.__path__)]
    modules = [importlib.import_module(f"posrewrite.sites.{name}") for name in names]
    assert sites_rope in modules
    try:
        import posrewrite.passes.fx.sites as fx_sites
    except ImportError:  # torch not installed: the fx side is not there to check
        return modules
    return [*modules, fx_sites]


def _leaves(hint: object) -> list[object]:
    """Every type a hint is made of (unions, generics, tuples unpacked)."""
    args = typing.get_args(hint)
    if not args:
        return [hint]
    return [typing.get_origin(hint), *(leaf for a in args for leaf in _leaves(a))]


def test_no_any_in_site_types():
    checked = 0
    for module in _site_modules():
        for cls in _dataclasses_of(module):
            hints = typing.get_type_hints(cls, vars(module))
            for field in dataclasses.fields(cls):
                leaves = _leaves(hints[field.name])
                assert typing.Any not in leaves and object not in leaves, f"{cls.__name__}.{field.name}"
                checked += 1
    assert checked > 60  # every site, source and handle type was seen (not an empty loop)


def test_the_source_union_is_the_six_kinds_with_their_facts():
    kinds = set(typing.get_args(sites_rope.RopeSource))
    assert kinds == {ComputedAngles, CachedTable, FusedCaches, AttentionRotary, sites_rope.GridAngles,
                     sites_rope.ProbedAngles}
    fields = {k: {f.name for f in dataclasses.fields(k)} for k in kinds}
    assert {"inv_freq_origin", "position_dtype", "attention_factor", "runtime", "selection"} <= fields[ComputedAngles]
    assert {"rows", "cos_columns", "sin_columns", "row_selection"} <= fields[CachedTable]
    assert {"op", "rows", "rescaled"} <= fields[FusedCaches]
    assert {"op", "rows", "interleaved", "selection"} <= fields[AttentionRotary]
    assert {"axes", "angle_dtype", "attention_factor"} <= fields[sites_rope.GridAngles]  # 2-D RoPE over a grid
    assert "rows" in {f.name for f in dataclasses.fields(ComputedAngles)}  # M-RoPE: the row each frequency reads
    assert {"rows", "position_dtype", "angle_dtype", "attention_factor"} <= fields[sites_rope.ProbedAngles]
    # the description holds no graph object: no onnx_ir type anywhere in RopeEncoding or a source
    for cls in (RopeEncoding, *kinds):
        hints = typing.get_type_hints(cls, vars(sites_rope))
        for name, hint in hints.items():
            assert not any(getattr(t, "__module__", "").startswith("onnx_ir") for t in _leaves(hint)), (cls, name)


def _rope_sites(path) -> list[RopeSite]:
    sites = api.detect(io.load_model(path)).rope_sites
    assert sites
    return sites


def test_computed_angles_from_hf_llama(llama_onnx):
    from fixtures.hf_models import ARCHS, TINY

    (site,) = _rope_sites(llama_onnx)
    source = site.source
    assert isinstance(source, ComputedAngles) and isinstance(site.handles, OnnxComputedHandles)
    assert source.inv_freq_origin in (InvFreqOrigin.CONSTANT, InvFreqOrigin.FOLDED)
    assert source.runtime is None and source.selection is None and source.attention_factor == 1.0
    assert site.prior_scaling is None
    spec = ARCHS["llama"]
    # the paper's frequencies for the config's base: base^(-2i/d)
    i = np.arange(spec.rotary_dim // 2, dtype=np.float64)
    np.testing.assert_allclose(site.inv_freq, spec.base ** (-2 * i / spec.rotary_dim), rtol=1e-6)
    assert site.handles.product.outputs[0] is not None and site.handles.cos.trig.op_type == "Cos"
    assert site.rotations == 2 * TINY["layers"]  # q and k of every layer


def test_cached_table_from_hf_gptj(hf_onnx):
    from fixtures.hf_models import ARCHS

    spec = ARCHS["gptj"]
    sites = _rope_sites(hf_onnx("gptj"))
    for site in sites:
        source = site.source
        assert isinstance(source, CachedTable) and isinstance(site.handles, OnnxCachedHandles)
        assert site.layout == Layout.INTERLEAVED
        # GPT-J's embed_positions is [n_positions, rotary_dim] = sin | cos: two column ranges of one table
        half = spec.rotary_dim // 2
        assert {source.sin_columns, source.cos_columns} == {(0, half), (half, spec.rotary_dim)}
        assert site.handles.cos.table is site.handles.sin.table
        assert source.row_selection in ("Gather", "GatherElements", "GatherND", "Slice")
        assert site.base == pytest.approx(10000.0, rel=1e-4)  # GPT-J hard-codes 10000


def test_fused_caches_from_a_fused_rotary(llama_onnx, tmp_path):
    """`--fuse ort` first writes one com.microsoft.RotaryEmbedding per rotation (the attention step after it
    is left out here), the fused-caches kind."""
    import onnx_ir as ir

    from fixtures.hf_models import ARCHS
    from posrewrite.passes.onnx.rope import fuse as fuse_rotary

    model = ir.load(str(llama_onnx))
    from posrewrite.passes.onnx._infra import cleanup_passes
    from posrewrite.pipeline import run_passes

    run_passes([fuse_rotary.FuseRotaryPass(sites=api.detect(model).rope_sites, target="ort"), *cleanup_passes()], model)
    out = tmp_path / "fused.onnx"
    ir.save(model, str(out))
    (site,) = _rope_sites(out)
    source = site.source
    assert isinstance(source, FusedCaches) and site.handles is None
    assert source.op == "com.microsoft.RotaryEmbedding" and source.rows == site.cos_cache.shape[0]
    assert len(site.fused_nodes) == site.rotations == 2 * 2
    assert all(n.op_type == "RotaryEmbedding" for n in site.fused_nodes)
    spec = ARCHS["llama"]
    np.testing.assert_allclose(site.inv_freq, rope_math.default_inv_freq(spec.base, spec.rotary_dim),
                               rtol=1e-4, atol=1e-6)


def test_attention_rotary_from_a_fuse_ort_output(llama_onnx, tmp_path):
    out = tmp_path / "fused.onnx"
    api.rewrite(llama_onnx, output=out, fuse="ort", validate=False)
    (site,) = _rope_sites(out)
    assert isinstance(site.source, AttentionRotary) and site.source.op == "com.microsoft.GroupQueryAttention"
    assert all(n.op_type == "GroupQueryAttention" for n in site.fused_nodes)


def test_attention_rotary_from_the_genai_builder():
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("torch")
    from fixtures.genai_models import genai_folder

    found = api.inspect(genai_folder("llama"))
    (site,) = found.sites
    source = site.source
    assert isinstance(source, AttentionRotary) and source.op == "com.microsoft.GroupQueryAttention"
    assert source.selection is None and not source.interleaved
    assert site.base == pytest.approx(1e4, rel=1e-6)
    assert all(n.op_type == "GroupQueryAttention" for n in site.fused_nodes)


def test_fx_and_onnx_describe_llama_with_the_same_types(llama_onnx):
    """One description for both sides: torch.export of the same HF Llama gives the ONNX export's encoding."""
    torch = pytest.importorskip("torch")
    from fixtures.hf_models import LogitsOnlyWithPositions, build_hf_model
    from posrewrite.passes.fx.detect_rope import detect_rope
    from posrewrite.passes.fx.pipeline import prepare
    from posrewrite.passes.fx.sites import FxComputedHandles

    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None]
    ep = torch.export.export(LogitsOnlyWithPositions(build_hf_model("llama")), (ids, pos))
    (fx_site,), refusals = detect_rope(prepare(ep))
    (onnx_site,) = _rope_sites(llama_onnx)
    assert not refusals and isinstance(fx_site.encoding, RopeEncoding)
    assert isinstance(fx_site.source, ComputedAngles) and isinstance(fx_site.handles, FxComputedHandles)
    a, b = fx_site.encoding, onnx_site.encoding
    assert (a.layout, a.rotary_dim, a.head_dim, a.prior_scaling) == (b.layout, b.rotary_dim, b.head_dim, None)
    assert a.base == pytest.approx(b.base, rel=1e-6)
    np.testing.assert_allclose(a.inv_freq, b.inv_freq, rtol=1e-6)
    assert a.source.attention_factor == b.source.attention_factor == 1.0
