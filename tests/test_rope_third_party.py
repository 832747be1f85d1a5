"""RoPE from libraries nobody here wrote, exported by these tests with torch.onnx.export(dynamo=True) and a dynamic
sequence axis: rotary-embedding-torch (plain and xPos), x-transformers, and Hugging Face's gpt-oss, DeepSeek-V3
and Llama 4. Each must be identified with the right parameters (base, rotary dim, pairing, partial range) and
every offered rescale must equal the library's own equivalent: the library rebuilt with its interpolation
setting (rotary-embedding-torch `interpolate_factor`, x-transformers `interpolation_factor`), HF rebuilt with the
new `rope_parameters`, or a numpy reference written here from the paper where the library has none."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from fixtures.cache import cached

torch = pytest.importorskip("torch")

VOCAB = 64
SEQ = 40  # positions compared (past the original contexts below)


def _export(module, path: Path, *, vocab: int = VOCAB, strict: bool = False) -> None:
    """torch.onnx.export(dynamo=True) with dynamic batch and sequence; `strict`: the module is first exported by
    torch.export.export(strict=True) (dynamo traces len(t) symbolically where the non-strict export fixes it) and
    that program handed to torch.onnx.export."""
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    dyn = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if strict:  # rotary-embedding-torch's cache guard compares the length with cache_max_seq_len (8192)
            dyn = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=8192)},)
            program = torch.export.export(module.eval(), (ids,), dynamic_shapes=dyn, strict=True)
            torch.onnx.export(program, (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                              dynamo=True)
            return
        torch.onnx.export(module.eval(), (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                          dynamo=True, dynamic_shapes=dyn)


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.astype(np.int64)})[0]


def _torch_out(module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(ids.astype(np.int64))).float().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


# -- rotary-embedding-torch --------------------------------------------------------------------------------------


class _TinyAttention(torch.nn.Module if hasattr(torch, "nn") else object):
    """ids -> embedding -> q, k, v -> `rotate` -> causal attention -> logits; `rotate(q, k)` is the library's."""

    def __init__(self, rotate, *, heads: int = 2, head_dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            width = heads * head_dim
            self.emb = torch.nn.Embedding(VOCAB, width)
            self.q = torch.nn.Linear(width, width)
            self.k = torch.nn.Linear(width, width)
            self.v = torch.nn.Linear(width, width)
            self.o = torch.nn.Linear(width, VOCAB)
        self.rotate, self.heads = rotate, heads

    def forward(self, ids):
        x = self.emb(ids)
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, self.heads, -1).transpose(1, 2)

        q, k = self.rotate(split(self.q(x)), split(self.k(x)))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, split(self.v(x)), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


def ret_module(*, xpos: bool = False, interpolate_factor: float = 1.0, theta: float = 10000.0):
    from rotary_embedding_torch import RotaryEmbedding

    rot = RotaryEmbedding(dim=16, theta=theta, use_xpos=xpos, interpolate_factor=interpolate_factor,
                          cache_if_possible=False)
    if xpos:
        module = _TinyAttention(rot.rotate_queries_and_keys)
    else:
        module = _TinyAttention(lambda q, k: (rot.rotate_queries_or_keys(q), rot.rotate_queries_or_keys(k)))
    module.rot = rot
    return module


def export_ret(*, xpos: bool = False, strict: bool = False) -> Path:
    pytest.importorskip("rotary_embedding_torch")
    key = {"kind": "third-party-ret", "xpos": xpos, **({"strict": True} if strict else {})}
    path, _ = cached(key, lambda tmp: _export(ret_module(xpos=xpos), tmp / "model.onnx", strict=strict) or {})
    return path


# -- a spelling written here: real pairs on merged heads [B, S, H·D] (Llama 4's rotation, heads not split) -----


