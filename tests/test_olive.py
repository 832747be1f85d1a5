"""The Olive pass (posrewrite.olive.PosRewrite) in real Olive workflows, checked in onnxruntime.

The workflow is the one docs/olive.md shows (read from the page, so the page cannot drift): YaRN x4 of the tiny
Llama trained for 64 tokens, fused for onnxruntime. Its output is compared with Hugging Face's LlamaForCausalLM
built with the same rope_parameters and weights, past the old context. The same pass on an onnxruntime-genai
ModelBuilder folder rewrites the whole folder, as ``posrewrite FOLDER -o OUT`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # tests send nothing anywhere (read by olive at import)
pytest.importorskip("torch")
pytest.importorskip("olive")

ROOT = Path(__file__).resolve().parents[1]
L = 64


def _documented_workflow() -> dict:
    from tests.test_docs import parse

    return json.loads(parse(ROOT / "docs" / "olive.md").files["workflow.json"])


def _run(config: dict) -> None:
    from olive.workflows import run

    from posrewrite.olive import package_config

    run(config, package_config=package_config())


@pytest.mark.slow
def test_documented_workflow_equals_hf_yarn(llama_onnx, tmp_path):
    from fixtures.hf_models import hf_logits, ort_logits

    config = _documented_workflow()
    assert config["passes"]["rescale"]["type"] == "PosRewrite"
    config["input_model"]["model_path"] = str(llama_onnx)
    config["output_dir"] = str(tmp_path / "out")
    config["cache_dir"] = str(tmp_path / "cache")
    _run(config)
    out = tmp_path / "out" / "model.onnx"
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "GroupQueryAttention" in ops  # fuse: ort
    meta = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    (item,) = json.loads(meta["posrewrite.rewrites"])
    assert item["rope_parameters"][0]["rope_type"] == "yarn" and item["context_length"] == 4 * L
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    for n in (L // 2, 3 * L):
        ids = np.random.default_rng(n).integers(3, 128, size=(1, n))
        ref = hf_logits("llama", ids, rope_parameters=params)
        got = ort_logits(out, ids)
        # fp32 logits of magnitude ~1: HF vs the fused onnxruntime graph differ by float32 round-off only
        assert float(np.max(np.abs(ref - got))) <= 1e-5


def test_pass_on_a_model_builder_folder(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from fixtures.genai_models import genai_folder
    src = tmp_path / "genai"
    shutil.copytree(genai_folder("llama"), src)
    context = json.loads((src / "genai_config.json").read_text())["model"]["context_length"]
    _run({
        "input_model": {"type": "ONNXModel", "model_path": str(src), "onnx_file_name": "model.onnx"},
        "passes": {"extend": {"type": "PosRewrite", "rope_scale": 2, "rope_method": "yarn"}},
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "log_severity_level": 3,
    })
    out = tmp_path / "out"
    assert json.loads((out / "genai_config.json").read_text())["model"]["context_length"] == 2 * context
    assert (out / "tokenizer.json").is_file()
    # HF's Llama with the same weights and rope_parameters, past the old context (the builder's fixtures are
    # built so that its model equals HF's: fixtures.genai_models)
    import torch

    from fixtures.genai_models import hf_model, onnx_logits

    ids = np.random.default_rng(1).integers(3, 128, size=(1, 3 * context // 2))
    ref = hf_model("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                             "original_max_position_embeddings": context})
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    assert float(np.max(np.abs(onnx_logits(out / "model.onnx", ids) - want))) <= 1e-5
