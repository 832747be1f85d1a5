"""posrewrite's passes as a public API (`posrewrite.passes.onnx`): the composition shown in docs/python-api.md,
run as written there, against Hugging Face's own YaRN model; keyword-only constructors; each pass correct on its
own, refusing what it cannot do."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from posrewrite import errors

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
HEADING = "## Composing posrewrite's passes with your own"


def _documented_snippet() -> str:
    """The first fenced python block under HEADING in docs/python-api.md, as the page shows it."""
    text = DOC.read_text()
    assert HEADING in text, f"{DOC.name} lost its section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert match, f"no python block under {HEADING!r}"
    return match.group(1)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_the_documented_composition_equals_hf_yarn(tmp_path):
    """The snippet (a YaRN x4 rescale, a pass of the user's, the RotaryEmbedding fusion, cleanup) runs unchanged on
    the tiny Llama the docs' workspace holds; the model it writes gives HF's logits for the same YaRN request
    (HF's own rope init and attention factor) below and past the trained length, and the original does not."""
    from fixtures.hf_models import ARCHS, export_hf_onnx, hf_logits, ort_logits

    snippet = _documented_snippet()
    spec = ARCHS["llama"]
    trained = spec.max_position_embeddings
    request = re.search(r"RopeParameters\((.*?)\)", snippet, re.S).group(1)
    assert f"original_max_position_embeddings={trained}" in request and 'rope_type="yarn"' in request
    factor = float(re.search(r"factor=([0-9.]+)", request).group(1))
    src = export_hf_onnx("llama")
    shutil.copy(src, tmp_path / "model.onnx")
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "model-yarn4-fused.onnx"
    model = ir.load(out)
    ops = [n.op_type for n in model.graph]
    assert "RotaryEmbedding" in ops and "Cos" not in ops and "Sin" not in ops
    assert model.metadata_props.get("my.steps")  # the user's own pass ran in the same PassManager
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained}
    rng = np.random.default_rng(0)
    for n in (trained // 2, trained + 8, 3 * trained):
        ids = rng.integers(3, spec.config_kwargs.get("vocab_size", 128), size=(1, n))
        ref = hf_logits("llama", ids, rope_parameters=params)
        # fp32 round-off of a 2-layer model, relative to the logits' magnitude (as tests/test_fuse_rotary.py)
        tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(ort_logits(out, ids) - ref).max()) <= tol, n
        assert float(np.abs(ort_logits(tmp_path / "model.onnx", ids) - ref).max()) > 100 * tol  # YaRN matters


def test_the_package_exports_every_pass_without_importing_them():
    """`import posrewrite.passes.onnx` imports no pass (a detector may import a graph helper of the package
    cheaply); each exported name is what its module defines; `__all__` lists them."""
    code = ("import sys, posrewrite.passes.onnx as p\n"
            "print(sorted(m for m in sys.modules if m.startswith('posrewrite.passes.onnx.')))\n"
            "print(sorted(p.__all__) == sorted(p._EXPORTS))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "True"]
    import importlib

    import posrewrite.passes.onnx as public

    for name in public.__all__:
        assert getattr(public, name) is getattr(importlib.import_module(public._EXPORTS[name]), name)
    with pytest.raises(AttributeError):
        public.NoSuchPass  # noqa: B018


def _pass_classes() -> list[type]:
    import posrewrite.passes.onnx as public

    return [getattr(public, n) for n in public.__all__
            if isinstance(getattr(public, n), type) and issubclass(getattr(public, n), ir.passes.PassBase)]


@pytest.mark.parametrize("cls", _pass_classes(), ids=lambda c: c.__name__)
def test_one_constructor_shape(cls):
    """Keyword arguments only, annotated; every posrewrite pass takes context= and preface=."""
    from posrewrite.passes.onnx import ReportingPass

    if not issubclass(cls, ReportingPass):
        assert "__init__" not in cls.__dict__  # an onnx_ir pass without configuration (DropUntypedValueInfoPass)
        return
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params), [p.name for p in params if p.kind is not p.KEYWORD_ONLY]
    assert all(p.annotation is not p.empty for p in params)
    if issubclass(cls, ReportingPass):
        assert {"context", "preface"} <= {p.name for p in params}


def _no_rope_model() -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.node("Relu", [x], name="relu")
    relu.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], relu.outputs, nodes=[relu], opset_imports={"": 18}), ir_version=10)


