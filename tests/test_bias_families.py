"""Score biases found by what they compute: the families written here from their papers as small torch attention
modules (ALiBi relative and key-only, KERPLE log and power, Sandwich, T5 buckets, a bias MLP of the distance) and
x-transformers' own modules, each exported with torch.onnx.export(dynamo=True) with a dynamic sequence axis and
statically. Expected parameters are the modules' own; every offered rewrite is compared in onnxruntime with the
module run at the new length with the same formula."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
import onnx.utils  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from posrewrite import api, errors  # noqa: E402
from posrewrite.passes.onnx.detect import detect_other_encodings  # noqa: E402

H, D, V = 4, 32, 64
SHORT, LONG = 16, 48  # export length (static: the baked table's length) and the length rewrites are run at


# ------------------------------------------------------------------------------ the families, from the papers


def paper_slopes(n):
    """Press et al. 2021: the geometric sequence starting at 2^(-8/n) with that ratio (n a power of two)."""
    start = 2 ** (-8 / n)
    return [start ** (k + 1) for k in range(n)]


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """Raffel et al. 2020 (T5), rel = j - i: half the buckets per direction; exact below half of them, then
    logarithmic up to max_distance."""
    ret = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(n < exact, n, large)


class Bias(torch.nn.Module):
    """b_h(i, j) [H, S, S] of one family; `scale` divides the distances (distance interpolation)."""

    def __init__(self, family, causal=True, scale=1.0):
        super().__init__()
        self.family, self.causal, self.scale = family, causal, scale
        g = torch.Generator().manual_seed(1)
        if family == "alibi":
            self.register_buffer("m", torch.tensor(paper_slopes(H)).view(H, 1, 1))
        if family == "kerple_log":  # r1, r2 > 0 learned per head
            self.r1 = torch.nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(H, 1, 1))
            self.r2 = torch.nn.Parameter(torch.tensor([0.1, 0.5, 1.5, 4.0]).view(H, 1, 1))
        if family == "kerple_power":  # r1 > 0, 0 < r2 <= 2
            self.r1 = torch.nn.Parameter(torch.tensor([0.5, 1.0, 0.25, 2.0]).view(H, 1, 1))
            self.r2 = torch.nn.Parameter(torch.tensor([0.3, 0.7, 1.2, 1.9]).view(H, 1, 1))
        if family == "sandwich":  # p_i . p_j of sinusoids of dimension 64, base 10000, head h divided by 8h/H
            k = torch.arange(1, 33, dtype=torch.float32)
            self.register_buffer("w", 10000.0 ** (-2 * k / 64))
            self.register_buffer("r", (8 * torch.arange(1, H + 1, dtype=torch.float32) / H).view(H, 1, 1))
        if family == "t5":
            self.table = torch.nn.Parameter(torch.randn(16, H, generator=g))
        if family == "mlp":  # a dynamic position bias: a small network of the distance
            self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.SiLU(), torch.nn.Linear(16, H))

    def forward(self, s):
        p = torch.arange(s)
        d = (p[:, None] - p[None, :]).float() / self.scale  # i - j
        f = self.family
        if f == "alibi":
            b = -self.m * d
        elif f == "alibi_key":
            b = torch.tensor(paper_slopes(H)).view(H, 1, 1) * (p[None, :].float() / self.scale)
            b = b.expand(H, s, s)
        elif f == "kerple_log":
            b = -self.r1 * torch.log(1 + self.r2 * d.abs())
        elif f == "kerple_power":
            b = -self.r1 * d.abs() ** self.r2
        elif f == "sandwich":
            b = (torch.cos(d[..., None] * self.w).sum(-1) - 32) / self.r
        elif f == "t5":
            b = self.table[t5_bucket(p[None, :] - p[:, None], True, 16, 32)].permute(2, 0, 1)
        elif f == "mlp":
            b = self.net(d[..., None]).permute(2, 0, 1)
        if self.causal:
            b = b.masked_fill(p[None, :] > p[:, None], float("-inf"))
        return b


class XBias(torch.nn.Module):
    """x-transformers' bias modules, called as its Attention calls them: bias(i, j)."""

    def __init__(self, kind):
        super().__init__()
        import x_transformers.x_transformers as xt

        torch.manual_seed(2)
        self.kind = kind
        if kind == "alibi":
            self.mod = xt.AlibiPositionalBias(heads=H)
            self.mod(128, 128)  # its first call caches the bias as a buffer of 128 positions, later calls slice it
        elif kind == "t5":
            self.mod = xt.RelativePositionBias(scale=0.5, causal=False, num_buckets=16, max_distance=32, heads=H)
        else:
            self.mod = xt.DynamicPositionBias(dim=16, heads=H, depth=2)

    def forward(self, s):
        return self.mod(s, s)