class MergedHeadsPairs(torch.nn.Module if hasattr(torch, "nn") else object):
    """Meta's complex rotation in real pairs applied to q/k as [B, S, H·D] (the heads are only split by the view
    into pairs), then causal attention. `factor` divides the positions (linear interpolation: the reference)."""

    def __init__(self, *, factor: float = 1.0, base: float = 10000.0, heads: int = 2, head_dim: int = 16,
                 heads_out: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            width = heads * head_dim
            self.emb = torch.nn.Embedding(VOCAB, width)
            self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
            self.o = torch.nn.Linear(width, VOCAB)
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv)
        self.heads, self.head_dim, self.factor, self.heads_out = heads, head_dim, factor, heads_out

    def _rotate(self, x, cos, sin):
        b, s, _ = x.shape
        pairs = x.view(b, s, self.heads, self.head_dim // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        # Llama 4's flatten(3): [B, S, H·D] in, [B, S, H, D] out
        return out.flatten(3).reshape(b, s, -1) if self.heads_out else out.reshape(b, s, -1)

    def forward(self, ids):
        x = self.emb(ids)
        b, s, _ = x.shape
        angles = (torch.arange(s, dtype=torch.float32) / self.factor)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        q, k = self._rotate(self.q(x), cos, sin), self._rotate(self.k(x), cos, sin)

        def split(t):
            return t.view(b, s, self.heads, -1).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(self.v(x)), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


def export_merged(*, heads_out: bool = False) -> Path:
    path, _ = cached({"kind": "third-party-merged-heads", "heads_out": heads_out},
                     lambda tmp: _export(MergedHeadsPairs(heads_out=heads_out), tmp / "model.onnx") or {})
    return path


# -- a spelling written here: partial interleaved RoPE through a pairs view (einsum angles, unbind, stack) --------


class PartialPairsRope(torch.nn.Module if hasattr(torch, "nn") else object):
    """Hand-written attention with partial interleaved RoPE: the first `rot` of `head_dim` channels viewed as
    [.., rot/2, 2] pairs, unbound, rotated, stacked and flattened back, then concatenated with the pass-through
    channels; angles from einsum(positions, freqs). `factor` divides the positions (linear interpolation: the
    reference for a linear rescale)."""

    def __init__(self, *, factor: float = 1.0, base: float = 5000.0, heads: int = 2, head_dim: int = 32,
                 rot: int = 16) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            width = heads * head_dim
            self.emb = torch.nn.Embedding(VOCAB, width)
            self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
            self.o = torch.nn.Linear(width, VOCAB)
        self.heads, self.head_dim, self.rot, self.base, self.factor = heads, head_dim, rot, base, factor

    def freqs(self):
        return torch.pow(torch.tensor(self.base), -torch.arange(0, self.rot, 2, dtype=torch.float32) / self.rot)

    def _rope(self, x, pos):
        r = self.rot
        ang = torch.einsum("i,j->ij", pos / self.factor, self.freqs())
        c, s = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        xr, xp = x[..., :r], x[..., r:]
        x0, x1 = xr.reshape(*xr.shape[:-1], r // 2, 2).unbind(-1)
        return torch.cat([torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2), xp], -1)

    def forward(self, ids, position_ids=None):
        x = self.emb(ids)
        b, s, _ = x.shape
        pos = torch.arange(s, dtype=torch.float32) if position_ids is None else position_ids[0].float()
        q = self._rope(self.q(x).view(b, s, self.heads, self.head_dim), pos).transpose(1, 2)
        k = self._rope(self.k(x).view(b, s, self.heads, self.head_dim), pos).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


def export_partial_pairs(*, static_batch: bool, position_ids: bool = False) -> Path:
    """Exported with the sequence axis dynamic; the batch static 1 (the common single-sequence export) or
    dynamic; with a `position_ids` input [1, S] (static batch only) or positions made from the length."""

    def build(tmp: Path) -> dict:
        if not static_batch:
            return _export(PartialPairsRope(), tmp / "model.onnx") or {}
        ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
        seq = torch.export.Dim("seq")
        args, names, dyn = (ids,), ["input_ids"], ({1: seq},)
        if position_ids:
            args, names, dyn = (ids, torch.arange(12)[None]), [*names, "position_ids"], (*dyn, {1: seq})
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(PartialPairsRope().eval(), args, str(tmp / "model.onnx"), input_names=names,
                              output_names=["logits"], dynamo=True, dynamic_shapes=dyn)
        return {}

    key = {"kind": "third-party-partial-pairs", "static_batch": static_batch, "position_ids": position_ids}
    path, _ = cached(key, build)
    return path


# -- x-transformers ----------------------------------------------------------------------------------------------


def xt_module(*, interpolation_factor: float = 1.0, xpos: bool = False, base_rescale_factor: float = 1.0,
              xpos_scale_base: float = 512):
    from x_transformers import Decoder, TransformerWrapper

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=0, attn_layers=Decoder(
            dim=64, depth=1, heads=2, attn_dim_head=32, rotary_pos_emb=True,
            rotary_interpolation_factor=interpolation_factor, rotary_xpos=xpos,
            rotary_base_rescale_factor=base_rescale_factor, rotary_xpos_scale_base=xpos_scale_base))
    return model.eval()


def export_xt(*, xpos: bool = False) -> Path:
    pytest.importorskip("x_transformers")
    path, _ = cached({"kind": "third-party-xt", "xpos": xpos},
                     lambda tmp: _export(xt_module(xpos=xpos), tmp / "model.onnx") or {})
    return path


