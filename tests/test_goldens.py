"""Every feature over every golden export (fixtures/goldens/: what optimum-cli, the onnxruntime-genai builder,
torch.onnx.export and onnxscript's optimize_for_ort write for tiny random-weight models).

References, never posrewrite's own code: the Hugging Face model rebuilt from the weights the golden was made from
(fixtures/goldens/hf/<arch>/) with the new `rope_parameters` (rescales), unchanged (fusion, fp32 positions,
--max-positions: HF computes RoPE at any position), or with each pair scored at the paper's relative position
(--extend, tests/test_attention_extend.py's reference); and the original golden's own outputs (KV-cache steps).
Where posrewrite refuses a feature on a golden, the documented refusal (exit code and reason) is asserted.

The goldens themselves are SNAPSHOTS: what each tool wrote once, at the versions its manifest.json records,
checked in and never re-exported by the tests (`make goldens` regenerates them; a newer tool may write otherwise).
`test_goldens_are_the_snapshots_their_manifests_record` checks that each folder still holds exactly the files
its manifest lists, byte for byte (sha256). No test compares posrewrite's outputs with stored outputs of its own.
"""

from __future__ import annotations

import subprocess
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import goldens  # noqa: E402

NAMES = goldens.names()
ARCH = {n: goldens.manifest(n)["arch"] for n in NAMES}
OPTIMUM = [n for n in NAMES if n.startswith("optimum-")]
L = 128  # max_position_embeddings of every golden (fixtures/goldens/hf_source.py)
SCALE = 4.0


def _cli(capsys, *args) -> subprocess.CompletedProcess:
    from posrewrite.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def _out(tmp_path, name: str, stem: str):
    """The output path for a golden: a folder for a genai folder, else an .onnx file."""
    src = goldens.model_path(name)
    return tmp_path / stem if src.is_dir() else tmp_path / f"{stem}.onnx"


def _ids(n: int, seed: int = 0) -> np.ndarray:
    vocab = goldens.manifest(NAMES[0])["config"]["vocab_size"]
    return np.random.default_rng(seed + n).integers(3, vocab, size=(1, n)).astype(np.int64)


def _tol(name: str, ref: np.ndarray) -> float:
    """fp32: 1e-5 on logits of magnitude ~1 (as tests/test_rescale_vs_hf.py); fp16 goldens: 2 fp16 epsilons (4 unit
    round-offs) of the logits' magnitude (the fp16 goldens are ~0.7 unit round-off from the fp32 HF model)."""
    if goldens.half_precision(name):
        return 2 * float(np.finfo(np.float16).eps) * max(1.0, float(np.abs(ref).max()))
    return 1e-5


def _assert_close(name: str, got: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = float(np.abs(got - ref).max())
    assert err <= _tol(name, ref), f"{name} {what}: max |logit diff| {err:.3g} > {_tol(name, ref):.3g}"


def test_goldens_are_the_snapshots_their_manifests_record():
    """Each golden folder holds exactly the files its manifest lists, with the sha256 recorded when the tool
    wrote them: a snapshot edited by hand (or half regenerated) is caught here, not by a puzzling feature test."""
    import hashlib

    assert NAMES
    for name in NAMES:
        folder = goldens.HERE / name
        recorded = goldens.manifest(name)["files"]
        held = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
                if p.is_file() and p.name != "manifest.json"}
        assert held == recorded, name


# ---------------------------------------------------------------------------------------------------------------
# a crash once seen: --fuse ort on a real optimum-cli export (a cycle left by the KV-cache attention rewrite)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMUM)
def test_fuse_ort_on_optimum_export(name, tmp_path, capsys):
    import onnx

    from fixtures.hf_models import optimum_feeds, ort_session

    src = goldens.model_path(name)
    out = tmp_path / "fused.onnx"
    res = _cli(capsys, src, "--fuse", "ort", "--max-positions", "4096", "-o", out)
    assert res.returncode == 0, res.stderr
    layers = goldens.manifest(name)["config"]["num_hidden_layers"]
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("GroupQueryAttention") == layers
    # no copy of the caches or of q/k left behind: the concatenation and the rotations are all inside the kernel
    assert "RotaryEmbedding" not in ops and "Transpose" not in ops, sorted(set(ops))
    ids = _ids(48)
    _assert_close(name, goldens.logits(out, ids), goldens.hf_logits(ARCH[name], ids), "fused prompt vs HF")
    # a step after a past, one entry left-padded: every output (logits, present keys/values) as the original's
    taken = {i.name for i in ort_session(src).get_inputs()}  # optimum's Gemma export has no position_ids
    feeds = {k: v for k, v in optimum_feeds(src, batch=2, past=7, seq=3, left_pad=2).items() if k in taken}
    want = ort_session(src).run(None, feeds)
    got = ort_session(out).run(None, feeds)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-5 * max(1.0, float(np.abs(b).max()))


