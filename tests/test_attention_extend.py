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

from posrewrite.math.positions import (  # noqa: E402
    dual_chunk,
    logn_factor,
    rerope,
    selfextend,
    selfextend_defaults,
)

TOL = 1e-5  # fp32 onnxruntime vs float64 reference, logits of magnitude ~1


# -- the papers' relative positions ---------------------------------------------------------------------------
def rel_selfextend(i, j, W, G):
    return np.where(i - j < W, i - j, i // G + (W - W // G) - j // G).astype(np.float64)


def rel_rerope(i, j, W, k=None):
    d = (i - j).astype(np.float64)
    if k is None:
        return np.where(d < W, d, W)
    return np.where(d < W, d, W + (d - W) / k)


def rel_dual_chunk(i, j, C, W):
    """An et al. 2024, Sec. 3, with Qwen2.5-1M's names: chunks of s = C - W tokens; keys at P_k = j mod s; queries
    at P_q^intra = i mod s (same chunk), P_q^succ = s + i mod s for the first W tokens of a chunk and the largest
    position (the paper's c - 1, here C) after them (the chunk right after the key's), P_q^inter = C (later
    chunks)."""
    s = C - W
    pk = j % s
    intra = i % s
    succ = np.where(i % s < W, s + i % s, C)
    inter = np.full_like(i, C)
    gap = i // s - j // s
    pq = np.where(gap == 0, intra, np.where(gap == 1, succ, inter))
    return (pq - pk).astype(np.float64)


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
    for c, w in ((24, 8), (7, 2), (12, 5), (40, 8)):
        dca = dual_chunk(c, w)
        assert np.array_equal(dca.relative_positions(np.arange(200), np.arange(200))[causal],
                              rel_dual_chunk(i, j, c, w)[causal])
        assert dca.max_relative_position(200) == rel_dual_chunk(i, j, c, w)[causal].max() <= c
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
                 rope_parameters: dict | None = None, model=None) -> np.ndarray:
    """``model`` (an HF Llama-family model) replaces ``build_hf_model(arch)`` when given."""
    import types

    from fixtures.hf_models import build_hf_model

    if model is None:
        model = build_hf_model(arch, rope_parameters=rope_parameters)
    model = model.double()
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
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "24", "--local-size", "8"],
                   lambda i, j: rel_dual_chunk(i, j, 24, 8), False),
    "dual-chunk-small": (["--extend", "dual-chunk", "--chunk-size", "14", "--local-size", "3"],
                         lambda i, j: rel_dual_chunk(i, j, 14, 3), False),
}


