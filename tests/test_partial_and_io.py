"""Partly recognised models are refused unless --allow-partial; external data stays external; inputs untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx_ir as ir

from fixtures.hf_models import build_hf_model, export_hf_onnx, export_llama_onnx_large, ort_logits
from posrewrite import api


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _break_one_rotation(src, dst, sign: float = -1.0) -> None:
    """Rewrites one Neg of a q/k rotation as Mul(x, sign): with -1 the same numbers in a shape no rotation pattern
    knows (the probe still reads a rotation); with +1 no longer a rotation at all ([[c, s], [s, c]])."""
    model = ir.load(src)
    neg = next(n for n in model.graph if n.op_type == "Neg")
    minus_one = ir.Value(name="minus_one", const_value=ir.tensor(np.array(sign, np.float32), name="minus_one"),
                         type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    model.graph.register_initializer(minus_one)
    mul = ir.node("Mul", [neg.inputs[0], minus_one], name="odd_neg")
    model.graph.insert_before(neg, mul)
    ir.convenience.replace_all_uses_with(neg.outputs[0], mul.outputs[0])
    model.graph.remove(neg, safe=True)
    ir.save(model, dst)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "posrewrite", *map(str, args)], capture_output=True, text=True)


def test_a_rotation_in_an_unknown_spelling_is_read_by_probing(tmp_path):
    """Neg written as Mul(x, -1): no pattern matches, the probe reads the same rotation, so every q/k rotation is
    found and the rescale goes through (it was refused when only patterns identified rotations)."""
    src = tmp_path / "odd.onnx"
    _break_one_rotation(export_hf_onnx("llama"), src, sign=-1.0)
    found = api.inspect(src)
    rope = [s for s in found.sites if s.kind == "rope"]
    layers = build_hf_model("llama").config.num_hidden_layers
    assert sum(s.rotations for s in rope) == 2 * layers and not found.refusals  # q and k in every layer
    out = tmp_path / "out.onnx"
    proc = _cli(src, "--rope-scale", "4", "--original-max-positions", "64", "-o", out)
    assert proc.returncode == 0, proc.stderr


def test_partial_match_refused_then_allowed(tmp_path):
    """One rotation broken into something that is not a rotation (rotate-half without its sign): refused with the
    reason (exit 5), written with --allow-partial."""
    src = tmp_path / "odd.onnx"
    _break_one_rotation(export_hf_onnx("llama"), src, sign=1.0)
    out = tmp_path / "out.onnx"
    proc = _cli(src, "--rope-scale", "4", "--original-max-positions", "64", "-o", out)
    assert proc.returncode == 5, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "not part of a recognised q/k rotation" in proc.stderr
    assert not out.exists()
    proc = _cli(src, "--rope-scale", "4", "--original-max-positions", "64", "-o", out, "--allow-partial", "--json")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_external_data_kept_and_input_untouched(tmp_path):
    src = export_llama_onnx_large(tmp_path / "big.onnx", num_layers=2, hidden=256, heads=4)
    data = src.with_name(src.name + ".data")
    assert data.exists()
    before = (_sha(src), _sha(data))
    out = tmp_path / "big-yarn.onnx"
    proc = _cli(src, "--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", "2048", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert (_sha(src), _sha(data)) == before
    out_data = out.with_name(out.name + ".data")
    assert out_data.exists() and out.stat().st_size < data.stat().st_size
    ids = np.random.default_rng(0).integers(3, 1000, size=(1, 40))
    # below the training length YaRN only changes the attention factor and high-frequency dims: still runs
    assert np.isfinite(ort_logits(out, ids)).all()
