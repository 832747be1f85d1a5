"""--fp32-positions for ALiBi: the bias of the nearest 256 distances at 8192 tokens, measured by running
the bias subgraph in onnxruntime before and after the rewrite; Falcon's bfloat16 ALiBi promoted to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fixtures.other_models import export_other_onnx, ort_run, torch_logits  # noqa: E402
from posrewrite.passes.onnx.alibi.fp32 import Fp32AlibiPass, alibi_precision  # noqa: E402
from posrewrite.passes.onnx.detect import detect_other_encodings  # noqa: E402
from tests.test_other_math import paper_slopes  # noqa: E402

N, WINDOW = 8192, 256


def rewrite(path, out):
    model = ir.load(path)
    sites, _ = detect_other_encodings(model)
    p = Fp32AlibiPass(sites=sites)
    modified = p(model).modified
    ir.save(model, out)
    return sites, p, modified


def near_bias(path, n=N):
    """Runs only the ALiBi subgraph for the last query of an n-token input; returns the bias that softmax
    sees for the WINDOW nearest keys, b(i, j) - b(i, i), shape [heads, WINDOW] (float64)."""
    (site,) = detect_other_encodings(ir.load(path))[0]
    inputs = ["attention_mask"]
    feeds = {"attention_mask": np.ones((1, n), np.int64)}
    if site.form == "relative":  # the rewritten bias reads the scores' shape: feed one query row
        inputs.append(site.scores[0].name)
        feeds[site.scores[0].name] = np.zeros((site.num_heads, 1, n), np.float16)
    sub = onnx.utils.Extractor(onnx.load(str(path))).extract_model(inputs, [site.bias.name])
    b = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = b.astype(np.float64).reshape(site.num_heads, -1)[:, -WINDOW:]
    return b - b[:, -1:]


def exact_fraction(eff):
    m = np.asarray(paper_slopes(eff.shape[0]))[:, None]
    exact = -m * np.arange(WINDOW - 1, -1, -1)[None, :]
    half_ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64) / 2
    return float(np.mean(np.abs(eff - exact) <= half_ulp))


def test_fp16_alibi_near_bias_exact_after_rewrite(tmp_path):
    path, _ = export_other_onnx("bloom", dtype="float16")
    sites, p, modified = rewrite(path, tmp_path / "fp32.onnx")
    assert modified and p.changes
    before, after = exact_fraction(near_bias(path)), exact_fraction(near_bias(tmp_path / "fp32.onnx"))
    assert before < 0.5 and after == 1.0, (before, after)
    # the analysis `check` prints agrees with the measurement
    report = alibi_precision(sites[0], N)
    assert not report["safe"] and report["near_exact_fraction"] == pytest.approx(before)
    (new_site,) = detect_other_encodings(ir.load(tmp_path / "fp32.onnx"))[0]
    assert new_site.form == "relative" and alibi_precision(new_site, N)["safe"]
    assert alibi_precision(new_site, N)["near_exact_fraction"] == after
    # short inputs: same logits; a second pass has nothing to do
    x = np.random.default_rng(0).integers(3, 100, size=(1, 24))
    np.testing.assert_allclose(ort_run(tmp_path / "fp32.onnx", x), ort_run(path, x), atol=2e-3, rtol=0)
    assert not Fp32AlibiPass(sites=[new_site])(ir.load(tmp_path / "fp32.onnx")).modified


def test_fp32_bloom_is_already_safe(tmp_path):
    path, _ = export_other_onnx("bloom")
    sites, p, modified = rewrite(path, tmp_path / "same.onnx")
    assert not modified and "already fp32-safe" in p.notes[0]
    assert alibi_precision(sites[0], N)["safe"]


def test_falcon_bfloat16_alibi_promoted(tmp_path):
    """Falcon forms ALiBi in bfloat16 (positions exact only up to 256); ORT's CPU has no bf16 Mul, so
    the export does not even run. After the rewrite it runs and matches HF torch."""
    path, _ = export_other_onnx("falcon")
    sites, p, modified = rewrite(path, tmp_path / "fp32.onnx")
    report = alibi_precision(sites[0], N)
    assert not report["safe"] and report["exact_position_fraction"] == pytest.approx(896 / 8192)
    assert modified
    x = np.random.default_rng(0).integers(3, 100, size=(1, 24))
    np.testing.assert_allclose(ort_run(tmp_path / "fp32.onnx", x), torch_logits("falcon", x), atol=1e-4, rtol=1e-4)
    (new_site,) = detect_other_encodings(ir.load(tmp_path / "fp32.onnx"))[0]
    assert new_site.compute_dtype == "float32" and alibi_precision(new_site, N)["safe"]
