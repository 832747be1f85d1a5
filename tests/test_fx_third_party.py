"""The torch side (`posrewrite.torch`) on RoPE from libraries nobody here wrote, exported by these tests with
torch.export: rotary-embedding-torch (1-D and axial), x-transformers (plain and xPos), timm RoPE ViTs (axial and
mixed), HF Pixtral (2-D from position ids made in the model), HF Qwen2-VL's text model (M-RoPE), gpt-oss,
DeepSeek-V3 and Llama 4, and the merged-heads spelling. Each must be identified with the library's parameters
and every rewrite the ONNX side offers must equal the library's own equivalent: the library rebuilt with its
interpolation setting (rotary-embedding-torch ``interpolate_factor``, x-transformers ``interpolation_factor`` /
``xpos_scale_base``, timm ``ref_feat_shape``), HF rebuilt with the new ``rope_parameters``, or, for xPos, a
numpy reference written here from the paper (Sun et al. 2022). What cannot be rewritten is refused as on the
ONNX side: `PartialMatchError` (exit 5) with the reason, `NoEncodingError` (exit 4), `UsageError` (exit 2).

Builders are those of tests/test_rope_third_party.py, tests/test_rope_angles.py and fixtures/third_party.py
(imported, not copied). Tolerance: float32 models of magnitude ~1 through one or two layers, outputs compared
relative to the largest one; the rewritten angles differ from the library's by float32 rounding of a product
(a few ulp of angles up to ~100 rad), so 1e-5 holds with margin, and a wrong frequency is off by far more (each
test also checks that the unrewritten program is off by > 1e-3 where the rewrite matters)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("rotary_embedding_torch")
pytest.importorskip("x_transformers")

import posrewrite.torch as pt  # noqa: E402
from fixtures import third_party as tp  # noqa: E402
from posrewrite.errors import NoEncodingError, PartialMatchError, UsageError  # noqa: E402
from tests import test_rope_angles as ra  # noqa: E402
from tests import test_rope_third_party as t3  # noqa: E402

TOL = 1e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


def _run(program, *args) -> np.ndarray:
    with torch.no_grad():
        return program.module()(*args).float().numpy()


def _lm_program(module, ctx=contextlib.nullcontext):
    """A language model taking ids [batch, seq], exported with both axes dynamic."""
    ids = torch.randint(3, t3.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with ctx():
        return torch.export.export(module.eval(), (ids,), dynamic_shapes=dims, strict=False)


#: name -> builder of the library's module (the same constructors as the ONNX tests)
MODULES = {
    "ret": lambda: t3.ret_module(),
    "xt": lambda: t3.xt_module(),
    "xt_xpos": lambda: t3.xt_module(xpos=True),
    "merged_heads": lambda: t3.MergedHeadsPairs(),
    "merged_heads_out": lambda: t3.MergedHeadsPairs(heads_out=True),
    "gpt_oss": lambda: t3.hf_module("gpt_oss"),
    "deepseek_v3": lambda: t3.hf_module("deepseek_v3"),
    "llama4": lambda: t3.hf_module("llama4"),
}


@functools.cache
def program(name: str):
    """The library's module exported by torch.export (Llama 4 with its rotation in real pairs, as HF's complex
    form cannot be exported; the reference runs HF's own complex arithmetic)."""
    ctx = t3._llama4_real_pairs if name == "llama4" else contextlib.nullcontext
    return _lm_program(MODULES[name](), ctx)


@pytest.mark.parametrize("name", list(MODULES))
def test_detected_with_the_library_parameters(name):
    _, layout, head_dim, rotary_dim, base = t3.DETECT[name]
    sites = pt.detect(program(name))
    assert sites and all(s.kind == "rope" for s in sites)
    inv = t3._library_inv_freq("xt" if name == "xt_xpos" else name)
    for site in sites:
        assert site.layout.value == layout and (site.head_dim, site.rotary_dim) == (head_dim, rotary_dim)
        assert site.base == pytest.approx(base, rel=1e-4)
        np.testing.assert_allclose(site.inv_freq, inv, rtol=1e-6)
        decay = site.encoding.decay
        if name == "xt_xpos":  # the paper's zeta_c = (2c + 0.4 d) / (1.4 d), x-transformers' scale_base 512
            assert decay is not None and decay.length_centred
            assert decay.scale_base == pytest.approx(512.0, rel=1e-3)
            assert site.encoding.identified_by == "probe"
        else:
            assert decay is None
    if name.startswith("merged_heads"):
        assert all(a.heads_in_last_axis == 2 for s in sites for a in s.applications)


