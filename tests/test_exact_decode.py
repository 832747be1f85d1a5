"""Run-time RoPE methods (dynamic NTK, LongRoPE) on KV-cache exports, decoded step by step across the switch at L.

References are Hugging Face's own models (same weights, the same ``rope_parameters``), in float64:
- ``--runtime-decode hf`` (the default): every step equals HF's cached model fed the same steps (past keys keep the
  frequencies of their own step);
- exact decode of LongRoPE (decode equal to the whole sequence at once at every step) with the hf-mode model and one
  new prefill of the whole sequence at the step that crosses L: every step equals HF's model run on the whole
  sequence so far at once (no cache);
- ``--runtime-decode rerotate`` (the cache holds keys before rotation, every step rotates them with the current
  frequencies): equal to the whole sequence below L and, past it, closer to it than HF's cached behaviour at every
  step (not equal: the past keys' values come from hidden states of earlier frequencies);
and HF's cached model differs from the whole sequence past the switch (so the tests cannot pass by accident).
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


def _decode(sess, ids: np.ndarray, spec, reprefill_at: int | None = None) -> list[np.ndarray]:
    """The rewritten model run step by step, each step fed the presents of the step before; at the step whose
    total length is ``reprefill_at`` the whole sequence so far is run again from an empty past."""
    empty = [np.zeros((ids.shape[0], spec.num_kv_heads, 0, spec.head_dim), np.float32) for _ in range(4)]
    past = empty
    t, out = 0, []
    for n in STEPS:
        if reprefill_at is not None and t + n == reprefill_at:
            feeds = {"input_ids": ids[:, :t + n], "attention_mask": np.ones((ids.shape[0], t + n), np.int64),
                     "position_ids": np.broadcast_to(np.arange(t + n), (ids.shape[0], t + n)).copy()}
            for layer in range(2):
                feeds[f"past_key_values.{layer}.key"] = empty[2 * layer]
                feeds[f"past_key_values.{layer}.value"] = empty[2 * layer + 1]
            logits, *past = sess.run(None, feeds)
            out.append(logits[:, t:])
            t += n
            continue
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


def test_longrope_exact_decode_with_one_prefill_at_the_switch(tmp_path):
    """LongRoPE changes frequencies once (at L + 1 tokens): the hf-mode model decoded with one new prefill of the
    whole sequence at that step equals the whole sequence at once at every step."""
    from fixtures.hf_models import ARCHS, export_hf_onnx_with_cache, ort_session

    src = export_hf_onnx_with_cache("llama")
    out = tmp_path / "hf.onnx"
    _rewrite(src, out, *_flags("longrope"))
    ids = np.random.default_rng(6).integers(3, 128, size=(2, sum(STEPS))).astype(np.int64)
    full = _hf_full(_hf_model("longrope"), ids)
    got = _decode(ort_session(out), ids, ARCHS["llama"], reprefill_at=L + 1)
    worst = max(_rel(g, f) for g, f in zip(got, full, strict=True))
    assert worst <= TOL, worst
    plain = _decode(ort_session(out), ids, ARCHS["llama"])
    assert _rel(plain[-1], full[-1]) > 100 * TOL  # without the new prefill: HF's cached behaviour


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
