"""RoPE inside com.microsoft.GroupQueryAttention: onnxruntime-genai builder models (tiny Llama, Qwen2, Mistral, Phi-3,
random weights, context 128), posrewrite's own `--fuse ort` output, and genai / HF model folders.

References: HF transformers models built with the same weights and `rope_parameters` (fixtures.genai_models.hf_model),
onnxruntime-genai generating from the output folder, and the original model where a rewrite must not change it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

og = pytest.importorskip("onnxruntime_genai")
torch = pytest.importorskip("torch")

import posrewrite.api as pr  # noqa: E402
from fixtures.genai_models import CONTEXT, genai_folder, hf_model, onnx_logits  # noqa: E402
from posrewrite import cli  # noqa: E402

L = CONTEXT
TOL = 1e-5  # fp32 logits of a 2-layer model: ~2e-7 measured; 1e-5 leaves room for summation order


def _ids(n: int, vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(1, n))


def _hf(arch: str, ids: np.ndarray, rope_parameters: dict | None = None) -> np.ndarray:
    model = hf_model(arch, rope_parameters=rope_parameters)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch,base", [("llama", 1e4), ("qwen2", 1e6), ("mistral", 1e4), ("phi3", 1e4)])
def test_inspect_builder_model(arch, base):
    found = pr.inspect(genai_folder(arch))
    assert found.refusals == []
    (site,) = found.sites
    d = site.to_dict()
    assert d["op"] == "com.microsoft.GroupQueryAttention" and d["angles"] == "fused_op"
    # q and k rotated inside each GroupQueryAttention of the 2 layers: 4 rotations (it once said 2)
    assert (d["max_positions"], d["rotary_dim"], d["head_dim"], d["rotations"]) == (L, 16, 16, 4)
    assert "sites" not in d
    assert d["base"] == pytest.approx(base, rel=1e-6) and d["attention_factor"] == pytest.approx(1.0, abs=1e-6)
    assert d["cos"] == "cos_cache" and d["layout"] == "rotate_half"


def test_builder_model_equals_hf():
    """The fixture itself: the builder's model is HF's model (so HF is a valid reference for the rewrites)."""
    ids = _ids(L)
    for arch in ("llama", "phi3"):
        vocab = 192 if arch == "phi3" else 128
        ids = _ids(L, vocab)
        assert np.abs(onnx_logits(genai_folder(arch) / "model.onnx", ids) - _hf(arch, ids)).max() <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["yarn", "llama3"])
def test_rescale_equals_hf_at_3x(tmp_path, arch, method):
    src = genai_folder(arch)
    out = tmp_path / "model.onnx"
    result = pr.rewrite(src / "model.onnx", rope_scale=4, rope_method=method, output=out)
    assert result.validation.ok and result.context_length == 4 * L
    shutil.copy(src / "genai_config.json", tmp_path)
    ids = _ids(3 * L)
    rp = {"rope_type": method, "factor": 4.0, "original_max_position_embeddings": L}
    if method == "llama3":
        rp.update(low_freq_factor=1.0, high_freq_factor=4.0)  # posrewrite's defaults (HF requires them)
    got, want = onnx_logits(out, ids), _hf(arch, ids, rp)
    assert np.abs(got - want).max() <= TOL


def test_dynamic_runtime_caches_equal_hf(tmp_path):
    """dynamic: caches computed per call from total_sequence_length (HF: a fresh model per length)."""
    src = genai_folder("llama")
    out = tmp_path / "model.onnx"
    result = pr.rewrite(src / "model.onnx", rope_scale=4, rope_method="dynamic", output=out)
    assert result.validation.ok
    shutil.copy(src / "genai_config.json", tmp_path)
    rp = {"rope_type": "dynamic", "factor": 4.0}
    for n in (L // 2, 3 * L):
        ids = _ids(n)
        assert np.abs(onnx_logits(out, ids) - _hf("llama", ids, rp)).max() <= TOL
    ids = _ids(L // 2)  # within L: the original model
    assert np.abs(onnx_logits(out, ids) - onnx_logits(src / "model.onnx", ids)).max() <= TOL


def test_phi3_rescale_keeps_the_model_within_L(tmp_path):
    """Phi-3 (HF allows it only default/longrope): --max-positions keeps every output within L bit for bit and
    runs past it; dynamic equals the original within L."""
    src = genai_folder("phi3")
    shutil.copy(src / "genai_config.json", tmp_path)
    ids = _ids(L, 192)
    original = onnx_logits(src / "model.onnx", ids)
    pr.rewrite(src / "model.onnx", max_positions=3 * L, output=tmp_path / "ext.onnx")
    assert np.array_equal(onnx_logits(tmp_path / "ext.onnx", ids), original)
    assert onnx_logits(tmp_path / "ext.onnx", _ids(3 * L, 192)).shape[1] == 3 * L
    pr.rewrite(src / "model.onnx", rope_scale=4, rope_method="dynamic", output=tmp_path / "dyn.onnx")
    assert np.abs(onnx_logits(tmp_path / "dyn.onnx", ids) - original).max() <= TOL


def test_max_positions_grows_caches_keeping_trained_rows(tmp_path):
    import onnx
    from onnx import numpy_helper

    src = genai_folder("llama")
    out = tmp_path / "model.onnx"
    pr.rewrite(src / "model.onnx", max_positions=3 * L, output=out)
    (site,) = pr.inspect(out).sites
    assert site.max_positions == 3 * L and site.base == pytest.approx(1e4)

    def caches(path):
        m = onnx.load(path)
        gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return inits[gqa.input[7]], inits[gqa.input[8]]

    (c0, s0), (c1, s1) = caches(src / "model.onnx"), caches(out)
    assert c1.shape == (3 * L, 8) and np.array_equal(c1[:L], c0) and np.array_equal(s1[:L], s0)
    shutil.copy(src / "genai_config.json", tmp_path)
    ids = _ids(3 * L)  # the original frequencies past L: HF's default model (which extrapolates)
    assert np.abs(onnx_logits(out, ids) - _hf("llama", ids)).max() <= TOL


def test_fused_output_rescales_like_rescale_then_fuse(tmp_path):
    """posrewrite's own --fuse ort output (GroupQueryAttention, rotary inside) is found again and rescaled: both
    routes give HF's yarn model."""
    from fixtures.hf_models import export_hf_onnx, hf_logits, ort_logits

    x = Path(export_hf_onnx("llama"))  # max_position_embeddings 64
    yarn = dict(rope_scale=4, rope_method="yarn", original_max_positions=64)
    pr.rewrite(x, fuse="ort", output=tmp_path / "f.onnx")
    (site,) = pr.inspect(tmp_path / "f.onnx").sites
    assert site.op == "com.microsoft.GroupQueryAttention"
    pr.rewrite(tmp_path / "f.onnx", output=tmp_path / "f-y.onnx", **yarn)
    pr.rewrite(x, output=tmp_path / "y.onnx", **yarn)
    pr.rewrite(tmp_path / "y.onnx", fuse="ort", output=tmp_path / "y-f.onnx")
    ids = _ids(192)
    a, b = ort_logits(tmp_path / "f-y.onnx", ids), ort_logits(tmp_path / "y-f.onnx", ids)
    ref = hf_logits("llama", ids, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64})
    assert np.abs(a - b).max() <= TOL and np.abs(a - ref).max() <= TOL


