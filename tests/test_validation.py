"""Validation you can trust: fused interleaved models equal the original, the validator's own
oracle catches injected faults and passes correct rewrites."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from posrewrite import api

REL = 1e-5  # of the logits' magnitude: fp32 round-off of a fusion is ~1e-6 of it on the fixtures


def _ids(n: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 128, size=(batch, n))


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("arch", ["cohere", "glm", "gptj"])
def test_interleaved_fused_with_position_ids_equals_original(arch, target, hf_onnx, tmp_path):
    """With a position_ids input, `--fuse ort` puts MultiHeadAttention after the RotaryEmbedding nodes; onnxscript's
    MHA rule re-creates those nodes without `interleaved`: the written nodes must say interleaved=1 and the logits
    stay the original's."""
    from fixtures.hf_models import ort_logits

    src = hf_onnx(arch, with_position_ids=True)
    out = tmp_path / f"fused-{target}.onnx"
    api.rewrite(src, output=out, fuse=target, validate=False)
    nodes = [n for n in onnx.load(out, load_external_data=False).graph.node if n.op_type == "RotaryEmbedding"]
    assert nodes
    for node in nodes:
        assert {a.name: a.i for a in node.attribute}.get("interleaved") == 1, node
    for n in (7, 40):
        ids = _ids(n)
        ref, got = ort_logits(src, ids), ort_logits(out, ids)
        assert np.max(np.abs(ref - got)) <= REL * np.max(np.abs(ref)), (arch, target, n)


# ------------------------------------------------------------------------------------------------------------
# Fault injection: faults put into correct rewrites must be caught, by the rewrite's own validation (the fault
# is applied to the model as it is saved) and by `posrewrite validate ORIGINAL REWRITTEN [flags]`.
# ------------------------------------------------------------------------------------------------------------

import onnx_ir as ir  # noqa: E402

from posrewrite import cli, errors, io  # noqa: E402
from posrewrite import plan as plan_module  # noqa: E402