@pytest.mark.parametrize("arch,case,exporter", [
    ("llama", "self-extend", "dynamo"), ("llama", "rerope", "dynamo"), ("llama", "leaky-rerope", "dynamo"),
    ("llama", "logn", "dynamo"), ("qwen2", "self-extend", "dynamo"), ("qwen2", "rerope+logn", "dynamo"),
    ("mistral", "leaky-rerope", "dynamo"),
    ("llama", "self-extend+logn", "torchscript"),  # the exporter Optimum-style exports come from
    ("llama", "dual-chunk", "dynamo"), ("qwen2", "dual-chunk-small", "dynamo"),
    ("llama", "dual-chunk-small", "torchscript"),
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
    rel = rel if rel.ndim == 3 else rel[None]  # [b or 1, s, s]
    inv = default_inv_freq(info["rotary_dim"], info["base"])
    x = w["embed.weight"][ids]
    q = (x @ w["q_proj.weight"].T).reshape(b, s, nh, hd)
    k = (x @ w["k_proj.weight"].T).reshape(b, s, nh, hd)
    v = (x @ w["v_proj.weight"].T).reshape(b, s, nh, hd)
    # q_i rotated by rel(i, j) for every pair: [b, s*s, nh, hd]
    pairs = np.repeat(q, s, axis=1)
    qr = reference_rope(pairs, rel[:, :s, :s].reshape(rel.shape[0], -1), inv, info["layout"], info["rotary_dim"])
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
    ("legacy_cached_rope", dict(variant="gather"), "dual-chunk-small"),
    ("interleaved_rope_attention", dict(variant="meta"), "dual-chunk"),
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


# the rewrite computes the branches only over a box of query rows and key columns (Region.box) found from the
# position values: positions need not start at 0, be the same in every batch row or be ordered
@pytest.mark.parametrize("case,s,order", [
    ("self-extend", 40, "shuffled"), ("rerope", 40, "shuffled"), ("leaky-rerope", 40, "shifted"),
    ("dual-chunk", 50, "shifted"), ("dual-chunk-small", 45, "shifted"),
    ("self-extend", 6, "shifted"), ("dual-chunk", 12, "shifted"),  # every position pair inside the window
])
def test_batch_positions_shifted_or_shuffled(module_onnx, case, s, order, tmp_path):
    """Batch of 2 with position_ids fed: row 0 the positions 0..s-1, row 1 shifted by 21 (crossing a window or
    chunk edge elsewhere than row 0), or a shuffle of 5..s+4 (SelfExtend / ReRoPE, whose regions read the
    distance of any two positions) whose last two are the smallest and the largest. Each row equals the paper
    reference at its own positions."""
    from fixtures.modules import ort_run

    path, info = module_onnx("interleaved_rope_attention", variant="meta", with_position_ids=True)
    flags, rel_fn, _ = CASES[case]
    out = tmp_path / "out.onnx"
    _rewrite(path, out, *flags)
    rng = np.random.default_rng(11)
    # shuffled: the first key of row 1 last but one, so that its column is needed by row 1's last query only
    shuffled = np.concatenate([rng.permutation(np.arange(1, s - 1)), [0, s - 1]]) + 5
    pos = np.stack([np.arange(s), shuffled if order == "shuffled" else np.arange(s) + 21])
    ids = rng.integers(3, 128, size=(2, s)).astype(np.int64)
    rel = np.stack([rel_fn(p[:, None], p[None, :]) for p in pos])
    ref = module_reference(info, ids, rel)
    got = ort_run(out, ids, pos)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())
    if s > 20:
        plain = ort_run(path, ids, pos)
        assert np.abs(plain - ref).max() > 10 * TOL  # the rewrite changed what the model computes


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
    (["--extend", "rerope", "--window", "8", "--leaky", "4", "--fuse", "ort"], "fuse"),
    (["--logn-scaling"], "original"),
    (["--extend", "dual-chunk", "--chunk-size", "16"], "--local-size"),
    (["--extend", "dual-chunk", "--chunk-size", "8", "--local-size", "8"], "chunk size"),
    (["--extend", "dual-chunk", "--chunk-size", "16", "--local-size", "4", "--window", "8"], "--window"),
    (["--extend", "rerope", "--window", "8", "--chunk-size", "16"], "dual-chunk"),
    (["--extend", "dual-chunk", "--chunk-size", "16", "--local-size", "4", "--rope-params",
      '{"dual_chunk_attention_config": {"chunk_size": 32, "local_size": 4}}'], "disagrees"),
    (["--extend", "rerope", "--window", "8", "--rope-params",
      '{"dual_chunk_attention_config": {"chunk_size": 24, "local_size": 8}}'], "asks for --extend dual-chunk"),
    (["--logn-scaling", "--original-max-positions", "1"], "at least 2"),
    (["--extend", "rerope", "--window", str(2 ** 63)], "over the limit"),
    (["--extend", "dual-chunk", "--chunk-size", str(2 ** 64), "--local-size", "4"], "over the limit"),
    (["--extend", "rerope", "--window", "0"], "greater than 0"),
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
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "7", "--local-size", "2"],
                   lambda i, j: rel_dual_chunk(i, j, 7, 2), False),
}


@pytest.mark.parametrize("arch,case,packed", [("llama", "self-extend", True), ("llama", "rerope+logn", True),
                                              ("qwen2", "leaky-rerope", True), ("qwen2", "dual-chunk", True),
                                              ("llama", "self-extend", False), ("qwen2", "dual-chunk", False)])
