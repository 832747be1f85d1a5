"""The fused RoPE custom ops: reference vs the shared math, opcheck, autograd, Triton (interpreter on CPU,
real kernel on CUDA when present) and ONNX export to both RotaryEmbedding targets."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import posrewrite.ops  # noqa: E402,F401
from posrewrite.math import rope as rope_math  # noqa: E402
from posrewrite.ops.rope import angles_cos_sin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ops = torch.ops.posrewrite


def _inputs(seq_axis=2, hq=4, hk=2, batch=2, seq=5, head_dim=16, rotary_dim=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shp = (lambda h: (batch, h, seq, head_dim)) if seq_axis == 2 else (lambda h: (batch, seq, h, head_dim))
    q = torch.randn(shp(hq), generator=g).to(dtype)
    k = torch.randn(shp(hk), generator=g).to(dtype)
    pos = torch.randint(0, 300, (batch, seq), generator=g)
    inv = torch.from_numpy(rope_math.default_inv_freq(10000.0, rotary_dim))
    return q, k, pos, inv


def _numpy_reference(x, pos, inv, factor, layout, rotary_dim, seq_axis):
    """posrewrite.math.rope on the [.., seq, head_dim] view."""
    xb = x if seq_axis == 2 else x.transpose(1, 2)
    cos, sin = rope_math.cos_sin_tables(inv.numpy(), pos.numpy(), attention_factor=factor, layout="half")
    out = rope_math.apply_rotary(xb.double().numpy(), cos[:, None].astype(np.float64), sin[:, None].astype(np.float64),
                                 layout=layout, rotary_dim=rotary_dim)
    out = torch.from_numpy(out)
    return out if seq_axis == 2 else out.transpose(1, 2)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("seq_axis", [1, 2])
def test_reference_matches_shared_math(interleaved, seq_axis):
    q, k, pos, inv = _inputs(seq_axis)
    cos, sin = angles_cos_sin(pos, inv, 1.25, seq_axis)
    layout = "interleaved" if interleaved else "rotate_half"
    qo, ko = ops.rope_qk(q, k, cos, sin, interleaved, 12, seq_axis)
    qf, kf = ops.rope_qk_freqs(q, k, pos, inv, 1.25, interleaved, seq_axis)
    for got, x in ((qo, q), (ko, k), (qf, q), (kf, k)):
        want = _numpy_reference(x, pos, inv, 1.25, layout, 12, seq_axis)
        assert got.shape == x.shape and got.stride() == x.stride()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    single = ops.rope(q, cos, sin, interleaved, 12, seq_axis)
    assert torch.equal(single, qo)


def test_output_dtype_follows_promotion():
    q, k, pos, inv = _inputs(dtype=torch.bfloat16)
    cos, sin = angles_cos_sin(pos, inv, 1.0, 2)
    qo, ko = ops.rope_qk(q, k, cos, sin, False, 12, 2)  # bf16 x fp32 -> fp32, as the unfused graph
    assert qo.dtype == torch.float32
    qo, _ = ops.rope_qk(q, k, cos.bfloat16(), sin.bfloat16(), False, 12, 2)
    assert qo.dtype == torch.bfloat16


def test_bad_arguments_are_refused():
    q, k, pos, inv = _inputs()
    cos, sin = angles_cos_sin(pos, inv, 1.0, 2)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rope(q, cos, sin, False, 10, 2)
    with pytest.raises(ValueError, match="seq_axis"):
        ops.rope(q, cos, sin, False, 12, 3)


def test_opcheck_all_ops():
    q, k, pos, inv = _inputs(batch=1, seq=3)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = angles_cos_sin(pos, inv, 1.0, 2)
    cos.requires_grad_()
    sin.requires_grad_()
    cases = [
        (ops.rope_qk.default, (q, k, cos, sin, False, 12, 2)),
        (ops.rope.default, (q, cos, sin, True, 12, 2)),
        (ops.rope_qk_freqs.default, (q, k, pos, inv, 1.5, True, 2)),
        (ops.rope_freqs.default, (q, pos, inv, 1.5, False, 2)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_gradients_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for interleaved in (False, True):
        def fn(a, b, c_, s_, il=interleaved):
            return ops.rope_qk(a, b, c_, s_, il, 6, 2)

        assert torch.autograd.gradcheck(fn, (q, k, c, s))


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from posrewrite.math import rope as rope_math
    from posrewrite.ops.rope import angles_cos_sin, rotate_reference
    from posrewrite.ops.rope_triton import launch
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for interleaved in (False, True):
        for seq_axis in (1, 2):
            for rotary_dim in (16, 12):
                shp = (lambda h: (2, h, 3, 16)) if seq_axis == 2 else (lambda h: (2, 3, h, 16))
                q, k = torch.randn(shp(4), generator=g), torch.randn(shp(2), generator=g)
                if seq_axis == 2:  # HF layout: a transposed view of [b, s, h, d]
                    q = q.transpose(1, 2).contiguous().transpose(1, 2)
                pos = torch.randint(0, 5000, (2, 3), generator=g)
                inv = torch.from_numpy(rope_math.default_inv_freq(10000.0, rotary_dim))
                cos, sin = angles_cos_sin(pos, inv, 1.1, seq_axis)
                for kw in (dict(cos=cos, sin=sin), dict(positions=pos, inv_freq=inv, attention_factor=1.1)):
                    qo, ko = launch(q, k, interleaved=interleaved, rotary_dim=rotary_dim, seq_axis=seq_axis,
                                    out_dtype=torch.float32, **kw)
                    assert qo.stride() == q.stride()
                    for got, x in ((qo, q), (ko, k)):
                        want = rotate_reference(x, cos, sin, interleaved, rotary_dim)
                        worst = max(worst, (got - want).abs().max().item())
                qo, none = launch(q, None, cos=cos, sin=sin, interleaved=interleaved, rotary_dim=rotary_dim,
                                  seq_axis=seq_axis, out_dtype=torch.float32)
                assert none is None
                worst = max(worst, (qo - rotate_reference(q, cos, sin, interleaved, rotary_dim)).abs().max().item())
    print("WORST", worst)
    """
)


