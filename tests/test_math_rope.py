"""posrewrite.math.rope against Hugging Face transformers (the independent reference)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402

from posrewrite.math.rope import (  # noqa: E402
    ROPE_METHODS,
    RopeParameters,
    apply_rotary,
    cos_sin_tables,
    default_inv_freq,
    dynamic_ntk_base,
    longrope_attention_factor,
    ntk_base,
    scaled_inv_freq,
    yarn_attention_factor,
)
from posrewrite.math.rope_fit import fit_base, recover_base, recover_inv_freq, round_base_inv_freq  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


def llama_config(head_dim: int, rope: dict, *, theta: float = 10000.0, max_pos: int = 4096) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
        max_position_embeddings=max_pos,
        rope_parameters={**rope, "rope_theta": theta},
    )


def hf_inv_freq(config, seq_len=None) -> tuple[np.ndarray, float]:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, att = ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu", seq_len=seq_len)
    return inv.numpy().astype(np.float32), float(att)


def assert_matches(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal within float32 round-off, whatever operation order HF (or torch's pow) used.

    Each inverse frequency is exp(-y) with y = x ln b. In float32 the exponent carries a few roundings of |y|
    (x, ln b, their product, pow's own ~1 ulp) and the value a few of its own (pow, reciprocal, the scaling's
    blends), so two correct evaluations differ by at most u |f| (8 + 4 |ln f|), u = 2^-24. An error in a
    method (a wrong ramp, a wrong factor, a frequency off by one index) is orders of magnitude larger."""
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    u = 2.0 ** -24
    f = np.abs(ref.astype(np.float64))
    bound = u * f * (8 + 4 * np.abs(np.log(f)))
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g}"


def ours_for(rope: dict, *, head_dim: int, theta: float, max_pos: int, seq_len=None, dim=None):
    dim = dim or head_dim
    params = RopeParameters.from_hf(rope, max_position_embeddings=max_pos)
    return scaled_inv_freq(params, inv_freq=default_inv_freq(theta, dim), base=theta, dim=dim, seq_len=seq_len)


# ----------------------------------------------------------------------------------------------------------
# inverse frequencies per method
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6, 75000.0])
def test_default_inv_freq_matches_hf(head_dim, theta):
    ref, _ = hf_inv_freq(llama_config(head_dim, {"rope_type": "default"}, theta=theta))
    assert_matches(default_inv_freq(theta, head_dim), ref)


def test_default_inv_freq_partial_rotary_gpt_neox():
    config = GPTNeoXConfig(hidden_size=256, num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=10000)
    ref, _ = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    dim = int(64 * 0.25)
    assert_matches(default_inv_freq(10000.0, dim), ref.numpy())


CASES = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 8.0},
    {"rope_type": "linear", "factor": 3.3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "attention_factor": 1.25},
    {  # DeepSeek-V3 values
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    },
    {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.8},
    {  # Llama 3.1
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    {  # Llama 3.2 1B/3B
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 2048,
    },
]


@pytest.mark.parametrize("rope", CASES, ids=lambda r: "-".join(f"{v}" for v in r.values()))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_scaled_inv_freq_matches_hf(rope, head_dim, theta):
    max_pos = 131072
    ref, ref_att = hf_inv_freq(llama_config(head_dim, dict(rope), theta=theta, max_pos=max_pos))
    ours, att = ours_for(rope, head_dim=head_dim, theta=theta, max_pos=max_pos)
    assert_matches(ours, ref)
    assert att == pytest.approx(ref_att, rel=1e-12)