def test_kv_cache_decode_step_by_step(arch, case, packed, tmp_path):
    """KV-cache exports, both cache contracts: packed (the CLI's: keys of every position system rotated once and
    cached on the heads axis) and keys before rotation (the fallback: every step rotates all keys at their
    positions, normal and second rotation). A prefill of 10 tokens from an empty cache, then 14 single-token
    steps fed their own presents, equal the paper reference over the whole sequence at every position."""
    import onnx_ir as ir

    from fixtures.hf_models import ARCHS, export_hf_onnx_with_cache, ort_session
    from posrewrite import api
    from posrewrite.options import options_from_flags
    from posrewrite.passes.onnx.attention.extend import extend_attention

    flags, rel_fn, logn = KV_CASES[case]
    src = export_hf_onnx_with_cache(arch)
    out = tmp_path / "out.onnx"
    if packed:
        _rewrite(src, out, *flags)
    else:  # the fallback contract, through the pass's own function
        opts = options_from_flags({"extend": flags[1], **dict(zip(
            [f.lstrip("-").replace("-", "_") for f in flags[2::2]], [float(v) if "." in v else int(v)
                                                                      for v in flags[3::2]], strict=True))})
        model = ir.load(src)
        extend_attention(model, api.detect(model).rope_sites, opts.attention_extension, None, packed_cache=False)
        ir.save(model, out, external_data="out.onnx.data")
    past_heads = ort_session(out).get_inputs()[3].shape[1]
    assert isinstance(past_heads, str) == packed  # packed: heads symbolic (H in, 2 H out)
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


# -- every method on Optimum's layout: TorchScript exporter, opset 14, KV cache -----------------------------------
OPTIMUM_CASES = {
    "self-extend": (["--extend", "self-extend", "--group-size", "3", "--window", "5"],
                    lambda i, j: rel_selfextend(i, j, 5, 3), False),
    "rerope": (["--extend", "rerope", "--window", "5"], lambda i, j: rel_rerope(i, j, 5), False),
    "leaky-rerope": (["--extend", "rerope", "--window", "5", "--leaky", "3"],
                     lambda i, j: rel_rerope(i, j, 5, 3.0), False),
    "logn": (["--logn-scaling", "--original-max-positions", "8"], lambda i, j: (i - j).astype(np.float64), True),
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "7", "--local-size", "2"],
                   lambda i, j: rel_dual_chunk(i, j, 7, 2), False),
    "dual-chunk-from-rope-params": (
        ["--rope-params", '{"dual_chunk_attention_config": {"chunk_size": 8, "local_size": 3}}'],
        lambda i, j: rel_dual_chunk(i, j, 8, 3), False),
}


def optimum_steps(sess, model, ids: np.ndarray, schedule, mask: np.ndarray | None = None,
                  positions: np.ndarray | None = None):
    """Optimum's generation loop over a KV-cache export: from an empty past of the model's H heads, run
    ``ids`` in chunks of ``schedule`` tokens, each fed the presents of the step before by name (``present.*`` ->
    ``past_key_values.*``); yields (first token, chunk length, logits). ``mask`` / ``positions`` default to all
    ones and 0..S-1."""
    batch, s = ids.shape
    mask = np.ones((batch, s), np.int64) if mask is None else mask
    positions = np.broadcast_to(np.arange(s), (batch, s)) if positions is None else positions
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{layer}.{kv}": np.zeros((batch, cfg.num_key_value_heads, 0, d), np.float32)
            for layer in range(cfg.num_hidden_layers) for kv in ("key", "value")}
    t = 0
    for n in schedule:
        feeds = {"input_ids": ids[:, t:t + n], "attention_mask": mask[:, :t + n],
                 "position_ids": np.ascontiguousarray(positions[:, t:t + n]), **past}
        got = dict(zip(names, sess.run(None, feeds), strict=True))
        yield t, n, got["logits"]
        past = {name: got[name.replace("past_key_values", "present")] for name in past}
        t += n


@pytest.mark.parametrize("case", sorted(OPTIMUM_CASES))
def test_optimum_layout_opset14_prefill_and_decode(case, tmp_path):
    """Optimum's ``text-generation-with-past`` layout (TorchScript, opset 14, KV cache): the rewrite loads in
    onnxruntime (opset-14 nodes only), and a prefill of 9 tokens from an empty cache then 15 single-token steps,
    each fed the presents of the step before, equal the paper reference over the whole sequence (batch 2)."""
    import onnx

    from fixtures.hf_models import export_optimum_layout, optimum_layout_hf_model, ort_session

    flags, rel_fn, logn = OPTIMUM_CASES[case]
    src = export_optimum_layout()
    out = tmp_path / "out.onnx"
    _rewrite(src, out, *flags)
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}.get("", 1) == 14  # opset kept, nodes written for it
    onnx.checker.check_model(proto, full_check=True)
    sess = ort_session(out)
    s, batch = 24, 2
    ids = np.random.default_rng(7).integers(3, 128, size=(batch, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    model = optimum_layout_hf_model()
    ref = hf_reference("llama", ids, rel_fn(i, j), qwen_logn(s, 8) if logn else None, model=model)
    for t, n, logits in optimum_steps(sess, model, ids, [9] + [1] * 15):
        err = np.abs(logits - ref[:, t:t + n]).max() / np.abs(ref[:, t:t + n]).max()
        assert err <= TOL, (t, n, err)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    plain = ort_session(src)
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, s), np.int64),
             "position_ids": np.broadcast_to(np.arange(s), (batch, s)).copy()}
    for layer in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kv}"] = np.zeros((batch, cfg.num_key_value_heads, 0, d), np.float32)
    assert np.abs(plain.run(None, feeds)[0] - ref).max() > 10 * TOL  # the rewrite changed what the model computes


