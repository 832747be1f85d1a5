"""`posrewrite M.onnx --fuse ort|onnx`: every RoPE rotation becomes one RotaryEmbedding node, the logits stay
those of the original export (fp32, 1e-5) or, after a rescale, those of the Hugging Face scaled model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from posrewrite import api, errors
from posrewrite.passes.onnx.rope import fuse as fuse_rotary

TOL = 1e-5
ARCH_NAMES = [
    "llama",
    "gpt_neox",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "phi",
    "stablelm",
    "gemma",
    "gemma2",
    "olmo",
    "olmo2",
    "gptj",
    "cohere",
    "glm",
]


def _ids(n: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 128, size=(batch, n))


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]


def rotations(proto: onnx.ModelProto) -> int:
    """q/k rotations done by fused ops: RotaryEmbedding nodes, 2 per GroupQueryAttention with do_rotary."""
    n = 0
    for node in proto.graph.node:
        if node.op_type == "RotaryEmbedding":
            n += 1
        elif node.op_type == "GroupQueryAttention" and any(a.name == "do_rotary" and a.i for a in node.attribute):
            n += 2
    return n


def _check_fused(path, n_rotations: int) -> None:
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)  # includes strict shape inference
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Cos") == 0 and ops.count("Sin") == 0 and ops.count("Neg") == 0, ops
    assert rotations(proto) == n_rotations


def _fuse(src, tmp_path, target, **kw):
    out = tmp_path / f"fused-{target}.onnx"
    result = api.rewrite(src, output=out, fuse=target, **kw)
    assert result.modified
    return out, result


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_arch_fused_equals_original(arch, target, hf_onnx, tmp_path):
    from fixtures.hf_models import ort_logits

    src = hf_onnx(arch)
    n_rot = sum(s.rotations for s in api.inspect(src).sites)
    out, result = _fuse(src, tmp_path, target)
    _check_fused(out, n_rot)
    if target == "onnx":
        assert onnx.load(out, load_external_data=False).opset_import[0].version >= 23 or any(
            o.domain in ("", "ai.onnx") and o.version == 23 for o in onnx.load(out).opset_import
        )
    for n in (7, 60):  # GPT-J's sincos table has 64 rows: stay inside it
        ids = _ids(n)
        ref = ort_logits(src, ids)
        # of the logits' magnitude (a fused Cohere without `interleaved` moved them by 4e-3 of it)
        assert float(np.max(np.abs(ort_logits(out, ids) - ref))) <= TOL * float(np.max(np.abs(ref)))


def test_position_ids_input(llama_pos_onnx, tmp_path):
    from fixtures.hf_models import ort_logits

    out, _ = _fuse(llama_pos_onnx, tmp_path, "ort")
    _check_fused(out, 4)
    ids = _ids(50)
    pos = np.stack([np.arange(50) + 3, np.arange(50)[::-1]])  # per batch row, not monotonic
    assert float(np.max(np.abs(ort_logits(out, ids, pos) - ort_logits(llama_pos_onnx, ids, pos)))) <= TOL


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize(
    "kind,variant",
    [
        ("three_d_rope", None),
        ("legacy_cached_rope", "gather"),
        ("legacy_cached_rope", "slice"),
        ("interleaved_rope_attention", "gptj"),
    ],
)
def test_hand_written_modules(kind, variant, target, module_onnx, tmp_path):
    """[B, S, H, D] rotations, cached tables gathered or sliced, GPT-J partial interleaved."""
    from fixtures.modules import ort_run

    src, info = module_onnx(kind, **({"variant": variant} if variant else {}))
    out, _ = _fuse(src, tmp_path, target)
    _check_fused(out, 2)
    ids = _ids(40)
    pos = np.tile(np.arange(40) + 5, (2, 1)) if info["with_position_ids"] else None
    assert float(np.max(np.abs(ort_run(out, ids, pos) - ort_run(src, ids, pos)))) <= TOL


def test_fp16_positions_are_fixed_by_the_fp32_caches(fp16_rope_onnx, tmp_path):
    from fixtures.modules import ort_run, reference_logits

    src, info = fp16_rope_onnx
    out, result = _fuse(src, tmp_path, "ort")
    assert any("float16" in n for n in result.notes)
    ids = _ids(3000, batch=1)  # fp16 positions are exact up to 2048 only
    ref = reference_logits(info, ids)[:, 2048:]
    assert np.max(np.abs(ort_run(out, ids)[:, 2048:] - ref)) < 0.5 * np.max(np.abs(ort_run(src, ids)[:, 2048:] - ref))


# ---------------------------------------------------------------------------------------------------------
# rescale + fuse in one command, against Hugging Face's own scaled models
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize(
    "arch,method",
    [
        ("llama", "yarn"),
        ("gpt_neox", "yarn"),
        ("cohere", "yarn"),
        ("llama", "dynamic"),
        ("glm", "dynamic"),
        ("stablelm", "llama3"),
        ("mistral", "ntk"),
    ],
)
def test_rescale_and_fuse_vs_hf(arch, method, target, hf_onnx, tmp_path):
    from test_rescale_vs_hf import _hf_params

    from fixtures.hf_models import hf_logits, ort_logits

    L = 64
    src = hf_onnx(arch)
    kw = dict(rope_scale=4.0, rope_method=method, original_max_positions=L)
    out, result = _fuse(src, tmp_path, target, **kw)
    assert result.validation is not None and result.validation.ok, result.to_dict()
    ops = _ops(out)
    assert ops.count("Neg") == 0 and rotations(onnx.load(out)) == 4
    # runtime methods compute their caches in the graph (one Cos, one Sin per site); static ones have none
    assert ops.count("Cos") == (1 if method == "dynamic" else 0)
    params = _hf_params(arch, method, L)
    for n in (L // 2, L + 8, 3 * L):
        ids = _ids(n, batch=1)
        err = float(np.max(np.abs(hf_logits(arch, ids, rope_parameters=params) - ort_logits(out, ids))))
        assert err <= TOL, f"{arch} {method} {target} at {n} tokens: {err:.3g}"


def test_longrope_and_fuse_vs_hf(hf_onnx, tmp_path):
    from fixtures.hf_models import hf_logits, ort_logits

    L, half = 64, 8
    rng = np.random.default_rng(0)
    short = [float(v) for v in 1.0 + 0.1 * rng.random(half)]
    long = [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, half)]
    out, result = _fuse(
        hf_onnx("phi3"),
        tmp_path,
        "ort",
        rope_scale=4.0,
        rope_method="longrope",
        original_max_positions=L,
        rope_params={"short_factor": short, "long_factor": long},
    )
    assert result.validation.ok
    params = {
        "rope_type": "longrope",
        "factor": 4.0,
        "original_max_position_embeddings": L,
        "short_factor": short,
        "long_factor": long,
    }
    for n in (L // 2, 3 * L):
        ids = _ids(n, batch=1)
        ref = hf_logits("phi3", ids, rope_parameters=params, original_max_position_embeddings=L)
        assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= TOL


def test_rescale_cached_table_and_fuse(hf_onnx, tmp_path):
    """GPT-J's sincos table rescaled (linear x4, 256 rows) then fused == rescaled only."""
    from fixtures.hf_models import ort_logits

    src = hf_onnx("gptj")
    scaled = tmp_path / "scaled.onnx"
    api.rewrite(src, output=scaled, rope_scale=4.0, rope_method="linear")
    out, result = _fuse(src, tmp_path, "ort", rope_scale=4.0, rope_method="linear")
    assert "256 rows" in " ".join(result.changes)
    ids = _ids(200, batch=1)
    assert float(np.max(np.abs(ort_logits(out, ids) - ort_logits(scaled, ids)))) <= TOL


