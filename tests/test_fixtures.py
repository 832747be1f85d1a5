"""The fixture builders produce runnable ONNX that matches its torch source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures import cache

# ------------------------------------------------------------------------------------------ cache


def test_cache_key_depends_on_spec():
    a = cache.cache_key({"kind": "x", "config": {"a": 1, "b": 2.0}})
    assert a == cache.cache_key({"config": {"b": 2.0, "a": 1}, "kind": "x"})
    assert a != cache.cache_key({"kind": "x", "config": {"a": 1, "b": 2.5}})
    assert a != cache.cache_key({"kind": "x", "config": {"a": 1, "b": 2}})  # 2 vs 2.0


def test_cached_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "c"))
    calls = []

    def build(d):
        calls.append(d)
        (d / "model.onnx").write_bytes(b"abc")
        return {"n": 1}

    spec = {"kind": "t", "v": 1}
    p1, info1 = cache.cached(spec, build)
    p2, info2 = cache.cached(spec, build)
    assert p1 == p2 and p1.read_bytes() == b"abc" and info1 == info2 == {"n": 1}
    assert len(calls) == 1
    assert p1.parent.parent == tmp_path / "c"
    assert not [x for x in (tmp_path / "c").iterdir() if ".tmp-" in x.name]  # no leftovers
    assert json.loads((p1.parent / "spec.json").read_text())["v"] == 1


def test_cached_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))

    def build(d):
        (d / "model.onnx").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.cached({"kind": "f"}, build)
    assert not cache.entry_dir({"kind": "f"}).exists()
    assert not [x for x in tmp_path.iterdir() if x.is_dir()]


# ------------------------------------------------------------------------------------------ HF


def test_arch_specs_match_hf_models():
    pytest.importorskip("transformers")
    from fixtures.hf_models import ARCHS, build_hf_model

    for name, spec in ARCHS.items():
        m = build_hf_model(name)
        assert not m.training
        bufs = dict(m.named_buffers())
        if spec.angle_source == "table":  # GPT-J: embed_positions [n_pos, rotary_dim] = sin | cos
            tab = next(v for k, v in bufs.items() if k.endswith("embed_positions"))
            assert tuple(tab.shape) == (spec.max_position_embeddings, spec.rotary_dim), name
            continue
        invs = {k: v for k, v in bufs.items() if k.endswith("inv_freq") and "original" not in k}
        inv = next(v for k, v in sorted(invs.items(), key=lambda kv: "full_attention" not in kv[0]))
        inv = inv.double().numpy()
        assert inv.shape == (spec.rotary_dim // 2,), name
        expect = spec.base ** (-np.arange(0, spec.rotary_dim, 2) / spec.rotary_dim)
        np.testing.assert_allclose(inv, expect, rtol=1e-6, err_msg=name)
        cfg = m.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert hd == spec.head_dim, name
        assert cfg.max_position_embeddings == spec.max_position_embeddings


def test_build_hf_model_same_weights_for_any_rope():
    torch = pytest.importorskip("torch")
    from fixtures.hf_models import build_hf_model

    base = build_hf_model("llama", seed=3)
    yarn = build_hf_model("llama", seed=3, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 64})
    other = build_hf_model("llama", seed=4)
    sd_b, sd_y = base.state_dict(), yarn.state_dict()
    assert all(torch.equal(sd_b[k], sd_y[k]) for k in sd_b)
    assert not torch.equal(sd_b["lm_head.weight"], other.state_dict()["lm_head.weight"])
    assert yarn.config.rope_parameters["rope_type"] == "yarn"
    assert yarn.config.rope_parameters["rope_theta"] == base.config.rope_parameters["rope_theta"]
    assert not torch.equal(base.model.rotary_emb.inv_freq, yarn.model.rotary_emb.inv_freq)
    # partial_rotary_factor is kept as well
    neox = build_hf_model("gpt_neox", rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert neox.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert neox.gpt_neox.rotary_emb.inv_freq.shape == (4,)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_hf_logits_scaled(rope, rng):
    pytest.importorskip("transformers")
    from fixtures.hf_models import hf_logits

    ids = rng.integers(3, 128, (1, 100))
    a = hf_logits("llama", ids)
    b = hf_logits("llama", ids, rope_parameters=rope)
    assert a.shape == b.shape == (1, 100, 128)
    assert np.abs(a - b).max() > 1e-3  # the rescale is in effect
    np.testing.assert_array_equal(b, hf_logits("llama", ids, rope_parameters=rope))  # deterministic


def test_hf_phi3_longrope(rng):
    pytest.importorskip("transformers")
    from fixtures.hf_models import hf_logits

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)],
            "original_max_position_embeddings": 64}
    ids = rng.integers(3, 128, (1, 100))
    out = hf_logits("phi3", ids, rope_parameters=rope, max_position_embeddings=256)
    assert np.isfinite(out).all()


LENGTHS = [5, 64, 256]  # 256 = 4x max_position_embeddings


@pytest.mark.parametrize("fixture,arch", [("llama_onnx", "llama"), ("neox_onnx", "gpt_neox")])
def test_hf_export_matches(fixture, arch, request, rng):
    from fixtures.hf_models import hf_logits, ort_logits

    path = request.getfixturevalue(fixture)
    for length in LENGTHS:
        ids = rng.integers(3, 128, (2, length))
        np.testing.assert_allclose(ort_logits(path, ids), hf_logits(arch, ids), atol=1e-5, rtol=0)


def test_hf_export_with_position_ids(llama_pos_onnx, rng):
    import onnx

    from fixtures.hf_models import hf_logits, ort_logits

    assert [i.name for i in onnx.load(str(llama_pos_onnx), load_external_data=False).graph.input] == [
        "input_ids", "position_ids"]
    ids = rng.integers(3, 128, (2, 40))
    pos = np.arange(100, 140)
    np.testing.assert_allclose(ort_logits(llama_pos_onnx, ids, pos), hf_logits("llama", ids, position_ids=pos),
                               atol=1e-5, rtol=0)


def test_hf_export_torchscript(hf_onnx, rng):
    from fixtures.hf_models import hf_logits, ort_logits

    path = hf_onnx("llama", exporter="torchscript")
    for length in (7, 130):
        ids = rng.integers(3, 128, (1, length))
        np.testing.assert_allclose(ort_logits(path, ids), hf_logits("llama", ids), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3", "phi", "stablelm", "gemma", "gemma2",
                                  "gemma3", "olmo", "olmo2", "gptj", "cohere", "glm"])
def test_all_archs_export(arch, hf_onnx, rng):
    from fixtures.hf_models import ARCHS, hf_logits, ort_logits

    path = hf_onnx(arch)
    for length in (5, 64) + ((200,) if ARCHS[arch].extrapolates else ()):
        ids = rng.integers(3, 128, (2, length))
        np.testing.assert_allclose(ort_logits(path, ids), hf_logits(arch, ids), atol=1e-5, rtol=0)


def test_large_llama_external_data(tmp_out):
    pytest.importorskip("torch")
    from fixtures.hf_models import export_llama_onnx_large, ort_logits

    p = export_llama_onnx_large(tmp_out / "big.onnx", num_layers=2, hidden=128, heads=4, vocab=256)
    assert p.exists() and (tmp_out / "big.onnx.data").exists()
    import onnx

    m = onnx.load(str(p), load_external_data=False)
    big = [i for i in m.graph.initializer if np.prod(i.dims) >= 1024]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)  # weights in the data file
    out = ort_logits(p, np.arange(3, 19)[None])
    assert out.shape == (1, 16, 256) and np.isfinite(out).all()


# ------------------------------------------------------------------------------------------ modules

MODULE_FIXTURES = ["interleaved_meta_onnx", "interleaved_gptj_onnx", "legacy_gather_onnx", "legacy_index_onnx",
                   "legacy_slice_onnx", "three_d_rope_onnx"]


@pytest.mark.parametrize("fixture", MODULE_FIXTURES)
def test_module_export_matches(fixture, request, rng):
    from fixtures.modules import ort_run, reference_logits, torch_logits

    path, info = request.getfixturevalue(fixture)
    lengths = [5, info["max_positions"]] + ([3 * info["max_positions"]] if info["extrapolates"] else [])
    for length in lengths:
        ids = rng.integers(3, 128, (2, length))
        pos = np.arange(length)[None].repeat(2, 0) if info["with_position_ids"] else None
        t = torch_logits(info, ids, pos)
        np.testing.assert_allclose(ort_run(path, ids, pos), t, atol=1e-5, rtol=0)
        np.testing.assert_allclose(reference_logits(info, ids, pos), t, atol=1e-5, rtol=0)


def test_module_info_fields(interleaved_gptj_onnx, legacy_gather_onnx):
    for _, info in (interleaved_gptj_onnx, legacy_gather_onnx):
        for k in ("layout", "head_dim", "rotary_dim", "base", "num_heads", "max_positions", "position_dtype"):
            assert k in info
    assert interleaved_gptj_onnx[1]["layout"] == "interleaved"
    assert interleaved_gptj_onnx[1]["rotary_dim"] == 8 and interleaved_gptj_onnx[1]["head_dim"] == 16
    assert legacy_gather_onnx[1]["angle_source"] == "table"


def test_legacy_gather_positions(legacy_gather_onnx, rng):
    from fixtures.hf_models import ort_run_errors
    from fixtures.modules import ort_run, reference_logits

    path, info = legacy_gather_onnx
    ids = rng.integers(3, 128, (1, 20))
    pos = np.arange(30, 50)
    np.testing.assert_allclose(ort_run(path, ids, pos), reference_logits(info, ids, pos), atol=1e-5, rtol=0)
    with pytest.raises(ort_run_errors()):  # past the table
        ort_run(path, ids, np.arange(60, 80))


def test_legacy_slice_fails_past_table(legacy_slice_onnx):
    from fixtures.hf_models import ort_run_errors
    from fixtures.modules import ort_run

    path, info = legacy_slice_onnx
    with pytest.raises(ort_run_errors()):
        ort_run(path, np.full((1, info["max_positions"] + 1), 5))


def test_reference_rope_layouts():
    from fixtures.modules import reference_rope

    x = np.random.default_rng(1).standard_normal((1, 3, 2, 8))
    inv = np.array([1.0, 0.1])  # rotary_dim 4 of 8
    for layout in ("rotate_half", "interleaved"):
        y = reference_rope(x, np.arange(3)[None], inv, layout, 4)
        np.testing.assert_array_equal(y[..., 4:], x[..., 4:])  # pass-through channels
        np.testing.assert_allclose(y[:, 0], x[:, 0])  # position 0 is the identity
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))  # rotation
    # interleaved pair (0, 1) at position 1 rotates by 1 rad
    y = reference_rope(x, np.arange(3)[None], inv, "interleaved", 4)
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(y[0, 1, :, 0], x[0, 1, :, 0] * c - x[0, 1, :, 1] * s)


def test_fp16_module(fp16_rope_onnx, rng):
    import onnx

    from fixtures.modules import ort_run, torch_logits

    path, info = fp16_rope_onnx
    assert info["position_dtype"] == "float16" and info["dtype"] == "float16"
    ids = rng.integers(3, 128, (1, 48))
    np.testing.assert_allclose(ort_run(path, ids), torch_logits(info, ids), atol=2e-2, rtol=2e-2)
    m = onnx.load(str(path))
    f16 = onnx.TensorProto.FLOAT16
    inv = [i for i in m.graph.initializer if i.data_type == f16 and len(i.dims) == 1 and i.dims[0] == 8]
    assert inv, "fp16 inv_freq initializer expected"
    casts = [n for n in m.graph.node if n.op_type == "Cast" and n.attribute[0].i == f16]
    assert casts, "positions should be cast to float16"


def test_to_bf16(fp16_rope_onnx, tmp_out):
    import onnx

    from fixtures.modules import to_bf16

    path, _ = fp16_rope_onnx
    out = to_bf16(path, tmp_out / "bf16.onnx")
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    f16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    assert not [i for i in m.graph.initializer if i.data_type == f16]
    assert [i for i in m.graph.initializer if i.data_type == bf16]
    assert not [n for n in m.graph.node if n.op_type == "Cast" and n.attribute[0].i == f16]
    assert [n for n in m.graph.node if n.op_type == "Cast" and n.attribute[0].i == bf16]
    assert m.graph.output[0].type.tensor_type.elem_type == bf16
    onnx.shape_inference.infer_shapes(m, strict_mode=True)