def test_greedy_generate_on_a_packed_cache(tmp_path):
    """posrewrite.decode's loop sizes the first past of a packed --extend cache (heads declared symbolic) from the
    value cache, and its greedy tokens are the argmax of the paper reference over the tokens so far."""
    from fixtures.hf_models import export_optimum_layout, optimum_layout_hf_model, ort_session
    from posrewrite.decode import greedy_generate

    flags, rel_fn, _ = OPTIMUM_CASES["self-extend"]
    out = tmp_path / "out.onnx"
    _rewrite(export_optimum_layout(), out, *flags)
    prompt = np.random.default_rng(10).integers(3, 128, size=(2, 12)).astype(np.int64)
    tokens = greedy_generate(ort_session(out), prompt, 10)
    assert tokens.shape == (2, 22) and (tokens[:, :12] == prompt).all()
    n = tokens.shape[1]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ref = hf_reference("llama", tokens, rel_fn(i, j), None, model=optimum_layout_hf_model())
    assert (ref[:, 11:n - 1].argmax(-1) == tokens[:, 12:]).all()


_DCA_24 = (["--extend", "dual-chunk", "--chunk-size", "24", "--local-size", "8"],
           lambda i, j: rel_dual_chunk(i, j, 24, 8), False)


@pytest.mark.parametrize("case,fuse", [("self-extend", None), ("rerope", None), ("dual-chunk", None),
                                       ("dual-chunk-24", "ort"), ("self-extend", "onnx")])
def test_optimum_layout_left_padding(case, fuse, tmp_path):
    """Batched generation left-pads (Optimum: attention_mask 0 on the pads, position_ids ``cumsum(mask) - 1``):
    key positions are read from the rows' positions, not from their index in the cache, so the padded row's
    tokens equal the paper reference of that row alone at every step (prefill then single steps, across the
    window), and the unpadded row equals its own; also with the rotations fused, and for Dual Chunk with a
    prefill whose queries pass C + 1."""
    from fixtures.hf_models import export_optimum_layout, optimum_layout_hf_model, ort_session

    flags, rel_fn, _ = _DCA_24 if case == "dual-chunk-24" else OPTIMUM_CASES[case]
    out = tmp_path / "out.onnx"
    _rewrite(export_optimum_layout(), out, *flags, *(["--fuse", fuse, "--max-positions", "128"] if fuse else []))
    sess = ort_session(out)
    s, pad = (41, 3) if case == "dual-chunk-24" else (26, 5)  # past C + 1 = 25 positions
    ids = np.random.default_rng(9).integers(3, 128, size=(2, s)).astype(np.int64)
    mask = np.ones((2, s), np.int64)
    mask[0, :pad] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    model = optimum_layout_hf_model()
    refs = []
    for row, start in ((0, pad), (1, 0)):
        n = s - start
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        refs.append(hf_reference("llama", ids[row:row + 1, start:], rel_fn(i, j), None, model=model)[0])
    prefill = 33 if case == "dual-chunk-24" else 9  # a prefill with queries past C + 1 = 25 too
    for t, n, logits in optimum_steps(sess, model, ids, [prefill] + [1] * (s - prefill), mask, positions):
        for row, start in ((0, pad), (1, 0)):
            first = max(t, start)  # the pads' own logits are not compared
            got = logits[row, first - t:]
            want = refs[row][first - start:t + n - start]
            if len(want):
                err = np.abs(got - want).max() / np.abs(want).max()
                assert err <= TOL, (row, t, n, err)