@pytest.mark.parametrize("case", list(t3.LIBRARY_RESCALES))
def test_rescale_equals_the_library(case):
    """rotary-embedding-torch, x-transformers (plain and xPos, both decay conventions) and the merged-heads
    spelling: each rewrite = the library built with its own interpolation setting."""
    name, options, reference = t3.LIBRARY_RESCALES[case]
    rescaled = pt.rewrite(program(name), **options)
    ids = torch.from_numpy(t3._ids())
    ref = t3._torch_out(reference(), ids.numpy())
    assert _rel(_run(rescaled, ids), ref) <= TOL
    assert _rel(_run(program(name), ids), ref) > 1e-3  # the rewrite matters at these positions


@pytest.mark.parametrize("method", t3.HF_METHODS)
@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "llama4"])
def test_rescale_equals_hf(name, method):
    """gpt-oss (rotate-half without Neg), DeepSeek-V3 (interleaved pairs written de-interleaved, identified by
    probing) and Llama 4 (complex pairs): each method = HF's model rebuilt with the new rope_parameters."""
    _, _, _, rotary_dim, base = t3.DETECT[name]
    L = 16
    rescaled = pt.rewrite(program(name), rope_scale=4.0, rope_method=method, original_max_positions=L)
    ids = t3._ids()
    ref = t3._torch_out(t3.hf_module(name, t3._hf_params(method, rotary_dim, base, L)), ids)
    assert _rel(_run(rescaled, torch.from_numpy(ids)), ref) <= TOL


# -- xPos against the paper --------------------------------------------------------------------------------------


class XposRotation(torch.nn.Module):
    """q, k [batch, heads, seq, 16] rotated by x-transformers' own xPos `RotaryEmbedding` and
    `apply_rotary_pos_emb` (q by the scale, k by its inverse), stacked: what the paper's reference checks."""

    def __init__(self) -> None:
        super().__init__()
        from x_transformers.x_transformers import RotaryEmbedding

        self.rope = RotaryEmbedding(16, use_xpos=True, scale_base=64)

    def forward(self, q, k):
        from x_transformers.x_transformers import apply_rotary_pos_emb

        freqs, scale = self.rope(torch.arange(q.shape[-2]))
        return torch.stack([apply_rotary_pos_emb(q, freqs, scale), apply_rotary_pos_emb(k, freqs, scale ** -1)])


def _xpos_paper(q: np.ndarray, k: np.ndarray, *, s: float, gamma: float, decay: str) -> np.ndarray:
    """Sun et al. 2022 with position interpolation by s: pair c = (2c, 2c+1) of q at position p rotated by
    p·θ_c / s, θ_c = 10000^(-2c/d), and scaled by ζ_c^((p - p0)/γ'), ζ_c = (2c + 0.4 d) / (1.4 d), p0 = n // 2
    (x-transformers centres it on the sequence); k by the inverse scale. γ' = γ ("angles": the decay keeps the
    original positions) or γ·s ("scaled": its positions are divided by s too)."""
    d, n = q.shape[-1], q.shape[-2]
    c = np.arange(d // 2)
    theta = 10000.0 ** (-2.0 * c / d)
    zeta = (2.0 * c + 0.4 * d) / (1.4 * d)
    p = np.arange(n, dtype=np.float64)
    ang = np.outer(p / s, theta)  # [n, d/2]
    power = (p - n // 2) / (gamma * (s if decay == "scaled" else 1.0))
    scale = zeta[None, :] ** power[:, None]

    def rotate(x, sc):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x, dtype=np.float64)
        out[..., 0::2] = (x0 * np.cos(ang) - x1 * np.sin(ang)) * sc
        out[..., 1::2] = (x1 * np.cos(ang) + x0 * np.sin(ang)) * sc
        return out

    return np.stack([rotate(q, scale), rotate(k, 1.0 / scale)])


@pytest.mark.parametrize("decay", ["angles", "scaled"])
def test_xpos_rescale_equals_the_paper(decay):
    """x-transformers' xPos rotation, exported, identified (decay ζ, γ = 64) and rescaled linear x4 with each
    decay convention: equal to the paper's formula at positions / 4 with the decay on the original positions
    (angles) or on the divided ones (scaled)."""
    module = XposRotation().eval()
    q = torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=2, max=4096)
    ep = torch.export.export(module, (q, q.clone()), dynamic_shapes=({2: seq}, {2: seq}), strict=False)
    sites = pt.detect(ep)
    assert sites and sum(s.rotations for s in sites) == 2
    for site in sites:
        assert site.encoding.decay is not None and site.encoding.decay.scale_base == pytest.approx(64.0, rel=1e-3)
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="linear", xpos_decay=decay)
    rng = np.random.default_rng(1)
    qn, kn = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(2))
    got = _run(new, torch.from_numpy(qn), torch.from_numpy(kn))
    ref = _xpos_paper(qn.astype(np.float64), kn.astype(np.float64), s=4.0, gamma=64.0, decay=decay)
    assert _rel(got, ref) <= TOL
    other = _xpos_paper(qn.astype(np.float64), kn.astype(np.float64), s=4.0, gamma=64.0,
                        decay="scaled" if decay == "angles" else "angles")
    assert _rel(got, other) > 1e-3  # the two conventions differ here


