"""RoPE angles identified by probing and rescaled in angle space, on models from libraries nobody here wrote.

References are the libraries themselves: HF transformers' Qwen2-VL / Qwen3-VL text models built with the new
`rope_parameters` (M-RoPE with `mrope_section`), timm's RoPE ViTs built with `ref_feat_shape` (EVA-02's
interpolation, per axis), timm's RoPE-Mixed with its learned frequencies divided by the factor (positions / s,
the interpolation of Heo et al. 2024 written through the library's own parameter), and an NTK reference whose
frequency bands the test computes from the NTK-aware formula (base · s^(d/(d-2))). Models are exported by the
tests (fixtures/third_party.py, torch.onnx.export(dynamo=True)) and run in onnxruntime.

Tolerance: float32 activations of magnitude ~1 through two layers; the rewrite's angles differ from the
library's by float32 rounding of the ratio product (a few ulp of angles up to ~100 rad), so 1e-5 relative to the
largest output holds with margin and a wrong ratio (or a missed channel) is off by far more.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import third_party as tp  # noqa: E402
from posrewrite import api, errors, io  # noqa: E402

REL_TOL = 1e-5


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _ort(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _encoding(path) -> dict:
    result = api.inspect(path).to_dict()
    assert not result["refusals"], result["refusals"]
    (enc,) = [e for e in result["encodings"] if e["kind"] == "rope"]
    return enc


# -- M-RoPE (HF Qwen2-VL, Qwen3-VL) ---------------------------------------------------------------------


def _mrope_positions(n: int) -> np.ndarray:
    """3-row position_ids as a VL model sees them: text positions, then an image block whose rows (t, h, w)
    differ, then text again."""
    t = np.arange(n)
    rows = np.stack([t, t, t]).astype(np.int64)
    a, b = n // 4, n // 4 + min(12, n // 2)
    k = np.arange(b - a)
    rows[0, a:b] = a
    rows[1, a:b] = a + k // 4
    rows[2, a:b] = a + k % 4
    rows[:, b:] = rows[:, b:] - (b - a) + 4
    return rows[:, None, :]


@pytest.mark.parametrize("family,sections,interleaved", [("qwen2_vl", [2, 3, 3], False),
                                                         ("qwen2_5_vl", [4, 2, 2], False),
                                                         ("qwen3_vl", [4, 2, 2], True)])
def test_mrope_detected_with_sections(family, sections, interleaved):
    enc = _encoding(tp.export_vl_text(family))
    assert enc["angles"] == "computed" and enc["base"] == 10000.0 and enc["rotary_dim"] == 16
    rows = enc["positions"]
    assert rows["kind"] == "rows" and rows["rows"] == 3
    assert rows["sections"] == sections and rows["interleaved"] is interleaved
    if interleaved:  # HF's interleaved layout: T H W T H W ... then T (Qwen3-VL's apply_interleaved_mrope)
        assert rows["row_of_channel"] == [0, 1, 2, 0, 1, 2, 0, 0]
    else:
        assert rows["row_of_channel"] == sum(([r] * s for r, s in enumerate(sections)), [])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["linear", "yarn", "dynamic", "llama3"])
def test_mrope_rescale_equals_hf(family, method, tmp_path):
    src = tp.export_vl_text(family)
    L = tp.VL_TEXT["max_position_embeddings"]
    out = tmp_path / "scaled.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method=method, original_max_positions=L)
    assert result.modified and result.validation is not None and result.validation.ok
    params = {"rope_type": method, "factor": 4.0}
    if method in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = L
    if method == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    ref_model = tp.vl_text(family, params)
    rng = np.random.default_rng(0)
    for n in (L // 2, L + 8, 3 * L):
        ids = rng.integers(0, tp.VL_TEXT["vocab_size"], size=(1, n)).astype(np.int64)
        pos = _mrope_positions(n)
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(ids), torch.from_numpy(pos)).numpy()
        got = _ort(out, {"input_ids": ids, "position_ids": pos})
        assert _rel_err(got, ref) <= REL_TOL, (family, method, n, _rel_err(got, ref))
    before = _ort(src, {"input_ids": ids, "position_ids": pos})
    assert _rel_err(before, ref) > 1e-3  # the rewrite changed what matters


# -- timm 2-D RoPE ViTs ----------------------------------------------------------------------------------


AXIAL = "vit_small_patch16_rope_224"
MIXED = "vit_small_patch16_rope_mixed_224"


def _image(rows: int, cols: int, patch: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, rows * patch, cols * patch)).astype(np.float32)


def _timm_out(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_timm_axial_detected_as_2d():
    enc = _encoding(tp.export_timm(AXIAL))
    assert enc["angles"] == "grid" and enc["layout"] == "interleaved" and enc["rotary_dim"] == 32
    grid = enc["positions"]
    # head_dim 32: timm gives each axis head_dim / 4 = 8 frequency bands (each used by one rotated pair)
    assert grid == {**grid, "kind": "grid", "mixed": False, "normalised": False, "channels_per_axis": [8, 8]}


@pytest.mark.parametrize("target", [(8, 8), (8, 12)])
def test_timm_axial_interpolation_equals_ref_feat_shape(target, tmp_path):
    """--original-grid 4x4 --target-grid HxW = timm built with ref_feat_shape=(4, 4), run at HxW."""
    src = tp.export_timm(AXIAL)
    out = tmp_path / "grid.onnx"
    result = api.rewrite(src, output=out, original_grid=(4, 4), target_grid=target)
    assert result.modified and result.validation is not None and result.validation.ok
    original = tp.timm_model(AXIAL)
    reference = tp.timm_model(AXIAL, ref_feat_shape=(4, 4))
    reference.load_state_dict(original.state_dict())
    x = _image(*target)
    ref = _timm_out(reference, x)
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 20 * REL_TOL  # without the rewrite the model differs there
    # at the trained grid the reference (ref_feat_shape = the grid) is the original model
    x4 = _image(4, 4)
    assert _rel_err(_ort(src, {"x": x4}), _timm_out(original, x4)) <= REL_TOL


def test_timm_axial_ntk_per_axis_equals_paper_bands(tmp_path):
    """NTK per axis: an axis's k geometric bands f_i = f_0 r^i rebuilt from a base raised so that the fastest
    stays and the slowest is divided by s (NTK-aware scaling, base · s^(d/(d-2)) with d = 2k: f_i · s^(-i/(k-1))),
    computed here and put into timm's own `bands` buffer."""
    src = tp.export_timm(AXIAL)
    out = tmp_path / "ntk.onnx"
    result = api.rewrite(src, output=out, original_grid=(4, 4), target_grid=(8, 8), rope_method="ntk")
    assert result.validation is not None and result.validation.ok
    reference = tp.timm_model(AXIAL)
    bands = reference.rope.bands.numpy().astype(np.float64)
    k, s = bands.size, 2.0
    np.testing.assert_allclose(bands[1:] / bands[:-1], bands[1] / bands[0], rtol=1e-5)  # geometric
    with torch.no_grad():
        reference.rope.bands.copy_(torch.from_numpy(bands * s ** (-np.arange(k) / (k - 1))))
    x = _image(8, 8)
    ref = _timm_out(reference, x)
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 20 * REL_TOL


