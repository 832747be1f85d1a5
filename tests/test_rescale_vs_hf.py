"""`posrewrite M.onnx --rope-scale 4 --rope-method X` against Hugging Face's own scaled models.

The reference is the HF model built with `rope_parameters={"rope_type": X, "factor": 4, ...}` and the same
weights; the candidate is posrewrite's rewrite of the unscaled ONNX export, run in onnxruntime. Lengths
below and above the training length L are compared (max abs logit difference <= 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.hf_models import ARCHS, export_hf_onnx, hf_logits, ort_logits, ort_run_errors
from posrewrite import api

TOL = 1e-5


def _lengths(L: int) -> list[int]:
    return [L // 2, L + 8, 3 * L]


def _ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, vocab, size=(1, n))


def _hf_params(arch: str, method: str, L: int) -> dict:
    spec = ARCHS[arch]
    if method == "ntk":
        d = spec.rotary_dim
        return {"rope_type": "default", "rope_theta": spec.base * 4.0 ** (d / (d - 2))}
    if method == "base":
        return {"rope_type": "default", "rope_theta": 123456.0}
    p = {"rope_type": method, "factor": 4.0}
    if method != "linear":
        p["original_max_position_embeddings"] = L
    if method == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return p


def _rewrite(tmp_path, src, method: str, L: int):
    out = tmp_path / f"{method}.onnx"
    if method == "base":
        kwargs = dict(rope_base=123456.0)
    else:
        kwargs = dict(rope_scale=4.0, rope_method=method, original_max_positions=L)
    result = api.rewrite(src, output=out, **kwargs)
    assert result.modified and result.validation is not None and result.validation.ok, result.to_dict()
    return out


def _compare(arch: str, method: str, tmp_path, **export_kw):
    spec = ARCHS[arch]
    L = spec.max_position_embeddings
    vocab = spec.config_kwargs.get("vocab_size", 128)
    src = export_hf_onnx(arch, **export_kw)
    out = _rewrite(tmp_path, src, method, L)
    params = _hf_params(arch, method, L)
    worst = 0.0
    for n in _lengths(L):
        ids = _ids(n, vocab)
        ref = hf_logits(arch, ids, rope_parameters=params)
        got = ort_logits(out, ids)
        err = float(np.max(np.abs(ref - got)))
        worst = max(worst, err)
        assert err <= TOL, f"{arch} {method} at {n} tokens: max abs diff {err:.3g}"
    # the rewrite must actually change the model where scaling matters
    ids = _ids(3 * L, vocab)
    assert np.max(np.abs(ort_logits(src, ids) - ort_logits(out, ids))) > 1e-4


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3", "ntk", "base"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_named_architectures(arch, method, tmp_path):
    _compare(arch, method, tmp_path)


@pytest.mark.parametrize(
    "arch,method",
    [("qwen2", "yarn"), ("qwen3", "dynamic"), ("phi", "yarn"), ("stablelm", "llama3"), ("gemma", "linear"),
     ("olmo2", "dynamic"), ("cohere", "yarn"), ("glm", "dynamic"), ("mistral", "ntk")],
)
def test_other_architectures(arch, method, tmp_path):
    _compare(arch, method, tmp_path)


def test_position_ids_input(tmp_path):
    """Positions given as a graph input instead of a Range: dynamic rescaling follows max(position_ids)+1."""
    spec = ARCHS["llama"]
    L = spec.max_position_embeddings
    src = export_hf_onnx("llama", with_position_ids=True)
    out = _rewrite(tmp_path, src, "dynamic", L)
    n = 2 * L
    ids = _ids(n, 128)
    pos = np.arange(n) + 5  # an offset, as after a prompt
    ref = hf_logits("llama", ids, rope_parameters=_hf_params("llama", "dynamic", L), position_ids=pos)
    got = ort_logits(out, ids, position_ids=pos)
    assert float(np.max(np.abs(ref - got))) <= TOL


def test_longrope_phi3(tmp_path):
    spec = ARCHS["phi3"]
    L = spec.max_position_embeddings
    half = spec.rotary_dim // 2
    rng = np.random.default_rng(0)
    short = [float(v) for v in 1.0 + 0.1 * rng.random(half)]
    long = [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, half)]
    src = export_hf_onnx("phi3")
    out = tmp_path / "longrope.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method="longrope", original_max_positions=L,
                         rope_params={"short_factor": short, "long_factor": long})
    assert result.validation.ok
    params = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
              "short_factor": short, "long_factor": long}
    for n in (L // 2, L + 8, 3 * L):
        ids = _ids(n, 128)
        ref = hf_logits("phi3", ids, rope_parameters=params, original_max_position_embeddings=L)
        err = float(np.max(np.abs(ref - ort_logits(out, ids))))
        assert err <= TOL, f"longrope at {n}: {err:.3g}"


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_torchscript_export(arch, tmp_path):
    """Graphs from the older TorchScript exporter (inv_freq as a Constant node, shapes computed at run time)."""
    export_hf_onnx(arch, exporter="torchscript")  # a failed export is a failure of the test, not a skip
    _compare(arch, "yarn", tmp_path, exporter="torchscript")


def test_gptj_cached_table_linear(tmp_path):
    """GPT-J keeps a precomputed sin|cos table; the rewrite regenerates it 4x longer. Reference: HF's GPT-J with
    its table rebuilt by HF's own `create_sinusoidal_positions` formula at positions / 4."""
    import torch
    from transformers.models.gptj import modeling_gptj

    from fixtures.hf_models import build_hf_model

    spec = ARCHS["gptj"]
    L = spec.max_position_embeddings
    src = export_hf_onnx("gptj")
    out = tmp_path / "gptj4.onnx"
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method="linear")
    assert result.validation.ok
    model = build_hf_model("gptj")
    d = model.config.rotary_dim  # a public config field (the module holding the table differs across versions)
    for module in model.modules():
        if hasattr(module, "embed_positions"):
            table = modeling_gptj.create_sinusoidal_positions(4 * L, d)
            # HF's table at integer positions p holds angle p * inv_freq; linear scaling wants p / 4
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64) / d))
            angles = torch.einsum("i,j->ij", torch.arange(4 * L, dtype=torch.int64).float() / 4.0, inv).float()
            assert table.shape == (4 * L, d)
            module.embed_positions = torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)
    n = 3 * L
    ids = _ids(n, 128)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= TOL
    with pytest.raises(ort_run_errors()):  # the original table ends at L rows
        ort_logits(src, ids)