def test_xpos_scaled_decay_needs_linear():
    with pytest.raises(UsageError, match="linear"):
        pt.rewrite(program("xt_xpos"), rope_scale=4.0, rope_method="yarn", original_max_positions=16,
                   xpos_decay="scaled")


# -- M-RoPE (HF Qwen2-VL text model) -----------------------------------------------------------------------------


def _vl_program():
    module = tp.vl_text("qwen2_vl")
    ids, pos = torch.randint(0, 128, (1, 8)), torch.arange(8).expand(3, 1, 8).contiguous()
    seq = torch.export.Dim("seq", min=2, max=4096)
    return torch.export.export(module, (ids, pos), dynamic_shapes={"input_ids": {1: seq}, "position_ids": {2: seq}})


@pytest.mark.parametrize("method", ["linear", "dynamic", "llama3", "yarn", "ntk"])
def test_mrope_rescale_equals_hf(method):
    """Qwen2-VL's M-RoPE (mrope_section [2, 3, 3], 3-row position_ids with an image block): every method = HF's
    text model rebuilt with the new rope_parameters, at lengths below and past the original 64."""
    ep = _vl_program()
    (site,) = pt.detect(ep)
    assert site.encoding.source.rows.sections == (2, 3, 3) and site.base == 10000.0
    L = tp.VL_TEXT["max_position_embeddings"]
    new = pt.rewrite(ep, rope_scale=4.0, rope_method=method, original_max_positions=L)
    params = t3._hf_params(method, 16, 10000.0, L)
    if method == "ntk":
        params = {"rope_theta": params["rope_theta"]}
    reference = tp.vl_text("qwen2_vl", params)
    rng = np.random.default_rng(3)
    for n in (L // 2, 3 * L):
        ids = torch.from_numpy(rng.integers(0, 128, size=(1, n)))
        pos = torch.from_numpy(ra._mrope_positions(n))
        with torch.no_grad():
            want = reference(ids, pos).numpy()
        assert _rel(_run(new, ids, pos), want) <= TOL, (method, n)
    assert _rel(_run(ep, ids, pos), want) > 1e-3


# -- 2-D RoPE ----------------------------------------------------------------------------------------------------


def _timm_program(name: str, **overrides):
    model = tp.timm_model(name, **overrides)
    patch = int(model.patch_embed.patch_size[0])
    rows, cols = torch.export.Dim("rows", min=2, max=64), torch.export.Dim("cols", min=2, max=64)
    ep = torch.export.export(model, (torch.randn(1, 3, 4 * patch, 4 * patch),),
                             dynamic_shapes={"x": {2: patch * rows, 3: patch * cols}})
    return model, ep


@pytest.mark.parametrize("target", [(8, 8), (8, 12)])
def test_timm_axial_interpolation_equals_ref_feat_shape(target):
    """original_grid 4x4 -> target_grid HxW = timm built with ref_feat_shape=(4, 4), run at HxW."""
    original, ep = _timm_program(ra.AXIAL)
    (site,) = pt.detect(ep)
    assert site.angles.value == "grid" and site.encoding.position_axes.channels_per_axis() == (8, 8)
    new = pt.rewrite(ep, original_grid=(4, 4), target_grid=target)
    reference = tp.timm_model(ra.AXIAL, ref_feat_shape=(4, 4))
    reference.load_state_dict(original.state_dict())
    x = ra._image(*target)
    ref = ra._timm_out(reference, x)
    assert _rel(_run(new, torch.from_numpy(x)), ref) <= TOL
    assert _rel(_run(ep, torch.from_numpy(x)), ref) > 20 * TOL


def test_timm_axial_ntk_per_axis_equals_paper_bands():
    """NTK per axis ("4x4" -> "8x8" given as strings): each axis's k geometric bands with the base raised as
    NTK-aware scaling does (base · s^(d/(d-2)), d = 2k: f_i · s^(-i/(k-1))), computed here, put into timm's own
    bands buffer."""
    _, ep = _timm_program(ra.AXIAL)
    new = pt.rewrite(ep, original_grid="4x4", target_grid="8x8", rope_method="ntk")
    reference = tp.timm_model(ra.AXIAL)
    bands = reference.rope.bands.numpy().astype(np.float64)
    k = bands.size
    with torch.no_grad():
        reference.rope.bands.copy_(torch.from_numpy(bands * 2.0 ** (-np.arange(k) / (k - 1))))
    x = ra._image(8, 8)
    ref = ra._timm_out(reference, x)
    assert _rel(_run(new, torch.from_numpy(x)), ref) <= TOL
    assert _rel(_run(ep, torch.from_numpy(x)), ref) > 20 * TOL


def test_timm_mixed_interpolated_and_per_axis_factors_refused():
    """RoPE-Mixed: one factor on both axes = timm's learned frequencies divided by it (angle = x·f_x + y·f_y,
    positions / 2); different factors per axis are refused with the reason (exit 5)."""
    _, ep = _timm_program(ra.MIXED)
    (site,) = pt.detect(ep)
    assert site.encoding.position_axes.mixed
    new = pt.rewrite(ep, original_grid=(4, 4), target_grid=(8, 8))
    reference = tp.timm_model(ra.MIXED)
    with torch.no_grad():
        reference.rope.freqs.div_(2.0)
    x = ra._image(8, 8)
    ref = ra._timm_out(reference, x)
    assert _rel(_run(new, torch.from_numpy(x)), ref) <= TOL
    assert _rel(_run(ep, torch.from_numpy(x)), ref) > 20 * TOL
    with pytest.raises(PartialMatchError, match="mixed 2-D RoPE"):
        pt.rewrite(ep, original_grid=(4, 4), target_grid=(8, 12))


def test_rotary_embedding_torch_axial_interpolated():
    """rotary-embedding-torch's get_axial_freqs on [1, rows, cols, channels] (its rotation identified by probing
    over the grid): 6x10 -> 12x15 = the library's frequencies at positions scaled by 6/12 and 10/15."""
    module = tp.axial_rotary("lang")
    rows, cols = torch.export.Dim("rows", min=2, max=256), torch.export.Dim("cols", min=2, max=256)
    ep = torch.export.export(module, (torch.randn(1, 6, 10, 32),), dynamic_shapes={"x": {1: rows, 2: cols}})
    (site,) = pt.detect(ep)
    assert site.angles.value == "grid" and site.encoding.identified_by == "probe" and site.rotary_dim == 32
    assert site.encoding.position_axes.channels_per_axis() == (16, 16)
    new = pt.rewrite(ep, original_grid=(6, 10), target_grid=(12, 15))
    x = np.random.default_rng(0).standard_normal((1, 12, 15, 32)).astype(np.float32)
    ref = ra._axial_reference(module, x, (6 / 12, 10 / 15))
    assert _rel(_run(new, torch.from_numpy(x)), ref) <= TOL
    assert _rel(_run(ep, torch.from_numpy(x)), ref) > 20 * TOL


def test_pixtral_grid_interpolated():
    """HF Pixtral (positions made from the image size inside the model): 4x4 -> 8x8 = HF's module with its
    inv_freq divided by 2."""
    rows, cols = torch.export.Dim("rows", min=2, max=16), torch.export.Dim("cols", min=2, max=16)
    ep = torch.export.export(tp.pixtral(), (torch.randn(1, 3, 64, 64),),
                             dynamic_shapes={"pixel_values": {2: 16 * rows, 3: 16 * cols}})
    (site,) = pt.detect(ep)
    assert site.angles.value == "grid" and site.layout.value == "rotate_half"
    new = pt.rewrite(ep, original_grid=(4, 4), target_grid=(8, 8))
    reference = tp.pixtral()
    with torch.no_grad():
        reference.inner.patch_positional_embedding.inv_freq.div_(2.0)
    x = ra._image(8, 8)
    ref = ra._timm_out(reference, x)
    assert _rel(_run(new, torch.from_numpy(x)), ref) <= TOL
    assert _rel(_run(ep, torch.from_numpy(x)), ref) > 20 * TOL
    # fusion leaves a 2-D RoPE as it is, with a note (the fused op reads one position per token), as on ONNX
    messages: list[str] = []
    fused = pt.rewrite(ep, original_grid=(4, 4), target_grid=(8, 8), fuse=True, messages=messages)
    assert any("not fused: 2-D RoPE" in m for m in messages)
    assert _rel(_run(fused, torch.from_numpy(x)), ref) <= TOL


def test_grid_refusals_as_on_the_onnx_side():
    """A 1-D rescale of a 2-D RoPE: exit 5 with the way to rescale it; both kinds of flags on a model with only
    2-D RoPE: exit 2; grid flags on a 1-D model: exit 4; EVA-02 with a reference grid and HF DINOv3 (coordinates
    normalised by the grid size): exit 5, they already adapt to resolution."""
    _, ep = _timm_program(ra.AXIAL)
    with pytest.raises(PartialMatchError, match="original_grid"):
        pt.rewrite(ep, rope_scale=2.0)
    with pytest.raises(UsageError, match="only 2-D RoPE"):
        pt.rewrite(ep, rope_scale=2.0, original_grid=(4, 4), target_grid=(8, 8))
    with pytest.raises(NoEncodingError, match="no 2-D RoPE"):
        pt.rewrite(program("ret"), original_grid=(4, 4), target_grid=(8, 8))
    _, eva = _timm_program("eva02_tiny_patch14_224", img_size=56, embed_dim=64, num_heads=2, ref_feat_shape=(4, 4))
    rows, cols = torch.export.Dim("rows", min=2, max=64), torch.export.Dim("cols", min=2, max=64)
    dinov3 = torch.export.export(tp.dinov3(), (torch.randn(1, 3, 64, 64),),
                                 dynamic_shapes={"pixel_values": {2: 16 * rows, 3: 16 * cols}})
    for normalised in (eva, dinov3):
        (site,) = pt.detect(normalised)
        assert site.encoding.position_axes.normalised
        with pytest.raises(PartialMatchError, match="already adapts to resolution"):
            pt.rewrite(normalised, original_grid=(4, 4), target_grid=(8, 8))


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "why"), [("deepseek_v3", "interleaved_to_half"), ("xt_xpos", "xPos"),
                                           ("merged_heads", "heads on its last axis")])