def test_timm_mixed_detected_and_interpolated(tmp_path):
    src = tp.export_timm(MIXED)
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["positions"]["mixed"] is True
    out = tmp_path / "mixed.onnx"
    result = api.rewrite(src, output=out, original_grid=(4, 4), target_grid=(8, 8))
    assert result.validation is not None and result.validation.ok
    reference = tp.timm_model(MIXED)
    with torch.no_grad():  # angle = x·f_x + y·f_y: positions / 2 is every learned frequency / 2
        reference.rope.freqs.div_(2.0)
    x = _image(8, 8)
    assert _rel_err(_ort(out, {"x": x}), _timm_out(reference, x)) <= REL_TOL


def test_timm_mixed_refuses_per_axis_factors(tmp_path):
    src = tp.export_timm(MIXED)
    with pytest.raises(errors.PartialMatchError, match="mixed 2-D RoPE"):
        api.rewrite(src, output=tmp_path / "o.onnx", original_grid=(4, 4), target_grid=(8, 12))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("export", [
    lambda: tp.export_timm("eva02_tiny_patch14_224", img_size=56, embed_dim=64, num_heads=2, ref_feat_shape=(4, 4)),
    lambda: tp.export_dinov3(),
], ids=["eva02_ref_feat_shape", "hf_dinov3"])
def test_normalised_coordinates_already_adapt(export, tmp_path):
    src = export()
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["positions"]["normalised"] is True
    assert any("already adapts to resolution" in n for n in enc["notes"])
    with pytest.raises(errors.PartialMatchError, match="already adapts to resolution"):
        api.rewrite(src, output=tmp_path / "o.onnx", original_grid=(4, 4), target_grid=(8, 8))
    assert not (tmp_path / "o.onnx").exists()


def test_grid_site_refuses_a_1d_rescale(tmp_path):
    with pytest.raises(errors.PartialMatchError, match="--original-grid"):
        api.rewrite(tp.export_timm(AXIAL), output=tmp_path / "o.onnx", rope_scale=2.0)


