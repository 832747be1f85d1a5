"""Run-time RoPE methods (dynamic NTK, LongRoPE) on KV-cache exports, decoded step by step across the switch at L.

References are Hugging Face's own models (same weights, the same ``rope_parameters``), in float64:
- ``--runtime-decode hf`` (the default): every step equals HF's cached model fed the same steps (past keys keep the
  frequencies of their own step);
- ``--runtime-decode exact`` decoded by the shipped loop (``posrewrite.decode.CachedDecoder``, which reads the
  model's decode contract and re-prefills where it says): every step equals HF's model run on the whole sequence
  so far at once (no cache), for LongRoPE and dynamic NTK; the same file decoded without honouring the contract
  equals HF's cached model (the HF-compatible mode);
- ``--runtime-decode rerotate`` (the cache holds keys before rotation, every step rotates them with the current
  frequencies): equal to the whole sequence below L and, past it, closer to it than HF's cached behaviour at every
  step (not equal: the past keys' values come from hidden states of earlier frequencies);
and HF's cached model differs from the whole sequence past the switch (so the tests cannot pass by accident).
Edges: models without past inputs, without the contract, with a contract that is not posrewrite's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

L = 16  # the switch: the tiny models have 64 positions; the methods are planned for 4 x 16
TOL = 1e-5  # relative to the logits' magnitude: fp32 onnxruntime vs float64 HF
HALF = 8


def _longrope() -> dict:
    rng = np.random.default_rng(0)
    return {"short_factor": [float(v) for v in 1.0 + 0.1 * rng.random(HALF)],
            "long_factor": [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, HALF)]}


def _flags(method: str) -> list[str]:
    flags = ["--rope-scale", "4", "--rope-method", method, "--original-max-positions", str(L)]
    if method == "longrope":
        flags += ["--rope-params", json.dumps(_longrope())]
    return flags


def _hf_params(method: str) -> dict:
    if method == "dynamic":  # HF's dynamic NTK switches at the config's max_position_embeddings (set to L below)
        return {"rope_type": "dynamic", "factor": 4.0}
    return {"rope_type": method, "factor": 4.0, "original_max_position_embeddings": L} | _longrope()


def _hf_model(method: str):
    from fixtures.hf_models import build_hf_model

    overrides = {"max_position_embeddings": L} if method == "dynamic" else {}
    return build_hf_model("llama", rope_parameters=_hf_params(method), **overrides).double()


def _rewrite(src, out, *flags) -> None:
    from posrewrite.cli import main

    assert main([str(src), *flags, "-o", str(out)]) == 0


STEPS = [10] + [1] * 14  # prefill below L, then single tokens across it (positions 10 .. 23)


def _decode(sess, ids: np.ndarray, spec) -> list[np.ndarray]:
    """The rewritten model run step by step, each step fed the presents of the step before (a loop written here,
    independent of posrewrite.decode)."""
    past = [np.zeros((ids.shape[0], spec.num_kv_heads, 0, spec.head_dim), np.float32) for _ in range(4)]
    t, out = 0, []
    for n in STEPS:
        feeds = {"input_ids": ids[:, t:t + n], "attention_mask": np.ones((ids.shape[0], t + n), np.int64),
                 "position_ids": np.broadcast_to(np.arange(t, t + n), (ids.shape[0], n)).copy()}
        for layer in range(2):
            feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
        logits, *past = sess.run(None, feeds)
        out.append(logits)
        t += n
    return out


def _hf_full(model, ids: np.ndarray) -> list[np.ndarray]:
    """HF without a cache, the whole sequence up to each step's end at once; the step's positions."""
    t, out = 0, []
    with torch.no_grad():
        for n in STEPS:
            full = model(input_ids=torch.from_numpy(ids[:, :t + n]), use_cache=False).logits.numpy()
            out.append(full[:, t:t + n])
            t += n
    return out


def _hf_cached(model, ids: np.ndarray) -> list[np.ndarray]:
    """HF's cached model (a DynamicCache carried from step to step), the same steps."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t, out = 0, []
    with torch.no_grad():
        for n in STEPS:
            r = model(input_ids=torch.from_numpy(ids[:, t:t + n]),
                      position_ids=torch.arange(t, t + n)[None].expand(ids.shape[0], -1),
                      attention_mask=torch.ones(ids.shape[0], t + n, dtype=torch.int64),
                      past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            out.append(r.logits.numpy())
            t += n
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_hf_mode_equals_hf_cached_and_rerotate_is_closer_to_the_whole_sequence(method, tmp_path):
    from fixtures.hf_models import ARCHS, export_hf_onnx_with_cache, ort_session

    src = export_hf_onnx_with_cache("llama")
    hf, rerot = tmp_path / "hf.onnx", tmp_path / "rerotate.onnx"
    _rewrite(src, hf, *_flags(method))  # the default: HF's cached behaviour
    _rewrite(src, rerot, *_flags(method), "--runtime-decode", "rerotate")
    ids = np.random.default_rng(5).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)
    model = _hf_model(method)
    full, cached = _hf_full(model, ids), _hf_cached(_hf_model(method), ids)
    got_hf = _decode(ort_session(hf), ids, ARCHS["llama"])
    got_rerot = _decode(ort_session(rerot), ids, ARCHS["llama"])
    t = 0
    for n, h, r, f, c in zip(STEPS, got_hf, got_rerot, full, cached, strict=True):
        assert _rel(h, c) <= TOL, (method, "hf", t, _rel(h, c))
        if t + n <= L:
            assert _rel(r, f) <= TOL, (method, "rerotate", t, _rel(r, f))
        else:
            assert _rel(r, f) < _rel(h, f), (method, t, _rel(r, f), _rel(h, f))
        t += n
    assert _rel(cached[-1], full[-1]) > 100 * TOL  # past the switch HF's cache is not the whole sequence


