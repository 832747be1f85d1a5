"""RoPE from libraries nobody here wrote, exported by these tests with torch.onnx.export(dynamo=True) and a dynamic
sequence axis: rotary-embedding-torch (plain and xPos), x-transformers, and Hugging Face's gpt-oss, DeepSeek-V3
and Llama 4. Each must be identified with the right parameters (base, rotary dim, pairing, partial range) and
every offered rescale must equal the library's own equivalent: the library rebuilt with its interpolation
setting (rotary-embedding-torch `interpolate_factor`, x-transformers `interpolation_factor`), HF rebuilt with the
new `rope_parameters`, or a numpy reference written here from the paper where the library has none."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest

from fixtures.cache import cached

torch = pytest.importorskip("torch")

VOCAB = 64
SEQ = 40  # positions compared (past the original contexts below)


def _export(module, path: Path, *, vocab: int = VOCAB) -> None:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    dyn = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
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


def export_ret(*, xpos: bool = False) -> Path:
    pytest.importorskip("rotary_embedding_torch")
    path, _ = cached({"kind": "third-party-ret", "xpos": xpos}, lambda tmp: _export(ret_module(xpos=xpos),
                                                                                    tmp / "model.onnx") or {})
    return path


# -- x-transformers ----------------------------------------------------------------------------------------------


def xt_module(*, interpolation_factor: float = 1.0, xpos: bool = False, base_rescale_factor: float = 1.0):
    from x_transformers import Decoder, TransformerWrapper

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=0, attn_layers=Decoder(
            dim=64, depth=1, heads=2, attn_dim_head=32, rotary_pos_emb=True,
            rotary_interpolation_factor=interpolation_factor, rotary_xpos=xpos,
            rotary_base_rescale_factor=base_rescale_factor))
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
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=64, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=1024, use_qk_norm=False,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
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