def test_cli_grid_flags(tmp_path):
    from posrewrite.cli import main

    src = tp.export_timm(AXIAL)
    out = tmp_path / "cli.onnx"
    assert main([str(src), "--original-grid", "4x4", "--target-grid", "8x8", "-o", str(out)]) == 0
    assert out.exists()
    assert main([str(src), "--original-grid", "4x4", "-o", str(tmp_path / "bad.onnx")]) == 2
    assert main([str(src), "--original-grid", "4by4", "--target-grid", "8x8", "-o", str(tmp_path / "b.onnx")]) == 2


# -- angles read through real pairs (Llama 4 written without complex numbers) ----------------------------


class _RealPairsRope(torch.nn.Module):
    """q rotated by rotate-half RoPE whose cos/sin are picked from stacked real pairs (cis[..., 0], cis[..., 1]):
    a scalar-index Gather between Cos/Sin and the rotation (what Llama 4 becomes when its complex RoPE is
    written with real pairs)."""

    def __init__(self, dim: int = 16, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        cis = torch.stack([freqs.cos(), freqs.sin()], dim=-1)
        cos, sin = cis[..., 0], cis[..., 1]
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        q = self.proj(x)
        half = q.shape[-1] // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        return q * cos + rotated * sin


def _numpy_rope(q: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """rotate-half RoPE of Su et al. (2021) in float64: q [B, H, S, D], positions [B, S]."""
    angles = positions[:, None, :, None].astype(np.float64) * inv_freq[None, None, None, :]
    cos, sin = np.concatenate([np.cos(angles)] * 2, -1), np.concatenate([np.sin(angles)] * 2, -1)
    half = q.shape[-1] // 2
    return q * cos + np.concatenate([-q[..., half:], q[..., :half]], -1) * sin


def test_real_pair_angles_detected_and_rescaled(tmp_path):
    torch.manual_seed(0)
    module = _RealPairsRope().eval()
    x, pos = torch.randn(1, 2, 8, 16), torch.arange(8)[None]
    src = tmp_path / "pairs.onnx"
    seq = torch.export.Dim("seq", min=2, max=4096)
    torch.onnx.export(module, (x, pos), str(src), dynamo=True, input_names=["x", "position_ids"],
                      dynamic_shapes={"x": {2: seq}, "position_ids": {1: seq}})
    enc = _encoding(src)
    assert enc["angles"] == "computed" and enc["base"] == 10000.0 and enc["rotary_dim"] == 16
    out = tmp_path / "linear4.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method="linear")
    assert result.validation is not None and result.validation.ok
    n = 300
    xs = np.random.default_rng(1).standard_normal((1, 2, n, 16)).astype(np.float32)
    positions = np.arange(n, dtype=np.int64)[None]
    with torch.no_grad():
        q = module.proj(torch.from_numpy(xs)).numpy().astype(np.float64)
    inv = 10000.0 ** (-np.arange(0, 16, 2) / 16) / 4.0  # linear interpolation: positions / 4
    ref = _numpy_rope(q, positions, inv)
    assert _rel_err(_ort(out, {"x": xs, "position_ids": positions}), ref) <= REL_TOL


class _CyclesRope(torch.nn.Module):
    """Interleaved (GPT-J) RoPE whose angles are written in cycles: (pos x f) x 2π after the product, so no
    positions x inv_freq product feeds Cos/Sin directly and the angles are identified by probing."""

    def __init__(self, dim: int = 16, base: float = 10000.0):
        super().__init__()
        cycles = 1.0 / (2 * np.pi * base ** (np.arange(0, dim, 2) / dim))
        self.register_buffer("cycles", torch.tensor(cycles, dtype=torch.float32))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, position_ids):
        angles = (position_ids[..., None].float() * self.cycles) * (2 * np.pi)
        cos = angles.cos().repeat_interleave(2, -1)[:, None]
        sin = angles.sin().repeat_interleave(2, -1)[:, None]
        q = self.proj(x)
        rotated = torch.stack([-q[..., 1::2], q[..., 0::2]], dim=-1).flatten(-2)
        return q * cos + rotated * sin


def _numpy_rope_interleaved(q: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """GPT-J's interleaved RoPE in float64: pairs (2i, 2i+1) rotated by pos·f_i."""
    angles = positions[:, None, :, None].astype(np.float64) * inv_freq[None, None, None, :]
    cos, sin = np.repeat(np.cos(angles), 2, -1), np.repeat(np.sin(angles), 2, -1)
    rotated = np.stack([-q[..., 1::2], q[..., 0::2]], -1).reshape(q.shape)
    return q * cos + rotated * sin


@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_probed_angles_rescaled_in_angle_space(method, tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    module = _CyclesRope().eval()
    src = tmp_path / "cycles.onnx"
    seq = torch.export.Dim("seq", min=2, max=4096)
    torch.onnx.export(module, (torch.randn(1, 2, 8, 16), torch.arange(8)[None]), str(src), dynamo=True,
                      input_names=["x", "position_ids"], dynamic_shapes={"x": {2: seq}, "position_ids": {1: seq}})
    enc = _encoding(src)
    assert enc["angles"] == "probed" and enc["layout"] == "interleaved" and enc["base"] == 10000.0
    L = 64
    out = tmp_path / f"{method}.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method=method, original_max_positions=L)
    assert result.validation is not None and result.validation.ok
    # the reference frequencies and attention factor from HF's own rope init functions
    params = {"rope_type": method, "factor": 4.0, "rope_theta": 10000.0}
    if method == "yarn":
        params["original_max_position_embeddings"] = L
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=L, rope_parameters=params)
    inv, factor = ROPE_INIT_FUNCTIONS[method](config, "cpu")
    n = 3 * L
    xs = np.random.default_rng(2).standard_normal((1, 2, n, 16)).astype(np.float32)
    positions = np.arange(n, dtype=np.int64)[None]
    with torch.no_grad():
        q = module.proj(torch.from_numpy(xs)).numpy().astype(np.float64)
    ref = factor * _numpy_rope_interleaved(q, positions, inv.numpy().astype(np.float64))
    assert _rel_err(_ort(out, {"x": xs, "position_ids": positions}), ref) <= REL_TOL


# -- the torch.export side reads M-RoPE the same way ------------------------------------------------------


@pytest.mark.parametrize("family,sections", [("qwen2_vl", (2, 3, 3)), ("qwen3_vl", (4, 2, 2))])
@pytest.mark.parametrize("method", ["linear", "yarn"])
def test_fx_mrope_detected_and_rescaled_like_hf(family, sections, method):
    import posrewrite.torch as pt

    module = tp.vl_text(family)
    ids, pos = torch.randint(0, 128, (1, 8)), torch.arange(8).expand(3, 1, 8).contiguous()
    seq = torch.export.Dim("seq", min=2, max=4096)
    program = torch.export.export(module, (ids, pos), dynamic_shapes={"input_ids": {1: seq}, "position_ids": {2: seq}})
    (site,) = pt.detect(program)
    assert site.encoding.base == 10000.0 and site.encoding.source.rows.sections == sections
    L = tp.VL_TEXT["max_position_embeddings"]
    new = pt.rewrite(program, rope_scale=4.0, rope_method=method, original_max_positions=L)
    params = {"rope_type": method, "factor": 4.0, **({"original_max_position_embeddings": L} if method == "yarn"
                                                      else {})}
    reference = tp.vl_text(family, params)
    n = 3 * L
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 128, size=(1, n)))
    pos = torch.from_numpy(_mrope_positions(n))
    with torch.no_grad():
        got, want = new.module()(ids, pos).numpy(), reference(ids, pos).numpy()
    assert _rel_err(got, want) <= REL_TOL