def _shipped(sess, ids: np.ndarray, **kwargs) -> tuple[list[np.ndarray], object]:
    """posrewrite's own loop (posrewrite.decode.CachedDecoder) over the same steps."""
    from posrewrite.decode import CachedDecoder

    dec = CachedDecoder(sess, **kwargs)
    t, out = 0, []
    for n in STEPS:
        out.append(dec.step(ids[:, t:t + n]))
        t += n
    return out, dec


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_exact_mode_equals_the_whole_sequence_at_every_step(method, tmp_path):
    """--runtime-decode exact, decoded by posrewrite.decode: every step across L equals HF's model run on the whole
    sequence so far at once; the same model decoded with the cache only (honour_contract=False) and the hf-mode
    model decoded by the same loop equal HF's cached model. Re-prefills: longrope once (at L + 1), dynamic at every
    step past L."""
    from fixtures.hf_models import export_hf_onnx_with_cache, ort_session

    src = export_hf_onnx_with_cache("llama")
    exact, hf = tmp_path / "exact.onnx", tmp_path / "hf.onnx"
    _rewrite(src, exact, *_flags(method), "--runtime-decode", "exact")
    _rewrite(src, hf, *_flags(method))
    ids = np.random.default_rng(6).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)
    full, cached = _hf_full(_hf_model(method), ids), _hf_cached(_hf_model(method), ids)
    got, dec = _shipped(ort_session(exact), ids)
    for i, (g, f) in enumerate(zip(got, full, strict=True)):
        assert _rel(g, f) <= TOL, (method, i, _rel(g, f))
    past_l = sum(1 for t in np.cumsum(STEPS) if t > L)
    assert dec.full_runs == 1 + (1 if method == "longrope" else past_l), dec.full_runs
    assert dec.cached_steps == len(STEPS) - dec.full_runs
    for model, kwargs in ((exact, {"honour_contract": False}), (hf, {})):
        compat, dec = _shipped(ort_session(model), ids, **kwargs)
        assert dec.full_runs == 1
        for i, (g, c) in enumerate(zip(compat, cached, strict=True)):
            assert _rel(g, c) <= TOL, (method, model.name, i, _rel(g, c))
    assert _rel(cached[-1], full[-1]) > 100 * TOL  # past the switch HF's cache is not the whole sequence


@pytest.mark.slow
@pytest.mark.parametrize("form", ["optimum", "fused-ort", "optimum-fused-ort"])
@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_exact_mode_on_other_export_forms(method, form, tmp_path):
    """The same contract on Optimum's layout (TorchScript, opset 14) and on KV-cache attention fused for
    onnxruntime (--fuse ort: GroupQueryAttention with the run-time caches): the shipped loop equals the whole
    sequence at once at every step."""
    from fixtures.hf_models import export_hf_onnx_with_cache, export_optimum_layout, ort_session

    src = export_optimum_layout() if form.startswith("optimum") else export_hf_onnx_with_cache("llama")
    out = tmp_path / "exact.onnx"
    _rewrite(src, out, *_flags(method), "--runtime-decode", "exact", *(["--fuse", "ort"] if "fused" in form else []))
    ids = np.random.default_rng(8).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)
    got, _ = _shipped(ort_session(out), ids)
    full = _hf_full(_hf_model(method), ids)
    worst = max(_rel(g, f) for g, f in zip(got, full, strict=True))
    assert worst <= TOL, (method, form, worst)


