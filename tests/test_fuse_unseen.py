"""Tiny Hugging Face architectures that are not in fixtures.hf_models.ARCHS (posrewrite was not written
against them): built from a tiny config, exported with the dynamo exporter, cached like the fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fixtures.cache import cached

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

#: name -> (config class, model class, config overrides, what is special about its RoPE)
UNSEEN = {
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            num_key_value_heads=2,
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "two RoPE configurations (local base 1e4, global base 1e6): two sites, distinct caches",
    ),
    "starcoder2": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        dict(num_key_value_heads=2, sliding_window=None),
        "biases, LayerNorm",
    ),
    "nemotron": (
        "NemotronConfig",
        "NemotronForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        "partial rotary 0.5",
    ),
    "persimmon": (
        "PersimmonConfig",
        "PersimmonForCausalLM",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5}),
        "fused qkv, q/k LayerNorm, partial rotary 0.5",
    ),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2), "multipliers"),
}


def _config(name: str):
    import transformers

    cfg_cls, _, overrides, _ = UNSEEN[name]
    kw = dict(_COMMON)
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not None}
    return getattr(transformers, cfg_cls)(**kw)


def build_model(name: str, seed: int = 0):
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, UNSEEN[name][1])(_config(name))
    return model.eval()


def export_unseen(name: str) -> Path:
    from fixtures.hf_models import LogitsOnly, _export_module

    def build(tmp: Path) -> dict:
        model = build_model(name)
        _export_module(LogitsOnly(model), tmp / "model.onnx", with_position_ids=False, exporter="dynamo", vocab=128)
        return {"arch": name}

    path, _ = cached({"kind": f"unseen-{name}", "name": name, "overrides": repr(UNSEEN[name][2])}, build)
    return path


def torch_logits(name: str, ids: np.ndarray) -> np.ndarray:
    import torch

    model = build_model(name)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

import onnx  # noqa: E402
import pytest  # noqa: E402

from posrewrite import api  # noqa: E402

TOL = 1e-5
_DEFAULT_RUN = ("gemma3", "nemotron", "granite")  # granite: attention scale 1.0 (not 1/sqrt(d))


def _params():
    for name in UNSEEN:
        marks = () if name in _DEFAULT_RUN else (pytest.mark.slow,)
        for target in ("ort", "onnx"):
            yield pytest.param(name, target, marks=marks, id=f"{name}-{target}")


@pytest.mark.parametrize("name,target", list(_params()))
def test_unseen_architecture_fused(name, target, tmp_path):
    pytest.importorskip("transformers")
    from fixtures.hf_models import ort_logits

    src = export_unseen(name)
    found = api.inspect(src)
    assert found.sites and not found.refusals
    out = tmp_path / f"{name}-{target}.onnx"
    api.rewrite(src, output=out, fuse=target)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Cos") == ops.count("Sin") == ops.count("Neg") == 0
    from test_fuse_rotary import rotations

    assert rotations(proto) == sum(s.rotations for s in found.sites)
    ids = np.random.default_rng(0).integers(3, 128, size=(2, 40))
    ref = ort_logits(src, ids)
    assert float(np.max(np.abs(ort_logits(out, ids) - ref))) <= TOL
    assert float(np.max(np.abs(ort_logits(out, ids) - torch_logits(name, ids)))) <= TOL


def test_distinct_configurations_get_distinct_caches(tmp_path):
    """Gemma 3: local (base 1e4) and global (base 1e6) RoPE in one graph -> two pairs of caches."""
    pytest.importorskip("transformers")
    src = export_unseen("gemma3")
    out = tmp_path / "gemma3.onnx"
    api.rewrite(src, output=out, fuse="ort")
    proto = onnx.load(out)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    pairs = {(n.input[2], n.input[3]) for n in proto.graph.node if n.op_type == "RotaryEmbedding"}
    pairs |= {(n.input[7], n.input[8]) for n in proto.graph.node if n.op_type == "GroupQueryAttention"}
    assert len(pairs) == 2
    (c1, _), (c2, _) = sorted(pairs)
    assert not np.allclose(inits[c1], inits[c2])