# -- Hugging Face --------------------------------------------------------------------------------------------------

_HF = {
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=16, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=1024, use_qk_norm=False,
        max_position_embeddings=16, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}


def _real_pairs_llama4_rotation(xq, xk, freqs_cis):
    """Llama 4's complex RoPE with real pairs (the dynamo exporter cannot export complex tensors): (x0 + i x1) *
    (cos + i sin) on pairs (2c, 2c+1) of [B, S, H, D] q/k, freqs given as their cos/sin (real, imag) pairs."""
    cos, sin = freqs_cis[..., 0][:, :, None, :], freqs_cis[..., 1][:, :, None, :]

    def rot(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x)

    return rot(xq), rot(xk)


@contextlib.contextmanager
def _llama4_real_pairs():
    """Llama 4's rotary embedding and application in real arithmetic (same numbers as HF's complex form)."""
    from transformers.models.llama4 import modeling_llama4 as m

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling

    saved = (m.apply_rotary_emb, m.Llama4TextRotaryEmbedding.forward)
    m.apply_rotary_emb, m.Llama4TextRotaryEmbedding.forward = _real_pairs_llama4_rotation, forward
    try:
        yield
    finally:
        m.apply_rotary_emb, m.Llama4TextRotaryEmbedding.forward = saved


class _Logits(torch.nn.Module if hasattr(torch, "nn") else object):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def hf_module(name: str, rope_parameters: dict | None = None):
    import transformers

    cfg_cls, model_cls, kw = _HF[name]
    kw = dict(kw)
    if rope_parameters is not None:
        kw["rope_parameters"] = {**kw["rope_parameters"], **rope_parameters}
    config = getattr(transformers, cfg_cls)(**kw)
    config._attn_implementation = "eager"
    config._experts_implementation = "batched_mm"  # grouped-mm has no ONNX translation, eager loops on data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config)
    return _Logits(model.eval()).eval()


def export_hf(name: str) -> Path:
    pytest.importorskip("transformers")

    def build(tmp: Path) -> dict:
        ctx = _llama4_real_pairs() if name == "llama4" else contextlib.nullcontext()
        with ctx:
            _export(hf_module(name), tmp / "model.onnx")
        return {}

    path, _ = cached({"kind": "third-party-hf", "name": name, "config": repr(_HF[name][2])}, build)
    return path


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------

from posrewrite import api  # noqa: E402
from posrewrite.cli import main  # noqa: E402
from posrewrite.errors import PartialMatchError  # noqa: E402

TOL = 1e-5  # relative to the largest |logit|: float32 round-off of two ~1e-1 logit computations is ~1e-6


def _ids(n: int = SEQ) -> np.ndarray:
    return np.random.default_rng(0).integers(3, VOCAB, size=(2, n))


def _site(path: Path):
    found = api.inspect(path)
    assert len(found.sites) == 1 and not found.refusals, found.to_dict()
    return found.sites[0]


def _library_inv_freq(name: str) -> np.ndarray:
    """The frequencies the library itself holds (its buffer), the reference for what detection reads."""
    if name == "ret":
        return ret_module().rot.freqs.detach().numpy()
    if name.startswith("merged_heads"):
        return MergedHeadsPairs().inv_freq.numpy()
    if name.startswith("partial_pairs"):
        return PartialPairsRope().freqs().numpy()
    if name.startswith("xt"):
        return xt_module().attn_layers.rotary_pos_emb.inv_freq.numpy()
    return hf_module(name).model.model.rotary_emb.inv_freq.numpy()


#: name -> (export, layout, head_dim, rotary_dim, base): the constructor arguments of the builders above, and
#: the pairing each library writes (rotary-embedding-torch / x-transformers: pairs (2i, 2i+1); gpt-oss:
#: rotate-half; DeepSeek-V3: pairs (2i, 2i+1) written de-interleaved; Llama 4: complex pairs (2i, 2i+1)).
DETECT = {
    "ret": (lambda: export_ret(), "interleaved", 32, 16, 10000.0),
    "xt": (lambda: export_xt(), "interleaved", 32, 16, 10000.0),
    "xt_xpos": (lambda: export_xt(xpos=True), "interleaved", 32, 16, 10000.0),
    "gpt_oss": (lambda: export_hf("gpt_oss"), "rotate_half", 16, 16, 150000.0),
    "deepseek_v3": (lambda: export_hf("deepseek_v3"), "interleaved_to_half", 8, 8, 10000.0),
    "llama4": (lambda: export_hf("llama4"), "interleaved", 16, 16, 500000.0),
    "merged_heads": (export_merged, "interleaved", 16, 16, 10000.0),
    # the rotation reads [B, S, H·D] and writes [B, S, H, D] (validation lines the two up)
    "merged_heads_out": (lambda: export_merged(heads_out=True), "interleaved", 16, 16, 10000.0),
    # pairs view [.., 8, 2] of the first 16 of 32 channels; batch static 1 (one symbolic axis) or dynamic
    "partial_pairs": (lambda: export_partial_pairs(static_batch=True), "interleaved", 32, 16, 5000.0),
    "partial_pairs_batch": (lambda: export_partial_pairs(static_batch=False), "interleaved", 32, 16, 5000.0),
    "partial_pairs_ids": (lambda: export_partial_pairs(static_batch=True, position_ids=True), "interleaved", 32,
                          16, 5000.0),
}
_SLOW = {"gpt_oss", "deepseek_v3", "llama4"}