def test_fuse_refused_with_the_reason(name, why):
    """The fused op rotates pairs in place, per [batch, heads, seq, head_dim] q/k, without a magnitude: DeepSeek's
    de-interleaved output, xPos and a [.., H·D] rotation are refused (exit 5) with the reason; with
    allow_partial nothing is fused and the program is unchanged in what it computes."""
    with pytest.raises(PartialMatchError, match=why):
        pt.rewrite(program(name), fuse=True)
    messages: list[str] = []
    new = pt.rewrite(program(name), fuse=True, allow_partial=True, messages=messages)
    assert any(why in m for m in messages)
    ids = torch.from_numpy(t3._ids(20))
    assert _rel(_run(new, ids), _run(program(name), ids)) == 0.0


class CumsumAngles(torch.nn.Module):
    """q [batch, heads, seq, 16] rotated (rotate-half) by angles written as a running sum of inv_freq over the
    positions (= p·θ, but no positions x inv_freq product for a pattern to read): identified by probing."""

    def __init__(self, factor: float = 1.0, inv_freq=None, attention: float = 1.0) -> None:
        super().__init__()
        default = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        self.register_buffer("inv_freq", default if inv_freq is None else inv_freq.to(torch.float32))
        self.factor, self.attention = factor, attention

    def forward(self, q):
        n = q.shape[-2]
        ang = torch.cumsum(self.inv_freq.expand(n, -1), dim=0) - self.inv_freq
        ang = torch.cat([ang, ang], dim=-1) / self.factor
        x1, x2 = q.chunk(2, dim=-1)
        return q * (ang.cos() * self.attention) + torch.cat([-x2, x1], dim=-1) * (ang.sin() * self.attention)