@pytest.mark.parametrize("rope", [CASES[0], CASES[3], CASES[5], CASES[8], CASES[10]], ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("partial", [0.25, 0.5])
def test_scaled_inv_freq_partial_rotary(rope, partial):
    head_dim = 128
    config = llama_config(head_dim, {**rope, "partial_rotary_factor": partial}, max_pos=131072)
    ref, ref_att = hf_inv_freq(config)
    dim = int(head_dim * partial)
    ours, att = ours_for(rope, head_dim=head_dim, theta=10000.0, max_pos=131072, dim=dim)
    assert_matches(ours, ref)
    assert att == pytest.approx(ref_att, rel=1e-12)


def test_yarn_factor_from_lengths():
    # factor absent (null): HF uses max_position_embeddings / original_max_position_embeddings
    rope = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    ref, ref_att = hf_inv_freq(llama_config(128, dict(rope), max_pos=32768))
    ours, att = ours_for(rope, head_dim=128, theta=10000.0, max_pos=32768)
    assert_matches(ours, ref)
    assert att == pytest.approx(ref_att, rel=1e-12)
    assert att == pytest.approx(0.1 * math.log(8) + 1)


@pytest.mark.parametrize("factor", [2.0, 4.0, 1.5])
@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 6000, 20000])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dynamic_matches_hf(factor, seq_len, head_dim):
    rope = {"rope_type": "dynamic", "factor": factor}
    ref, _ = hf_inv_freq(llama_config(head_dim, dict(rope), max_pos=4096), seq_len=seq_len)
    ours, att = ours_for(rope, head_dim=head_dim, theta=10000.0, max_pos=4096, seq_len=seq_len)
    assert_matches(ours, ref)
    assert att == 1.0
    base = dynamic_ntk_base(10000.0, head_dim, factor, seq_len, 4096)
    if seq_len <= 4096:
        assert base == 10000.0
    else:
        assert base == pytest.approx(10000.0 * (factor * seq_len / 4096 - (factor - 1)) ** (head_dim / (head_dim - 2)))


