"""posrewrite.math.precision against torch casts and half-precision arithmetic (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from posrewrite.math.precision import (  # noqa: E402
    DEFAULT_ANGLE_TOLERANCE,
    PrecisionReport,
    analyse_positions,
    angle_error,
    colliding_positions,
    default_angle_tolerance,
    dtype_name,
    exact_integer_limit,
    exact_position_count,
    float32_to_bfloat16_bits,
    machine_epsilon,
    mantissa_bits,
    max_exponent,
    round_to_dtype,
    unit_roundoff,
)

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _hf_inv_freq(base: float, dim: int) -> np.ndarray:
    # written out independently (HF's formula) rather than taken from posrewrite.math.rope
    return (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).numpy()


def test_mantissa_bits_and_aliases():
    assert mantissa_bits("bfloat16") == 7
    assert mantissa_bits("float16") == 10
    assert mantissa_bits("float32") == 23
    assert mantissa_bits("float64") == 52
    for alias, name in [("bf16", "bfloat16"), ("fp16", "float16"), ("half", "float16"), ("fp32", "float32"),
                        ("float", "float32"), ("double", "float64"), (np.float16, "float16"),
                        (np.dtype("float32"), "float32"), (torch.bfloat16, "bfloat16"), ("tensor(float16)", "float16")]:
        assert dtype_name(alias) == name
    with pytest.raises(ValueError):
        mantissa_bits("int64")
    with pytest.raises(ValueError):
        dtype_name("float8_e4m3")


def test_machine_epsilon_and_unit_roundoff_match_torch():
    for name, t in {**TORCH, "float64": torch.float64}.items():
        assert machine_epsilon(name) == torch.finfo(t).eps
        assert unit_roundoff(name) == torch.finfo(t).eps / 2
    assert machine_epsilon("fp16") == 2.0 ** -10
    for name, t in {**TORCH, "float64": torch.float64}.items():
        # the largest finite value is (2 - eps) * 2^emax
        assert torch.finfo(t).max == (2 - torch.finfo(t).eps) * 2.0 ** max_exponent(name)
    with pytest.raises(ValueError):
        machine_epsilon("int32")


def test_exact_integer_limit():
    assert exact_integer_limit("bf16") == 256
    assert exact_integer_limit("fp16") == 2048
    assert exact_integer_limit("fp32") == 2**24
    for name, t in TORCH.items():
        lim = exact_integer_limit(name)
        ints = torch.arange(lim - 4, lim + 4, dtype=torch.float64)
        back = ints.to(t).to(torch.float64)
        # everything up to the limit survives the cast, limit + 1 does not
        assert torch.equal(back[:5], ints[:5]) and back[5] != ints[5]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_to_dtype_matches_torch_cast(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 6, 20000),
        rng.integers(0, 200000, 5000).astype(np.float64),
        np.arange(-3000, 3000) + 0.5,  # ties
        [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, 1e-8, 6e-8, 2.0**-24 * 1.5, 3.4e38, np.inf, -np.inf],
    ]).astype(np.float32)  # float32 inputs: torch casts them with a single rounding
    ref = torch.from_numpy(x).to(TORCH[dtype]).to(torch.float64).numpy()
    ours = round_to_dtype(x, dtype)
    assert ours.dtype == np.float64
    np.testing.assert_array_equal(ours, ref)
    assert np.isnan(round_to_dtype(np.array([np.nan]), dtype)).all()


def test_round_to_dtype_from_float64_is_correctly_rounded():
    # 1 + 2^-8 + 2^-30 is just above the bf16 halfway point; going through float32 first would lose the 2^-30
    x = np.array([1 + 2**-8 + 2**-30, 1 + 2**-8, 1 + 3 * 2**-8])
    np.testing.assert_array_equal(round_to_dtype(x, "bf16"), [1 + 2**-7, 1.0, 1 + 4 * 2**-8])
    np.testing.assert_array_equal(round_to_dtype(x, "float64"), x)
    np.testing.assert_array_equal(round_to_dtype(np.array([1e-40, 3e-39]), "bf16"),
                                  torch.tensor([1e-40, 3e-39], dtype=torch.float32).to(torch.bfloat16).double().numpy())


def test_float32_to_bfloat16_bits_matches_torch():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(x), ref)


@pytest.mark.parametrize(
    "dtype,n,expected",
    [("bf16", 8192, 896), ("fp16", 4096, 3072), ("fp16", 8192, 4096), ("bf16", 256, 256), ("bf16", 257, 257),
     ("fp16", 2049, 2049), ("fp32", 2**24, 2**24), ("fp16", 100, 100)],
)
def test_exact_position_count_figures(dtype, n, expected):
    assert exact_position_count(n, dtype) == expected


def _torch_counts(n: int, t) -> tuple[int, int]:
    exact = torch.arange(n, dtype=torch.float64)
    vals = exact.to(t).to(torch.float64)
    n_exact = int((vals == exact).sum())
    _, inverse, counts = torch.unique(vals, return_inverse=True, return_counts=True)
    colliding = int((counts[inverse] > 1).sum())
    return n_exact, colliding


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 258, 259, 300, 1000, 2047, 2048, 2049, 2050, 2051, 4096, 8192,
                               65504, 65505, 70000, 131072])
def test_counts_match_torch(dtype, n):
    n_exact, colliding = _torch_counts(n, TORCH[dtype])
    assert exact_position_count(n, dtype) == n_exact
    assert colliding_positions(n, dtype) == colliding


def test_counts_match_torch_float32_and_arange():
    # fp32 near 2^24, on a window (the count is analytic; collisions start just past the limit)
    assert exact_position_count(2**24 + 10, "float32") == 2**24 + 5  # 0..2^24, then the even ones
    assert colliding_positions(2**24 + 1, "float32") == 0
    # torch.arange straight in bfloat16, as exported graphs sometimes do
    vals = torch.arange(8192, dtype=torch.bfloat16).double().numpy()
    assert np.count_nonzero(vals == np.arange(8192)) == exact_position_count(8192, "bf16") == 896
    # 897 distinct values: 8191 rounds up to 8192 (torch's arange breaks some ties differently from a cast,
    # but hits the same set of values)
    assert np.unique(vals).size == np.unique(round_to_dtype(np.arange(8192.0), "bf16")).size == 897


def test_colliding_positions_chunk_boundary(monkeypatch):
    import posrewrite.math.precision as precision

    monkeypatch.setattr(precision, "_CHUNK", 1000)  # groups straddle chunk edges
    for n in (3001, 5000, 8192):
        assert colliding_positions(n, "bf16") == _torch_counts(n, torch.bfloat16)[1]
        assert colliding_positions(n, "fp16") == _torch_counts(n, torch.float16)[1]


@pytest.mark.parametrize(
    "position_dtype,angle_dtype,n",
    [("float32", "float16", 2048), ("float16", "float16", 4096), ("bfloat16", "bfloat16", 4096),
     ("float32", "bfloat16", 1000), ("bfloat16", "float32", 3000), ("float32", "float32", 20000)],
)
def test_angle_error_matches_torch(position_dtype, angle_dtype, n):
    inv = _hf_inv_freq(10000.0, 64)
    pos = torch.arange(n).to(TORCH[position_dtype]).to(TORCH[angle_dtype])
    low = (pos[:, None] * torch.from_numpy(inv).to(TORCH[angle_dtype])).double()
    exact = torch.arange(n, dtype=torch.float64)[:, None] * torch.from_numpy(inv).double()
    ref = float((low - exact).abs().max())
    assert angle_error(inv, n, position_dtype=position_dtype, angle_dtype=angle_dtype) == ref


def test_angle_error_scale():
    inv = _hf_inv_freq(10000.0, 128)
    # float32 positions and angles: at most half an ulp of the largest angle
    err = angle_error(inv, 8192, position_dtype="float32", angle_dtype="float32")
    assert 0 < err <= 8191 * 2.0**-24
    # bf16 angles at m = 8192: many radians ("mixed precision position encoding bug")
    assert angle_error(inv, 8192, position_dtype="bfloat16", angle_dtype="bfloat16") > 10
    assert angle_error(inv, 0, position_dtype="float32", angle_dtype="float32") == 0.0


def test_analyse_positions_reports():
    inv = _hf_inv_freq(10000.0, 128)
    r = analyse_positions(8192, position_dtype="bf16", angle_dtype="bf16", inv_freq=inv)
    assert isinstance(r, PrecisionReport)
    assert (r.max_length, r.position_dtype, r.angle_dtype) == (8192, "bfloat16", "bfloat16")
    exact, colliding = _torch_counts(8192, torch.bfloat16)
    assert r.exact_positions == exact and r.exact_position_fraction == pytest.approx(exact / 8192)
    assert r.colliding_positions == colliding
    assert not r.safe
    d = r.to_dict()
    assert d["exact_positions"] == exact and d["safe"] is False and set(d) >= {
        "max_length", "position_dtype", "angle_dtype", "exact_positions", "exact_position_fraction",
        "colliding_positions", "max_angle_error", "safe"}

    r = analyse_positions(4096, position_dtype="fp16", angle_dtype="float32", inv_freq=inv)
    assert (r.exact_positions, r.exact_position_fraction) == (3072, 0.75) and not r.safe

    # float32 everything: safe, even at 128k where float32's own rounding exceeds 1e-3 rad
    for n in (4096, 131072):
        r = analyse_positions(n, position_dtype="float32", angle_dtype="float32", inv_freq=inv)
        assert r.safe and r.exact_positions == n and r.colliding_positions == 0
    assert r.max_angle_error > 1e-3 and r.angle_tolerance > r.max_angle_error

    # exact positions but half-precision angles: unsafe through the angle error
    r = analyse_positions(2048, position_dtype="float16", angle_dtype="float16", inv_freq=inv)
    assert r.exact_positions == 2048 and r.colliding_positions == 0 and r.max_angle_error > 0.1 and not r.safe
    # float32 positions cast to fp16 for the multiply collide like fp16 positions
    r = analyse_positions(8192, position_dtype="float32", angle_dtype="float16", inv_freq=inv)
    assert r.exact_positions == 4096

    # explicit tolerance, default inv_freq
    r = analyse_positions(1000, position_dtype="float32", angle_dtype="float32", angle_tolerance=1e-9)
    assert not r.safe and r.exact_positions == 1000
    assert default_angle_tolerance(None, 100) == DEFAULT_ANGLE_TOLERANCE
    assert default_angle_tolerance(inv, 2**20) == pytest.approx((2**20 - 1) * 2.0**-23)