def test_triton_kernel_in_interpreter():
    """The Triton kernel itself (q+k in one launch, GQA, partial, both layouts, tables and in-kernel angles),
    run on CPU by Triton's interpreter in a fresh process (TRITON_INTERPRET must be set before import)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_reference(dtype):
    q, k, pos, inv = _inputs(dtype=dtype, seq=33, hq=8, hk=2, head_dim=64, rotary_dim=64)
    q, k, pos, inv = q.cuda(), k.cuda(), pos.cuda(), inv.cuda()
    for interleaved in (False, True):
        cos, sin = angles_cos_sin(pos, inv, 1.0, 2)
        qo, ko = ops.rope_qk(q, k, cos.to(dtype), sin.to(dtype), interleaved, 64, 2)
        qf, kf = ops.rope_qk_freqs(q, k, pos, inv, 1.0, interleaved, 2)
        for got, x in ((qo, q), (ko, k), (qf, q), (kf, k)):
            want = posrewrite.ops.rotate_reference(x.cpu(), cos.cpu(), sin.cpu(), interleaved, 64).to(dtype)
            torch.testing.assert_close(got.cpu(), want, atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------


class _Rotary(torch.nn.Module):
    def __init__(self, interleaved, seq_axis, freqs):
        super().__init__()
        self.interleaved, self.seq_axis, self.freqs = interleaved, seq_axis, freqs
        self.register_buffer("inv_freq", torch.from_numpy(rope_math.default_inv_freq(10000.0, 12)))

    def forward(self, q, k, pos):
        if self.freqs:
            return ops.rope_qk_freqs(q, k, pos, self.inv_freq, 1.25, self.interleaved, self.seq_axis)
        cos, sin = angles_cos_sin(pos, self.inv_freq, 1.0, self.seq_axis)
        return ops.rope_qk(q, k, cos, sin, self.interleaved, 12, self.seq_axis)


@pytest.mark.parametrize(
    "target,interleaved,seq_axis,freqs",
    [("com.microsoft", False, 2, False), ("com.microsoft", True, 1, True), ("onnx", True, 2, False),
     ("onnx", False, 1, True)],
)
def test_onnx_export_to_rotary_embedding(target, interleaved, seq_axis, freqs):
    ort = pytest.importorskip("onnxruntime")
    from posrewrite.ops.rope_onnx import onnx_opset_for, translation_table

    q, k, pos, _ = _inputs(seq_axis)
    model = _Rotary(interleaved, seq_axis, freqs)
    seq_dim = 2 if seq_axis == 2 else 1
    b, s = torch.export.Dim("b"), torch.export.Dim("s")
    dyn = {"q": {0: b, seq_dim: s}, "k": {0: b, seq_dim: s}, "pos": {0: b, 1: s}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (q, k, pos), dynamo=True, dynamic_shapes=dyn, optimize=False,
                                 custom_translation_table=translation_table(target),
                                 opset_version=onnx_opset_for(target))
    domain = "com.microsoft" if target == "com.microsoft" else ""
    rotary = [n for n in prog.model_proto.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 2 and all(n.domain == domain for n in rotary)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # another batch and length than the example
    q2, k2, pos2, _ = _inputs(seq_axis, batch=3, seq=7, seed=3)
    got = sess.run(None, {"q": q2.numpy(), "k": k2.numpy(), "pos": pos2.numpy()})
    want = model(q2, k2, pos2)
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b_.numpy(), atol=1e-5)