class Attn(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, D)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.out = torch.nn.Linear(D, V)
        self.bias = bias

    def forward(self, input_ids):
        b, s = input_ids.shape
        q, k, v = self.qkv(self.emb(input_ids)).view(b, s, 3, H, D // H).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H) + self.bias(s)
        return self.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, D))


_EXPORTS: dict = {}


def export(name, module, dynamic, tmp_path_factory, length=SHORT):
    key = (name, dynamic, length)
    if key not in _EXPORTS:
        path = tmp_path_factory.mktemp("bias") / f"{name}-{'dyn' if dynamic else 'static'}.onnx"
        ids = torch.randint(0, V, (1, length))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (ids,), str(path), dynamo=True, input_names=["input_ids"],
                              output_names=["logits"], dynamic_shapes=({1: "seq"},) if dynamic else None,
                              external_data=False, verbose=False)
        _EXPORTS[key] = path
    return _EXPORTS[key]


def run(path, n, seed=0):
    ids = np.random.default_rng(seed).integers(0, V, size=(1, n)).astype(np.int64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0], ids


def torch_out(module, ids):
    with torch.no_grad():
        return module(torch.from_numpy(ids)).numpy()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def the_site(path):
    sites, refusals = detect_other_encodings(ir.load(path))
    assert len(sites) == 1, (sites, refusals)
    assert not refusals, refusals
    return sites[0]


def family_of(site):
    """(family, parameters) of what was found, whichever reader found it."""
    if site.kind == "alibi":
        return "linear", {"slopes": list(site.slopes)}
    if site.kind == "t5_relative_bias":
        return "bucketed", {"num_buckets": site.num_buckets, "max_distance": site.max_distance,
                            "bidirectional": site.bidirectional}
    return site.family, site.params


def assert_close(found, want, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(found, np.float64).reshape(-1), np.asarray(want, np.float64).reshape(-1),
                               rtol=rtol, atol=0)


def check_params(family, module, found):
    f, p = found
    if family in ("alibi", "alibi_key"):
        assert f == "linear"
        assert_close(p["slopes"], paper_slopes(H))
    elif family in ("kerple_log", "kerple_power"):
        assert f == family
        assert_close(p["r1"], module.r1.detach().numpy())
        assert_close(p["r2"], module.r2.detach().numpy())
    elif family == "sandwich":
        assert f == "sandwich" and p["dim"] == 64 and p["first"] == 1
        assert_close([p["base"]], [10000.0])
        assert_close(p["scale"], 1 / module.r.numpy())
    elif family == "t5":
        assert f == "bucketed" and p["num_buckets"] == 16 and p["bidirectional"] is True
        rel = np.arange(-4 * LONG, 4 * LONG)
        got = t5_bucket(torch.from_numpy(rel), True, 16, p["max_distance"]).numpy()
        np.testing.assert_array_equal(got, t5_bucket(torch.from_numpy(rel), True, 16, 32).numpy())


FAMILIES = ["alibi", "alibi_key", "kerple_log", "kerple_power", "sandwich", "t5"]
CAUSAL = {"sandwich": False, "t5": False}


