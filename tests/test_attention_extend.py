"""SelfExtend, ReRoPE / Leaky ReRoPE and log-n scaling rewritten into ONNX exports, against references written
here from the papers (not from posrewrite's code):

- the relative position each (query i, key j) pair sees: SelfExtend (Jin et al. 2024, Algorithm 1: neighbour
  tokens ``i - j < W`` keep ``i - j``, the others ``i // G + (W - W // G) - j // G``); ReRoPE (Su 2023: ``min(i -
  j, W)``); Leaky ReRoPE (Su: ``W + (i - j - W) / k`` beyond W); log-n (Qwen-1 ``logn_list``: query at 1-based
  position n scaled by ``log(n) / log(L)`` when n > L);
- the score of each pair computed as ``(R(rel) q_i) . k_j`` with R the rotation of the model's own rotary
  embedding (HF's ``rotary_emb`` or the fixtures' numpy RoPE) at the relative position: RoPE's defining property,
  so no second-rotation decomposition (what the rewrite does) is assumed;
- HF weights and attention written out in float64; onnxruntime runs the rewritten model in float32.
"""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from posrewrite.math.positions import logn_factor, rerope, selfextend, selfextend_defaults  # noqa: E402

TOL = 1e-5  # fp32 onnxruntime vs float64 reference, logits of magnitude ~1


