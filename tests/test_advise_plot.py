"""`posrewrite advise` and `posrewrite plot` (posrewrite/advise.py, posrewrite/plot.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posrewrite import advise as adv
from posrewrite.math import base_bound as bb
from posrewrite.math.rope import default_inv_freq

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------- advise
def test_advise_context_only_reports_bound_and_paper_values():
    r = adv.advise(4096)
    assert r.dim == 128
    assert r.min_base == pytest.approx(bb.min_base(4096, 128))
    assert abs(r.min_base / 2.7e4 - 1) < 0.1  # paper's table: 4k -> 2.7e4
    text = "\n".join(r.lines)
    assert "smallest RoPE base: 28,6" in text
    assert "2405.14591" in text
    assert "paper's table 27,000" in text
    assert "Necessary, not sufficient" in text
    assert len(r.lines) <= 8
    d = r.to_dict()
    assert d["context"] == 4096 and d["rotary_dim"] == 128 and d["checks"] == []


def test_advise_head_dim_changes_the_bound():
    r = adv.advise(4096, head_dim=64)
    assert r.dim == 64 and r.paper_table is None
    assert r.min_base == pytest.approx(bb.min_base(4096, 64))
    assert "--head-dim" in r.lines[0]


def test_advise_model_base_meets_or_not():
    # base 10000, rotary dim 32 (the long-context fixture model); reference: B(m) = sum_i cos(m theta_i) summed
    # here directly, its first negative m found by scanning
    theta = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    curve = np.cos(np.outer(np.arange(513, dtype=np.float64), theta)).sum(axis=1)
    first = int(np.flatnonzero(curve < 0)[0])
    assert first < 512
    low = adv.advise(512, base=10000, rotary_dim=32)
    (c,) = low.checks
    assert not c.meets and c.first_negative == first and c.longest == first - 1
    assert "does NOT meet" in low.lines[-1] and str(first) in low.lines[-1]
    assert curve[:257].min() >= 0
    ok = adv.advise(256, base=10000, rotary_dim=32)
    assert ok.checks[0].meets
    assert "MEETS" in ok.lines[-1]
    # the direct test agrees with comparing to the minimal base here
    assert low.checks[0].base < low.min_base


@pytest.mark.parametrize("method", ["linear", "ntk", "dynamic", "yarn"])
def test_advise_planned_rewrite(method):
    r = adv.advise(512, base=10000, rotary_dim=32, rope_params={"rope_type": method, "factor": 4}, original_context=128)
    before, after = r.checks
    assert not before.meets and after.meets
    assert after.label.startswith(f"after {method} x4")
    assert "MEETS" in r.lines[-1]
    if method == "ntk":
        assert after.geometric and after.base == pytest.approx(10000 * 4 ** (32 / 30), rel=1e-4)
    if method in ("linear", "yarn"):
        assert not after.geometric
    if method == "yarn":
        assert after.attention_factor == pytest.approx(0.1 * math.log(4) + 1)


def test_effective_base_of_geometric_and_linear():
    inv = default_inv_freq(10000.0, 32)
    assert adv.effective_base(inv) == (10000.0, True)
    b, geometric = adv.effective_base(inv / 4)
    assert not geometric and b == pytest.approx(10000 * 4 ** (32 / 30), rel=1e-4)


def test_advise_model_without_path_rejects_rewrite():
    with pytest.raises(ValueError):
        adv.advise_model(1024, rope_params={"rope_type": "ntk", "factor": 2})
    assert adv.advise_model(1024).min_base == pytest.approx(bb.min_base(1024, 128))


# --------------------------------------------------------------------------------------------------- plot
def _png_ok(path):
    data = open(path, "rb").read()
    return len(data) > 10_000 and data[:8] == PNG_MAGIC


def test_plot_rope_writes_png_and_wavelengths(tmp_path):
    from posrewrite.math.rope import RopeParameters, scaled_inv_freq
    from posrewrite.plot import plot_rope

    pytest.importorskip("matplotlib")
    inv = default_inv_freq(10000.0, 32)
    params = RopeParameters.from_hf({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 128})
    new, att = scaled_inv_freq(params, inv_freq=inv, base=10000.0, dim=32)
    out = tmp_path / "rope.png"
    r = plot_rope(
        inv,
        original_context=128,
        target_context=512,
        scaled_inv_freq=new,
        attention_factor=att,
        out_png=out,
        label_after="after yarn x4",
    )
    assert _png_ok(out)
    # independent: wavelength_i = 2 pi b^(2i/d)
    expect = 2 * math.pi * 10000.0 ** (np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(r.wavelengths_before, expect, rtol=1e-6)
    np.testing.assert_allclose(r.wavelengths_after, 2 * math.pi / new.astype(np.float64), rtol=1e-12)
    assert r.wavelengths_after[0] == pytest.approx(2 * math.pi)  # yarn keeps the fastest pair
    assert r.wavelengths_after[-1] == pytest.approx(4 * expect[-1], rel=1e-5)  # ... and interpolates the slowest
    d = r.to_dict()
    assert len(d["wavelengths_before"]) == 16 and d["attention_factor"] == pytest.approx(att)
    assert r.lines[0].startswith("wrote ")
    assert "10 of 16 pairs exceed the training context 128" in r.lines[1]
    assert "B(m) >= 0 up to m = 473" in r.lines[2]


def test_decay_curve_starts_at_one_and_decays():
    from posrewrite.plot import decay_curve

    inv = default_inv_freq(10000.0, 128)
    c = decay_curve(inv, np.arange(0, 2000))
    assert c[0] == pytest.approx(1.0)
    assert c[1000:].mean() < 0.5 * c[:5].mean()


# ------------------------------------------------------------------------------------------ on a fixture
def test_plot_and_advise_on_fixture_model(llama_onnx, tmp_path):
    pytest.importorskip("matplotlib")
    from posrewrite.plot import plot_model

    out = tmp_path / "llama.png"
    r = plot_model(llama_onnx, out, {"rope_type": "ntk", "factor": 4}, original_context=64)
    assert _png_ok(out)
    expect = 2 * math.pi * 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(r.wavelengths_before, expect, rtol=1e-5)
    assert r.target_context == 256
    a = adv.advise_model(
        256, path=llama_onnx, rope_params={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64}
    )
    assert a.dim == 16 and len(a.checks) == 2
    assert a.lines[0].startswith("model ") and "base 10,000" in a.lines[0]