def rewrite(path, out, **kw):
    return api.rewrite(path, output=out, validate=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_export(family, tmp_path_factory, tmp_path):
    bias = Bias(family, causal=CAUSAL.get(family, True))
    model = Attn(bias)
    path = export(family, model, True, tmp_path_factory, length=64 if family == "t5" else SHORT)
    site = the_site(path)
    check_params(family, bias, family_of(site))
    # the export runs at any length as the module does
    got, ids = run(path, LONG)
    assert rel_err(got, torch_out(model, ids)) <= 1e-5
    if family == "t5":
        return  # a bucket lookup has no distance interpolation; it runs at any length as is
    out = tmp_path / "scaled.onnx"
    rewrite(path, out, bias_scale=2.0)
    got, ids = run(out, LONG)
    scaled = Attn(Bias(family, causal=CAUSAL.get(family, True), scale=2.0))
    scaled.load_state_dict(model.state_dict())
    want = torch_out(scaled, ids)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(torch_out(model, ids), want) > 1e-3  # the scale changed the output


def bias_at(path, n):
    """The bias the rewritten model adds to the scores at n tokens (its bias subgraph run in onnxruntime with
    the scores as input)."""
    model = ir.load(path)
    (site,) = detect_other_encodings(model)[0]
    scores, bias = site.scores[0].name, site.bias.name
    add = site.add_nodes[0]
    bias = [v.name for v in add.inputs if v.name != scores][0]
    proto = onnx.load(str(path))
    sub = onnx.utils.Extractor(proto).extract_model([scores], [bias])
    for v in list(sub.graph.input) + list(sub.graph.output):
        for d in v.type.tensor_type.shape.dim[-2:]:
            d.dim_param = "n"
    del sub.graph.value_info[:]
    feeds = {scores: np.zeros((1, H, n, n), np.float32)}
    return ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_static_export(family, tmp_path_factory, tmp_path):
    bias = Bias(family, causal=CAUSAL.get(family, True))
    # T5: long enough for every bucket to be seen; Sandwich: for its slowest frequencies to show
    length = {"t5": 64, "sandwich": 256}.get(family, SHORT)
    path = export(family, Attn(bias), False, tmp_path_factory, length=length)
    site = the_site(path)
    assert site.kind == "score_bias" and site.source == "constant" and site.max_positions == length
    assert any("static export" in n and "dynamic" in n for n in site.notes)
    check_params(family, bias, family_of(site))
    n = 2 * length
    out = tmp_path / "ext.onnx"
    result = rewrite(path, out, max_positions=n)
    assert result.modified
    got = bias_at(out, n).reshape(H, n, n)
    with torch.no_grad():
        want = bias(n).numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert rel_err(got[fin], want[fin]) <= 1e-5


def test_bias_mlp_is_reported_not_rewritten(tmp_path_factory, tmp_path):
    path = export("mlp", Attn(Bias("mlp")), True, tmp_path_factory)
    site = the_site(path)
    assert site.kind == "score_bias" and site.family == "learned_network" and not site.rewritable
    assert "learned function of distance" in site.reason
    with pytest.raises(errors.PartialMatchError):
        rewrite(path, tmp_path / "x.onnx", bias_scale=2.0)
    assert not (tmp_path / "x.onnx").exists()


def test_bias_mlp_static_is_refused_as_seen(tmp_path_factory, tmp_path):
    """Folded into a constant by a static export, the network is gone: a table of i - j that no family fits."""
    path = export("mlp", Attn(Bias("mlp")), False, tmp_path_factory)
    sites, refusals = detect_other_encodings(ir.load(path))
    assert not sites and len(refusals) == 1
    assert "function of i - j that fits no known family" in refusals[0].reason
    with pytest.raises((errors.PartialMatchError, errors.NoEncodingError)):  # refused: nothing understood
        rewrite(path, tmp_path / "x.onnx", max_positions=64)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("kind,family", [("alibi", "linear"), ("t5", "bucketed"), ("dpb", "learned_network")])
@pytest.mark.parametrize("dynamic", [True, False])
def test_x_transformers_modules(kind, family, dynamic, tmp_path_factory):
    if kind == "dpb" and not dynamic:
        family = None  # folded by a static export: a table that no family fits (refused, see the MLP test)
    pytest.importorskip("x_transformers")
    try:
        path = export(f"x-{kind}", Attn(XBias(kind)), dynamic, tmp_path_factory, length=64)
    except Exception as exc:  # noqa: BLE001 - torch.export's own refusal, checked below
        if dynamic and "inferred a static shape" in str(exc):
            pytest.skip(f"x-transformers' {kind} module specialises the length under torch.export")
        raise
    if family is None:
        sites, refusals = detect_other_encodings(ir.load(path))
        assert not sites and "fits no known family" in refusals[0].reason
        return
    site = the_site(path)
    found, params = family_of(site)
    assert found == family
    if family == "linear":
        assert_close(params["slopes"], paper_slopes(H))