def _marks(name: str):
    return (pytest.mark.slow,) if name in _SLOW else ()


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in DETECT])
def test_detected_with_the_library_parameters(name):
    export, layout, head_dim, rotary_dim, base = DETECT[name]
    site = _site(export())
    assert site.layout.value == layout
    assert (site.head_dim, site.rotary_dim) == (head_dim, rotary_dim)
    assert site.base == pytest.approx(base, rel=1e-4)
    inv = _library_inv_freq("xt" if name == "xt_xpos" else name)
    np.testing.assert_allclose(site.inv_freq, inv, rtol=1e-6)
    if name == "xt_xpos":
        decay = site.encoding.decay
        assert decay is not None and decay.length_centred
        # the paper's zeta_c = (2c + 0.4 d) / (1.4 d) with x-transformers' default scale_base 512
        assert decay.scale_base == pytest.approx(512.0, rel=1e-3)
    else:
        assert site.encoding.decay is None


def _rescaled(src: Path, tmp_path: Path, tag: str, **kw) -> Path:
    out = tmp_path / f"{tag}.onnx"
    result = api.rewrite(src, output=out, **kw)
    assert result.modified and result.validation is not None and result.validation.ok, result.to_dict()
    return out


#: (library, posrewrite options, the library's own equivalent built with its settings)
_D = 16  # rotary dim of the rotary-embedding-torch / x-transformers builders
LIBRARY_RESCALES = {
    "ret-linear": ("ret", dict(rope_scale=4.0, rope_method="linear"), lambda: ret_module(interpolate_factor=4.0)),
    "ret-ntk": ("ret", dict(rope_scale=4.0, rope_method="ntk", original_max_positions=16),
                lambda: ret_module(theta=10000.0 * 4.0 ** (_D / (_D - 2)))),
    "ret-base": ("ret", dict(rope_base=123456.0), lambda: ret_module(theta=123456.0)),
    "merged_heads-linear": ("merged_heads", dict(rope_scale=4.0, rope_method="linear"),
                            lambda: MergedHeadsPairs(factor=4.0)),
    "merged_heads_out-linear": ("merged_heads_out", dict(rope_scale=4.0, rope_method="linear"),
                                lambda: MergedHeadsPairs(factor=4.0, heads_out=True)),
    "xt-linear": ("xt", dict(rope_scale=4.0, rope_method="linear"), lambda: xt_module(interpolation_factor=4.0)),
    "xt-ntk": ("xt", dict(rope_scale=4.0, rope_method="ntk", original_max_positions=16),
               lambda: xt_module(base_rescale_factor=4.0)),
    # xPos, angles only: x-transformers' own interpolation keeps the decay on the original positions
    "xt_xpos-angles": ("xt_xpos", dict(rope_scale=4.0, rope_method="linear", xpos_decay="angles"),
                       lambda: xt_module(xpos=True, interpolation_factor=4.0)),
    # xPos, decay too (rotary-embedding-torch's convention): zeta^((p - p0)/(gamma s)) = scale_base x s
    "xt_xpos-scaled": ("xt_xpos", dict(rope_scale=4.0, rope_method="linear", xpos_decay="scaled"),
                       lambda: xt_module(xpos=True, interpolation_factor=4.0, xpos_scale_base=512 * 4.0)),
}


@pytest.mark.parametrize("case", list(LIBRARY_RESCALES))
def test_rescale_equals_the_library(case, tmp_path):
    name, options, reference = LIBRARY_RESCALES[case]
    src = DETECT[name][0]()
    out = _rescaled(src, tmp_path, case, **options)
    ids = _ids()
    ref = _torch_out(reference(), ids)
    assert _rel(_run(out, ids), ref) <= TOL
    assert _rel(_run(src, ids), ref) > 1e-3  # the rescale matters at these positions