def test_passes_refuse_clearly_on_their_own(llama_onnx):
    from posrewrite.math.rope import RopeParameters
    from posrewrite.passes.onnx import FuseAttentionPass, FuseRotaryPass, RescaleRopePass, plan_site
    from posrewrite.passes.onnx.detect import detect

    yarn = RopeParameters(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    with pytest.raises(errors.NoEncodingError, match="no RoPE"):
        RescaleRopePass(params=yarn)(_no_rope_model())
    with pytest.raises(ValueError, match="either params"):
        RescaleRopePass(params=yarn, plans=[])
    with pytest.raises(errors.UsageError):
        FuseAttentionPass(target="tensorrt")
    # plans made on one copy of the model do not apply to another: refused before anything is touched
    other = ir.load(llama_onnx)
    plans = [plan_site(s, yarn) for s in detect(other).rope_sites]
    model = ir.load(llama_onnx)
    with pytest.raises(ir.passes.PreconditionError, match="not in this model"):
        RescaleRopePass(plans=plans)(model)
    # attention fusion that follows a rotary fusion which fused nothing leaves the model as it is
    bare = _no_rope_model()
    rotary = FuseRotaryPass(target="ort")
    assert not rotary(bare).modified
    assert not FuseAttentionPass(target="ort", after=rotary)(bare).modified


def test_fusions_alone_without_a_shared_context(llama_onnx, tmp_path):
    """FuseRotaryPass, cleanup, FuseAttentionPass, cleanup, each with a context of its own (no report shared):
    attention is fused around the RotaryEmbedding nodes, and onnxruntime gives the original's logits."""
    from fixtures.hf_models import ort_logits
    from posrewrite.passes.onnx import FuseAttentionPass, FuseRotaryPass, cleanup_passes

    model = ir.load(llama_onnx)
    ir.passes.PassManager([FuseRotaryPass(target="ort"), *cleanup_passes(), FuseAttentionPass(target="ort"),
                           *cleanup_passes()])(model)
    out = tmp_path / "fused.onnx"
    ir.save(model, out)
    ops = {n.op_type for n in model.graph}
    assert "Softmax" not in ops and ops & {"GroupQueryAttention", "MultiHeadAttention"}, ops
    for n in (7, 60):
        ids = np.random.default_rng(n).integers(3, 100, size=(1, n))
        ref = ort_logits(llama_onnx, ids)
        assert float(np.abs(ort_logits(out, ids) - ref).max()) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_node_writer_and_what_a_rewrite_leaves_unread():
    """NodeWriter (on onnx_ir's tape): named nodes inserted before their anchor, constants as initializers; without
    a stem, unnamed nodes and Constant nodes. remove_made_dead removes what the rewrite left unread, cascading up,
    and leaves the dead code that was there before."""
    from posrewrite.passes.onnx._build import NodeWriter, remove_made_dead, unread_nodes

    x = ir.Value(name="x", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    old = ir.node("Neg", [x], name="old")
    relu = ir.node("Relu", [old.outputs[0]], name="relu")
    stale = ir.node("Abs", [x], name="stale")  # dead before the rewrite: the caller's
    graph = ir.Graph([x], relu.outputs, nodes=[old, stale, relu], opset_imports={"": 18})
    before = unread_nodes(graph)
    w = NodeWriter(graph, relu, "t")
    y = w.op("Mul", x, w.const(np.array(2.0, np.float32)))
    w.commit()
    relu.replace_input_with(0, y)
    assert [n.name for n in graph] == ["old", "stale", y.producer().name, "relu"] and y.name.endswith("_out")
    assert len(graph.initializers) == 1
    assert remove_made_dead(graph, before) == 1
    assert [n.name for n in graph][0] == "stale"
    bare = NodeWriter(graph, relu)
    z = bare.op("Add", y, bare.const(np.array(1.0, np.float32)))
    bare.commit()
    assert [n.op_type for n in graph][-3:] == ["Constant", "Add", "Relu"]
    assert y.producer().name.startswith("t_Mul") and not z.producer().name.startswith("t_")  # the graph names it
