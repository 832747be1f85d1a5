"""fx passes on tiny real HF models exported with torch.export: detection, every scaling method against
HF's own ``rope_parameters``, and fusion into the posrewrite custom op."""

from __future__ import annotations

import functools
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import posrewrite.torch as pt  # noqa: E402
from fixtures.hf_models import ARCHS, LogitsOnlyWithPositions, build_hf_model  # noqa: E402
from posrewrite.errors import UsageError  # noqa: E402
from posrewrite.math.rope import ntk_base  # noqa: E402
from posrewrite.passes.fx.detect_rope import detect_rope  # noqa: E402
from posrewrite.passes.fx.pipeline import prepare  # noqa: E402

L = 64  # max_position_embeddings of the tiny models
LAYERS = 2


@functools.cache
def exported(arch: str) -> torch.export.ExportedProgram:
    """The default tiny ``arch`` exported with dynamic batch and length (input_ids, position_ids)."""
    model = build_hf_model(arch)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None].expand(2, -1).contiguous()
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = ({0: b, 1: s}, {0: b, 1: s})
        return torch.export.export(LogitsOnlyWithPositions(model), (ids, pos), dynamic_shapes=dyn)


def _tokens(n: int, batch: int = 1, seed: int = 1):
    ids = torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(n)[None].expand(batch, -1).contiguous()


def _run(program, ids, pos):
    with torch.no_grad():
        return program.module()(ids, pos)


def _hf(arch, rope_parameters, ids, pos):
    model = build_hf_model(arch, rope_parameters=rope_parameters)  # fresh: HF dynamic rope is stateful
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "cohere", "glm", "gptj"])
def test_detect_hf(arch):
    spec = ARCHS[arch]
    sites, refusals = detect_rope(prepare(exported(arch)))
    assert not refusals
    assert sites, arch
    apps = [a for s in sites for a in s.applications]
    assert len(apps) == 2 * LAYERS  # q and k of every layer
    for site in sites:
        assert site.layout.value == spec.layout
        assert site.rotary_dim == spec.rotary_dim and site.head_dim == spec.head_dim
    if spec.angle_source == "computed":
        assert len(sites) == 1  # one rotary module shared by all layers
        site = sites[0]
        assert site.angles.value == "computed"
        assert site.base == pytest.approx(float(build_hf_model(arch).config.rope_parameters["rope_theta"]))
        assert site.source.attention_factor == 1.0
        assert site.to_dict()["inv_freq"] is not None
    else:  # GPT-J: per-layer precomputed sin|cos tables
        assert {s.angles.value for s in sites} == {"cached"}
        assert all(s.source.max_positions == L for s in sites)


def test_detect_does_not_touch_the_program():
    ep = exported("llama")
    before = str(ep.graph)
    pt.detect(ep)
    pt.rewrite(ep, rope_scale=4, rope_method="linear", fuse=True)
    assert str(ep.graph) == before


# --------------------------------------------------------------------------------------------------
# scaling vs HF
# --------------------------------------------------------------------------------------------------

_SHORT = [1.0 + 0.05 * i for i in range(8)]
_LONG = [1.5 + 0.4 * i for i in range(8)]

