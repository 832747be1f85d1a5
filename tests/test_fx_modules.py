"""fx passes on small hand-written RoPE modules: the spellings detection must accept (operand orders, sub,
split/chunk halves, cat-of-unsqueeze interleave, matmul angles, in-forward inv_freq, [b, s, h, d] layout),
fp32-safe positions, and explained refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import posrewrite.torch as pt  # noqa: E402
from posrewrite.errors import NoEncodingError, PartialMatchError  # noqa: E402
from posrewrite.math import rope as rope_math  # noqa: E402
from posrewrite.passes.fx.detect_rope import detect_rope  # noqa: E402
from posrewrite.passes.fx.pipeline import prepare  # noqa: E402

HEAD, HEADS, KV = 8, 2, 1
BASE = 10000.0


class RopeAttention(torch.nn.Module):
    """q/k projections + RoPE written in one of several styles + a score matmul."""

    def __init__(self, style: str, rotary_dim: int = HEAD, angle_dtype=torch.float32, table_dtype=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.style, self.rotary_dim, self.angle_dtype = style, rotary_dim, angle_dtype
        self.table_dtype = table_dtype or angle_dtype
        self.wq = torch.nn.Parameter(torch.randn(HEADS * HEAD, 16, generator=g) * 0.3)
        self.wk = torch.nn.Parameter(torch.randn(KV * HEAD, 16, generator=g) * 0.3)
        if style != "inline_inv_freq":
            inv = torch.from_numpy(rope_math.default_inv_freq(BASE, rotary_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

    def _inv_freq(self):
        if self.style == "inline_inv_freq":
            return 1.0 / (BASE ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim))
        return self.inv_freq

    def _cos_sin(self, pos):
        inv = self._inv_freq()
        if self.style == "matmul":  # HF 4.x: (inv_freq[None, :, None] @ pos[:, None, :]).transpose(1, 2)
            inv_e = inv[None, :, None].float().expand(pos.shape[0], -1, 1)
            freqs = (inv_e @ pos[:, None, :].float()).transpose(1, 2)
        else:
            freqs = pos[..., None].to(self.angle_dtype) * inv.to(self.angle_dtype)
        interleaved = self.style.startswith("interleaved")
        emb = torch.repeat_interleave(freqs, 2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.table_dtype), emb.sin().to(self.table_dtype)

    def _rotate(self, x, cos, sin):
        r = self.rotary_dim
        xr, xp = x[..., :r], x[..., r:]
        h = r // 2
        if self.style == "sub":  # x*cos - cat(x2, -x1)*sin
            out = xr * cos - torch.cat((xr[..., h:], -xr[..., :h]), dim=-1) * sin
        elif self.style == "swapped":  # cos*x + sin*rot, add operands swapped
            x1, x2 = xr.chunk(2, dim=-1)
            out = sin * torch.cat((-x2, x1), dim=-1) + cos * xr
        elif self.style == "interleaved_cat":
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            rot = torch.cat(((-x2).unsqueeze(-1), x1.unsqueeze(-1)), dim=-1).reshape(xr.shape)
            out = xr * cos + rot * sin
        elif self.style.startswith("interleaved"):
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = xr * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin
        else:
            x1, x2 = torch.split(xr, h, dim=-1)
            out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out, xp), dim=-1) if r < x.shape[-1] else out

    def forward(self, x, pos):
        b, s, _ = x.shape
        bshd = self.style == "interleaved_bshd"
        q = (x @ self.wq.T).view(b, s, HEADS, HEAD)
        k = (x @ self.wk.T).view(b, s, KV, HEAD)
        if not bshd:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self._cos_sin(pos)
        cos, sin = cos.unsqueeze(2 if bshd else 1), sin.unsqueeze(2 if bshd else 1)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if bshd:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q @ k.transpose(-1, -2).repeat_interleave(HEADS // KV, dim=1)


STYLES = ["split", "sub", "swapped", "matmul", "inline_inv_freq", "interleaved", "interleaved_cat",
          "interleaved_bshd"]


def _export(module, seq=6):
    x = torch.randn(2, seq, 16, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq)[None].expand(2, -1).contiguous()
    b, s = torch.export.Dim("b"), torch.export.Dim("s", max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, (x, pos), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))


def _inputs(seq, offset=0, seed=2):
    x = torch.randn(3, seq, 16, generator=torch.Generator().manual_seed(seed))
    return x, (torch.arange(seq) + offset)[None].expand(3, -1).contiguous()


@pytest.mark.parametrize("style,partial", [(s, False) for s in STYLES] +
                         [(s, True) for s in ("split", "sub", "interleaved", "interleaved_bshd")])
def test_spellings_detect_rescale_and_fuse(style, partial):
    r = 4 if partial else HEAD
    module = RopeAttention(style, rotary_dim=r)
    ep = _export(module)
    sites, refusals = detect_rope(prepare(ep))
    assert not refusals and len(sites) == 1, style
    site = sites[0]
    assert site.layout.value == ("interleaved" if style.startswith("interleaved") else "rotate_half")
    assert (site.rotary_dim, site.head_dim, site.rotations) == (r, HEAD, 2)
    assert site.angles.value == "computed" and site.base == pytest.approx(BASE)

    x, pos = _inputs(11, offset=30)
    # linear x4 == positions / 4
    scaled = pt.rewrite(ep, rope_scale=4.0, rope_method="linear", fuse=True)
    assert sum(n.op == "call_function" and "posrewrite" in str(n.target) for n in scaled.graph.nodes) == 1
    with torch.no_grad():
        got = scaled.module()(x, pos)
        want = module(x, pos.float() / 4.0)
    assert (got - want).abs().max().item() <= 1e-5


def test_fp32_positions_fixes_half_precision_angles():
    module = RopeAttention("split", angle_dtype=torch.bfloat16)
    ep = _export(module)
    site = detect_rope(prepare(ep))[0][0]
    assert (site.source.position_dtype, site.source.angle_dtype) == ("bfloat16", "bfloat16")
    messages: list[str] = []
    new = pt.rewrite(ep, fp32_positions=True, messages=messages)
    assert any("float32" in m for m in messages)
    new_site = detect_rope(prepare(new))[0][0]
    assert (new_site.source.position_dtype, new_site.source.angle_dtype) == ("float32", "float32")

    x, pos = _inputs(8, offset=3000)
    # what the pass promises: float32 angles, cos/sin rounded to the graph's bf16 only at the end
    fixed = RopeAttention("split", angle_dtype=torch.float32, table_dtype=torch.bfloat16)
    exact = RopeAttention("split", angle_dtype=torch.float32)
    with torch.no_grad():
        assert (new.module()(x, pos) - fixed(x, pos)).abs().max().item() <= 1e-5
        want = exact(x, pos)
        err_before = (module(x, pos) - want).abs().max().item()
        err_after = (new.module()(x, pos) - want).abs().max().item()
    assert err_after < 0.1 * err_before  # bf16 positions near 3000 collapse to multiples of 16
    # nothing to do on a float32 graph
    messages.clear()
    pt.rewrite(_export(exact), fp32_positions=True, messages=messages)
    assert any("already float32" in m for m in messages)


class NotRope(torch.nn.Module):
    """x*c + cat(-x2, x1)*s with unrelated tables c and s: shaped like RoPE, but c is not [f, f]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("c", torch.randn(64, HEAD, generator=g))
        self.register_buffer("s", torch.randn(64, HEAD, generator=g))

    def forward(self, x, pos):
        q = x.view(x.shape[0], x.shape[1], 2, HEAD).transpose(1, 2)
        c, s = self.c[pos].unsqueeze(1), self.s[pos].unsqueeze(1)
        x1, x2 = q[..., : HEAD // 2], q[..., HEAD // 2:]
        return q * c + torch.cat((-x2, x1), dim=-1) * s


def test_refusals_are_explained():
    ep = _export(NotRope())
    with pytest.raises(PartialMatchError, match="repeats each angle"):
        pt.rewrite(ep, fuse=True)
    messages: list[str] = []
    same = pt.rewrite(ep, fuse=True, allow_partial=True, messages=messages)
    assert any("not fused" in m for m in messages)
    x, pos = _inputs(5)
    with torch.no_grad():
        assert torch.equal(same.module()(x, pos), ep.module()(x, pos))
    with pytest.raises(PartialMatchError, match="table"):
        pt.rewrite(ep, rope_scale=2.0)

    class Plain(torch.nn.Module):
        def forward(self, x, pos):
            return x * 2

    with pytest.raises(NoEncodingError):
        pt.rewrite(_export(Plain()), fuse=True)


def test_sites_json():
    site = pt.detect(_export(RopeAttention("interleaved", rotary_dim=4)))[0]
    d = site.to_dict()
    assert d["kind"] == "rope" and d["layout"] == "interleaved" and d["rotary_dim"] == 4 and d["rotations"] == 2
    assert d["angles"] == "computed" and d["position_dtype"] == "float32"
    assert np.isclose(d["base"], BASE)


def test_alibi_detected_in_bloom():
    transformers = pytest.importorskip("transformers")
    from posrewrite.math.alibi import alibi_slopes

    cfg = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask, use_cache=False).logits

    ids = torch.randint(0, 128, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Logits(model), (ids, torch.ones(2, 8, dtype=torch.long)))
    sites = [s for s in pt.detect(ep) if s.kind == "alibi"]
    assert len(sites) == 1
    d = sites[0].to_dict()
    assert d["num_heads"] == 4
    np.testing.assert_allclose(d["slopes"], alibi_slopes(4), rtol=1e-6)
    assert not [s for s in pt.detect(ep) if s.kind == "rope"]