@pytest.mark.parametrize("case", ["self-extend", "rerope", "dual-chunk"])
def test_optimum_layout_chunked_prefill_across_the_window(case, tmp_path):
    """The box of rows and key columns the branches are computed on, on a KV cache: a first prefill of one token
    (one key: the box is empty), chunks of several tokens on a past that cross the window (or several chunks of
    Dual Chunk, s = 5), and single steps past it; batch 2. Every step equals the paper reference."""
    from fixtures.hf_models import export_optimum_layout, optimum_layout_hf_model, ort_session

    flags, rel_fn, _ = OPTIMUM_CASES[case]
    out = tmp_path / "out.onnx"
    _rewrite(export_optimum_layout(), out, *flags)
    sess = ort_session(out)
    s, batch = 27, 2
    ids = np.random.default_rng(8).integers(3, 128, size=(batch, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    model = optimum_layout_hf_model()
    ref = hf_reference("llama", ids, rel_fn(i, j), None, model=model)
    schedule = [1, 2, 4, 1, 7, 1, 1, 8, 1, 1]
    assert sum(schedule) == s
    for t, n, logits in optimum_steps(sess, model, ids, schedule):
        err = np.abs(logits - ref[:, t:t + n]).max() / np.abs(ref[:, t:t + n]).max()
        assert err <= TOL, (t, n, err)


# -- an independently written LM (not HF, not posrewrite's fixtures) ----------------------------------------------
# cos/sin computed once as [S, D] from torch.outer and broadcast over heads; attention through
# scaled_dot_product_attention(is_causal=True); exported with the dynamo exporter.
IND = dict(vocab=256, hidden=64, heads=4, layers=2, base=10000.0)


def _independent_lm():
    import torch.nn.functional as F
    from torch import nn

    hd = IND["hidden"] // IND["heads"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(IND["hidden"], 3 * IND["hidden"], bias=False)
            self.out = nn.Linear(IND["hidden"], IND["hidden"], bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, IND["heads"], hd).permute(2, 0, 3, 1, 4)

            def rotate(t):
                return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

            y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, s, -1))

    class ByteLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(IND["vocab"], IND["hidden"])
            self.blocks = nn.ModuleList(Attention() for _ in range(IND["layers"]))
            self.head = nn.Linear(IND["hidden"], IND["vocab"], bias=False)
            inv = 1.0 / IND["base"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            self.register_buffer("inv_freq", inv, persistent=False)

        def forward(self, ids):
            angles = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32), self.inv_freq)
            emb = torch.cat([angles, angles], -1)  # [S, D]
            cos, sin = emb.cos(), emb.sin()
            x = self.embed(ids)
            for block in self.blocks:
                x = x + block(x, cos, sin)
            return self.head(x)

    torch.manual_seed(11)
    return ByteLM().eval()


@pytest.fixture(scope="module")
def independent_lm(tmp_path_factory):
    from fixtures.cache import cached

    def build(tmp):
        m = _independent_lm()
        ids = torch.randint(0, IND["vocab"], (1, 40))
        torch.onnx.export(m, (ids,), str(tmp / "model.onnx"), dynamo=True, verbose=False,
                          dynamic_shapes={"ids": {1: torch.export.Dim("seq", max=4096)}})
        return dict(IND)

    path, _ = cached(dict(kind="test-independent-byte-lm", config=IND, version=1), build)
    return path, _independent_lm()


def independent_reference(module, ids: np.ndarray, rel: np.ndarray, logn: np.ndarray | None) -> np.ndarray:
    """The module's forward in float64 with q_i rotated by rel(i, j) against k_j at position 0 (RoPE's relative
    property), causal softmax with scale 1/sqrt(d), optional per-query log-n factor."""
    w = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    nh, hd = IND["heads"], IND["hidden"] // IND["heads"]
    inv = 1.0 / IND["base"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    b, s = ids.shape
    ang = rel[:s, :s, None] * inv  # [i, j, D/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x = w["embed.weight"][ids]
    for layer in range(IND["layers"]):
        qkv = (x @ w[f"blocks.{layer}.qkv.weight"].T).reshape(b, s, 3, nh, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        q_half = np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1)
        qr = q[:, :, :, None, :] * cos + q_half[:, :, :, None, :] * sin  # [b, h, i, j, d]
        scores = np.einsum("bhijd,bhjd->bhij", qr, k) / math.sqrt(hd)
        if logn is not None:
            scores = scores * logn[:s, None]
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y = np.einsum("bhij,bhjd->bihd", p, v).reshape(b, s, -1)
        x = x + y @ w[f"blocks.{layer}.out.weight"].T
    return x @ w["head.weight"].T


INDEPENDENT_CASES = {
    "self-extend": (["--extend", "self-extend", "--group-size", "8", "--window", "32"],
                    lambda i, j: rel_selfextend(i, j, 32, 8), None),
    "rerope": (["--extend", "rerope", "--window", "24"], lambda i, j: rel_rerope(i, j, 24), None),
    "leaky-rerope": (["--extend", "rerope", "--window", "24", "--leaky", "4"],
                     lambda i, j: rel_rerope(i, j, 24, 4.0), None),
    "logn": (["--logn-scaling", "--original-max-positions", "32"], lambda i, j: (i - j).astype(np.float64), 32),
    "self-extend+logn": (["--extend", "self-extend", "--group-size", "4", "--window", "16", "--logn-scaling",
                          "--original-max-positions", "32"], lambda i, j: rel_selfextend(i, j, 16, 4), 32),
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "40", "--local-size", "8"],
                   lambda i, j: rel_dual_chunk(i, j, 40, 8), None),
}


