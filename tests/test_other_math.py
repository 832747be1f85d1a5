"""ALiBi slopes, sinusoidal tables, table interpolation and T5 buckets against independent references:
the ALiBi paper's slope code, HF's Bloom/MPT ALiBi builders, HF's sinusoidal embeddings and T5 buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posrewrite.math.absolute import (
    fit_sinusoidal,
    fit_t5_buckets,
    interpolate_table,
    sinusoidal_table,
    t5_relative_bucket,
)
from posrewrite.math.alibi import alibi_bias, alibi_slopes, fit_linear_bias, near_bias_error

HEADS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 64, 96]


def paper_slopes(n):
    """get_slopes from the ALiBi authors' reference code (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", HEADS)
def test_slopes_match_paper(n):
    np.testing.assert_allclose(alibi_slopes(n), paper_slopes(n), rtol=1e-12)


@pytest.mark.parametrize("n", [4, 6, 12, 16])
def test_slopes_match_hf_bloom_and_mpt(n):
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 3), n, torch.float32)  # [n, 1, 3] = m * j
    np.testing.assert_allclose(bloom[:, 0, 1].numpy(), alibi_slopes(n), rtol=1e-6)
    mpt = build_mpt_alibi_tensor(n, 5)  # [n, 1, 5] = m * (j - 4)
    np.testing.assert_allclose(mpt[:, 0, -1].numpy() - mpt[:, 0, -2].numpy(), alibi_slopes(n), rtol=1e-6)
    np.testing.assert_allclose(
        mpt[:, 0, :].numpy(), alibi_bias(alibi_slopes(n), 1, 5, form="anchored")[:, 0], rtol=1e-6
    )
    fit = fit_linear_bias(mpt[:, 0, :].numpy())
    np.testing.assert_allclose(fit[0], alibi_slopes(n), rtol=1e-5)


def test_alibi_bias_forms_equal_under_softmax():
    m = alibi_slopes(4)
    rel, ab = alibi_bias(m, 5, 7), alibi_bias(m, 5, 7, form="absolute")
    diff = ab - rel  # constant per query row
    assert np.allclose(diff, diff[..., :1])
    assert np.allclose(alibi_bias(m, 3, 3, scale=2.0), alibi_bias(m / 2, 3, 3))


def test_sinusoidal_table_matches_tutorial_and_hf():
    pytest.importorskip("torch")
    n, d = 40, 16
    pos = np.arange(n)[:, None]
    div = np.exp(np.arange(0, d, 2) * (-math.log(10000.0) / d))
    ref = np.zeros((n, d))
    ref[:, 0::2], ref[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    np.testing.assert_allclose(sinusoidal_table(n, d), ref, atol=1e-12)
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    hf = M2M100SinusoidalPositionalEmbedding.get_embedding(n, d).numpy()  # fairseq: concat, i/(d/2-1)
    np.testing.assert_allclose(sinusoidal_table(n, d, layout="concat", rule="fairseq"), hf, atol=1e-6)
    fit = fit_sinusoidal(hf)
    assert (fit["layout"], fit["rule"], fit["base"]) == ("concat", "fairseq", 10000.0)
    fit = fit_sinusoidal(sinusoidal_table(n, d, base=500000.0))
    assert (fit["layout"], fit["rule"], fit["base"]) == ("interleaved", "vaswani", 500000.0)
    assert fit_sinusoidal(np.random.default_rng(0).normal(size=(n, d))) is None


def test_interpolate_table_keeps_offset_rows_and_endpoints():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(34, 8)).astype(np.float32)
    out = interpolate_table(t, 2 + 128, offset=2)
    assert out.shape == (130, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], t[:2])
    np.testing.assert_allclose(out[2], t[2])
    np.testing.assert_allclose(out[-1], t[-1], rtol=1e-6)
    x = 5 * 31 / 127  # row 5 of the new trained block reads trained position 5 * 31/127
    np.testing.assert_allclose(out[2 + 5], t[2 + int(x)] * (1 - x % 1) + t[3 + int(x)] * (x % 1), rtol=1e-5)
    scaled = interpolate_table(t, 2 + 128, offset=2, scale=4.0)
    np.testing.assert_allclose(scaled[2 + 8], t[2 + 2], rtol=1e-6)  # position 8 reads trained position 2


@pytest.mark.parametrize("bidirectional,nb,md", [(True, 32, 128), (False, 32, 128), (True, 16, 64), (False, 64, 256)])
def test_t5_buckets_match_hf(bidirectional, nb, md):
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-600, 600)
    ref = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md
    ).numpy()
    np.testing.assert_array_equal(t5_relative_bucket(rel, bidirectional, nb, md), ref)
    fit = fit_t5_buckets(rel, ref, nb)
    assert (fit["bidirectional"], fit["max_distance"], fit["saturated"]) == (bidirectional, md, True)


def test_near_bias_error_half_precision():
    m = alibi_slopes(4)
    # Bloom fp16: m * j stored in float16 -> near distances wrong at 8192 tokens
    before = near_bias_error(m, 8192, position_dtype="int64", compute_dtype="float32", dtype="float16", form="absolute")
    after = near_bias_error(
        m, 8192, position_dtype="float32", compute_dtype="float32", dtype="float16", form="relative"
    )
    assert before["exact_fraction"] < 0.5 and before["max_error"] >= 0.5
    assert after["exact_fraction"] == 1.0 and after["max_error"] == 0.0
    # within 2048 tokens fp16 integers are exact and power-of-two slopes keep m*j exact
    assert (
        near_bias_error(m, 2048, position_dtype="int64", compute_dtype="float32", dtype="float16", form="absolute")[
            "exact_fraction"
        ]
        == 1.0
    )
    bf16 = near_bias_error(
        m, 8192, position_dtype="bfloat16", compute_dtype="bfloat16", dtype="float32", form="absolute"
    )
    assert bf16["exact_fraction"] < 0.1