def test_a_pass_that_leaves_a_cycle_is_named(tmp_path, capsys, monkeypatch):
    """The graph check after every rewriting pass names the pass (exit 1, one line), instead of an internal
    error in a later topological sort: the KV-cache rewrite made to replace the present keys everywhere, its own
    inputs included (a cycle)."""
    from posrewrite.passes.onnx.attention import cache_rewrite

    monkeypatch.setattr(cache_rewrite, "ancestors", lambda node: set())
    res = _cli(capsys, goldens.model_path("optimum-llama"), "--fuse", "ort", "-o", tmp_path / "x.onnx")
    assert res.returncode == 1
    assert "fuse_cache_attention" in res.stderr and "cycle" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # nothing left behind


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inspect(name, capsys):
    import json

    cfg = goldens.hf_model(ARCH[name]).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    res = _cli(capsys, "inspect", goldens.model_path(name), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    ropes = [e for e in data["encodings"] if e["kind"] == "rope"]
    assert len(ropes) == 1 and not data["refusals"], data
    rope = ropes[0]
    assert rope["head_dim"] == head_dim and rope["rotary_dim"] == head_dim
    assert rope["base"] == pytest.approx(cfg.rope_parameters["rope_theta"], rel=1e-3)
    # one q and one k rotation per layer, whatever the exporter fused (a GroupQueryAttention node counts as two)
    assert rope["rotations"] == 2 * cfg.num_hidden_layers and data["rotations"] == rope["rotations"]


# ---------------------------------------------------------------------------------------------------------------
# rescale methods against HF with the new rope_parameters
# ---------------------------------------------------------------------------------------------------------------

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "base")
_HALF = 8  # rotary_dim / 2 of every golden
LONGROPE = {"short_factor": [float(v) for v in 1.0 + 0.1 * np.random.default_rng(0).random(_HALF)],
            "long_factor": [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, _HALF)]}


def _hf_params(method: str) -> dict:
    if method == "ntk":
        d = 16
        return {"rope_type": "default", "rope_theta": 10000.0 * SCALE ** (d / (d - 2))}
    if method == "base":
        return {"rope_type": "default", "rope_theta": 123456.0}
    p = {"rope_type": method, "factor": SCALE}
    if method != "linear":
        p["original_max_position_embeddings"] = L
    if method == "llama3":
        p.update(low_freq_factor=1.0, high_freq_factor=4.0)
    if method == "longrope":
        p.update(LONGROPE)
    return p


def _flags(method: str) -> list[str]:
    import json

    if method == "base":
        return ["--rope-base", "123456"]
    flags = ["--rope-scale", str(SCALE), "--rope-method", method, "--original-max-positions", str(L)]
    return flags + (["--rope-params", json.dumps(LONGROPE)] if method == "longrope" else [])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_rescale_vs_hf(name, method, tmp_path, capsys):
    src = goldens.model_path(name)
    out = _out(tmp_path, name, method)
    res = _cli(capsys, src, *_flags(method), "-o", out)
    assert res.returncode == 0, res.stderr
    hf = goldens.hf_model(ARCH[name], _hf_params(method))
    # a new base does not lengthen the context: cos/sin caches of the golden's own (genai) keep their L rows
    lengths = (L // 2, L) if method == "base" and name.startswith("genai-") else (L // 2, L + 8, 3 * L)
    for n in lengths:
        ids = _ids(n)
        _assert_close(name, goldens.logits(out, ids), goldens.hf_logits(ARCH[name], ids, model=hf), f"{method} at {n}")
    ids = _ids(lengths[-1])  # it changed the model: compared with the unscaled HF model (the golden's caches end at L)
    plain = goldens.hf_logits(ARCH[name], ids)  # the unscaled model must fail the tolerance the rewrite meets
    assert float(np.abs(plain - goldens.logits(out, ids)).max()) > _tol(name, plain)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_validate_command(name, tmp_path, capsys):
    """`posrewrite validate ORIGINAL REWRITTEN` with the rewrite's flags holds (0); with other flags it does not
    (6)."""
    src = goldens.model_path(name)
    out = _out(tmp_path, name, "yarn")
    assert _cli(capsys, src, *_flags("yarn"), "-o", out).returncode == 0
    if out.is_dir():  # validate takes model files (a folder is refused with exit 3): the folders' models
        src, out = src / "model.onnx", out / "model.onnx"
    ok = _cli(capsys, "validate", src, out, *_flags("yarn"))
    assert ok.returncode == 0, ok.stderr
    wrong = _cli(capsys, "validate", src, out, "--rope-scale", "2", "--rope-method", "yarn",
                 "--original-max-positions", str(L))
    assert wrong.returncode == 6, wrong.stderr


# ---------------------------------------------------------------------------------------------------------------
# fp32 positions, fusion, --max-positions: the same model, compared with HF unchanged
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--fp32-positions"], ["--fuse", "ort"], ["--fuse", "onnx"],
                                   ["--max-positions", str(4 * L)]], ids=["fp32", "fuse-ort", "fuse-onnx", "maxpos"])