@pytest.mark.parametrize("case", sorted(INDEPENDENT_CASES))
def test_independent_lm_matches_paper_reference(case, independent_lm, tmp_path, capfd):
    """The issue's failing form: the rewrite validates (exit 0, nothing from onnxruntime on stderr) and equals
    the paper reference at 96 tokens; the model as exported does not."""
    from fixtures.hf_models import ort_session

    path, module = independent_lm
    flags, rel_fn, logn = INDEPENDENT_CASES[case]
    out = tmp_path / "out.onnx"
    capfd.readouterr()
    _rewrite(path, out, *flags)
    err = capfd.readouterr().err
    assert "\x1b[" not in err and "onnxruntime" not in err.lower(), err
    s = 96
    ids = np.random.default_rng(8).integers(0, IND["vocab"], size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = independent_reference(module, ids, rel_fn(i, j), qwen_logn(s, logn) if logn else None)
    got = ort_session(out).run(None, {"ids": ids})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= TOL
    plain = ort_session(path).run(None, {"ids": ids})[0]
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 10 * TOL


def test_validation_failure_leaves_no_onnxruntime_log_on_stderr(independent_lm, tmp_path, monkeypatch, capfd):
    """A rewrite whose model fails in onnxruntime at run time is refused with one line (exit 6) and
    onnxruntime's own coloured log stays off stderr (file descriptor 2, where onnxruntime writes). The fault is
    injected after the last layer, which the default (bounded) validation's cut does not reach: --validate full
    runs the whole model."""
    import onnx_ir as ir

    from posrewrite import io
    from posrewrite.cli import main

    path, _ = independent_lm
    real = io.stage_model

    def faulty(model, *args, **kwargs):
        logits = model.graph.outputs[0]
        node = ir.node("Reshape", [logits, ir.Value(name="bad_shape")], name="injected_bad_reshape")
        node.inputs[1].const_value = ir.tensor(np.array([7, -1, 5], np.int64))
        bad = node.inputs[1]
        bad.name = "injected_bad_shape"
        model.graph.initializers["injected_bad_shape"] = bad
        model.graph.append(node)
        node.outputs[0].name = "injected_logits"
        node.outputs[0].dtype = logits.dtype
        model.graph.outputs[0] = node.outputs[0]
        return real(model, *args, **kwargs)

    monkeypatch.setattr(io, "stage_model", faulty)
    capfd.readouterr()
    rc = main([str(path), "--extend", "rerope", "--window", "24", "--validate", "full", "-o", str(tmp_path / "o.onnx")])
    err = capfd.readouterr().err
    assert rc == 6
    assert "\x1b[" not in err and "[E:onnxruntime" not in err, err
    assert err.count("\n") == 1 and err.startswith("posrewrite: error:")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flags", [
    ["--extend", "rerope", "--window", "8"],
    ["--extend", "dual-chunk", "--chunk-size", "24", "--local-size", "8"],
])
def test_genai_fused_attention_refused_with_reason(flags, tmp_path, capsys):
    """An onnxruntime-genai builder folder (GroupQueryAttention with RoPE inside): no score MatMul to merge a second
    matrix into, so --extend is refused with the reason (exit 2), nothing written, the folder untouched."""
    pytest.importorskip("onnxruntime_genai")
    from fixtures.genai_models import genai_folder

    src = genai_folder("llama")
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    res = _cli(capsys, src, *flags, "-o", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert "fused" in res.stderr and "unfused model" in res.stderr
    assert not (tmp_path / "out").exists()
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_qwen25_1m_config_json_reads_dual_chunk(tmp_path):
    """A Qwen2.5-1M-style config.json given to --rope-params: its dual_chunk_attention_config sets --extend
    dual-chunk with its chunk_size and local_size, and nothing else (rope_theta, max_position_embeddings) turns
    it into a frequency rescale."""
    import json

    from posrewrite.math.positions import dual_chunk
    from posrewrite.options import options_from_flags

    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
           "num_attention_heads": 4, "max_position_embeddings": 1010000, "rope_theta": 10000000.0,
           "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                           "original_max_position_embeddings": 262144}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    opts = options_from_flags({"rope_params": str(path)})
    assert opts.extend == "dual-chunk" and (opts.chunk_size, opts.local_size) == (262144, 8192)
    assert not opts.rescales_rope
    assert opts.attention_extension == dual_chunk(262144, 8192)
    assert opts.attention_extension.unchanged_length == 262144 - 8192


def test_packed_cache_contract(tmp_path):
    """--extend on a KV-cache export keeps the key cache of the model's own rotation and adds one per key position
    system, packed on the heads axis (present.key [B, 2 H, T, D]); the keys of the model's own rotation are what
    the original model caches; a cache written by the original model (H heads, some length) is refused by
    onnxruntime instead of being misread; an empty past of H heads starts a sequence."""
    import onnx

    from fixtures.hf_models import export_optimum_layout, ort_session

    src = export_optimum_layout()
    out = tmp_path / "out.onnx"
    _rewrite(src, out, "--extend", "self-extend", "--group-size", "2", "--window", "4")
    proto = onnx.load(str(out), load_external_data=False)
    present = next(o for o in proto.graph.output if o.name == "present.0.key")
    assert present.type.tensor_type.shape.dim[1].dim_param  # heads: symbolic now (H in, 2 H out)
    sess, plain = ort_session(out), ort_session(src)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 128, size=(1, 6)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64), "position_ids": np.arange(6)[None]}
    for layer in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kv}"] = np.zeros((1, 2, 0, 16), np.float32)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    ref = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds), strict=True))
    assert got["present.0.key"].shape == (1, 4, 6, 16)
    np.testing.assert_allclose(got["present.0.key"][:, :2], ref["present.0.key"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["present.0.value"], ref["present.0.value"], rtol=0, atol=1e-6)
    step = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.array([[6]])}
    for layer in range(2):
        for kv in ("key", "value"):
            step[f"past_key_values.{layer}.{kv}"] = ref[f"present.{layer}.{kv}"]  # the original model's cache
    from fixtures.hf_models import ort_run_errors

    with pytest.raises(ort_run_errors()):
        sess.run(None, step)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["self-extend", "dual-chunk"])
