"""posrewrite.torch.export_onnx: export + rewrite + fused ONNX op + onnxruntime, compared with HF."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import posrewrite.torch as pt  # noqa: E402
from fixtures.hf_models import LogitsOnlyWithPositions, build_hf_model  # noqa: E402

L = 64


def _example():
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(8)[None].expand(2, -1).contiguous()


def _dynamic():
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=4096)
    return ({0: b, 1: s}, {0: b, 1: s})


def _ort(path, ids, pos):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (ids.numpy(), pos.numpy()), strict=True)))[0]


@pytest.mark.parametrize(
    "arch,fuse,method,rope_parameters,domain",
    [
        ("llama", "ort", "yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
         "com.microsoft"),
        ("gpt_neox", "onnx", "dynamic", {"rope_type": "dynamic", "factor": 4.0}, "ai.onnx"),
    ],
)
def test_export_onnx_fused_matches_hf(tmp_path, arch, fuse, method, rope_parameters, domain):
    model = build_hf_model(arch, num_hidden_layers=1)  # one layer keeps the ONNX export short
    result = pt.export_onnx(
        LogitsOnlyWithPositions(model), _example(), tmp_path / f"{arch}.onnx", dynamic_shapes=_dynamic(),
        input_names=["input_ids", "position_ids"], output_names=["logits"], optimize=False,
        rope_scale=4.0, rope_method=method, fuse=fuse,  # L comes from model.config
    )
    assert result.path.is_file()
    assert result.onnx_ops.get(f"{domain}::RotaryEmbedding") == 2  # q and k
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    assert any("fuse-rope" in m for m in result.messages)
    # the export records what was done, as every posrewrite output does
    import json

    import onnx

    meta = {p.key: p.value for p in onnx.load(result.path, load_external_data=False).metadata_props}
    (item,) = json.loads(meta["posrewrite.rewrites"])
    assert item["options"]["rope_scale"] == 4.0 and item["options"]["fuse"] == fuse
    # longer than the training length, another batch size
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(150)[None]
    got = _ort(result.path, ids, pos)
    with torch.no_grad():
        torch_out = result.program.module()(ids, pos).numpy()
        hf_model = build_hf_model(arch, rope_parameters=rope_parameters, num_hidden_layers=1)
        hf = hf_model(input_ids=ids, position_ids=pos, use_cache=False).logits.numpy()
    assert np.abs(got - torch_out).max() <= 1e-5
    assert np.abs(got - hf).max() <= 1e-5