def test_decode_without_contract_or_past_inputs(llama_onnx, tmp_path, capsys):
    """A model posrewrite did not rewrite (no contract) decodes with its cache: equal to HF's model, whose default
    RoPE makes its cache exact; a model without past inputs runs the whole sequence at every step: a dynamic
    rewrite of it equals HF's whole sequence at every step. ``--runtime-decode exact`` on it is refused."""
    from fixtures.hf_models import build_hf_model, export_hf_onnx_with_cache, ort_session
    from posrewrite.cli import main

    ids = np.random.default_rng(7).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)
    plain = build_hf_model("llama").double()
    got, dec = _shipped(ort_session(export_hf_onnx_with_cache("llama")), ids)
    assert dec.contract is None and dec.full_runs == 1
    for i, (g, f) in enumerate(zip(got, _hf_full(plain, ids), strict=True)):
        assert _rel(g, f) <= TOL, (i, _rel(g, f))
    out = tmp_path / "dyn.onnx"
    _rewrite(llama_onnx, out, *_flags("dynamic"))
    got, dec = _shipped(ort_session(out), ids)
    assert dec.full_runs == len(STEPS)
    for i, (g, f) in enumerate(zip(got, _hf_full(_hf_model("dynamic"), ids), strict=True)):
        assert _rel(g, f) <= TOL, (i, _rel(g, f))
    capsys.readouterr()
    rc = main([str(llama_onnx), *_flags("dynamic"), "--runtime-decode", "exact", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "KV-cache" in err and err.count("\n") == 1 and not (tmp_path / "o.onnx").exists()


def test_decode_refuses_what_it_cannot_feed(tmp_path):
    """A decode contract that is not posrewrite's, inputs the loop cannot feed, and bad token arrays: ValueError
    with the reason, and the decoder left as it was."""
    import onnx

    from fixtures.hf_models import export_hf_onnx_with_cache, ort_session
    from posrewrite.decode import CachedDecoder

    src = export_hf_onnx_with_cache("llama")
    model = onnx.load(str(src))
    onnx.helper.set_model_props(model, {"posrewrite.decode": '{"mode": "exact", "reprefill": "sometimes"}'})
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ValueError, match="not a decode contract"):
        CachedDecoder(ort_session(bad))
    dec = CachedDecoder(ort_session(src))
    for ids in (np.zeros((2, 0), np.int64), np.zeros(3, np.int64), np.zeros((2, 2), np.float32)):
        with pytest.raises(ValueError, match="input_ids"):
            dec.step(ids)
    dec.step(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="batch"):
        dec.step(np.ones((3, 1), np.int64))
    assert dec.length == 3

    class Session:  # an input the loop does not know
        def get_modelmeta(self):
            return None

        def get_inputs(self):
            return [type("A", (), {"name": n, "shape": ["b", "s"], "type": "tensor(int64)"})()
                    for n in ("input_ids", "token_type_ids")]

        def get_outputs(self):
            return [type("A", (), {"name": "logits"})()]

    with pytest.raises(ValueError, match="token_type_ids"):
        CachedDecoder(Session())


def test_rerotate_on_optimum_layout(tmp_path):
    """Optimum's layout (TorchScript, opset 14): --runtime-decode rerotate loads, validates and equals the whole
    sequence at once below the switch."""
    from fixtures.hf_models import export_optimum_layout, ort_session

    src = export_optimum_layout()
    out = tmp_path / "rerotate.onnx"
    _rewrite(src, out, *_flags("longrope"), "--runtime-decode", "rerotate")
    plain = tmp_path / "hf.onnx"
    _rewrite(src, plain, *_flags("longrope"))
    ids = np.random.default_rng(6).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)

    class Spec:
        num_kv_heads, head_dim = 2, 16

    a, b = _decode(ort_session(out), ids, Spec), _decode(ort_session(plain), ids, Spec)
    t = 0
    for n, x, y in zip(STEPS, a, b, strict=True):
        if t + n <= L:  # one set of frequencies: both equal the whole sequence
            assert _rel(x, y) <= TOL
        t += n
    assert _rel(a[-1], b[-1]) > 100 * TOL


@pytest.mark.parametrize("flags,needle", [
    (["--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", "16", "--runtime-decode",
      "rerotate"], "run-time methods"),
    (["--rope-scale", "4", "--rope-method", "dynamic", "--original-max-positions", "16", "--runtime-decode", "x"],
     "invalid choice"),
    (["--rope-scale", "4", "--rope-method", "ntk", "--original-max-positions", "16", "--runtime-decode",
      "exact"], "run-time methods"),
])
def test_runtime_decode_usage_errors(flags, needle, tmp_path, capsys):
    from fixtures.hf_models import export_hf_onnx_with_cache
    from posrewrite.cli import main

    src = export_hf_onnx_with_cache("llama")
    capsys.readouterr()
    try:
        rc = main([str(src), *flags, "-o", str(tmp_path / "o.onnx")])
    except SystemExit as exc:  # argparse's own choice check
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err
    assert not (tmp_path / "o.onnx").exists()


def test_rerotate_refused_without_kv_cache(llama_onnx, tmp_path, capsys):
    from posrewrite.cli import main

    capsys.readouterr()
    rc = main([str(llama_onnx), *_flags("dynamic"), "--runtime-decode", "rerotate", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "KV-cache" in err and err.count("\n") == 1