def test_packed_cache_products_read_gqa_keys_without_repeat_kv(case, tmp_path):
    """On Optimum's layout (GQA, 4 q / 2 kv heads: repeat_kv is Unsqueeze, Expand, Reshape) the extension's
    products read the packed cache's keys and the values as cached: the keys' and the values' repeat_kv Expand of
    every layer are gone (each copied the whole cache G times per layer and step), and torch's NaN guard is on the
    output rows (no IsNaN reading the probability matrix), so the exactness tests on this layout (above,
    test_optimum_layout_*) check the grouped products and the banded softmax against the paper references."""
    import onnx

    from fixtures.hf_models import export_optimum_layout

    src = export_optimum_layout()
    out = tmp_path / "out.onnx"
    _rewrite(src, out, *OPTIMUM_CASES[case][0])
    layers = sum(1 for o in onnx.load(str(src), load_external_data=False).graph.output
                 if o.name.startswith("present.") and o.name.endswith(".key"))

    def expands(path):
        return sum(n.op_type == "Expand" for n in onnx.load(str(path), load_external_data=False).graph.node)

    assert layers == 2
    assert expands(out) == expands(src) - 2 * layers
    nodes = onnx.load(str(out), load_external_data=False).graph.node
    assert not [n for n in nodes if n.op_type == "IsNaN"]
    # the softmax runs per band of rows (before the box, then each segment: Dual Chunk's two regions start at
    # different rows), so the score blocks are never concatenated back into one [.., S, T] matrix
    bands = {"self-extend": 2, "dual-chunk": 3}[case]
    assert sum(n.op_type == "Softmax" for n in nodes) == bands * layers