def _hf_params(method: str, rotary_dim: int, base: float, L: int = 16) -> dict:
    if method == "ntk":
        return {"rope_type": "default", "rope_theta": base * 4.0 ** (rotary_dim / (rotary_dim - 2))}
    p = {"rope_type": method, "factor": 4.0}
    if method != "linear":
        p["original_max_position_embeddings"] = L
    if method == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return p


HF_METHODS = ("linear", "dynamic", "yarn", "llama3", "ntk")


@pytest.mark.slow
@pytest.mark.parametrize("method", HF_METHODS)
@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "llama4"])
def test_rescale_equals_hf(name, method, tmp_path):
    pytest.importorskip("transformers")
    _, _, _, rotary_dim, base = DETECT[name]
    src = export_hf(name)
    L = 16
    out = _rescaled(src, tmp_path, f"{name}-{method}", rope_scale=4.0, rope_method=method,
                    original_max_positions=L)
    ids = _ids()
    # HF's own model (Llama 4 in its own complex arithmetic) rebuilt with the new rope_parameters
    ref = _torch_out(hf_module(name, _hf_params(method, rotary_dim, base, L)), ids)
    assert _rel(_run(out, ids), ref) <= TOL


def test_hf_rescale_quick(tmp_path):
    """One HF architecture (gpt-oss, rotate-half without Neg) in the default run: linear = HF linear."""
    pytest.importorskip("transformers")
    src = export_hf("gpt_oss")
    out = _rescaled(src, tmp_path, "gpt_oss-linear", rope_scale=4.0, rope_method="linear")
    ids = _ids()
    ref = _torch_out(hf_module("gpt_oss", _hf_params("linear", 16, 150000.0)), ids)
    assert _rel(_run(out, ids), ref) <= TOL


def test_fuse_refused_with_the_reason_where_the_op_cannot(tmp_path, capsys):
    """DeepSeek-V3 writes its rotated pairs de-interleaved: RotaryEmbedding cannot, so exit 5 with the reason;
    xPos has a decay RotaryEmbedding lacks: exit 5 too."""
    pytest.importorskip("transformers")
    for src, why in ((export_hf("deepseek_v3"), "interleaved_to_half"), (export_xt(xpos=True), "xPos")):
        with pytest.raises(PartialMatchError, match=why):
            api.rewrite(src, output=tmp_path / "fused.onnx", fuse="ort")
        assert not (tmp_path / "fused.onnx").exists()


def test_fuse_where_the_contract_allows(tmp_path):
    src = export_ret()
    out = tmp_path / "fused.onnx"
    api.rewrite(src, output=out, fuse="ort")
    import onnx

    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("RotaryEmbedding") == 2 and "Cos" not in ops
    ids = _ids()
    assert _rel(_run(out, ids), _torch_out(ret_module(), ids)) <= TOL


@pytest.mark.parametrize(("static_batch", "position_ids"), [(True, False), (False, False), (True, True)])
def test_partial_pairs_rescale_equals_the_module_on_scaled_positions(static_batch, position_ids, tmp_path):
    """The hand-written partial interleaved rotation (pairs view, einsum angles): x2 linear equals the module
    run on positions / 2, at 40 and 200 tokens (past the 64 original positions), with batch static 1 or
    dynamic, positions from the length or a position_ids input."""
    import onnxruntime as ort

    src = export_partial_pairs(static_batch=static_batch, position_ids=position_ids)
    out = _rescaled(src, tmp_path, "linear", rope_scale=2.0, rope_method="linear", original_max_positions=64)
    reference = PartialPairsRope(factor=2.0).eval()

    def run(path: Path, feeds: dict) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    batch = 1 if static_batch else 2
    for n in (40, 200):
        ids = np.random.default_rng(n).integers(3, VOCAB, size=(batch, n))
        feeds = {"input_ids": ids}
        with torch.no_grad():
            if position_ids:
                feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
                ref = reference(torch.from_numpy(ids), torch.from_numpy(feeds["position_ids"])).numpy()
            else:
                ref = reference(torch.from_numpy(ids)).numpy()
        assert _rel(run(out, feeds), ref) <= TOL
        assert _rel(run(src, feeds), ref) > 1e-3  # the rescale matters at these positions