# ---------------------------------------------------------------------------------------------------------
# bounds
# ---------------------------------------------------------------------------------------------------------


def _fuse_small(src, out, rows: int) -> fuse_rotary.FuseRotaryPass:
    model = ir.load(str(src))
    fuse = fuse_rotary.FuseRotaryPass(sites=api.detect(model).rope_sites, target="ort", max_positions=rows)
    fuse(model)
    ir.save(model, str(out))
    return fuse


def test_positions_past_the_cache_fail_loudly(llama_onnx, llama_pos_onnx, tmp_path):
    """Caches hold `max_positions` rows; onnxruntime CPU rejects later positions instead of reading past."""
    from fixtures.hf_models import ort_logits

    out = tmp_path / "small.onnx"
    fuse = _fuse_small(llama_onnx, out, 32)
    assert any("32 rows" in c for c in fuse.changes) and any(">= 32" in n for n in fuse.notes)
    ort_logits(out, _ids(32))
    with pytest.raises(Exception, match="Updating cos_cache|out of range"):
        ort_logits(out, _ids(33))
    out_pos = tmp_path / "small-pos.onnx"
    _fuse_small(llama_pos_onnx, out_pos, 32)
    with pytest.raises(Exception, match="out of range"):
        ort_logits(out_pos, _ids(4), position_ids=np.array([[0, 1, 2, 40]] * 2))