def test_dynamic_matches_hf_module():
    # The module path gets seq_len as a tensor (base computed in float32 there), hence rtol only.
    config = llama_config(64, {"rope_type": "dynamic", "factor": 2.0}, max_pos=1024)
    module = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, 64)
    params = RopeParameters.from_hf({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=1024)
    inv = default_inv_freq(10000.0, 64)
    for n in (512, 3000):
        cos, sin = module(x, torch.arange(n)[None])
        ref = module.inv_freq.numpy()
        ours, _ = scaled_inv_freq(params, inv_freq=inv, base=10000.0, dim=64, seq_len=n)
        np.testing.assert_allclose(ours, ref, rtol=2e-6)
        ours_cos, ours_sin = cos_sin_tables(ref, n, layout="rotate_half")
        np.testing.assert_allclose(ours_cos, cos[0].numpy(), atol=2e-6)
        np.testing.assert_allclose(ours_sin, sin[0].numpy(), atol=2e-6)


def phi3_longrope_config(partial: float = 1.0, factor=None, attention_factor=None) -> tuple[Phi3Config, dict]:
    head_dim = 96
    dim = int(head_dim * partial)
    rng = np.random.default_rng(0)
    rope = {
        "rope_type": "longrope",
        "short_factor": [float(v) for v in 1.0 + 0.1 * rng.random(dim // 2)],
        "long_factor": [float(v) for v in np.linspace(1.0, 40.0, dim // 2)],
    }
    if factor is not None:
        rope["factor"] = factor
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    config = Phi3Config(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        intermediate_size=8,
        vocab_size=16,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=partial,
        rope_parameters={**rope, "rope_theta": 10000.0},
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    return config, rope


@pytest.mark.parametrize("seq_len", [None, 10, 4096, 4097, 100000])
@pytest.mark.parametrize(
    "partial,factor,attention_factor", [(1.0, None, None), (0.5, None, None), (1.0, 16.0, None), (1.0, None, 1.1)]
)
def test_longrope_matches_hf(seq_len, partial, factor, attention_factor):
    config, rope = phi3_longrope_config(partial, factor, attention_factor)
    ref, ref_att = hf_inv_freq(config, seq_len=seq_len)
    params = RopeParameters.from_hf(
        {**rope, "original_max_position_embeddings": 4096}, max_position_embeddings=131072
    )
    dim = int(96 * partial)
    ours, att = scaled_inv_freq(params, inv_freq=default_inv_freq(10000.0, dim), base=10000.0, dim=dim, seq_len=seq_len)
    assert_matches(ours, ref)
    assert att == pytest.approx(ref_att, rel=1e-12)
    expected = attention_factor or longrope_attention_factor(factor or 131072 / 4096, 4096)
    assert att == pytest.approx(expected)


def test_longrope_module_switch():
    config, rope = phi3_longrope_config()
    module = Phi3RotaryEmbedding(config)
    params = RopeParameters.from_hf(rope, max_position_embeddings=131072, original_max_position_embeddings=4096)
    assert params.original_max_position_embeddings == 4096 and params.effective_factor() == 32.0
    x = torch.zeros(1, 1, 96)
    for n in (4096, 4097):
        cos, sin = module(x, torch.arange(n)[None])
        ours, att = scaled_inv_freq(params, inv_freq=default_inv_freq(10000.0, 96), base=10000.0, dim=96, seq_len=n)
        assert_matches(ours, module.inv_freq.numpy())
        assert att == pytest.approx(module.attention_scaling)
        # tables from HF's vector (ours may differ from it by an ulp, which m * theta magnifies)
        ours_cos, ours_sin = cos_sin_tables(module.inv_freq.numpy(), n, attention_factor=att, layout="rotate_half")
        np.testing.assert_allclose(ours_cos, cos[0].numpy(), atol=2e-6)
        np.testing.assert_allclose(ours_sin, sin[0].numpy(), atol=2e-6)


def test_longrope_wrong_list_length():
    params = RopeParameters(
        rope_type="longrope", original_max_position_embeddings=4096, short_factor=(1.0,) * 31, long_factor=(2.0,) * 32
    )
    with pytest.raises(ValueError, match="short_factor has 31"):
        scaled_inv_freq(params, inv_freq=default_inv_freq(1e4, 64), base=1e4, dim=64)


@pytest.mark.parametrize("new_base", [500000.0, 1e6, 40000.0])
def test_new_base_and_ntk_match_hf_default(new_base):
    ref, _ = hf_inv_freq(llama_config(128, {"rope_type": "default"}, theta=new_base))
    inv = default_inv_freq(10000.0, 128)
    ours, att = scaled_inv_freq(RopeParameters(rope_theta=new_base), inv_freq=inv, base=10000.0, dim=128)
    assert_matches(ours, ref)
    assert att == 1.0
    # "default" without a new base keeps the vector
    same, _ = scaled_inv_freq(RopeParameters(), inv_freq=inv, base=10000.0, dim=128)
    np.testing.assert_array_equal(same, inv)
    # ntk == default with rope_theta = b * s^(d/(d-2)), which is how HF expresses it
    for factor in (2.0, 4.0, 8.0):
        b = ntk_base(10000.0, 128, factor)
        assert b == pytest.approx(10000.0 * factor ** (128 / 126))
        ref, _ = hf_inv_freq(llama_config(128, {"rope_type": "default"}, theta=b))
        ours, _ = scaled_inv_freq(RopeParameters("ntk", factor), inv_freq=inv, base=None, dim=128)
        assert_matches(ours, ref)
        hf_dict = RopeParameters("ntk", factor).to_hf(base=10000.0, dim=128)
        assert hf_dict["rope_type"] == "default" and hf_dict["rope_theta"] == pytest.approx(b)


def test_rope_theta_replaces_base_for_scaling():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    ref, ref_att = hf_inv_freq(llama_config(128, dict(rope), theta=1e6, max_pos=16384))
    params = RopeParameters.from_hf({**rope, "rope_theta": 1e6})
    ours, att = scaled_inv_freq(params, inv_freq=default_inv_freq(1e4, 128), base=1e4, dim=128)
    assert_matches(ours, ref)
    assert att == pytest.approx(ref_att)


def test_base_fitted_when_not_given():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    ref, _ = hf_inv_freq(llama_config(64, dict(rope), theta=500000.0, max_pos=16384))
    params = RopeParameters.from_hf(rope)
    ours, _ = scaled_inv_freq(params, inv_freq=default_inv_freq(500000.0, 64), base=None, dim=64)
    assert_matches(ours, ref)
    llama3 = hf_inv_freq(llama_config(64, dict(CASES[10]), theta=500000.0, max_pos=131072))[0]
    with pytest.raises(ValueError, match="base"):
        scaled_inv_freq(params, inv_freq=llama3, base=None, dim=64)


def test_attention_factor_helpers():
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4) + 1)
    assert yarn_attention_factor(40.0, 1.0, 1.0) == pytest.approx(1.0)
    assert yarn_attention_factor(4.0, mscale=0.8) == pytest.approx(0.1 * math.log(4) + 1)  # needs both, as HF
    assert yarn_attention_factor(4.0, attention_factor=0.5) == 0.5
    assert longrope_attention_factor(32.0, 4096) == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert longrope_attention_factor(1.0, 4096) == 1.0


# ----------------------------------------------------------------------------------------------------------
# tables and rotation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, CASES[3], CASES[10]], ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cos_sin_tables_match_hf_module(rope, dtype):
    head_dim, max_pos = 64, 32768
    config = llama_config(head_dim, dict(rope), max_pos=max_pos)
    module = LlamaRotaryEmbedding(config)
    torch_dtype = getattr(torch, dtype)
    positions = np.array([0, 1, 2, 7, 100, 2047, 4095, 8191, 20000, 32767])
    cos, sin = module(torch.zeros(1, 1, head_dim, dtype=torch_dtype), torch.from_numpy(positions)[None])
    ours_inv, att = ours_for(rope, head_dim=head_dim, theta=10000.0, max_pos=max_pos)
    assert att == pytest.approx(module.attention_scaling)
    assert_matches(ours_inv, module.inv_freq.numpy())
    ours_inv = module.inv_freq.numpy()  # an ulp of difference would be magnified by m up to 32767
    ours_cos, ours_sin = cos_sin_tables(ours_inv, positions, attention_factor=att, layout="rotate_half")
    ref_cos, ref_sin = cos[0].float().numpy(), sin[0].float().numpy()
    ours_cos_f32 = ours_cos
    if dtype == "bfloat16":
        ours_cos = torch.from_numpy(ours_cos).to(torch.bfloat16).float().numpy()
        ours_sin = torch.from_numpy(ours_sin).to(torch.bfloat16).float().numpy()
        atol = 2**-8
    else:
        atol = 2e-6
    np.testing.assert_allclose(ours_cos, ref_cos, atol=atol, rtol=0)
    np.testing.assert_allclose(ours_sin, ref_sin, atol=atol, rtol=0)
    # the other layouts hold the same values
    half_cos, half_sin = cos_sin_tables(ours_inv, positions, attention_factor=att, layout="half")
    np.testing.assert_array_equal(half_cos, ours_cos_f32[:, : head_dim // 2])
    il_cos, il_sin = cos_sin_tables(ours_inv, positions, attention_factor=att, layout="interleaved")
    np.testing.assert_array_equal(il_cos, np.repeat(half_cos, 2, axis=-1))
    np.testing.assert_array_equal(il_sin, np.repeat(half_sin, 2, axis=-1))


def test_cos_sin_tables_count_and_fp64():
    inv = default_inv_freq(10000.0, 32)
    c32, s32 = cos_sin_tables(inv, 5000)
    assert c32.shape == (5000, 16) and c32.dtype == np.float32
    c64, s64 = cos_sin_tables(inv, 5000, dtype=np.float64, compute_dtype=np.float64)
    pos = np.arange(5000, dtype=np.float64)[:, None] * inv.astype(np.float64)
    np.testing.assert_allclose(c64, np.cos(pos), atol=1e-12)
    # float32 angles lose ~half an ulp of m*theta, up to ~2.4e-4 rad at m ~ 5000
    assert np.max(np.abs(c32 - c64)) < 5e-4


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("full_form", [False, True])
def test_apply_rotary_rotate_half_matches_hf(full_form):
    head_dim, seq = 64, 12
    config = llama_config(head_dim, {"rope_type": "default"})
    positions = torch.arange(seq)[None]
    q = _rand((1, 3, seq, head_dim))
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    ref, _ = llama_apply(torch.from_numpy(q), torch.from_numpy(q), cos, sin)
    c, s = cos_sin_tables(default_inv_freq(10000.0, head_dim), seq, layout="rotate_half" if full_form else "half")
    ours = apply_rotary(q, c, s, layout="rotate_half", rotary_dim=head_dim if full_form else None)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_apply_rotary_interleaved_matches_gptj():
    head_dim, seq = 32, 10
    x = _rand((1, seq, 2, head_dim), seed=1)  # GPT-J: [batch, seq, heads, dim]
    inv = default_inv_freq(10000.0, head_dim)
    c, s = cos_sin_tables(inv, seq, layout="half")
    ref = gptj_apply(torch.from_numpy(x), torch.from_numpy(s)[None], torch.from_numpy(c)[None])
    ours = apply_rotary(np.swapaxes(x, 1, 2), c, s, layout="interleaved")
    np.testing.assert_allclose(np.swapaxes(ours, 1, 2), ref.numpy(), atol=1e-5)
    # full (repeated) form gives the same
    c2, s2 = cos_sin_tables(inv, seq, layout="interleaved")
    full = apply_rotary(np.swapaxes(x, 1, 2), c2, s2, layout="interleaved", rotary_dim=head_dim)
    np.testing.assert_array_equal(full, ours)


def test_apply_rotary_partial_matches_neox_style():
    head_dim, rot, seq = 64, 16, 9
    q = _rand((1, 2, seq, head_dim), seed=2)
    inv = default_inv_freq(10000.0, rot)
    c, s = cos_sin_tables(inv, seq, layout="rotate_half")
    tq = torch.from_numpy(q)
    rot_ref, _ = llama_apply(tq[..., :rot], tq[..., :rot], torch.from_numpy(c)[None], torch.from_numpy(s)[None])
    ref = torch.cat([rot_ref, tq[..., rot:]], dim=-1).numpy()
    half_c, half_s = cos_sin_tables(inv, seq, layout="half")
    ours = apply_rotary(q, half_c, half_s, layout="rotate_half")
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_array_equal(ours[..., rot:], q[..., rot:])
    np.testing.assert_allclose(apply_rotary(q, c, s, layout="rotate_half", rotary_dim=rot), ours, atol=0)


# ----------------------------------------------------------------------------------------------------------
# fit_base
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6, 5e6, 1234.5, 10000.0 * 4 ** (128 / 126)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_fit_base_round_trip_hf(theta, head_dim):
    ref, _ = hf_inv_freq(llama_config(head_dim, {"rope_type": "default"}, theta=theta))
    fitted = fit_base(ref)
    assert fitted is not None
    if theta in (10000.0, 500000.0, 1e6, 5e6, 1234.5):
        assert fitted == theta
    else:
        # any base whose vector agrees with HF's within float32 round-off of exp(-x ln b) is as good as theta
        # (3 roundings of the exponent |ln f|, 6 of the value): the fit may be any base in that window
        u, x_last = 2.0 ** -24, (head_dim - 2) / head_dim
        window = u * (6 + 3 * x_last * math.log(theta)) / x_last
        assert fitted == pytest.approx(theta, rel=window)
    assert fit_base(ref, head_dim) == fitted


def test_fit_base_rejects_non_geometric():
    llama3, _ = hf_inv_freq(llama_config(128, dict(CASES[10]), theta=500000.0, max_pos=131072))
    assert fit_base(llama3) is None
    linear, _ = hf_inv_freq(llama_config(128, {"rope_type": "linear", "factor": 4.0}))
    assert fit_base(linear) is None
    yarn, _ = hf_inv_freq(llama_config(128, dict(CASES[3]), max_pos=16384))
    assert fit_base(yarn) is None
    assert fit_base(np.array([1.0], dtype=np.float32)) is None


def test_fit_base_partial_dim():
    # GPT-NeoX partial rotary: exponents 2i/rotary_dim
    ref = default_inv_freq(10000.0, 16)
    assert fit_base(ref, 16) == 10000.0
    with pytest.raises(ValueError):
        fit_base(ref, 64)


# ----------------------------------------------------------------------------------------------------------
# parsing and validation
# ----------------------------------------------------------------------------------------------------------

PHI3_SHORT = [1.05] * 48
PHI3_LONG = [1.0 + i for i in range(48)]

REAL_CONFIGS = [
    # (name, rope dict as found in config.json, top-level rope_theta, max_position_embeddings, head_dim)
    ("llama-3.1-v4", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}, 500000.0, 131072, 128),
    ("llama-3.1-v5", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, None, 131072, 128),
    ("qwen2.5-yarn-v4", {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}, 1e6, 131072, 128),
    ("deepseek-v3-yarn", {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096, "type": "yarn"}, 10000.0, 163840, 64),
    ("linear-v4", {"type": "linear", "factor": 2.0}, 10000.0, 4096, 128),
    ("dynamic-v4", {"type": "dynamic", "factor": 2.0}, 10000.0, 4096, 128),
    ("phi3-longrope-v4", {"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG},
     10000.0, 131072, 96),
    ("v5-partial", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
     None, 4096, 64),
    ("v5-nulls", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                  "attention_factor": None, "beta_fast": None, "beta_slow": None}, 10000.0, 16384, 64),
]


@pytest.mark.parametrize("name,rope,theta,max_pos,head_dim", REAL_CONFIGS, ids=[c[0] for c in REAL_CONFIGS])
def test_from_hf_real_configs_match_hf(name, rope, theta, max_pos, head_dim):
    kwargs = {} if theta is None else {"rope_theta": theta}
    config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
        intermediate_size=8, vocab_size=16, max_position_embeddings=max_pos, rope_scaling=dict(rope), **kwargs,
    )
    params = RopeParameters.from_hf(dict(rope), max_position_embeddings=max_pos)
    base = params.rope_theta if params.rope_theta is not None else theta
    for seq_len in (None, max_pos // 2, max_pos, 2 * max_pos):
        ref, ref_att = hf_inv_freq(config, seq_len=seq_len)
        ours, att = scaled_inv_freq(params, inv_freq=default_inv_freq(base, head_dim), base=base, dim=head_dim,
                                    seq_len=seq_len)
        assert_matches(ours, ref)
        assert att == pytest.approx(ref_att, rel=1e-12)
    # our dict goes back through HF to the same vector
    back = RopeParameters.from_hf(params.to_hf(), max_position_embeddings=max_pos)
    assert back == params


def test_from_hf_fields():
    p = RopeParameters.from_hf(REAL_CONFIGS[0][1])
    assert p == RopeParameters(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    p = RopeParameters.from_hf({"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768,
                                "truncate": False, "rope_theta": 1e6})
    assert (p.rope_type, p.factor, p.rope_theta, p.truncate) == ("yarn", 4.0, 1e6, False)
    assert isinstance(p.factor, float) and isinstance(p.original_max_position_embeddings, int)
    p = RopeParameters.from_hf({"rope_type": "ntk", "factor": 4.0})
    assert p.rope_type == "ntk"
    assert RopeParameters.from_hf({"rope_type": "ntk", "factor": 4.0}).to_hf() == {"rope_type": "ntk", "factor": 4.0}
    p = RopeParameters.from_hf({"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]},
                               max_position_embeddings=131072)
    assert p.short_factor == (1.0, 2.0) and p.original_max_position_embeddings == 131072
    assert RopeParameters.from_hf({"rope_theta": 10000.0}) == RopeParameters(rope_theta=10000.0)
    p = RopeParameters.from_hf({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=2048)
    assert p.original_max_position_embeddings == 2048
    # Phi-3 keeps the training length at the top level; it wins over the dict, as in HF
    p = RopeParameters.from_hf({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0],
                                "original_max_position_embeddings": 8192}, original_max_position_embeddings=4096)
    assert p.original_max_position_embeddings == 4096
    hash(p)


def test_from_hf_unknown_key_and_type():
    with pytest.raises(ValueError, match="'rope_scale'"):
        RopeParameters.from_hf({"rope_type": "linear", "factor": 2.0, "rope_scale": 3})
    with pytest.raises(ValueError, match="'mrope_section'"):
        RopeParameters.from_hf({"rope_type": "default", "mrope_section": [16, 24, 24]})
    with pytest.raises(ValueError, match="rope_type"):
        RopeParameters.from_hf({"rope_type": "proportional", "factor": 2.0})


def test_to_hf_loads_in_hf():
    for rope in CASES:
        params = RopeParameters.from_hf(rope)
        config = llama_config(64, params.to_hf(), max_pos=131072)
        ref, ref_att = hf_inv_freq(config)
        ours, att = scaled_inv_freq(params, inv_freq=default_inv_freq(1e4, 64), base=1e4, dim=64)
        assert_matches(ours, ref)
        assert att == pytest.approx(ref_att)


@pytest.mark.parametrize(
    "params,message",
    [
        (RopeParameters(rope_type="linear", factor=0.0), "factor"),
        (RopeParameters(rope_type="linear", factor=-2.0), "factor"),
        (RopeParameters(rope_type="nope"), "unknown rope_type"),
        (RopeParameters(rope_type="yarn", factor=4.0), "original_max_position_embeddings"),
        (RopeParameters(rope_type="llama3", factor=8.0), "original_max_position_embeddings"),
        (RopeParameters(rope_type="dynamic", factor=2.0), "original_max_position_embeddings"),
        (RopeParameters(rope_type="longrope", short_factor=(1.0,), long_factor=(1.0,)),
         "original_max_position_embeddings"),
        (RopeParameters(rope_type="longrope", original_max_position_embeddings=4096), "short_factor and long_factor"),
        (RopeParameters(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=4.0,
                        high_freq_factor=4.0), "low_freq_factor"),
        (RopeParameters(rope_type="yarn", factor=4.0, original_max_position_embeddings=8192, beta_fast=1.0,
                        beta_slow=32.0), "beta_fast"),
        (RopeParameters(rope_theta=-1.0), "rope_theta"),
        (RopeParameters(rope_type="yarn", factor=4.0, original_max_position_embeddings=8192, attention_factor=0.0),
         "attention_factor"),
    ],
)
def test_validate_errors(params, message):
    with pytest.raises(ValueError, match=message) as info:
        params.validate()
    assert "\n" not in str(info.value)


def test_validate_ok_and_methods():
    assert ROPE_METHODS == ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
    for rope in CASES:
        RopeParameters.from_hf(rope).validate()
    RopeParameters().validate()
    RopeParameters("ntk", 4.0).validate()


def _exporter_inv_freq(theta: float, dim: int, order: str) -> np.ndarray:
    """b^(-2i/d) in float32 the ways exporters and modelling code compute it."""
    x = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    if order == "reciprocal_pow":  # HF, Meta
        return (1.0 / (theta ** x)).numpy()
    if order == "neg_pow":
        return (theta ** -x).numpy()
    if order == "exp_log":  # exp(-x ln b), ln b rounded to float32
        return torch.exp(-x * torch.log(torch.tensor(theta, dtype=torch.float32))).numpy()
    if order == "arange_times_inverse":  # arange * (2/d), then pow
        x = torch.arange(0, dim // 2, dtype=torch.float32) * torch.tensor(2.0 / dim, dtype=torch.float32)
        return (1.0 / (theta ** x)).numpy()
    if order == "float64_cast":
        return (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float().numpy()
    raise AssertionError(order)


@pytest.mark.parametrize("order", ["reciprocal_pow", "neg_pow", "exp_log", "arange_times_inverse", "float64_cast"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6, 75000.0, 2e7])
@pytest.mark.parametrize("dim", [32, 64, 96, 128])
def test_fit_base_any_operation_order(order, theta, dim):
    # an export computed with any of these orders still describes base theta exactly
    assert fit_base(_exporter_inv_freq(theta, dim, order)) == theta


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_fit_base_half_precision_storage(theta):
    exact = np.exp(-(np.arange(0, 64, 2) / 64) * math.log(theta))
    assert fit_base(exact.astype(np.float16)) == theta
    bf16 = torch.from_numpy(exact.astype(np.float32)).to(torch.bfloat16).float().numpy()
    assert fit_base(bf16, dtype="bfloat16") == theta


# ----------------------------------------------------------------------------------------------------------
# recovering the float32 inv_freq a half-precision export rounded
# ----------------------------------------------------------------------------------------------------------

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _half_of(inv: np.ndarray, dtype: str) -> np.ndarray:
    """HF's float32 vector as a half-precision export stores it (torch's cast), back in float64."""
    return torch.from_numpy(inv).to(HALF[dtype]).double().numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_recover_inv_freq_from_half_hf(dtype, theta, head_dim):
    ref, _ = hf_inv_freq(llama_config(head_dim, {"rope_type": "default"}, theta=theta))
    stored = _half_of(ref, dtype)
    found = recover_base(stored, dtype)
    assert found is not None
    inv, base = found
    assert base == theta
    assert inv.dtype == np.float32
    # the recovered vector is HF's float32 one (within float32 round-off) and rounds to what was stored
    assert_matches(inv, ref)
    np.testing.assert_array_equal(torch.from_numpy(inv).to(HALF[dtype]).double().numpy(), stored)
    np.testing.assert_array_equal(recover_inv_freq(stored, dtype), inv)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("theta", [75000.0, 25000.0, 1.5e6, 330000.0])
def test_recover_base_within_half_round_off(dtype, theta):
    # a base of a few significant digits: the recovered base is the shortest decimal near the fit whose vector
    # rounds to the same stored values, so it lies within what the dtype can resolve: the slowest frequency
    # f = b^(-x) is stored within u f (u = 2^-(p+1) from torch's finfo), so ln b is known to u / x.
    # (A base with more digits than that resolution, 271828 in float16, is not recovered: the decimals of
    # the fitted base, off by 4e-4, do not include it; such a vector is kept as stored.)
    dim = 64
    ref, _ = hf_inv_freq(llama_config(dim, {"rope_type": "default"}, theta=theta))
    stored = _half_of(ref, dtype)
    found = recover_base(stored, dtype)
    assert found is not None
    u = torch.finfo(HALF[dtype]).eps / 2
    x_last = (dim - 2) / dim
    assert found[1] == pytest.approx(theta, rel=2 * u / x_last)
    np.testing.assert_array_equal(torch.from_numpy(found[0]).to(HALF[dtype]).double().numpy(), stored)


def test_recover_inv_freq_candidates_and_refusals():
    ref, _ = hf_inv_freq(llama_config(64, {"rope_type": "linear", "factor": 4.0}))
    stored = _half_of(ref, "float16")
    # a scaled vector is no round base's b^(-2i/d): nothing is recovered without the vector it rounds
    assert recover_base(stored, "float16") is None
    assert recover_inv_freq(stored, "float16") is None
    got = recover_inv_freq(stored, "float16", candidates=[np.ones(32), ref.astype(np.float64)])
    np.testing.assert_array_equal(got, ref)
    # a vector perturbed by more than its storage rounding is not recovered
    bumped = stored.copy()
    bumped[5] *= 1.0 + 8 * torch.finfo(torch.float16).eps
    assert recover_inv_freq(bumped, "float16") is None


def test_round_base_inv_freq():
    ref, _ = hf_inv_freq(llama_config(64, {"rope_type": "default"}, theta=10000.0))
    rng = np.random.default_rng(0)
    fitted = ref.astype(np.float64) * (1.0 + rng.uniform(-1e-3, 1e-3, ref.size))  # measured from a table
    got = round_base_inv_freq(fitted, rtol=2e-3)
    assert got is not None
    assert_matches(got, ref)
    assert round_base_inv_freq(fitted, rtol=1e-4) is None
    assert round_base_inv_freq(np.array([0.5, 0.25]), rtol=2e-3) is None  # first frequency is not 1