def test_static_export_reported_with_the_fix(tmp_path, capsys):
    """rotary-embedding-torch's xPos reads len(t) as a Python int, so torch.export fixes the sequence length even
    with dynamic_shapes: the rotation is identified, and the rewrite refused (exit 5) saying why and what to do."""
    src = export_ret(xpos=True)
    rc = main(["rewrite", str(src), "--rope-scale", "4", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert rc == 5
    assert "fixed length of 12" in err and "dynamic sequence axis" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["inspect", str(src)]) == 5


def test_xpos_check_reports_the_fp16_overflow():
    """zeta^((p - p0)/gamma) with zeta_0 = 0.4/1.4 and gamma = 512 passes 65504 at |p - p0| = 512 ln(65504) /
    ln(1.4/0.4) (the paper's numbers; p0 = length // 2): check says so past that length, not before, and calls it
    safe in this float32 model."""
    src = export_xt(xpos=True)
    limit = 2 * 512 * math.log(65504.0) / math.log(1.4 / 0.4)

    def notes(n):
        (row,) = api.check(src, max_length=n).to_dict()["sites"]
        return row, " ".join(row.get("notes", []))

    row, text = notes(int(limit * 0.95))
    assert "stays within float16" in text and row["safe"]
    row, text = notes(int(limit * 1.05))
    assert "exceeds float16" in text and row["safe"]
    import re

    said = float(re.search(r"past about (\d+) positions", text).group(1))
    assert said == pytest.approx(limit, rel=1e-3)


def export_ret_fp16() -> Path:
    pytest.importorskip("rotary_embedding_torch")
    path, _ = cached({"kind": "third-party-ret-fp16"},
                     lambda tmp: _export(ret_module().half(), tmp / "model.onnx") or {})
    return path


def test_fp32_positions_on_a_probed_half_precision_rotation(tmp_path):
    """rotary-embedding-torch in float16 makes its positions in float16 (exact only up to 2048): check says
    unsafe at 8192 tokens; after --fp32-positions the same check says safe, and the rotations still validate."""
    src = export_ret_fp16()
    site = _site(src)
    assert site.position_dtype == "float16" and site.encoding.identified_by == "probe"
    assert not api.check(src, max_length=8192).safe
    out = _rescaled(src, tmp_path, "fp32", fp32_positions=True)
    assert api.check(out, max_length=8192).safe


def test_torch_side_identifies_by_probing():
    """posrewrite.torch on rotary-embedding-torch's ATen graph (its rearrange/unbind/stack spelling matches no
    form in fx.detect_rope.ROTATIONS): found by probing with torch, and the linear rescale equals the library's
    own interpolate_factor."""
    pytest.importorskip("rotary_embedding_torch")
    from posrewrite import torch as pt

    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    program = torch.export.export(ret_module().eval(), (ids,), dynamic_shapes=dims)
    sites = pt.detect(program)
    assert sites and all(s.layout.value == "interleaved" and s.rotary_dim == 16 for s in sites)
    assert all(s.base == pytest.approx(10000.0, rel=1e-4) for s in sites)
    rescaled = pt.rewrite(program, rope_scale=4.0, rope_method="linear")
    x = _ids()
    with torch.no_grad():
        got = rescaled.module()(torch.from_numpy(x)).numpy()
    ref = _torch_out(ret_module(interpolate_factor=4.0), x)
    assert _rel(got, ref) <= TOL


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in DETECT])
def test_probing_alone_identifies_every_spelling(name):
    """The probe, with no pattern claiming anything first, reads the same pairing and range as the libraries
    write (also where the existing patterns are the fast path: Llama 4's real pairs, the merged-heads form)."""
    import onnx_ir as ir

    from posrewrite.passes.onnx.rope.rotation_probe import find_probed, rotation_seeds

    export, layout, head_dim, rotary_dim, _ = DETECT[name]
    model = ir.load(export())
    rotations, refused, failed = find_probed(model, rotation_seeds(model), set())
    assert rotations and not refused and not failed
    for rot in rotations:
        assert rot.layout is not None and rot.layout.value == layout
        assert rot.rotary_dim == rotary_dim
        assert (rot.decay is not None) == (name == "xt_xpos")
    if name.startswith("merged_heads"):
        assert {r.heads_in_last_axis for r in rotations} == {2} and {r.head_dim for r in rotations} == {16}


# -- rotary-embedding-torch xPos, exported with a dynamic sequence ---------------------------------------------
# Its get_scale computes `len(t) // 2`: the non-strict torch.export (torch.onnx.export's default) turns len() of a
# tensor into a Python int and fixes the length (test_static_export_reported_with_the_fix); torch.export.export
# with strict=True traces len() symbolically, and torch.onnx.export takes that program: the export stays dynamic.


