"""Exports of models that are already scaled (Llama 3.1's llama3 rope, a YaRN config, linear interpolation).

Their inv_freq is not b^(-2i/d), so the base must be recovered from the frequencies the scaling left alone,
and a rescale must *replace* the scaling (and any attention factor already multiplying cos/sin), as new
``rope_parameters`` in config.json would. The reference is HF's model built with the new rope_parameters
(same rope_theta, same weights); inspect's base is checked against the config's rope_theta.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.hf_models import ARCHS, export_hf_onnx, hf_logits, ort_logits
from posrewrite import api

TOL = 1e-5

#: rope_parameters of the export (the model as published). Their training lengths are long enough that the
#: fastest frequencies are left unscaled, as in real checkpoints (Llama 3.1: 8192 tokens, 29 of 64 unscaled).
PRIORS = {
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 1024,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def _target(method: str, L: int) -> dict:
    p = {"rope_type": method, "factor": 8.0}
    if method != "linear":
        p["original_max_position_embeddings"] = L
    return p


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 128, size=(1, n))


@pytest.mark.parametrize("arch", ["llama", "cohere"])
@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_inspect_recovers_base_of_scaled_export(arch, prior):
    src = export_hf_onnx(arch, rope_parameters=PRIORS[prior])
    (site,) = [s for s in api.inspect(src).sites if s.kind == "rope"]
    d = site.to_dict()
    assert d["base"] == pytest.approx(ARCHS[arch].base, rel=1e-6)
    assert d["prior_scaling"] is not None
    assert d["prior_scaling"]["kind"] == ("linear" if prior == "linear" else "by_frequency")
    assert d["prior_scaling"]["factor"] == pytest.approx(PRIORS[prior]["factor"], rel=1e-5)
    assert d["layout"] == ARCHS[arch].layout


@pytest.mark.parametrize(
    "arch,prior,method",
    [("llama", "llama3", "yarn"), ("llama", "llama3", "linear"), ("llama", "yarn", "dynamic"),
     ("llama", "yarn", "linear"), ("cohere", "linear", "yarn"), ("cohere", "yarn", "llama3")],
)
def test_rescale_replaces_prior_scaling(arch, prior, method, tmp_path):
    """HF semantics: the new rope_parameters replace the old ones, so the result equals HF's model built
    with the new parameters only (a YaRN prior's attention factor is dropped, not compounded)."""
    L = ARCHS[arch].max_position_embeddings
    src = export_hf_onnx(arch, rope_parameters=PRIORS[prior])
    out = tmp_path / "out.onnx"
    kwargs = dict(rope_scale=8.0, rope_method=method, original_max_positions=L)
    if method == "llama3":
        kwargs["rope_params"] = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    result = api.rewrite(src, output=out, **kwargs)
    assert result.modified and result.validation is not None and result.validation.ok
    params = _target(method, L) | kwargs.get("rope_params", {})
    for n in (L // 2, L + 8, 3 * L):
        ids = _ids(n)
        err = float(np.max(np.abs(hf_logits(arch, ids, rope_parameters=params) - ort_logits(out, ids))))
        assert err <= TOL, f"{arch} {prior}->{method} at {n} tokens: {err:.3g}"


def test_fused_scaled_export_rescaled(tmp_path):
    """A Llama-3.1-style export fused first (RotaryEmbedding caches hold the llama3 frequencies), then
    rescaled: the caches are regenerated from the recovered base."""
    L = ARCHS["llama"].max_position_embeddings
    src = export_hf_onnx("llama", rope_parameters=PRIORS["llama3"])
    fused = tmp_path / "fused.onnx"
    api.rewrite(src, output=fused, fuse="onnx")
    (site,) = api.inspect(fused).sites
    assert site.angles.value == "fused_op" and site.prior_scaling is not None
    out = tmp_path / "out.onnx"
    api.rewrite(fused, output=out, rope_scale=8.0, rope_method="yarn", original_max_positions=L, max_positions=4 * L)
    for n in (L // 2, 3 * L):
        ids = _ids(n)
        ref = hf_logits("llama", ids, rope_parameters=_target("yarn", L))
        assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= TOL


def _longrope_prior(L: int, half: int) -> dict:
    rng = np.random.default_rng(1)
    return {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
            "short_factor": [float(v) for v in 1.0 + 0.5 * rng.random(half)],
            "long_factor": [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, half)]}


def test_longrope_export_is_found_and_needs_a_base(tmp_path):
    """HF exports LongRoPE (Phi-3.5, Phi-4-mini) as inv_freq = Where(max(position)+1 > L, long, short). The
    site is found; its base is not in the graph, so a rescale asks for it (one clear usage error, nothing
    written) and, given --rope-base or a config.json beside the model, replaces LongRoPE as HF would."""
    import json
    import shutil

    from posrewrite.errors import UsageError

    spec = ARCHS["llama"]
    L = spec.max_position_embeddings
    src = export_hf_onnx("llama", rope_parameters=_longrope_prior(L, spec.rotary_dim // 2))
    (site,) = api.inspect(src).sites
    assert site.base is None and site.prior_scaling is not None and site.prior_scaling.kind == "by_length"
    assert site.rotations == 2 * 2  # q and k of both layers
    for method in ("yarn", "linear"):
        with pytest.raises(UsageError, match="rope-base"):
            api.rewrite(src, output=tmp_path / f"{method}.onnx", rope_scale=8.0, rope_method=method,
                        original_max_positions=L)
        assert not (tmp_path / f"{method}.onnx").exists()
    ids = _ids(2 * L)
    ref = hf_logits("llama", ids, rope_parameters=_target("yarn", L))
    out = tmp_path / "yarn.onnx"
    api.rewrite(src, output=out, rope_scale=8.0, rope_method="yarn", original_max_positions=L, rope_base=spec.base)
    assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= TOL
    beside = tmp_path / "export"
    beside.mkdir()
    shutil.copy(src, beside / "model.onnx")
    (beside / "config.json").write_text(json.dumps({"rope_theta": spec.base, "max_position_embeddings": L}))
    out2 = tmp_path / "yarn-config.onnx"
    api.rewrite(beside / "model.onnx", output=out2, rope_scale=8.0, rope_method="yarn")
    assert float(np.max(np.abs(ref - ort_logits(out2, ids)))) <= TOL


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_longrope_export_fused(target, tmp_path):
    """Fusing a LongRoPE export keeps the switch: caches are built at run time from the graph's own
    (short or long) inv_freq, so logits equal HF's LongRoPE model below and above L."""
    spec = ARCHS["llama"]
    L = spec.max_position_embeddings
    prior = _longrope_prior(L, spec.rotary_dim // 2)
    src = export_hf_onnx("llama", rope_parameters=prior)
    out = tmp_path / "fused.onnx"
    result = api.rewrite(src, output=out, fuse=target)
    assert result.validation.ok and any(r.length == L + 1 for r in result.validation.rows)
    import onnx

    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("RotaryEmbedding") + ops.count("GroupQueryAttention") > 0
    assert ops.count("Cos") == 1 and ops.count("Sin") == 1  # the run-time caches, not per-layer angles
    for n in (L // 2, L + 8, 3 * L):
        ids = _ids(n)
        err = float(np.max(np.abs(hf_logits("llama", ids, rope_parameters=prior) - ort_logits(out, ids))))
        assert err <= TOL, f"{target} at {n} tokens: {err:.3g}"


def test_fx_rescale_replaces_prior_scaling():
    """The torch side: an exported program of a llama3-scaled Llama, no config given, rescaled with YaRN,
    equals HF's YaRN model (the base comes from the unchanged frequencies, the llama3 scaling is replaced)."""
    torch = pytest.importorskip("torch")
    import warnings

    import posrewrite.torch as pt
    from fixtures.hf_models import LogitsOnlyWithPositions, build_hf_model

    L = ARCHS["llama"].max_position_embeddings
    model = build_hf_model("llama", rope_parameters=PRIORS["llama3"])
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None]
    s = torch.export.Dim("seq", max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(LogitsOnlyWithPositions(model), (ids, pos), dynamic_shapes=({1: s}, {1: s}))
    (site,) = [x for x in pt.detect(ep) if x.kind == "rope"]
    assert site.base == pytest.approx(ARCHS["llama"].base) and site.prior_scaling.kind == "by_frequency"
    new = pt.rewrite(ep, rope_scale=8.0, rope_method="yarn", original_max_positions=L)
    ref_model = build_hf_model("llama", rope_parameters=_target("yarn", L))
    for n in (L // 2, 3 * L):
        ids = torch.from_numpy(_ids(n))
        pos = torch.arange(n)[None]
        with torch.no_grad():
            got = new.module()(ids, pos)
            ref = ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert float((got - ref).abs().max()) <= TOL


def test_posrewrite_output_rescaled_again(tmp_path):
    """A rescale leaves a mark with the base on the node reading the new inv_freq (tiny YaRN vectors are not
    recognisable from their values: fewer than three frequencies stay unscaled). Rescaling the output again
    starts from that base: x4 YaRN then x8 YaRN equals HF's x8 YaRN model."""
    L = ARCHS["llama"].max_position_embeddings
    first, second = tmp_path / "x4.onnx", tmp_path / "x8.onnx"
    api.rewrite(export_hf_onnx("llama"), output=first, rope_scale=4.0, rope_method="yarn", original_max_positions=L)
    (site,) = api.inspect(first).sites
    assert site.base == pytest.approx(ARCHS["llama"].base) and site.prior_scaling.kind == "rewritten"
    api.rewrite(first, output=second, rope_scale=8.0, rope_method="yarn", original_max_positions=L)
    for n in (L // 2, 3 * L):
        ids = _ids(n)
        ref = hf_logits("llama", ids, rope_parameters=_target("yarn", L))
        err = float(np.max(np.abs(ref - ort_logits(second, ids))))
        assert err <= TOL, f"{n} tokens: {err:.3g}"