def test_probed_angles_rescaled_and_runtime_methods_refused():
    ep = torch.export.export(CumsumAngles(), (torch.randn(1, 2, 8, 16),),
                             dynamic_shapes=({2: torch.export.Dim("seq", min=2, max=4096)},))
    (site,) = pt.detect(ep)
    assert site.angles.value == "probed" and site.base == pytest.approx(10000.0, rel=1e-4)
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="linear")
    q = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = CumsumAngles(4.0)(q).numpy()
    assert _rel(_run(new, q), ref) <= TOL
    assert _rel(_run(ep, q), ref) > 1e-3
    with pytest.raises(PartialMatchError, match="identified by probing only"):
        pt.rewrite(ep, rope_scale=4.0, rope_method="dynamic", original_max_positions=16)
    # YaRN: a ratio that differs per frequency and an attention factor on cos/sin = HF's own YaRN numbers
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=16, num_attention_heads=1, head_dim=16, max_position_embeddings=64,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 16})
    inv, attention = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    new = pt.rewrite(ep, rope_scale=4.0, rope_method="yarn", original_max_positions=16)
    with torch.no_grad():
        ref = CumsumAngles(inv_freq=inv, attention=float(attention))(q).numpy()
    assert _rel(_run(new, q), ref) <= TOL