PROMPT = np.arange(100) % 90 + 3


def _generate(folder: Path, max_length: int) -> int:
    return len(_generated(folder, max_length))


def _generated(folder: Path, max_length: int) -> np.ndarray:
    """Greedy onnxruntime-genai generation from the folder, as a user runs it."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return np.asarray(gen.get_sequence(0))


def test_genai_folder_generates_past_the_old_context(tmp_path, capsys):
    src = tmp_path / "in"
    shutil.copytree(genai_folder("llama"), src)  # a private copy: the shared cache entry stays as built
    before = _tree_digest(src)
    out = tmp_path / "out"
    code = cli.main([str(src), "--rope-scale", "4", "--rope-method", "yarn", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "context_length 128 -> 512" in text and ("copied" in text or "reflinked" in text)
    assert _tree_digest(src) == before  # the input is never modified
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["context_length"] == 4 * L and config["search"]["max_length"] == 4 * L
    for name in ("tokenizer.json", "tokenizer_config.json", "model.onnx.data"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind
    tokens = _generated(out, 3 * L - 34)  # nothing edited by hand
    ref = hf_model("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L})
    with torch.no_grad():  # HF's greedy generation with the same rope_parameters, token for token
        want = ref.generate(torch.from_numpy(PROMPT)[None], max_length=3 * L - 34, min_length=3 * L - 34,
                            do_sample=False, pad_token_id=0)[0].numpy()
    assert len(tokens) == 3 * L - 34 and np.array_equal(tokens, want)
    with pytest.raises(Exception, match="context_length"):
        _generate(src, 3 * L - 34)


def test_genai_folder_link_weights(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(genai_folder("llama"), src)
    out = tmp_path / "out"
    result = pr.rewrite(src, max_positions=2 * L, link_weights=True, output=out)
    assert any("hard-linked" in n for n in result.notes)
    assert (out / "model.onnx.data").stat().st_ino == (src / "model.onnx.data").stat().st_ino
    assert _generate(out, L + 30) == L + 30


def test_folder_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty), "--rope-scale", "2"]) == 2
    assert "genai_config.json" in capsys.readouterr().err
    src = tmp_path / "in"
    shutil.copytree(genai_folder("llama"), src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert cli.main([str(src), "--rope-scale", "2", "-o", str(busy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty folder" in err
    assert cli.main([str(src), "--rope-scale", "2", "-o", str(src / "sub")]) == 2
    assert "inside it" in capsys.readouterr().err
    (src / "genai_config.json").write_text("{not json")
    assert cli.main([str(src), "--rope-scale", "2", "-o", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "genai_config.json" in err and not (tmp_path / "o").exists()


def test_hf_folder_config_as_transformers_writes_it(tmp_path):
    """An HF/Optimum-style folder (config.json + model.onnx): config.json gets the new rope_parameters and
    max_position_embeddings; transformers builds from it a model whose logits are the rewritten ONNX model's."""
    import transformers

    from fixtures.hf_models import export_hf_onnx, hf_config, ort_logits

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(export_hf_onnx("llama"), src / "model.onnx")
    hf_config("llama").save_pretrained(src)
    out = tmp_path / "out"
    result = pr.rewrite(src, rope_scale=4, rope_method="yarn", output=out)
    assert result.validation.ok
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 64
    assert config["max_position_embeddings"] == 256
    cfg = transformers.AutoConfig.from_pretrained(out)
    from fixtures.hf_models import build_hf_model

    ref = build_hf_model("llama")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict())
    ids = _ids(192)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ort_logits(out / "model.onnx", ids) - want).max() <= TOL