# -- the papers' relative positions ---------------------------------------------------------------------------
def rel_selfextend(i, j, W, G):
    return np.where(i - j < W, i - j, i // G + (W - W // G) - j // G).astype(np.float64)


def rel_rerope(i, j, W, k=None):
    d = (i - j).astype(np.float64)
    if k is None:
        return np.where(d < W, d, W)
    return np.where(d < W, d, W + (d - W) / k)


def qwen_logn(n_positions: int, L: int) -> np.ndarray:
    logn_list = [math.log(i, L) if i > L else 1 for i in range(1, n_positions + 1)]  # Qwen-1 modeling_qwen.py
    return np.asarray(logn_list, np.float64)


def test_position_maps_match_the_papers():
    i, j = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    causal = j <= i
    se = selfextend(16, 4).relative_positions(np.arange(200), np.arange(200))
    assert np.array_equal(se[causal], rel_selfextend(i, j, 16, 4)[causal])
    assert np.array_equal(rerope(16).relative_positions(np.arange(200), np.arange(200))[causal],
                          rel_rerope(i, j, 16)[causal])
    np.testing.assert_allclose(rerope(16, 4.0).relative_positions(np.arange(200), np.arange(200))[causal],
                               rel_rerope(i, j, 16, 4.0)[causal], rtol=0, atol=1e-12)
    np.testing.assert_allclose(logn_factor(np.arange(300), 128), qwen_logn(300, 128), rtol=0, atol=1e-12)
    # grouped positions continue the neighbour ones at the window edge
    assert se[100, 100 - 16] == 16 - 16 // 4 + (100 // 4 - (100 - 16) // 4) - 4 or se[100, 84] <= 16
    g, w = selfextend_defaults(128, 1024)
    assert selfextend(w, g).max_relative_position(1024) <= 127
    assert selfextend(w, g - 1).max_relative_position(1024) > 127 if g > 1 else True


# -- HF reference -----------------------------------------------------------------------------------------------
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _reference_forward(rel: np.ndarray, logn: np.ndarray | None, rotary):
    """An attention forward for HF Llama-family layers: each pair scored with q rotated by its relative position."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        b, s, _ = hidden_states.shape
        hd = self.head_dim
        q = self.q_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        rep = self.num_key_value_groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        r = torch.from_numpy(rel[:s, :s]).reshape(1, -1).to(torch.float64)
        cos, sin = rotary(v, r)  # [1, s*s, hd]
        cos, sin = cos.view(s, s, hd), sin.view(s, s, hd)
        qr = q[:, :, :, None, :] * cos + _rotate_half(q)[:, :, :, None, :] * sin  # q_i rotated by rel(i, j)
        c0, s0 = rotary(v, torch.zeros(1, 1, dtype=torch.float64))
        k0 = k * c0 + _rotate_half(k) * s0  # keys at position 0
        scores = torch.einsum("bhijd,bhjd->bhij", qr, k0) * self.scaling
        if logn is not None:
            scores = scores * torch.from_numpy(logn[:s])[:, None]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out = (p @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), None

    return forward


def hf_reference(arch: str, ids: np.ndarray, rel: np.ndarray, logn: np.ndarray | None,
                 rope_parameters: dict | None = None) -> np.ndarray:
    import types

    from fixtures.hf_models import build_hf_model

    model = build_hf_model(arch, rope_parameters=rope_parameters).double()
    rotary = model.model.rotary_emb
    fwd = _reference_forward(rel, logn, rotary)
    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(fwd, layer.self_attn)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _rewrite(path, out, *flags) -> None:
    from posrewrite.cli import main

    rc = main([str(path), *flags, "-o", str(out)])
    assert rc == 0


CASES = {
    "self-extend": (["--extend", "self-extend", "--group-size", "4", "--window", "8"],
                    lambda i, j: rel_selfextend(i, j, 8, 4), False),
    "rerope": (["--extend", "rerope", "--window", "8"], lambda i, j: rel_rerope(i, j, 8), False),
    "leaky-rerope": (["--extend", "rerope", "--window", "8", "--leaky", "4"],
                     lambda i, j: rel_rerope(i, j, 8, 4.0), False),
    "logn": (["--logn-scaling", "--original-max-positions", "64"], lambda i, j: (i - j).astype(np.float64), True),
    "rerope+logn": (["--extend", "rerope", "--window", "8", "--logn-scaling", "--original-max-positions", "64"],
                    lambda i, j: rel_rerope(i, j, 8), True),
    "self-extend+logn": (["--extend", "self-extend", "--group-size", "4", "--window", "8", "--logn-scaling",
                          "--original-max-positions", "64"], lambda i, j: rel_selfextend(i, j, 8, 4), True),
    "rerope+logn32": (["--extend", "rerope", "--window", "8", "--logn-scaling", "--original-max-positions", "32"],
                      lambda i, j: rel_rerope(i, j, 8), 32),
}


@pytest.mark.parametrize("arch,case,exporter", [
    ("llama", "self-extend", "dynamo"), ("llama", "rerope", "dynamo"), ("llama", "leaky-rerope", "dynamo"),
    ("llama", "logn", "dynamo"), ("qwen2", "self-extend", "dynamo"), ("qwen2", "rerope+logn", "dynamo"),
    ("mistral", "leaky-rerope", "dynamo"),
    ("llama", "self-extend+logn", "torchscript"),  # the exporter Optimum-style exports come from
])
def test_hf_prefill_matches_paper_reference(arch, case, exporter, tmp_path):
    from fixtures.hf_models import export_hf_onnx, ort_logits

    flags, rel_fn, logn = CASES[case]
    src = export_hf_onnx(arch, exporter=exporter)
    out = tmp_path / "out.onnx"
    _rewrite(src, out, *flags)
    s = 96  # past the tiny models' 64 trained positions
    ids = np.random.default_rng(3).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = hf_reference(arch, ids, rel_fn(i, j), qwen_logn(s, 64 if logn is True else logn) if logn else None)
    got = ort_logits(out, ids)
    assert np.abs(got - ref).max() <= TOL
    plain = ort_logits(src, ids)
    assert np.abs(plain - ref).max() > 10 * TOL  # the rewrite changed what the model computes


# -- hand-written modules (numpy reference RoPE from fixtures.modules) ----------------------------------------
def module_reference(info: dict, ids: np.ndarray, rel: np.ndarray, logn: np.ndarray | None = None) -> np.ndarray:
    from fixtures.modules import default_inv_freq, reference_rope, torch_module

    m = torch_module(info)
    w = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    b, s = ids.shape
    nh, hd = info["num_heads"], info["head_dim"]
    inv = default_inv_freq(info["rotary_dim"], info["base"])
    x = w["embed.weight"][ids]
    q = (x @ w["q_proj.weight"].T).reshape(b, s, nh, hd)
    k = (x @ w["k_proj.weight"].T).reshape(b, s, nh, hd)
    v = (x @ w["v_proj.weight"].T).reshape(b, s, nh, hd)
    # q_i rotated by rel(i, j) for every pair: [b, s*s, nh, hd]
    pairs = np.repeat(q, s, axis=1)
    qr = reference_rope(pairs, rel[:s, :s].reshape(1, -1), inv, info["layout"], info["rotary_dim"])
    qr = qr.reshape(b, s, s, nh, hd)
    scores = np.einsum("bijhd,bjhd->bhij", qr, k) / math.sqrt(hd)
    if logn is not None:
        scores = scores * logn[:s, None]
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("bhij,bjhd->bihd", p, v).reshape(b, s, nh * hd)
    return (x + a @ w["o_proj.weight"].T) @ w["lm_head.weight"].T


@pytest.mark.parametrize("kind,params,case", [
    ("interleaved_rope_attention", dict(variant="meta"), "self-extend"),
    ("interleaved_rope_attention", dict(variant="gptj"), "leaky-rerope"),
    ("legacy_cached_rope", dict(variant="gather"), "rerope"),
    ("three_d_rope", {}, "rerope+logn32"),
])
def test_modules_match_paper_reference(module_onnx, kind, params, case, tmp_path):
    from fixtures.modules import ort_run

    path, info = module_onnx(kind, **params)
    flags, rel_fn, logn = CASES[case]
    out = tmp_path / "out.onnx"
    _rewrite(path, out, *flags)
    s = 60  # the cached-table module holds 64 rows
    ids = np.random.default_rng(5).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = module_reference(info, ids, rel_fn(i, j), qwen_logn(s, 64 if logn is True else logn) if logn else None)
    assert np.abs(ort_run(out, ids) - ref).max() <= TOL


# -- refusals -----------------------------------------------------------------------------------------------------
def _cli(capsys, *args) -> subprocess.CompletedProcess:
    """The command line in this process (no interpreter start-up per call): exit code, stdout, stderr."""
    from posrewrite.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


@pytest.mark.parametrize("flags,needle", [
    (["--extend", "rerope"], "--window"),
    (["--extend", "self-extend", "--window", "8"], "--group-size"),
    (["--extend", "rerope", "--window", "8", "--group-size", "2"], "group"),
    (["--extend", "rerope", "--window", "8", "--leaky", "1"], "k > 1"),
    (["--extend", "self-extend", "--group-size", "2", "--window", "8", "--rope-scale", "4"], "rope"),
    (["--extend", "rerope", "--window", "8", "--fuse", "ort"], "fuse"),
    (["--logn-scaling"], "original"),
])
def test_contradicting_flags_exit_2(llama_onnx, tmp_path, flags, needle, capsys):
    res = _cli(capsys, llama_onnx, *flags, "-o", tmp_path / "o.onnx")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert needle in res.stderr
    assert not (tmp_path / "o.onnx").exists()


KV_CASES = {
    "self-extend": (["--extend", "self-extend", "--group-size", "2", "--window", "4"],
                    lambda i, j: rel_selfextend(i, j, 4, 2), False),
    "rerope+logn": (["--extend", "rerope", "--window", "4", "--logn-scaling", "--original-max-positions", "8"],
                    lambda i, j: rel_rerope(i, j, 4), True),
    "leaky-rerope": (["--extend", "rerope", "--window", "4", "--leaky", "3"],
                     lambda i, j: rel_rerope(i, j, 4, 3.0), False),
}


@pytest.mark.parametrize("arch,case", [("llama", "self-extend"), ("llama", "rerope+logn"),
                                       ("qwen2", "leaky-rerope")])
def test_kv_cache_decode_step_by_step(arch, case, tmp_path):
    """KV-cache exports: the rewritten cache holds keys before rotation and every step rotates all keys at their
    positions (normal and second rotation). A prefill of 10 tokens from an empty cache, then 14 single-token
    steps fed their own presents, equal the paper reference over the whole sequence at every position."""
    from fixtures.hf_models import ARCHS, export_hf_onnx_with_cache, ort_session

    flags, rel_fn, logn = KV_CASES[case]
    src = export_hf_onnx_with_cache(arch)
    out = tmp_path / "out.onnx"
    _rewrite(src, out, *flags)
    sess = ort_session(out)
    s = 24
    ids = np.random.default_rng(3).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = hf_reference(arch, ids, rel_fn(i, j), qwen_logn(s, 8) if logn else None)
    spec = ARCHS[arch]
    past = [np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32) for _ in range(4)]
    t = 0
    for n in [10] + [1] * 14:
        feeds = {"input_ids": ids[:, t:t + n], "attention_mask": np.ones((1, t + n), np.int64),
                 "position_ids": np.arange(t, t + n)[None]}
        for layer in range(2):
            feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
        logits, *past = sess.run(None, feeds)
        assert np.abs(logits - ref[:, t:t + n]).max() <= TOL, (t, n)
        t += n


def test_logn_with_yarn_matches_hf_yarn_with_qwen_logn(llama_onnx, tmp_path):
    """log-n combines with a frequency method: YaRN x4 + log-n equals HF's YaRN model with Qwen-1's factor."""
    from fixtures.hf_models import ort_logits

    out = tmp_path / "out.onnx"
    _rewrite(llama_onnx, out, "--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", "64",
             "--logn-scaling")
    s = 96
    ids = np.random.default_rng(4).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ref = hf_reference("llama", ids, (i - j).astype(np.float64), qwen_logn(s, 64), rope_parameters=yarn)
    assert np.abs(ort_logits(out, ids) - ref).max() <= TOL


def test_second_extension_refused(llama_onnx, tmp_path, capsys):
    _rewrite(llama_onnx, tmp_path / "a.onnx", "--extend", "rerope", "--window", "8")
    res = _cli(capsys, tmp_path / "a.onnx", "--logn-scaling", "--original-max-positions", "64",
               "-o", tmp_path / "b.onnx")
    assert res.returncode == 2 and "already rewritten by posrewrite (rerope (window 8))" in res.stderr
    assert not (tmp_path / "b.onnx").exists()


def test_logn_kv_cache_decode_matches_reference(tmp_path):
    """log-n only scales queries, so it applies to decode-step exports: a step at positions past..past+seq-1
    equals HF's model with Qwen-1's factor on q (keys and values from the cache, presents unchanged)."""
    import types

    from fixtures.hf_models import (
        WithKVCache,
        build_hf_model,
        export_hf_onnx_with_cache,
        kv_cache_inputs,
        ort_session,
    )

    src = export_hf_onnx_with_cache("llama")
    out = tmp_path / "out.onnx"
    _rewrite(src, out, "--logn-scaling", "--original-max-positions", "8")
    model = build_hf_model("llama").double()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        b, s, _ = hidden_states.shape
        hd = self.head_dim
        q = self.q_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_key_value_groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        n = torch.from_numpy(positions[0] + 1).double()  # 1-based query positions
        q = q * torch.where(n > 8, torch.log(n) / math.log(8), torch.ones_like(n))[:, None]
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        key_pos = torch.arange(k.shape[2])
        scores = scores.masked_fill(key_pos[None, :] > torch.from_numpy(positions[0])[:, None], float("-inf"))
        o = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(o), None

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)
    sess, plain = ort_session(out), ort_session(src)
    for past, seq in ((7, 5), (12, 1), (13, 1)):  # prefill-with-past, then single decode steps past L
        feeds = kv_cache_inputs("llama", past, seq, seed=past)
        positions = feeds["position_ids"]
        past_t = [torch.from_numpy(feeds[f"past_key_values.{i}.{k}"]).double() for i in range(2)
                  for k in ("key", "value")]
        with torch.no_grad():
            ref = WithKVCache(model)(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask",
                                                                             "position_ids")), past_t)
        got = sess.run(None, feeds)
        for a, r in zip(got, ref, strict=True):
            assert np.abs(a - r.numpy()).max() <= TOL
        assert np.abs(plain.run(None, feeds)[0] - ref[0].numpy()).max() > 10 * TOL