def test_no_rope_is_exit_4():
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    ep = torch.export.export(module, (torch.randn(2, 8),))
    with pytest.raises(NoEncodingError):
        pt.rewrite(ep, rope_scale=2.0)


def test_static_exports_refused_with_the_fix():
    """rotary-embedding-torch's xPos reads the length as a Python int, so torch.export fixes it: the rotation is
    identified (probed along each static axis) and the rewrite refused (exit 5) saying why and what to do; timm's
    default export (fixed image size) holds its cos/sin as a constant table no input selects: refused as baked."""
    ids = torch.randint(3, t3.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(t3.ret_module(xpos=True).eval(), (ids,), strict=False)
    with pytest.raises(PartialMatchError, match="fixed length of 12.*dynamic sequence axis"):
        pt.rewrite(ep, rope_scale=4.0)
    model = tp.timm_model(ra.AXIAL, dynamic_img_size=False)
    ep = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    for options in (dict(original_grid=(4, 4), target_grid=(8, 8)), dict(rope_scale=2.0)):
        with pytest.raises(PartialMatchError, match="static export.*dynamic_img_size=True"):
            pt.rewrite(ep, **options)


def test_export_onnx_of_an_xpos_rewrite_equals_the_library(tmp_path):
    """export + rewrite + ONNX in one call (x-transformers' xPos, linear x4, decay scaled): onnxruntime's logits
    = x-transformers built with interpolation_factor 4 and xpos_scale_base 512·4."""
    ids = torch.randint(3, t3.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    result = pt.export_onnx(t3.xt_module(xpos=True), (ids,), tmp_path / "xt.onnx", dynamic_shapes=dims,
                            input_names=["input_ids"], rope_scale=4.0, rope_method="linear", xpos_decay="scaled")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    x = t3._ids()
    ref = t3._torch_out(t3.xt_module(xpos=True, interpolation_factor=4.0, xpos_scale_base=512 * 4.0), x)
    assert _rel(t3._run(result.path, x), ref) <= TOL