def test_static_timm_export_reported_as_baked(tmp_path):
    """timm's default export (fixed image size) bakes cos/sin into constants: reported with the fix, not as
    "no positional encoding"."""
    result = api.inspect(tp.export_timm(AXIAL, static=True)).to_dict()
    assert not result["encodings"] and result["refusals"]
    for refusal in result["refusals"]:
        assert "static export" in refusal["reason"] and "dynamic_img_size=True" in refusal["reason"]


@pytest.mark.parametrize("flags", [["--original-grid", "4x4", "--target-grid", "8x8"], ["--rope-scale", "2"]],
                         ids=["grid", "rope_scale"])
def test_static_timm_export_rewrite_exits_5_with_the_fix(flags, tmp_path, capsys):
    """A rewrite of timm's static export: exit 5 (identified, not rewritable) with the baked reason and its fix
    on one stderr line, not exit 4 (no encoding); nothing written."""
    from posrewrite.cli import main

    out = tmp_path / "static.onnx"
    assert main([str(tp.export_timm(AXIAL, static=True)), *flags, "-o", str(out)]) == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "static export" in err and "dynamic_img_size=True" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pixtral_2d_rope_from_position_ids_detected_and_interpolated(tmp_path):
    """HF Pixtral: 2-D RoPE whose positions (row, column) are made from the image size inside the model. The
    reference is HF's own module with its inv_freq divided by the factor (angle = pos·f: positions / 2)."""
    src = tp.export_pixtral()
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["layout"] == "rotate_half"
    assert enc["positions"]["mixed"] is False and enc["positions"]["normalised"] is False
    out = tmp_path / "pixtral8.onnx"
    result = api.rewrite(src, output=out, original_grid=(4, 4), target_grid=(8, 8))
    assert result.validation is not None and result.validation.ok
    reference = tp.pixtral()
    rope = reference.inner.patch_positional_embedding
    with torch.no_grad():
        rope.inv_freq.div_(2.0)
    x = _image(8, 8)
    ref = _timm_out(reference, x)
    assert _rel_err(_ort(out, {"pixel_values": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"pixel_values": x}), ref) > 20 * REL_TOL