def _paper_xpos_module(factor: float):
    """The tiny attention with xPos written here from Sun et al. (2022): interleaved RoPE on the first 16 of 32
    channels at positions p / factor (angles only interpolated), q times zeta_i^((p - n//2)/gamma) and k times
    its inverse on the rotated channels, zeta_i = (2i + 0.4 d) / (1.4 d), gamma = 512, theta = 10000."""
    d, gamma = 16, 512.0
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    zeta = (torch.arange(0, d, 2, dtype=torch.float32) + 0.4 * d) / (1.4 * d)

    def rotate(q, k):
        n = q.shape[-2]
        pos = torch.arange(n, dtype=torch.float32)
        angles = (pos / factor)[:, None] * inv[None, :]
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        scale = (zeta[None, :] ** ((pos - n // 2) / gamma)[:, None]).repeat_interleave(2, -1)

        def rot(x, s):
            xr, rest = x[..., :d], x[..., d:]
            pairs = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
            return torch.cat([(xr * cos + pairs * sin) * s, rest], -1)

        return rot(q, scale), rot(k, 1.0 / scale)

    return _TinyAttention(rotate)


def test_xpos_dynamic_export_detected_with_the_library_parameters():
    site = _site(export_ret(xpos=True, strict=True))
    library = ret_module(xpos=True).rot
    assert site.layout.value == "interleaved" and (site.head_dim, site.rotary_dim) == (32, 16)
    assert site.base == pytest.approx(10000.0, rel=1e-4)
    np.testing.assert_allclose(site.inv_freq, library.freqs.detach().numpy(), rtol=1e-6)
    decay = site.encoding.decay
    assert decay is not None and decay.length_centred
    assert decay.scale_base == pytest.approx(library.scale_base, rel=1e-3)
    # q's decay: log(zeta_i) / gamma per pair with the library's own zeta buffer; read from float32 magnitudes
    # over 16 positions: an absolute error of a few float32 ulp of log r over 15 positions
    rate = np.log(library.scale.numpy().astype(np.float64)) / library.scale_base
    np.testing.assert_allclose(decay.log_rate, rate, rtol=0, atol=8 * np.finfo(np.float32).eps / 15)


#: --xpos-decay -> the reference: rotary-embedding-torch's own interpolate_factor divides the positions before both
#: the angles and the decay ("scaled"); for the angles alone it has no setting: the paper's formula written above
XPOS_REFERENCES = {
    "scaled": lambda: ret_module(xpos=True, interpolate_factor=4.0),
    "angles": lambda: _paper_xpos_module(4.0),
}


@pytest.mark.parametrize("decay", list(XPOS_REFERENCES))
def test_xpos_dynamic_rescale_equals_the_reference(decay, tmp_path):
    src = export_ret(xpos=True, strict=True)
    out = _rescaled(src, tmp_path, f"xpos-{decay}", rope_scale=4.0, rope_method="linear", xpos_decay=decay)
    for n in (SEQ, 100):
        ids = _ids(n)
        ref = _torch_out(XPOS_REFERENCES[decay](), ids)
        assert _rel(_run(out, ids), ref) <= TOL
        assert _rel(_run(src, ids), ref) > 1e-3  # the rescale matters at these positions
    # the two conventions differ (the decay's exponent), so each reference tells them apart
    ids = _ids(100)
    other = "angles" if decay == "scaled" else "scaled"
    assert _rel(_run(out, ids), _torch_out(XPOS_REFERENCES[other](), ids)) > 1e-3


def test_xpos_dynamic_check_reports_the_fp16_overflow():
    """The paper's numbers (zeta_0 = 0.4/1.4, gamma = 512, p0 = length // 2): the decay passes float16's 65504 at
    2 x 512 ln(65504) / ln(1.4/0.4) positions; check says so past that length and not before."""
    src = export_ret(xpos=True, strict=True)
    limit = 2 * 512 * math.log(65504.0) / math.log(1.4 / 0.4)
    (row,) = api.check(src, max_length=int(limit * 0.95)).to_dict()["sites"]
    assert "stays within float16" in " ".join(row["notes"])
    (row,) = api.check(src, max_length=int(limit * 1.05)).to_dict()["sites"]
    assert "exceeds float16" in " ".join(row["notes"])


# -- a spelling written here: a cache stacking (cos, sin) on its last axis, gathered by position (torchtune's form) --


class StackedCacheRope(torch.nn.Module if hasattr(torch, "nn") else object):
    """Interleaved RoPE whose cache is stack([cos, sin], -1) of shape [rows, d/2, 2], rows picked by position_ids,
    q/k viewed as [.., d/2, 2] pairs and rotated with cache[..., 0] and cache[..., 1]. `factor` divides the
    frequencies the cache is built from (linear interpolation: the reference)."""

    def __init__(self, *, factor: float = 1.0, base: float = 10000.0, heads: int = 2, head_dim: int = 32,
                 rows: int = 128) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            width = heads * head_dim
            self.emb = torch.nn.Embedding(VOCAB, width)
            self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
            self.o = torch.nn.Linear(width, VOCAB)
        theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim) / factor
        angles = torch.arange(rows, dtype=torch.float32)[:, None] * theta[None, :]
        self.register_buffer("cache", torch.stack([angles.cos(), angles.sin()], dim=-1))
        self.heads, self.head_dim = heads, head_dim

    def _rope(self, x, position_ids):  # x [B, S, H, D]
        rope = self.cache[position_ids][:, :, None]  # [B, S, 1, D/2, 2]
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        out = torch.stack([pairs[..., 0] * rope[..., 0] - pairs[..., 1] * rope[..., 1],
                           pairs[..., 1] * rope[..., 0] + pairs[..., 0] * rope[..., 1]], -1)
        return out.flatten(3)

    def forward(self, ids, position_ids):
        x = self.emb(ids)
        b, s, _ = x.shape
        q, k, v = (m(x).view(b, s, self.heads, self.head_dim) for m in (self.q, self.k, self.v))
        q, k = self._rope(q, position_ids).transpose(1, 2), self._rope(k, position_ids).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


def export_stacked_cache() -> Path:
    def build(tmp: Path) -> dict:
        ids, pos = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1)), torch.arange(12)[None]
        seq = torch.export.Dim("seq", max=128)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(StackedCacheRope().eval(), (ids, pos), str(tmp / "model.onnx"),
                              input_names=["input_ids", "position_ids"], output_names=["logits"], dynamo=True,
                              dynamic_shapes=({1: seq}, {1: seq}))
        return {}

    path, _ = cached({"kind": "third-party-stacked-cache"}, build)
    return path


