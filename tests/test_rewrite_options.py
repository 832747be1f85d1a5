"""How the training length is found, --rope-params, and what happens without RoPE."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

from fixtures.hf_models import ARCHS, export_hf_onnx, hf_logits, ort_logits


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "posrewrite", *map(str, args)], capture_output=True, text=True)


def _copy(src, dst_dir):
    dst = dst_dir / "model.onnx"
    shutil.copyfile(src, dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        shutil.copyfile(data, dst_dir / data.name)
    return dst


def test_yarn_needs_training_length(tmp_path):
    src = _copy(export_hf_onnx("llama"), tmp_path)
    proc = _cli(src, "--rope-scale", "4", "--rope-method", "yarn")
    assert proc.returncode == 2
    assert "--original-max-positions" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*yarn*"))


def test_training_length_from_config_json(tmp_path):
    """An HF/Optimum export ships config.json beside the model: its max_position_embeddings is L."""
    L = ARCHS["llama"].max_position_embeddings
    src = _copy(export_hf_onnx("llama"), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": L,
                                                      "rope_theta": 10000.0}))
    out = tmp_path / "out.onnx"
    proc = _cli(src, "--rope-scale", "4", "--rope-method", "yarn", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["validation"]["ok"]
    ids = np.random.default_rng(0).integers(3, 128, size=(1, 3 * L))
    ref = hf_logits("llama", ids, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": L})
    assert float(np.max(np.abs(ref - ort_logits(out, ids)))) <= 1e-5


def test_rope_params_file_llama3(tmp_path):
    """--rope-params takes the rope_parameters of a config (here Llama 3.1's llama3 scaling, from a file)."""
    L = ARCHS["llama"].max_position_embeddings
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": L}
    pfile = tmp_path / "rope.json"
    pfile.write_text(json.dumps(params))
    out = tmp_path / "out.onnx"
    proc = _cli(export_hf_onnx("llama"), "--rope-params", pfile, "-o", out)
    assert proc.returncode == 0, proc.stderr
    ids = np.random.default_rng(1).integers(3, 128, size=(1, 2 * L))
    assert float(np.max(np.abs(hf_logits("llama", ids, rope_parameters=params) - ort_logits(out, ids)))) <= 1e-5


def test_no_rope_exit_4(tmp_path):
    from fixtures.other_models import export_other_onnx

    gpt2, _ = export_other_onnx("gpt2")  # learned absolute positions, no RoPE
    proc = _cli(gpt2, "--rope-scale", "4", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 4, proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_rescale_of_half_precision_positions_implies_fp32(tmp_path):
    from fixtures.modules import build_fp16_legacy_rope
    from posrewrite import api

    src, _ = build_fp16_legacy_rope()
    out = tmp_path / "out.onnx"
    result = api.rewrite(src, output=out, rope_scale=2.0, rope_method="linear")
    assert any("implied" in n for n in result.notes)
    assert api.check(out, max_length=4096).safe
    assert not api.check(src, max_length=4096).safe