@pytest.mark.parametrize("name,overrides", [
    (AXIAL, {}), (MIXED, {}),
    ("eva02_tiny_patch14_224", dict(img_size=56, embed_dim=64, num_heads=2, ref_feat_shape=(4, 4))),
], ids=["axial", "mixed", "eva02_ref_feat_shape"])
def test_fx_reads_2d_rope_as_onnx_does(name, overrides):
    """The torch.export program of a timm RoPE ViT is read as the same 2-D RoPE as its ONNX export (same
    per-channel slopes at the probe grid), and a 1-D rescale of it is refused with the reason (exit 5)."""
    import posrewrite.torch as pt

    model = tp.timm_model(name, **overrides)
    patch = int(model.patch_embed.patch_size[0])
    rows, cols = torch.export.Dim("rows", min=2, max=64), torch.export.Dim("cols", min=2, max=64)
    program = torch.export.export(model, (torch.randn(1, 3, 4 * patch, 4 * patch),),
                                  dynamic_shapes={"x": {2: patch * rows, 3: patch * cols}})
    (site,) = pt.detect(program)
    (onnx_site,) = api.detect(io.load_model(tp.export_timm(name, **overrides))).rope_sites
    fx_axes, onnx_axes = site.encoding.position_axes, onnx_site.encoding.position_axes
    assert site.encoding.angles.value == "grid" and fx_axes.to_dict() == onnx_axes.to_dict()
    np.testing.assert_allclose(np.sort(np.abs(fx_axes.row_slope)), np.sort(np.abs(onnx_axes.row_slope)), rtol=1e-5)
    with pytest.raises(errors.PartialMatchError):
        pt.rewrite(program, rope_scale=2.0)


def test_grid_validation_catches_a_wrong_ratio(tmp_path):
    """The 2-D check re-fits the rewritten angles: a model rewritten for 8x12 fails the claims of an 8x8 plan
    (fault injection: the wrong plan checked against the written graph), and passes its own."""
    from posrewrite.passes.onnx.rope import rescale
    from posrewrite.validate import check_grid_rescales

    src = tp.export_timm(AXIAL)
    out = tmp_path / "8x12.onnx"
    api.rewrite(src, output=out, original_grid=(4, 4), target_grid=(8, 12))
    (site,) = api.detect(io.load_model(src)).rope_sites
    rewritten = io.load_model(out)
    right = rescale.plan_grid_site(site, "linear", (4, 4), (8, 12))
    wrong = rescale.plan_grid_site(site, "linear", (4, 4), (8, 8))
    assert all(row.ok for row in check_grid_rescales(rewritten, [right]))
    assert not any(row.ok for row in check_grid_rescales(rewritten, [wrong]))