def test_stacked_cos_sin_cache_detected_and_rescaled(tmp_path):
    """A cache [rows, d/2, 2] holding cos and sin on its last axis: read as a cached table (128 rows, base 10000,
    interleaved, all 32 channels); x2 linear regenerates it (256 rows) equal to the module built with its
    frequencies / 2, at 40 and 200 tokens (past the old rows)."""
    import onnxruntime as ort

    src = export_stacked_cache()
    found = api.inspect(src)
    assert found.sites and not found.refusals  # the exporter keeps one copy of the table per rotation: a site each
    for site in found.sites:
        assert site.angles.value == "cached" and site.max_positions == 128
        assert site.layout.value == "interleaved" and site.rotary_dim == 32
        assert site.base == pytest.approx(10000.0, rel=1e-4)
    out = _rescaled(src, tmp_path, "stacked", rope_scale=2.0, rope_method="linear")
    reference = StackedCacheRope(factor=2.0, rows=256).eval()
    for n in (40, 200):
        ids = np.random.default_rng(n).integers(3, VOCAB, size=(1, n))
        pos = np.arange(n, dtype=np.int64)[None]
        with torch.no_grad():
            ref = reference(torch.from_numpy(ids), torch.from_numpy(pos)).numpy()
        feeds = {"input_ids": ids, "position_ids": pos}
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert _rel(got, ref) <= TOL
        if n <= 128:  # the original's table has 128 rows
            before = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            assert _rel(before, ref) > 1e-3


class _HalfModelRope(torch.nn.Module if hasattr(torch, "nn") else object):
    """HF's way in a model cast to float16 (`model.half()` turns its inv_freq buffer to float16), the angles made
    in float32 (`inv_freq.float()` after it, as HF's rotary embeddings do): the exporter folds a float32 constant
    holding float16 values."""

    def __init__(self, base: float = 1e6, dim: int = 32) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], -1)[:, None]
        q = self.proj(x)
        half = q.shape[-1] // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], -1)
        return (q * emb.cos().to(q.dtype) + rotated * emb.sin().to(q.dtype))


def test_half_model_frequencies_upcast_by_the_exporter(tmp_path):
    """A float32 inv_freq constant whose values are all float16 values: the base comes from float16's
    round-off (1e6 exactly, not "not geometric"), and the exact frequencies are assumed."""
    module = _HalfModelRope().half().eval()
    src = tmp_path / "half.onnx"
    seq = torch.export.Dim("seq", min=2, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 2, 8, 32).half(), torch.arange(8)[None]), str(src), dynamo=True,
                          input_names=["x", "position_ids"], dynamic_shapes={"x": {2: seq}, "position_ids": {1: seq}})
    site = _site(src)
    assert site.base == 1e6 and any("stored in float16" in n for n in site.notes)
    np.testing.assert_allclose(site.inv_freq, 1.0 / 1e6 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