# ---------------------------------------------------------------------------------------------------------
# raising the opset for RotaryEmbedding-23
# ---------------------------------------------------------------------------------------------------------


def _tiny_model(opset: int, nodes, inputs, outputs) -> ir.Model:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["a", "b", "c"]) for n in outputs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def test_raise_opset_moves_reduce_axes():
    from onnx import helper

    model = _tiny_model(17, [helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=1)], ["x"], ["y"])
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    assert fuse_rotary.raise_opset(model, 23)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    import onnxruntime as ort

    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x.mean(-1, keepdims=True), rtol=1e-6)


def test_raise_opset_refuses_changed_meaning():
    from onnx import helper

    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=1)
    model = _tiny_model(18, [node], ["x", "s", "b"], ["y"])
    # scale/bias became per channel at 21: without x's shape (its channels) the version converter cannot convert
    model.graph.inputs[0].shape = None
    with pytest.raises(errors.UsageError, match="GroupNormalization.*--fuse ort"):
        fuse_rotary.raise_opset(model, 23)
    assert model.opset_imports[""] == 18  # untouched


def test_combined_with_fp32_positions(fp16_rope_onnx, tmp_path):
    src, _ = fp16_rope_onnx
    out, result = _fuse(src, tmp_path, "ort", fp32_positions=True)
    ops = _ops(out)
    assert rotations(onnx.load(out)) == 2 and ops.count("Cos") == 0


def test_fuse_only_rewrite_is_compared_with_the_original(llama_onnx, tmp_path):
    """With validation on, a fusion alone is checked by running the original and the fused model in
    onnxruntime on the same tokens (the original export is the reference)."""
    result = api.rewrite(llama_onnx, output=tmp_path / "f.onnx", fuse="ort", validate=True)
    rows = [r for r in result.validation.rows if r.site == "model"]
    assert len(rows) == 1 and rows[0].ok and rows[0].max_abs_error is not None
    assert rows[0].max_abs_error <= 1e-4
    # one position past the caches: validation shows that onnxruntime rejects it rather than reading past
    past = [r for r in result.validation.rows if r.site == "past cache"]
    assert len(past) == 1 and past[0].ok and past[0].length == 4097 and "rejected" in past[0].message


def test_comparison_catches_a_wrong_fused_cache(llama_onnx, tmp_path):
    """A fused model whose sin cache has the wrong sign (rotation the other way) must fail the comparison."""
    from posrewrite.validate import compare_models

    out = tmp_path / "f.onnx"
    api.rewrite(llama_onnx, output=out, fuse="ort", validate=False)
    model = ir.load(out)
    sins = [v for name, v in model.graph.initializers.items() if "sin" in name]
    assert sins
    for v in sins:
        v.const_value = ir.tensor(-v.const_value.numpy())
    bad = tmp_path / "bad.onnx"
    ir.save(model, bad)
    row = compare_models(llama_onnx, bad, 48)
    assert not row.ok and row.max_abs_error > row.tolerance
    good = compare_models(llama_onnx, out, 48)
    assert good.ok


def test_cache_rows_follow_config_json(llama_onnx, tmp_path):
    """Computed angles get fused caches as long as config.json's max_position_embeddings (beside the model),
    unless --max-positions says otherwise."""
    import json
    import shutil

    src = tmp_path / "model.onnx"
    shutil.copy(llama_onnx, src)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 300}))

    def cache_rows(path) -> set[int]:
        proto = onnx.load(path)
        return {int(t.dims[0]) for t in proto.graph.initializer if "cos_cache" in t.name}

    api.rewrite(src, output=tmp_path / "a.onnx", fuse="ort")
    assert cache_rows(tmp_path / "a.onnx") == {300}
    api.rewrite(src, output=tmp_path / "b.onnx", fuse="ort", max_positions=1000)
    assert cache_rows(tmp_path / "b.onnx") == {1000}
