"""RoPE written in forms no pattern knows, exported by these tests with torch.onnx.export(dynamo=True) and a
dynamic sequence axis: a rotation by -theta (the pairs turned the other way), 2x2 rotation matrices applied with
einsum, and positions made from a mask's cumulative sum (an input whose name says nothing). Each rescale must
equal the module itself built with the scaled positions (linear) or the new base (NTK-aware: b·s^(d/(d-2))), and
pass the built-in validation; the rotation by -theta also fused into onnxruntime's RotaryEmbedding."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from posrewrite.cli import main  # noqa: E402

D, H = 32, 2
BASE = 10000.0
TOL = 1e-5  # relative to max |scores|: float32 round-off of angles up to 300 positions, well under 1e-5


def _inv_freq(base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)).float()


class _Scores(torch.nn.Module):
    """x [1, S, H·D] -> q, k -> `rope` on each (positions / scale, frequencies of `base`) -> scores [1, H, S, S]."""

    def __init__(self, base: float = BASE, scale: float = 1.0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.q = torch.nn.Linear(D * H, D * H, bias=False)
            self.k = torch.nn.Linear(D * H, D * H, bias=False)
        self.base, self.scale = base, scale

    def positions(self, x, cues):
        return torch.arange(x.shape[1], dtype=torch.float32)

    def forward(self, x, *cues):
        b, s, _ = x.shape
        pos = self.positions(x, cues) / self.scale
        q = self.rope(self.q(x), pos).view(b, s, H, D)
        k = self.rope(self.k(x), pos).view(b, s, H, D)
        return torch.einsum("bshd,bthd->bhst", q, k)


class NegativeAngle(_Scores):
    """rotate-half turned the other way: x·cos + cat(x2, -x1)·sin (a rotation by -theta)."""

    def rope(self, x, pos):
        b, s, _ = x.shape
        ang = torch.outer(pos, _inv_freq(self.base))
        emb = torch.cat([ang, ang], -1)
        xh = x.view(b, s, H, D)
        x1, x2 = xh.chunk(2, -1)
        turned = torch.cat([x2, -x1], -1)
        return (xh * emb.cos()[None, :, None] + turned * emb.sin()[None, :, None]).reshape(b, s, H * D)


class RotationMatrices(_Scores):
    """R(p) [S, D/2, 2, 2] stacked from cos/sin, applied to adjacent pairs with einsum."""

    def rope(self, x, pos):
        b, s, _ = x.shape
        ang = pos[:, None] * _inv_freq(self.base)[None, :]
        c, sn = ang.cos(), ang.sin()
        rot = torch.stack([torch.stack([c, -sn], -1), torch.stack([sn, c], -1)], -2)
        pairs = x.view(b, s, H, D // 2, 2)
        return torch.einsum("sfij,bshfj->bshfi", rot, pairs).reshape(b, s, H * D)


class _FromMask:
    """positions = cumsum(mask) - 1 clamped at 0 (left padding aware)."""

    def positions(self, x, cues):
        return (cues[0].cumsum(-1) - 1).clamp(min=0)[0].float()


class MaskPositions(_FromMask, _Scores):
    """positions from a mask, rotate-half written as HF writes it (a known pattern)."""

    def rope(self, x, pos):
        b, s, _ = x.shape
        ang = torch.outer(pos, _inv_freq(self.base))
        emb = torch.cat([ang, ang], -1)
        xh = x.view(b, s, H, D)
        x1, x2 = xh[..., : D // 2], xh[..., D // 2:]
        return (xh * emb.cos()[None, :, None] + torch.cat([-x2, x1], -1) * emb.sin()[None, :, None]).reshape(
            b, s, H * D)


class MaskNegativeAngle(_FromMask, NegativeAngle):
    """positions from a mask, rotated by -theta (identified by probing: the mask input is a position input)."""


class MaskRotationMatrices(_FromMask, RotationMatrices):
    """positions from a mask, 2x2 rotation matrices by einsum (identified by probing)."""


class StartOffset(_Scores):
    """positions = 0..S-1 + a scalar start input (a past length); rotate-half."""

    def positions(self, x, cues):
        return torch.arange(x.shape[1], dtype=torch.float32) + cues[0].float()

    rope = MaskPositions.rope


def _export(module: _Scores, path: Path, with_mask: bool, start: bool = False) -> Path:
    x = torch.randn(1, 12, D * H)
    seq = torch.export.Dim("seq", max=4096)
    args = (x, torch.ones(1, 12, dtype=torch.int64)) if with_mask else (x,)
    dyn = ({1: seq}, ({1: seq},)) if with_mask else ({1: seq},)
    if start:
        args, dyn = (x, torch.tensor(5, dtype=torch.int64)), ({1: seq}, (None,))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # torch.onnx.export turns a nested (None,) into [None], which torch.export then rejects: the program
        # is exported first and handed over
        program = torch.export.export(module.eval(), args, dynamic_shapes=dyn, strict=False)
        torch.onnx.export(program, args, str(path), dynamo=True, external_data=False)
    return path


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


def _inspect(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    found = [e for e in json.loads(capsys.readouterr().out)["encodings"] if e["kind"] == "rope"]
    assert len(found) == 1
    return found[0]


def _masks(n: int) -> list[np.ndarray]:
    """A mask of ones and a left-padded one (3 pads: positions 0, 0, 0, 0, 1, ...)."""
    padded = np.ones((1, n), np.int64)
    padded[0, :3] = 0
    return [np.ones((1, n), np.int64), padded]


METHODS = [
    (["--rope-scale", "2", "--rope-method", "linear"], {"scale": 2.0}),
    (["--rope-scale", "4", "--rope-method", "ntk"], {"base": BASE * 4 ** (D / (D - 2))}),
]


def _check_rescales(cls, src: Path, tmp_path: Path, with_mask: bool, extra: list[str] = ()) -> None:
    for k, (options, reference_kw) in enumerate(METHODS):
        out = tmp_path / f"out{k}.onnx"
        assert main(["rewrite", str(src), *options, *extra, "-o", str(out)]) == 0
        reference = cls(**reference_kw).eval()
        sess, orig = _session(out), _session(src)
        for n in (40, 300):
            x = torch.randn(1, n, D * H, generator=torch.Generator().manual_seed(n))
            for mask in _masks(n) if with_mask else [None]:
                args = (x,) if mask is None else (x, torch.from_numpy(mask))
                with torch.no_grad():
                    ref = reference(*args).numpy()
                feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
                assert _rel(sess.run(None, feeds)[0], ref) <= TOL, (options, n)
                assert _rel(orig.run(None, feeds)[0], ref) > 1e-3  # the rescale matters at these positions


def test_rotation_by_negative_angle(tmp_path, capsys):
    """x·cos + cat(x2, -x1)·sin: rotate-half pairs turned the other way, read as a rotation by -theta
    (angle_sign -1), rescaled by every method to the module with scaled positions / the NTK base; the validation
    oracle rotates by -theta (a rescale that ignored the sign fails it: exit 6 on main before this)."""
    src = _export(NegativeAngle(), tmp_path / "neg.onnx", with_mask=False)
    found = _inspect(src, capsys)
    assert (found["layout"], found["rotary_dim"], found["angle_sign"]) == ("rotate_half", D, -1)
    assert found["base"] == pytest.approx(BASE, rel=1e-4)
    _check_rescales(NegativeAngle, src, tmp_path, with_mask=False)


def test_rotation_by_negative_angle_fused_into_rotary_embedding(tmp_path):
    """--fuse ort: onnxruntime's RotaryEmbedding turns by +theta; the fused model holds a negated sin cache and
    equals the module (rescaled x2 and as is) in onnxruntime."""
    import onnx

    src = _export(NegativeAngle(), tmp_path / "neg.onnx", with_mask=False)
    for options, reference_kw, name in ((["--rope-scale", "2", "--rope-method", "linear"], {"scale": 2.0}, "s2"),
                                        ([], {}, "plain")):
        out = tmp_path / f"fused_{name}.onnx"
        assert main(["rewrite", str(src), *options, "--fuse", "ort", "-o", str(out)]) == 0
        assert sum(n.op_type == "RotaryEmbedding" for n in onnx.load(str(out)).graph.node) == 2
        reference = NegativeAngle(**reference_kw).eval()
        sess = _session(out)
        for n in (40, 300):
            x = torch.randn(1, n, D * H, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                ref = reference(x).numpy()
            assert _rel(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref) <= TOL, (name, n)


def test_rotation_matrices_applied_with_einsum(tmp_path, capsys):
    """2x2 rotation matrices stacked from cos/sin and applied to adjacent pairs by one Einsum: the candidate is
    where cos/sin meet the activation in a matrix product; identified as interleaved RoPE of base 1e4."""
    src = _export(RotationMatrices(), tmp_path / "rot.onnx", with_mask=False)
    found = _inspect(src, capsys)
    assert (found["layout"], found["rotary_dim"], found["head_dim"]) == ("interleaved", D, D)
    assert found["base"] == pytest.approx(BASE, rel=1e-4)
    assert "angle_sign" not in found
    _check_rescales(RotationMatrices, src, tmp_path, with_mask=False)


@pytest.mark.parametrize("cls, layout, sign", [(MaskPositions, "rotate_half", None),
                                                (MaskNegativeAngle, "rotate_half", -1),
                                                (MaskRotationMatrices, "interleaved", None)])
def test_positions_from_a_mask_cumulative_sum(tmp_path, capsys, cls, layout, sign):
    """Positions cumsum(mask) - 1 from an input named `cues_0` by the exporter: the feed that gives positions
    0..S-1 (ones) is found by probing the angles, so the rotation probe treats it as positions (not hidden state)
    and the validation feeds it (it passes); the rescale equals the module with scaled positions for a mask of ones
    and a left-padded mask."""
    src = _export(cls(), tmp_path / "mask.onnx", with_mask=True)
    names = [i.name for i in _session(src).get_inputs()]
    assert not any("mask" in n.lower() or "pos" in n.lower() for n in names)
    found = _inspect(src, capsys)
    assert (found["layout"], found["rotary_dim"], found.get("angle_sign")) == (layout, D, sign)
    assert found["base"] == pytest.approx(BASE, rel=1e-4)
    _check_rescales(cls, src, tmp_path, with_mask=True)


def test_positions_from_a_start_input(tmp_path, capsys):
    """Positions 0..S-1 plus a scalar start input (fed 5 here, as a past length): validation feeds the start that
    gives positions 0..S-1 (0, found by probing); the rescale equals the module with scaled positions, start
    included ((t + 5) / 2)."""
    src = _export(StartOffset(), tmp_path / "start.onnx", with_mask=False, start=True)
    found = _inspect(src, capsys)
    assert (found["layout"], found["rotary_dim"]) == ("rotate_half", D)
    assert found["base"] == pytest.approx(BASE, rel=1e-4)
    for k, (options, reference_kw) in enumerate(METHODS):
        out = tmp_path / f"out{k}.onnx"
        assert main(["rewrite", str(src), *options, "-o", str(out)]) == 0
        reference = StartOffset(**reference_kw).eval()
        sess = _session(out)
        for n in (40, 300):
            x = torch.randn(1, n, D * H, generator=torch.Generator().manual_seed(n))
            start = torch.tensor(5, dtype=torch.int64)
            with torch.no_grad():
                ref = reference(x, start).numpy()
            feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (x, start), strict=True)}
            assert _rel(sess.run(None, feeds)[0], ref) <= TOL, (options, n)