L = 128  # the hand-written modules' "trained" length
YARN = dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L)
YARN_FLAGS = ["--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L)]
YARN_FACTOR = 0.1 * np.log(4.0) + 1.0


def _direct(layout: str = "rotate_half"):
    from fixtures.direct_rope import build_direct_rope

    return build_direct_rope(layout)


def _scalar(v: ir.Value | None):
    if v is None:
        return None
    t = v.const_value
    if t is None and v.producer() is not None and v.producer().op_type == "Constant":
        t = v.producer().attributes["value"].value
    if t is None or int(np.prod(t.shape.dims)) != 1:
        return None
    return float(np.asarray(t.numpy()).reshape(()))


def _const(graph: ir.Graph, arr: np.ndarray, name: str) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                 type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    graph.register_initializer(v)
    return v


def _insert_before(graph: ir.Graph, node: ir.Node, index: int, op: str, extra=(), **attrs) -> None:
    """node.inputs[index] <- op(node.inputs[index], *extra)."""
    new = ir.node(op, [node.inputs[index], *extra], attrs)
    new.outputs[0].name = f"fault_{op}_{id(new)}"
    graph.insert_before(node, new)
    node.replace_input_with(index, new.outputs[0])


def _rotary_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert nodes
    return nodes


def _positions_index(node: ir.Node) -> int:
    return 1 if node.domain == "com.microsoft" else 3


def _sin_index(node: ir.Node) -> int:
    return 3 if node.domain == "com.microsoft" else 2


def drop_interleaved(model: ir.Model) -> None:
    for node in model.graph:
        if node.op_type == "RotaryEmbedding":
            node.attributes.pop("interleaved", None)
        elif node.op_type == "GroupQueryAttention":
            node.attributes.pop("rotary_interleaved", None)


def scale_attention_factor(power: float):
    def inject(model: ir.Model) -> None:
        hits = 0
        for node in model.graph:
            if node.op_type != "Mul":
                continue
            for k, v in enumerate(node.inputs):
                f = _scalar(v)
                if f is not None and abs(f - YARN_FACTOR) < 1e-6:
                    node.replace_input_with(k, _const(model.graph, np.array(f ** power, np.float32), f"fault_f{hits}"))
                    hits += 1
        if not hits:  # fused caches hold the factor: scale the caches
            for node in _rotary_nodes(model):
                for idx in (_sin_index(node) - 1, _sin_index(node)):
                    _insert_before(model.graph, node, idx, "Mul",
                                   [_const(model.graph, np.array(YARN_FACTOR ** (power - 1), np.float32),
                                           f"fault_c{id(node)}_{idx}")])
                    hits += 1
        assert hits

    return inject


def positions_off_by_one(model: ir.Model) -> None:
    for node in _rotary_nodes(model):
        _insert_before(model.graph, node, _positions_index(node), "Add",
                       [_const(model.graph, np.array(1, np.int64), f"fault_one_{id(node)}")])


def wrong_rotary_dim(model: ir.Model) -> None:
    for node in _rotary_nodes(model):
        node.attributes["rotary_embedding_dim"] = ir.AttrInt64("rotary_embedding_dim", 8)
        node.attributes.setdefault("num_heads", ir.AttrInt64("num_heads", 4))


def flip_sin(model: ir.Model) -> None:
    for node in _rotary_nodes(model):
        _insert_before(model.graph, node, _sin_index(node), "Neg")


def caches_one_row_short(model: ir.Model) -> None:
    for node in _rotary_nodes(model):
        for idx in (_sin_index(node) - 1, _sin_index(node)):
            rows = node.inputs[idx].shape[0] if node.inputs[idx].shape is not None else None
            assert isinstance(rows, int), node.inputs[idx]
            starts = _const(model.graph, np.array([0], np.int64), f"fault_s{id(node)}_{idx}")
            ends = _const(model.graph, np.array([rows - 1], np.int64), f"fault_e{id(node)}_{idx}")
            _insert_before(model.graph, node, idx, "Slice", [starts, ends])


def swap_kv_heads(model: ir.Model) -> None:
    """GroupQueryAttention's key heads in the other order: each q head group reads the wrong kv head."""
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert nodes
    for node in nodes:
        kv = node.attributes["kv_num_heads"].as_int()
        assert kv >= 2
        key = node.inputs[1]
        split = ir.node("Split", [key], {"axis": -1, "num_outputs": kv}, num_outputs=kv)
        concat = ir.node("Concat", list(reversed(split.outputs)), {"axis": -1})
        for k, o in enumerate(split.outputs):
            o.name = f"fault_split_{id(node)}_{k}"
        concat.outputs[0].name = f"fault_concat_{id(node)}"
        model.graph.insert_before(node, [split, concat])
        node.replace_input_with(1, concat.outputs[0])


def _fault_in_rewrite(monkeypatch, inject) -> None:
    """The rewrite saves a model with `inject` applied: its own validation must refuse it."""
    real = io.stage_model

    def faulty(model, output, *args, **kwargs):
        inject(model)
        return real(model, output, *args, **kwargs)

    monkeypatch.setattr(io, "stage_model", faulty)


FAULTS = {
    # name: (fixture, rewrite options, flags for `posrewrite validate`, injection)
    "interleaved dropped (fusion)": ("cohere_pos", dict(fuse="ort"), [], drop_interleaved),
    "interleaved dropped (yarn, fused)": ("direct_interleaved", dict(YARN, fuse="ort"), YARN_FLAGS, drop_interleaved),
    "attention factor dropped": ("direct_half", YARN, YARN_FLAGS, scale_attention_factor(0.0)),
    "attention factor squared": ("direct_interleaved", YARN, YARN_FLAGS, scale_attention_factor(2.0)),
    "attention factor dropped (fused)": ("direct_half", dict(YARN, fuse="onnx"), YARN_FLAGS,
                                         scale_attention_factor(0.0)),
    "positions off by one": ("direct_half", dict(YARN, fuse="ort"), YARN_FLAGS, positions_off_by_one),
    "wrong rotary_dim": ("direct_half", dict(YARN, fuse="ort"), YARN_FLAGS, wrong_rotary_dim),
    "sin sign flipped": ("direct_interleaved", dict(YARN, fuse="onnx"), YARN_FLAGS, flip_sin),
    # the fused caches hold 4096 rows (--max-positions): the rewrite claims them, `validate` is told so
    "caches one row short": ("direct_half", dict(YARN, fuse="ort", max_positions=4096),
                             [*YARN_FLAGS, "--max-positions", "4096"],
                             caches_one_row_short),
    "GQA kv heads swapped": ("llama", dict(fuse="ort"), [], swap_kv_heads),
}


def _fixture(name: str, hf_onnx):
    if name == "cohere_pos":
        return hf_onnx("cohere", with_position_ids=True)
    if name == "llama":
        return hf_onnx("llama")
    return _direct("interleaved" if name == "direct_interleaved" else "rotate_half")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_fault_is_caught(fault, hf_onnx, tmp_path, monkeypatch, capsys):
    fixture, options, flags, inject = FAULTS[fault]
    src = _fixture(fixture, hf_onnx)
    good = tmp_path / "good.onnx"
    api.rewrite(src, output=good, **options)  # the correct rewrite passes its own validation
    assert cli.main(["validate", str(src), str(good), *flags]) == 0, capsys.readouterr().err
    # the fault, put into the model the rewrite saves: its own validation refuses it, no output left behind
    with monkeypatch.context() as m:
        _fault_in_rewrite(m, inject)
        bad_out = tmp_path / "bad-rewrite.onnx"
        with pytest.raises(errors.ValidationError):
            api.rewrite(src, output=bad_out, **options)
        assert not bad_out.exists()
    # the same fault in a file: `posrewrite validate` exits 6 with one line on stderr
    model = ir.load(good)
    inject(model)
    bad = tmp_path / "bad.onnx"
    ir.save(model, bad)
    capsys.readouterr()
    assert cli.main(["validate", str(src), str(bad), *flags, "--json"]) == 6
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posrewrite: error: validation failed:"), captured.err
    import json

    payload = json.loads(captured.out)
    assert not payload["validation"]["ok"]
    failed = [r for r in payload["validation"]["rows"] if not r["ok"]]
    assert failed and all("compared" in r or "message" in r for r in failed)


def test_half_precision_positions_left_in_are_caught(module_onnx, tmp_path, monkeypatch, capsys):
    """A rescale of an fp16-positions model that leaves positions and angles in fp16 (the implied
    --fp32-positions suppressed) is refused; the correct one passes."""
    src, _ = module_onnx("fp16_legacy_rope")
    opts = dict(rope_scale=4.0, rope_method="linear", original_max_positions=1024)  # new length 4096 > 2048
    flags = ["--rope-scale", "4", "--original-max-positions", "1024", "--fp32-positions"]
    good = tmp_path / "good.onnx"
    api.rewrite(src, output=good, **opts)
    assert cli.main(["validate", str(src), str(good), *flags]) == 0, capsys.readouterr().err
    monkeypatch.setattr(plan_module, "needs_fp32_positions", lambda sites: False)
    with pytest.raises(errors.ValidationError):
        api.rewrite(src, output=tmp_path / "bad-rewrite.onnx", **opts)
    bad = tmp_path / "bad.onnx"
    api.rewrite(src, output=bad, validate=False, **opts)
    assert cli.main(["validate", str(src), str(bad), *flags]) == 6


# ------------------------------------------------------------------------------------------------------------
# No false alarm: correct rewrites of hand-written modules (cos/sin applied directly) with every method.
# ------------------------------------------------------------------------------------------------------------

_HALF = 8  # rotary_dim / 2 of the hand-written modules
METHODS = {
    "linear": dict(rope_scale=4.0, rope_method="linear"),
    "ntk": dict(rope_scale=4.0, rope_method="ntk", original_max_positions=L),
    "dynamic": dict(rope_scale=4.0, rope_method="dynamic", original_max_positions=L),
    "yarn": YARN,
    "llama3": dict(rope_params={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": L}),
    "longrope": dict(rope_params={"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
                                  "short_factor": [1.0 + 0.05 * i for i in range(_HALF)],
                                  "long_factor": [1.0 + 0.5 * i for i in range(_HALF)]}),
    "new base": dict(rope_base=80000.0),
}


def _rotation_rows(result) -> list:
    rows = result.validation.rows
    (found,) = [r for r in rows if r.site == "rotations"]
    assert found.ok and "(4) vs in the original model (4)" in found.compared
    checked = [r for r in rows if (r.compared or "").startswith("rotated q/k")]
    assert checked and all(r.max_abs_error is not None for r in checked)
    return checked


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_no_false_alarm_every_method(layout, method, tmp_path):
    src = _direct(layout)
    result = api.rewrite(src, output=tmp_path / "out.onnx", **METHODS[method])
    assert result.validation.ok, result.validation.to_dict()
    rows = _rotation_rows(result)
    options = METHODS[method]
    if "original_max_positions" in options or "original_max_position_embeddings" in options.get("rope_params", {}):
        assert {r.length for r in rows} >= {L // 2, L + 1}


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("method", ["yarn", "dynamic", "longrope"])
def test_no_false_alarm_fused(method, target, tmp_path):
    src = _direct("interleaved" if target == "ort" else "rotate_half")
    result = api.rewrite(src, output=tmp_path / "out.onnx", fuse=target, **METHODS[method])
    assert result.validation.ok, result.validation.to_dict()
    _rotation_rows(result)


def test_validate_command_rope_params_and_errors(tmp_path, capsys):
    """`posrewrite validate` takes the rescale as --rope-params too; a wrong claim exits 6; a missing file is one
    line and exit 3."""
    import json

    src = _direct()
    out = tmp_path / "yarn.onnx"
    api.rewrite(src, output=out, validate=False, **YARN)
    params = json.dumps({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L})
    assert cli.main(["validate", str(src), str(out), "--rope-params", params]) == 0, capsys.readouterr().err
    # the same file is not a linear rescale, nor unchanged
    assert cli.main(["validate", str(src), str(out), "--rope-scale", "4"]) == 6
    # without flags: the rewrite the file records; with the record removed, "unchanged", which it is not
    assert cli.main(["validate", str(src), str(out)]) == 0, capsys.readouterr().err
    bare = ir.load(out)
    bare.metadata_props.pop("posrewrite.rewrites")
    ir.save(bare, tmp_path / "bare.onnx")
    assert cli.main(["validate", str(src), str(tmp_path / "bare.onnx")]) == 6
    capsys.readouterr()
    assert cli.main(["validate", str(src), str(tmp_path / "missing.onnx")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posrewrite: error:")


def test_rows_are_typed_frozen_and_their_json_loses_nothing(tmp_path):
    """Validation rows are frozen `Check`s, one class per kind of row; the JSON row of each (`to_dict`, what
    `--json` prints) holds every field the row has set, so the row is rebuilt from it unchanged."""
    import dataclasses
    import json

    from posrewrite.render import jsonable
    from posrewrite.validation.report import Check, RotationCheck, RotationCount, RunCheck

    result = api.rewrite(_direct(), output=tmp_path / "yarn.onnx", **YARN)
    rows = result.validation.rows
    assert {RotationCount, RotationCheck, RunCheck} <= {type(r) for r in rows}
    written = json.loads(json.dumps(jsonable(result.to_dict())))["validation"]["rows"]
    assert len(written) == len(rows)
    for row, data in zip(rows, written, strict=True):
        assert isinstance(row, Check)
        assert type(row)(**data) == row, data
        unset = {f.name for f in dataclasses.fields(row) if getattr(row, f.name) is None} & row.OPTIONAL
        assert not unset & set(data), data
        with pytest.raises(dataclasses.FrozenInstanceError):
            row.ok = not row.ok