#: method -> (rewrite options, HF rope_parameters builder(rotary_dim, base))
METHODS = {
    "linear": (dict(rope_scale=4.0, rope_method="linear"), lambda d, b: {"rope_type": "linear", "factor": 4.0}),
    "ntk": (dict(rope_scale=4.0, rope_method="ntk"),
            lambda d, b: {"rope_type": "default", "rope_theta": ntk_base(b, d, 4.0)}),
    "dynamic": (dict(rope_scale=4.0, rope_method="dynamic", original_max_positions=L),
                lambda d, b: {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": (dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L),
             lambda d, b: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}),
    "yarn-betas": (dict(rope_scale=8.0, rope_method="yarn", original_max_positions=L,
                        rope_params={"beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}),
                   lambda d, b: {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L,
                                 "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "llama3": (dict(rope_scale=4.0, rope_method="llama3", original_max_positions=16,
                    rope_params={"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
               lambda d, b: {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "longrope": (dict(rope_scale=4.0, rope_method="longrope", original_max_positions=L,
                      rope_params={"short_factor": _SHORT[:4], "long_factor": _LONG[:4]}),
                 lambda d, b: {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
                               "short_factor": _SHORT[: d // 2], "long_factor": _LONG[: d // 2]}),
    "base": (dict(rope_base=50000.0), lambda d, b: {"rope_type": "default", "rope_theta": 50000.0}),
}

CASES = [("llama", m) for m in METHODS] + [("gpt_neox", m) for m in METHODS] + [
    ("cohere", "yarn"), ("cohere", "dynamic"), ("glm", "longrope"), ("phi", "llama3"), ("qwen3", "dynamic"),
]


def _options(method, rotary_dim):
    opts, _ = METHODS[method]
    opts = dict(opts)
    if method == "longrope":  # factor lists have rotary_dim / 2 entries
        opts["rope_params"] = {"short_factor": _SHORT[: rotary_dim // 2], "long_factor": _LONG[: rotary_dim // 2]}
    return opts


@pytest.mark.parametrize("arch,method", CASES)
def test_rescale_matches_hf(arch, method):
    spec = ARCHS[arch]
    base = float(build_hf_model(arch).config.rope_parameters["rope_theta"])
    rp = METHODS[method][1](spec.rotary_dim, base)
    messages: list[str] = []
    new = pt.rewrite(exported(arch), messages=messages, **_options(method, spec.rotary_dim))
    assert messages and "rescale-rope" in messages[0]
    # below and above the training length (dynamic and longrope switch there)
    for n in (40, 200):
        ids, pos = _tokens(n)
        got = _run(new, ids, pos)
        want = _hf(arch, rp, ids, pos)
        assert (got - want).abs().max().item() <= 1e-5, (arch, method, n)


def test_dynamic_follows_runtime_positions():
    """dynamic NTK reads the runtime max position: an offset window past L differs from the same window at 0."""
    new = pt.rewrite(exported("llama"), rope_scale=4.0, rope_method="dynamic", original_max_positions=L)
    ids, _ = _tokens(20, batch=2)
    pos = (torch.arange(20) + 150)[None].expand(2, -1).contiguous()
    want = _hf("llama", {"rope_type": "dynamic", "factor": 4.0}, ids, pos)
    assert (_run(new, ids, pos) - want).abs().max().item() <= 1e-5


def test_rescale_needs_training_length():
    with pytest.raises(UsageError):
        pt.rewrite(exported("llama"), rope_scale=4.0, rope_method="yarn")
    cfg = build_hf_model("llama").config  # L from the config
    new = pt.rewrite(exported("llama"), rope_scale=4.0, rope_method="yarn", config=cfg)
    ids, pos = _tokens(100)
    want = _hf("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}, ids, pos)
    assert (_run(new, ids, pos) - want).abs().max().item() <= 1e-5


def test_cached_tables_are_refused_with_reason():
    from posrewrite.errors import PartialMatchError

    with pytest.raises(PartialMatchError, match="precomputed table"):
        pt.rewrite(exported("gptj"), rope_scale=2.0, rope_method="linear")


# --------------------------------------------------------------------------------------------------
# fusion
# --------------------------------------------------------------------------------------------------


def _fused_calls(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and "posrewrite" in str(n.target)]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "cohere", "glm", "gptj", "phi3"])
def test_fuse_every_site(arch):
    ep = exported(arch)
    messages: list[str] = []
    new = pt.rewrite(ep, fuse=True, messages=messages)
    calls = _fused_calls(new)
    assert len(calls) == LAYERS  # q and k of each layer in one op
    assert all(c.target is torch.ops.posrewrite.rope_qk.default for c in calls)
    assert not [m for m in messages if "not fused" in m]
    sites, _ = detect_rope(prepare(new))
    assert not sites  # no unfused rotation left
    n = 40 if ARCHS[arch].extrapolates else 30
    ids, pos = _tokens(n, batch=3)
    pos = pos + (0 if not ARCHS[arch].extrapolates else 5)
    assert (_run(new, ids, pos) - _run(ep, ids, pos)).abs().max().item() <= 1e-6


def test_rescale_and_fuse_match_hf():
    new = pt.rewrite(exported("gpt_neox"), rope_scale=4.0, rope_method="yarn", original_max_positions=L, fuse=True)
    assert len(_fused_calls(new)) == LAYERS
    ids, pos = _tokens(180)
    want = _hf("gpt_neox", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}, ids, pos)
    assert (_run(new, ids, pos) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "glm"])
def test_fuse_with_angles_in_kernel(arch):
    """fuse_angles="inv_freq": the op computes cos/sin from positions and (rescaled) inv_freq itself."""
    ep = exported(arch)
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="yarn", original_max_positions=L, fuse=True,
                     fuse_angles="inv_freq")
    calls = _fused_calls(new)
    assert len(calls) == LAYERS and all(c.target is torch.ops.posrewrite.rope_qk_freqs.default for c in calls)
    assert not [n for n in new.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.cos.default]
    ids, pos = _tokens(150)
    want = _hf(arch, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}, ids, pos)
    assert (_run(new, ids, pos) - want).abs().max().item() <= 1e-5


def test_static_export_without_position_ids():
    """input_ids only, static shapes: positions are arange(n) made inside the graph."""
    from fixtures.hf_models import LogitsOnly

    model = build_hf_model("llama")
    ids, pos = _tokens(100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(LogitsOnly(model), (ids,))
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="dynamic", original_max_positions=L, fuse=True)
    assert len(_fused_calls(new)) == LAYERS
    with torch.no_grad():
        got = new.module()(ids)
    assert (got - _hf("llama", {"rope_type": "dynamic", "factor": 4.0}, ids, pos)).abs().max().item() <= 1e-5


def test_rotation_cast_to_own_dtype_ernie():
    """Ernie 4.5 writes ``q.float() * cos + rotate_every_two(q).float() * sin`` with cos/sin sliced and
    repeat-interleaved: the cast around the rotation is looked through. Checked against HF's Ernie 4.5
    with YaRN rope_parameters, and the fused program against the original."""
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=L, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**kw)).eval()
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
            "rope_theta": base.config.rope_parameters["rope_theta"]}
    scaled = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(**kw, rope_parameters=yarn)).eval()
    scaled.load_state_dict(base.state_dict())
    ids, pos = _tokens(8)
    s = torch.export.Dim("seq", max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(LogitsOnlyWithPositions(base), (ids, pos), dynamic_shapes=({1: s}, {1: s}))
    (site,) = pt.detect(ep)
    assert site.layout.value == "interleaved" and site.rotations == 2 * LAYERS
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="yarn", original_max_positions=L)
    fused = pt.rewrite(ep, fuse=True)
    assert sum(1 for n in fused.graph.nodes if "posrewrite" in str(n.target)) >= 1
    for n in (L // 2, 3 * L):
        ids, pos = _tokens(n)
        with torch.no_grad():
            ref = scaled(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert float((_run(new, ids, pos) - ref).abs().max()) <= 1e-5
        assert float((_run(fused, ids, pos) - _run(ep, ids, pos)).abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_detect_half_precision_hf_base(dtype):
    # HF keeps inv_freq in the model's dtype after .half() / .to(bfloat16): the base is still the config's,
    # fitted within that dtype's round-off (it was None, "not geometric", when fitted at float32 tolerance)
    model = build_hf_model("llama").to(getattr(torch, dtype))
    ids, pos = _tokens(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(LogitsOnlyWithPositions(model), (ids, pos))
    sites, refusals = detect_rope(prepare(ep))
    assert not refusals and len(sites) == 1
    assert sites[0].source.inv_freq_dtype == dtype
    assert sites[0].base == float(model.config.rope_parameters["rope_theta"])
    assert sites[0].prior_scaling is None