LONG = {"rope_type": "longrope", "factor": 8.0, "original_max_position_embeddings": 128,
        "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 7.2, 7.8, 8.0]}


def test_longrope_two_cache_form_inspected():
    (site,) = pr.inspect(genai_folder("phi3_longrope")).sites
    d = site.to_dict()
    assert d["op"] == "com.microsoft.GroupQueryAttention" and d["max_positions"] == 4 * L
    assert d["prior_scaling"]["kind"] == "by_length" and d["base"] is None
    assert "switched by /model/rope_caches_subgraph/If: short [128, 8] up to 128 tokens" in d["notes"][0]
    # HF's LongRoPE attention factor sqrt(1 + ln(512/128) / ln(128))
    assert d["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(128)), rel=1e-6)


def test_longrope_max_positions_and_rescale(tmp_path):
    src = genai_folder("phi3_longrope")
    shutil.copy(src / "genai_config.json", tmp_path)
    pr.rewrite(src / "model.onnx", max_positions=6 * L, output=tmp_path / "ext.onnx")
    for n in (100, 129, 4 * L):  # short and long caches: the trained rows are kept bit for bit
        ids = _ids(n, 192)
        assert np.array_equal(onnx_logits(tmp_path / "ext.onnx", ids), onnx_logits(src / "model.onnx", ids))
    assert onnx_logits(tmp_path / "ext.onnx", _ids(6 * L - 10, 192)).shape[1] == 6 * L - 10
    # new LongRoPE factors: equals HF's Phi-3 with them, below and above the switch and past the old caches
    result = pr.rewrite(src / "model.onnx", rope_params=dict(LONG), rope_base=1e4, output=tmp_path / "lr8.onnx")
    assert result.context_length == 8 * L
    ref = hf_model("phi3_longrope", rope_parameters={**LONG, "rope_theta": 1e4})
    for n in (100, 129, 6 * L):
        ids = _ids(n, 192)
        with torch.no_grad():
            want = ref(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(onnx_logits(tmp_path / "lr8.onnx", ids) - want).max() <= TOL


def test_longrope_rescale_without_base_is_refused(capsys, tmp_path):
    out = tmp_path / "x.onnx"
    code = cli.main([str(genai_folder("phi3_longrope") / "model.onnx"), "--rope-scale", "2", "--rope-method", "yarn",
                     "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--rope-base" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_second_rescale_of_fused_output_starts_from_the_base(tmp_path):
    """`make demo`'s rescale-and-fuse output (yarn x4, GroupQueryAttention) rescaled again to yarn x8 equals HF's
    yarn x8 model: the caches carry posrewrite's record of the base, not a compounded scaling. Same for a genai
    model rescaled twice."""
    from fixtures.hf_models import export_hf_onnx, hf_logits, ort_logits

    x = Path(export_hf_onnx("llama"))
    pr.rewrite(x, rope_scale=4, rope_method="yarn", original_max_positions=64, fuse="ort", output=tmp_path / "f4.onnx")
    (site,) = pr.inspect(tmp_path / "f4.onnx").sites
    assert site.base == pytest.approx(1e4) and site.prior_scaling.kind == "rewritten"
    pr.rewrite(tmp_path / "f4.onnx", rope_scale=8, rope_method="yarn", original_max_positions=64,
               output=tmp_path / "f8.onnx")
    ids = _ids(300)
    ref = hf_logits("llama", ids, rope_parameters={"rope_type": "yarn", "factor": 8.0,
                                                   "original_max_position_embeddings": 64})
    assert np.abs(ort_logits(tmp_path / "f8.onnx", ids) - ref).max() <= TOL

    src = genai_folder("llama")
    shutil.copy(src / "genai_config.json", tmp_path)
    pr.rewrite(src / "model.onnx", rope_scale=4, rope_method="yarn", output=tmp_path / "g4.onnx")
    pr.rewrite(tmp_path / "g4.onnx", rope_scale=8, rope_method="yarn", output=tmp_path / "g8.onnx")  # L recorded
    ids = _ids(3 * L)
    want = _hf("llama", ids, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L})
    assert np.abs(onnx_logits(tmp_path / "g8.onnx", ids) - want).max() <= TOL


def test_partial_rotary_inside_gqa(tmp_path):
    """Phi-2-style partial rotary (16 of 32 channels), caches [128, 8]. The builder's Phi differs from HF's by ~5e-3
    on the logits already (a builder matter, as large as what RoPE changes in this tiny model), so the rewritten
    caches are compared with HF's own rotary embedding for the same rope_parameters, and the logits with the
    original builder model where they must not change."""
    import onnx
    from onnx import numpy_helper

    src = genai_folder("phi")
    (site,) = pr.inspect(src).sites
    assert (site.rotary_dim, site.head_dim, site.max_positions) == (16, 32, L)
    assert any("partial rotary: 16 of 32" in n for n in site.notes)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    pr.rewrite(src / "model.onnx", rope_scale=4, rope_method="yarn", output=tmp_path / "y.onnx")
    m = onnx.load(tmp_path / "y.onnx")
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    cos, sin = inits[gqa.input[7]], inits[gqa.input[8]]
    assert cos.shape == (4 * L, 8)
    rotary = hf_model("phi", rope_parameters=yarn).model.rotary_emb
    x = torch.zeros(1, 4 * L, 32)
    with torch.no_grad():
        hc, hs = rotary(x, torch.arange(4 * L)[None])
    assert np.abs(cos - hc[0, :, :8].numpy()).max() <= TOL and np.abs(sin - hs[0, :, :8].numpy()).max() <= TOL
    shutil.copy(src / "genai_config.json", tmp_path)
    pr.rewrite(src / "model.onnx", rope_scale=4, rope_method="dynamic", output=tmp_path / "d.onnx")
    ids = _ids(L)
    assert np.abs(onnx_logits(tmp_path / "d.onnx", ids) - onnx_logits(src / "model.onnx", ids)).max() <= TOL
    assert onnx_logits(tmp_path / "y.onnx", _ids(3 * L)).shape[1] == 3 * L


def test_hf_config_rope_scaling_key_kept(tmp_path):
    """A config.json written with the older `rope_scaling` key (transformers 4) keeps that key, rope_theta at the
    top; transformers reads the same parameters back from either form."""
    import transformers

    from fixtures.hf_models import hf_config
    from posrewrite.folders import updated_hf_config

    v5 = hf_config("llama").to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"} | {"rope_theta": 10000.0, "rope_scaling": None}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
            "beta_slow": 1.0}
    new4, lines = updated_hf_config(v4, yarn, 256)
    assert "rope_parameters" not in new4 and new4["rope_scaling"] == yarn and new4["rope_theta"] == 10000.0
    assert new4["max_position_embeddings"] == 256 and len(lines) == 2
    new5, _ = updated_hf_config(v5, yarn, 256)
    for k, config in enumerate((new4, new5)):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "config.json").write_text(json.dumps(config))
    a, b = (transformers.AutoConfig.from_pretrained(tmp_path / str(k)) for k in (0, 1))
    assert a.rope_parameters == b.rope_parameters and b.rope_parameters == {**yarn, "rope_theta": 10000.0}