def test_timm_axial_yarn_per_axis_equals_hf_yarn_bands(tmp_path):
    """YaRN per axis: each axis's bands and the attention factor from HF's own YaRN init function (the axis as a
    1-D RoPE: head_dim 2k, its base, the original grid side as the trained length), put into timm: its bands
    buffer, and its [sin, cos] embedding times the factor (the prefix token, which timm does not rotate, keeps
    its q and k)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = tp.export_timm(AXIAL)
    out = tmp_path / "yarn.onnx"
    result = api.rewrite(src, output=out, original_grid=(4, 4), target_grid=(8, 8), rope_method="yarn")
    assert result.validation is not None and result.validation.ok
    reference = tp.timm_model(AXIAL)
    bands = reference.rope.bands.numpy().astype(np.float64)
    k = bands.size
    base = (bands[0] / bands[1]) ** k  # bands = base^(-2i/(2k))
    config = LlamaConfig(hidden_size=2 * k, num_attention_heads=1, head_dim=2 * k, max_position_embeddings=8,
                         rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": float(base),
                                          "original_max_position_embeddings": 4})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    with torch.no_grad():
        reference.rope.bands.copy_(inv.to(torch.float32))
    get_embed = reference.rope.get_embed
    reference.rope.get_embed = lambda *a, **kw: get_embed(*a, **kw) * factor
    x = _image(8, 8)
    ref = _timm_out(reference, x)
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 20 * REL_TOL


def test_grid_and_1d_flags_together_on_a_2d_model(tmp_path):
    with pytest.raises(errors.UsageError, match="only 2-D RoPE"):
        api.rewrite(tp.export_timm(AXIAL), output=tmp_path / "o.onnx", original_grid=(4, 4), target_grid=(8, 8),
                    rope_scale=2.0)
    assert not (tmp_path / "o.onnx").exists()


def _axial_reference(module, x: np.ndarray, ratio: tuple[float, float]) -> np.ndarray:
    """rotary-embedding-torch's own rotation of the module's projection, its per-axis frequencies taken from the
    library's `forward` at positions arange(n) * ratio (interpolation: positions scaled per axis), broadcast
    over the grid and concatenated (axis 0's channels, then axis 1's) as get_axial_freqs lays them out."""
    from rotary_embedding_torch import apply_rotary_emb

    _, rows, cols, _ = x.shape
    with torch.no_grad():
        f_rows = module.rope(torch.arange(rows, dtype=torch.float32) * ratio[0])  # [rows, 2*bands]
        f_cols = module.rope(torch.arange(cols, dtype=torch.float32) * ratio[1])
        freqs = torch.cat([f_rows[:, None, :].expand(rows, cols, -1), f_cols[None, :, :].expand(rows, cols, -1)],
                          dim=-1)
        return apply_rotary_emb(freqs, module.proj(torch.from_numpy(x))).numpy()


def test_rotary_embedding_torch_axial_identified_and_interpolated(tmp_path):
    """rotary-embedding-torch's get_axial_freqs over a [batch 1, rows, cols, channels] grid: the rotation
    (rearrange + unbind + stack) is identified by probing (rotation_probe, one run per channel over the grid),
    its angles as axial 2-D RoPE; --original-grid 6x10 --target-grid 12x15 = the library's frequencies at
    positions scaled by 6/12 and 10/15."""
    src = tp.export_axial_rotary("lang")
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["identified_by"] == "probe" and enc["rotary_dim"] == 32
    grid = enc["positions"]
    assert grid == {**grid, "mixed": False, "normalised": False, "channels_per_axis": [16, 16]}
    module = tp.axial_rotary("lang")
    x = np.random.default_rng(0).standard_normal((1, 12, 15, 32)).astype(np.float32)
    assert _rel_err(_ort(src, {"x": x}), _axial_reference(module, x, (1.0, 1.0))) <= REL_TOL
    out = tmp_path / "axial.onnx"
    result = api.rewrite(src, output=out, original_grid=(6, 10), target_grid=(12, 15))
    assert result.modified and result.validation is not None and result.validation.ok
    ref = _axial_reference(module, x, (6 / 12, 10 / 15))
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 20 * REL_TOL


# -- positions that are an affine map of the index (rotary-embedding-torch offsets and pixel frequencies) -----


@pytest.mark.parametrize("freqs_for,offset", [("pixel", 0), ("lang", 3), ("pixel", 5)])
def test_rotary_embedding_torch_1d_offset_and_pixel_rescaled_like_interpolate_factor(freqs_for, offset, tmp_path):
    """rotate_queries_or_keys with the library's own `offset` (positions start at 3: no token has angle 0) and
    pixel frequencies (linspace(1, 32)·pi: above pi per token, so the rotation's per-token turn aliases): found
    with the library's frequencies and offset; x2 linear equals the library built with interpolate_factor=2
    (its positions (t + offset) / 2) at 50 tokens."""
    src = tp.export_rotary_1d(freqs_for, offset=offset)
    enc = _encoding(src)
    library = tp.rotary_1d(freqs_for, offset=offset)
    assert enc["layout"] == "interleaved" and enc["rotary_dim"] == 16
    (site,) = api.detect(io.load_model(src)).rope_sites
    np.testing.assert_allclose(site.inv_freq, library.rope.freqs.detach().numpy(), rtol=1e-6)
    assert enc.get("position_offset", 0.0) == pytest.approx(offset, rel=1e-5)
    out = tmp_path / "x2.onnx"
    result = api.rewrite(src, output=out, rope_scale=2.0, rope_method="linear")
    assert result.modified and result.validation is not None and result.validation.ok
    reference = tp.rotary_1d(freqs_for, offset=offset, interpolate_factor=2.0)
    reference.load_state_dict(library.state_dict())
    x = np.random.default_rng(4).standard_normal((1, 50, 32)).astype(np.float32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    # float32 angles up to (50 + offset)·32π are rounded to ~4 ulp of their size before cos/sin
    tol = max(REL_TOL, 4 * 50 * float(library.rope.freqs.max()) * np.finfo(np.float32).eps)
    assert _rel_err(_ort(out, {"x": x}), ref) <= tol
    assert _rel_err(_ort(src, {"x": x}), ref) > 1e-3


def test_rotary_embedding_torch_pixel_axial(tmp_path, capsys):
    """get_axial_freqs with freqs_for="pixel" makes its coordinates with torch.linspace(-1, 1, n), whose number
    of steps torch.export fixes: the export is static, reported with the fix (exit 5 on a rewrite). The same
    coordinates written with arange (equal to the library's at every size, checked here) export dynamically and
    are read as normalised: each grid spans [-1, 1], so at a larger grid the model computes what the library
    computes there, already interpolated, and a rewrite is refused as nothing to do."""
    from posrewrite.cli import main

    static = tp.export_axial_rotary("pixel")
    result = api.inspect(static).to_dict()
    assert not result["encodings"] and result["refusals"]
    assert any("fixed size of 6x10" in r["reason"] and "linspace" in r["reason"] for r in result["refusals"])
    out = tmp_path / "o.onnx"
    assert main([str(static), "--original-grid", "6x10", "--target-grid", "12x15", "-o", str(out)]) == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "static export" in err and not out.exists()

    library, written = tp.axial_rotary("pixel"), tp.axial_rotary("pixel", coordinates="arange")
    bound = 4 * float(library.rope.freqs.max()) * np.finfo(np.float32).eps  # angles up to 32π, float32
    for rows, cols in ((6, 10), (12, 15), (3, 7)):
        x = torch.randn(1, rows, cols, 32)
        with torch.no_grad():
            assert _rel_err(written(x).numpy(), library(x).numpy()) <= bound
    src = tp.export_axial_rotary("pixel", coordinates="arange")
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["positions"]["normalised"] is True
    assert any("already adapts to resolution" in n for n in enc["notes"])
    with pytest.raises(errors.PartialMatchError, match="already adapts to resolution"):
        api.rewrite(src, output=out, original_grid=(6, 10), target_grid=(12, 15))
    assert not out.exists()
    x = np.random.default_rng(5).standard_normal((1, 12, 15, 32)).astype(np.float32)
    with torch.no_grad():
        ref = library(torch.from_numpy(x)).numpy()
    assert _rel_err(_ort(src, {"x": x}), ref) <= bound


def test_rotary_embedding_torch_axial_offsets_interpolated(tmp_path):
    """get_axial_freqs with the library's own `offsets` (rows start at 2, columns at 5): identified as axial 2-D
    RoPE; --original-grid 6x10 --target-grid 12x15 equals the library's frequencies at the positions
    (t + offset) scaled by 6/12 and 10/15."""
    from rotary_embedding_torch import apply_rotary_emb

    src = tp.export_axial_rotary("lang", offsets=(2, 5))
    enc = _encoding(src)
    assert enc["angles"] == "grid" and enc["positions"]["channels_per_axis"] == [16, 16]
    out = tmp_path / "axial.onnx"
    result = api.rewrite(src, output=out, original_grid=(6, 10), target_grid=(12, 15))
    assert result.modified and result.validation is not None and result.validation.ok
    module = tp.axial_rotary("lang", offsets=(2, 5))
    x = np.random.default_rng(6).standard_normal((1, 12, 15, 32)).astype(np.float32)
    with torch.no_grad():
        f_rows = module.rope((torch.arange(12, dtype=torch.float32) + 2) * (6 / 12))
        f_cols = module.rope((torch.arange(15, dtype=torch.float32) + 5) * (10 / 15))
        freqs = torch.cat([f_rows[:, None, :].expand(12, 15, -1), f_cols[None, :, :].expand(12, 15, -1)], dim=-1)
        ref = apply_rotary_emb(freqs, module.proj(torch.from_numpy(x))).numpy()
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 20 * REL_TOL


class _LengthCyclesRope(torch.nn.Module):
    """Interleaved RoPE with no position input: positions made from the length, (t + offset) / factor, or
    normalised to [-1, 1] (t·2/(n-1) - 1); angles written in cycles ((pos × f) × 2π, no readable product)."""

    def __init__(self, *, normalised: bool = False, offset: float = 3.0, factor: float = 1.0, base: float = 10000.0):
        super().__init__()
        torch.manual_seed(0)
        cycles = 1.0 / (2 * np.pi * base ** (np.arange(0, 16, 2) / 16))
        self.register_buffer("cycles", torch.tensor(cycles, dtype=torch.float32))
        self.proj = torch.nn.Linear(16, 16)
        self.normalised, self.offset, self.factor = normalised, offset, factor

    def forward(self, x):
        t = torch.arange(x.shape[1], dtype=torch.float32)
        t = t * 2.0 / t[-1] - 1.0 if self.normalised else (t + self.offset) / self.factor
        angles = (t[:, None] * self.cycles) * (2 * np.pi)
        q = self.proj(x)
        rotated = torch.stack([-q[..., 1::2], q[..., 0::2]], dim=-1).flatten(-2)
        return q * angles.cos().repeat_interleave(2, -1) + rotated * angles.sin().repeat_interleave(2, -1)


@pytest.mark.parametrize("normalised", [False, True])
def test_positions_from_the_length_alone(normalised, tmp_path):
    """Angles made from the length only, in a form not read term by term: probed at two lengths. Offset
    positions (t + 3): found with base 10000 and offset 3, x2 linear = the module with (t + 3) / 2 at 50 tokens.
    Positions normalised by the length: reported as already adapting to length, a rescale refused (exit 5)."""
    module = _LengthCyclesRope(normalised=normalised).eval()
    src = tmp_path / "len.onnx"
    seq = torch.export.Dim("seq", min=2, max=4096)
    torch.onnx.export(module, (torch.randn(1, 12, 16),), str(src), dynamo=True, input_names=["x"],
                      dynamic_shapes={"x": {1: seq}})
    enc = _encoding(src)
    assert enc["angles"] == "probed" and enc["layout"] == "interleaved"
    out = tmp_path / "x2.onnx"
    if normalised:
        assert any("already adapts to length" in n for n in enc["notes"])
        with pytest.raises(errors.PartialMatchError, match="already adapts to length"):
            api.rewrite(src, output=out, rope_scale=2.0, rope_method="linear")
        assert not out.exists()
        return
    assert enc["base"] == 10000.0 and enc["position_offset"] == pytest.approx(3.0, rel=1e-5)
    result = api.rewrite(src, output=out, rope_scale=2.0, rope_method="linear")
    assert result.validation is not None and result.validation.ok
    reference = _LengthCyclesRope(factor=2.0).eval()
    reference.load_state_dict(module.state_dict())
    x = np.random.default_rng(7).standard_normal((1, 50, 16)).astype(np.float32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    assert _rel_err(_ort(out, {"x": x}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x}), ref) > 1e-3


class _ReversedRope(torch.nn.Module):
    """rotate-half whose partner enters with the other sign (cat([x2, -x1])): a rotation by minus its angles."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)[:, None]
        q = self.proj(x)
        half = q.shape[-1] // 2
        return q * emb.cos() + torch.cat([q[..., half:], -q[..., :half]], -1) * emb.sin()


def test_a_rotation_opposite_to_its_angles_is_rescaled_as_one(tmp_path):
    """The probe puts reversed pairs in the standard orientation (a frequency above π per position aliases), so the
    direction is read against the angles: a rotation by -θ is described as such (angle_sign -1), not rescaled as
    if it turned by +θ; linear x2 equals the module fed positions / 2."""
    src = tmp_path / "reversed.onnx"
    seq = torch.export.Dim("seq", min=2, max=4096)
    module = _ReversedRope().eval()
    torch.onnx.export(module, (torch.randn(1, 2, 8, 16), torch.arange(8)[None]), str(src),
                      dynamo=True, input_names=["x", "position_ids"],
                      dynamic_shapes={"x": {2: seq}, "position_ids": {1: seq}})
    result = api.inspect(src).to_dict()
    (rope,) = [e for e in result["encodings"] if e["kind"] == "rope"]
    assert rope["angle_sign"] == -1
    out = tmp_path / "o.onnx"
    api.rewrite(src, output=out, rope_scale=2.0)
    x = np.random.default_rng(0).standard_normal((1, 2, 40, 16)).astype(np.float32)
    pos = np.arange(40)[None]
    with torch.no_grad():
        ref = module(torch.from_numpy(x), torch.from_numpy(pos) / 2.0).numpy()
    assert _rel_err(_ort(out, {"x": x, "position_ids": pos}), ref) <= REL_TOL
    assert _rel_err(_ort(src, {"x": x, "position_ids": pos}), ref) > 1e-3