def test_max_positions_extends_rope_tables(tmp_path):
    """--max-positions alone on GPT-J's sin|cos table: the original fails past n_positions, the extended model
    equals HF's GPT-J built with a longer n_positions (HF recomputes its table from the config) and keeps
    the trained rows bit for bit."""
    import onnx_ir as ir
    import torch

    from fixtures.hf_models import build_hf_model

    L = ARCHS["gptj"].max_position_embeddings
    src = export_hf_onnx("gptj")
    out = tmp_path / "gptj-long.onnx"
    result = api.rewrite(src, output=out, max_positions=4 * L)
    assert result.validation.ok and any("same frequencies" in c for c in result.changes)
    longer = build_hf_model("gptj", max_position_embeddings=4 * L)  # GPT-J: n_positions
    longer.load_state_dict(build_hf_model("gptj").state_dict())
    for n in (L // 2, L + 8, 4 * L):
        ids = _ids(n, 128)
        with torch.no_grad():
            ref = longer(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= TOL
    with pytest.raises(ort_run_errors()):
        ort_logits(src, _ids(4 * L, 128))
    tables = []
    for path in (src, out):
        (site,) = api.detect(ir.load(path)).rope_sites[:1]
        t = ir.convenience.get_const_tensor(site.cos_cache).numpy()
        tables.append(t.reshape(-1, t.shape[-1]))
    assert tables[0].shape[0] == L and tables[1].shape[0] == 4 * L
    assert np.array_equal(tables[1][:L], tables[0])  # trained rows kept bit for bit


def test_max_positions_extends_fused_caches(tmp_path):
    """A fused model whose RotaryEmbedding caches end at L rows, extended with --max-positions: it runs at
    4L and equals HF's Llama there (HF computes cos/sin for any length)."""
    L = ARCHS["llama"].max_position_embeddings
    fused = tmp_path / "fused.onnx"
    api.rewrite(export_hf_onnx("llama"), output=fused, fuse="onnx", max_positions=L)
    out = tmp_path / "long.onnx"
    result = api.rewrite(fused, output=out, max_positions=4 * L)
    assert result.validation.ok
    for n in (L // 2, 4 * L):
        ids = _ids(n, 128)
        assert float(np.max(np.abs(hf_logits("llama", ids) - ort_logits(out, ids)))) <= TOL