@pytest.mark.parametrize("name", NAMES)
def test_same_model_features(name, flags, tmp_path, capsys):
    src = goldens.model_path(name)
    out = _out(tmp_path, name, "out")
    res = _cli(capsys, src, *flags, "-o", out)
    if name.startswith("ortopt-") and flags == ["--fuse", "onnx"]:  # its com.microsoft norms have no opset-23 form
        assert res.returncode == 2 and "--fuse onnx needs opset 23" in res.stderr, res.stderr
        return
    assert res.returncode == 0, res.stderr
    if not out.exists():  # nothing to change: said, and no output written
        assert "nothing" in (res.stdout + res.stderr).lower()
        out = src
    hf = goldens.hf_model(ARCH[name])
    # fused caches and the genai builder's caches have L rows (more with --max-positions): positions past them
    # are rejected by onnxruntime, as documented
    lengths = (L // 2, 3 * L) if flags[0] == "--max-positions" else (L // 2, L)
    for n in lengths:
        ids = _ids(n)
        _assert_close(name, goldens.logits(out, ids), goldens.hf_logits(ARCH[name], ids, model=hf),
                      f"{' '.join(flags)} at {n}")


# ---------------------------------------------------------------------------------------------------------------
# --extend (SelfExtend, ReRoPE) against the papers' relative positions on HF's layers
# ---------------------------------------------------------------------------------------------------------------

EXTEND = {"self-extend": ["--extend", "self-extend", "--group-size", "4", "--window", "16"],
          "rerope": ["--extend", "rerope", "--window", "16"]}
#: goldens whose attention --extend cannot rewrite: refused with exit 2 and this reason
EXTEND_REFUSED = {"genai-": "apply --extend to the unfused model",  # RoPE inside fused RotaryEmbedding/GQA nodes
                  "ortopt-": "no attention score MatMul(q, k^T) found after the RoPE rotations"}  # fused attention


def _rel(case: str, n: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    if case == "rerope":
        return np.where(i - j < 16, i - j, 16).astype(np.float64)
    return np.where(i - j < 16, i - j, i // 4 + (16 - 16 // 4) - j // 4).astype(np.float64)


def _extend_reference(arch: str, ids: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """HF's model in float64 with every attention pair scored with q rotated by the pair's relative position."""
    from tests.test_attention_extend import _reference_forward

    model = goldens.hf_model(arch).double()
    fwd = _reference_forward(rel, None, model.model.rotary_emb)
    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(fwd, layer.self_attn)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXTEND))
@pytest.mark.parametrize("name", NAMES)
def test_extend(name, case, tmp_path, capsys):
    src = goldens.model_path(name)
    out = _out(tmp_path, name, case)
    res = _cli(capsys, src, *EXTEND[case], "-o", out)
    refused = next((why for stem, why in EXTEND_REFUSED.items() if name.startswith(stem)), None)
    if refused is not None:
        assert res.returncode == 2 and refused in res.stderr, res.stderr
        assert not out.exists()
        return
    assert res.returncode == 0, res.stderr
    n = 48
    ids = _ids(n)
    # the extended model's KV cache holds both position systems (packed on the heads axis): a sequence starts
    # from an empty past of the original's kv heads
    cfg = goldens.hf_model(ARCH[name]).config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    got = goldens.logits(out, ids, past_heads=heads)
    if ARCH[name] == "phi3":  # fused qkv_proj: the reference forward reads q_proj/k_proj; inside the window only
        ids = _ids(16)
        _assert_close(name, goldens.logits(out, ids, past_heads=heads), goldens.hf_logits("phi3", ids),
                      f"{case} inside the window")
        return
    ref = _extend_reference(ARCH[name], ids, _rel(case, n))
    _assert_close(name, got, ref, f"{case} at {n}")
    assert float(np.abs(goldens.logits(src, ids) - ref).max()) > _tol(name, ref)  # the original fails the test


# ---------------------------------------------------------------------------------------------------------------
# run-time rescales (dynamic, longrope) with a training length L other than the config's, past the capture chunk
# ---------------------------------------------------------------------------------------------------------------


def _ort_cache_call(sess, ids: np.ndarray, start: int, past: list[np.ndarray] | None, kv_shape: tuple[int, int]):
    """(logits, presents) of an Optimum cache model: `ids` at positions start.., after `past` (None: empty)."""
    n = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, start + n), np.int64),
             "position_ids": (start + np.arange(n, dtype=np.int64))[None]}
    pasts = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    for k, name in enumerate(pasts):
        feeds[name] = past[k] if past is not None else np.zeros((1, kv_shape[0], 0, kv_shape[1]), np.float32)
    out = sess.run(None, feeds)
    return out[0], out[1:]


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
@pytest.mark.parametrize("orig", [600, 1024])
def test_runtime_rescale_with_other_training_length_vs_hf(method, orig, tmp_path, capsys):
    """dynamic / longrope with --original-max-positions L (not the config's 128) on the Optimum export (position_ids
    input, KV cache): the rewrite passes its own validation, whose captured q/k run in chunks of CAPTURE_CHUNK
    positions (each chunk a call with its own run-time length), and its logits equal HF's LlamaForCausalLM built
    with that L (dynamic: config.max_position_embeddings, which HF's dynamic compares with; longrope: the
    rope_parameters' original_max_position_embeddings) at L, L+1 and past L, on a whole prompt and decoding after a
    cache of L positions (HF's DynamicCache: each step's frequencies from its own max(position_ids) + 1)."""
    import json

    import onnxruntime as ort
    from transformers import DynamicCache

    name = "optimum-llama"
    flags = ["--rope-scale", "2", "--rope-method", method, "--original-max-positions", str(orig)]
    params = {"rope_type": method, "factor": 2.0, "original_max_position_embeddings": orig}
    if method == "longrope":
        flags += ["--rope-params", json.dumps(LONGROPE)]
        params.update(LONGROPE)
    out = tmp_path / "out.onnx"
    res = _cli(capsys, goldens.model_path(name), *flags, "-o", out)
    assert res.returncode == 0, res.stderr

    def hf():  # a fresh model per sequence: HF's dynamic keeps the largest length it has seen
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = goldens.HERE / "hf" / ARCH[name]
        config = AutoConfig.from_pretrained(str(folder))
        config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], **params}
        if method == "dynamic":  # HF's dynamic compares max(position_ids) + 1 with this, not with the dict's
            config.max_position_embeddings = orig
        return AutoModelForCausalLM.from_pretrained(str(folder), config=config, attn_implementation="eager",
                                                    dtype=torch.float32).eval()

    for n in (orig, orig + 1, orig + 9, 2 * orig):
        ids = _ids(n)
        got = goldens.logits(out, ids)
        _assert_close(name, got, goldens.hf_logits(ARCH[name], ids, model=hf()), f"{method} L={orig} at {n} tokens")
    plain = goldens.hf_logits(ARCH[name], ids)  # the unscaled model misses the tolerance the rewrite meets
    assert float(np.abs(plain - got).max()) > _tol(name, plain)
    # a cache: L positions (original frequencies), single tokens past L, L more tokens at once, one more: each call's
    # frequencies from its own last position (past + new), the cached keys as their calls rotated them
    cfg = goldens.manifest(name)["config"]
    kv = (cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    steps = (orig, 1, 1, orig, 1)
    ids = _ids(sum(steps), seed=1)
    model, cache = hf(), DynamicCache()
    start, past = 0, None
    for n in steps:
        chunk = ids[:, start:start + n]
        got, past = _ort_cache_call(sess, chunk, start, past, kv)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(chunk), position_ids=torch.arange(start, start + n)[None],
                        cache=cache, use_cache=True).logits.float().numpy()
        _assert_close(name, got, ref, f"{method} L={orig}: {n} token(s) after a cache of {start}")
        start += n
