"""The RoPE base bound (Men et al. 2024, arXiv 2405.14591) computed from its definition.

Reference values: the paper's table of minimal bases for head dim 128, as quoted by secondary sources
(docs: "+-30 %, check before quoting"): 1k 4.3e3, 2k 1.6e4, 4k 2.7e4, 8k 8.4e4, 16k 3.1e5, 32k 6.4e5,
64k 2.1e6, 128k 7.8e6, 256k 3.6e7, 512k 6.4e7, 1M 5.1e8.

A snapshot of one run, for the reader (no test compares with these numbers): what our direct search (the
first base on a 96-per-decade log grid with B(m) >= 0 for every integer m <= L, refined by bisection) gives,
and how it compares (ratio ours / table):

    1k 4.29e3 (1.00)   2k 1.45e4 (0.90)   4k 2.86e4 (1.06)   8k 9.02e4 (1.07)   16k 2.34e5 (0.76)
    32k 7.94e5 (1.24)  64k 2.09e6 (1.00)  128k 4.87e6 (0.62) 256k 3.26e7 (0.90) 512k 6.38e7 (1.00)
    1M 4.20e8 (0.82)

10 of 11 are within the table's +-30 % band; 128k is 38 % lower, and there the table's 7.8e6 itself fails the
criterion (the tests compare row by row, in the table's order, with that band).
The spread is real, not noise in our search: near the bound the set of valid bases is fragmented (B(m)
for fixed m is not monotone in b), e.g. at 1k the table's 4300 is valid while 4300 x 1.05 is not, and at
128k the table's 7.8e6 is itself invalid while a pocket at 4.87e6 is valid.  Which pocket counts as "the"
bound depends on the grid a search uses.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from posrewrite.math import base_bound as bb

# The paper's table (minimal base for head dim 128), in the paper's order (context ascending), as quoted by
# secondary sources. Its stated precision is the tolerance band: BAND = 30 % relative (the project's reference
# notes: "+-30 %, check before quoting"). A row outside the band is accepted only if the table's own value fails
# the paper's criterion (B(m) < 0 for some m <= L), i.e. the quoted value cannot be the bound of the definition.
PAPER_TABLE = [
    (1024, 4.3e3),
    (2048, 1.6e4),
    (4096, 2.7e4),
    (8192, 8.4e4),
    (16384, 3.1e5),
    (32768, 6.4e5),
    (65536, 2.1e6),
    (131072, 7.8e6),
    (262144, 3.6e7),
    (524288, 6.4e7),
    (1048576, 5.1e8),
]
BAND = 0.30


@functools.cache
def min_base_128(L: int) -> float:
    return bb.min_base(L, 128)


def brute_curve(base: float, dim: int, ms: np.ndarray) -> np.ndarray:
    theta = base ** (-np.arange(0, dim, 2) / dim)
    return np.cos(np.outer(ms.astype(np.float64), theta)).sum(axis=1)


@pytest.mark.parametrize("start", [0, 1, 777, 300_001, 1_000_003])
def test_curve_matches_direct_sum(start):
    theta = bb.geometric_inv_freq(1e4, 128)
    n = 5000
    got = bb._curve(theta, start, start + n)
    ref = brute_curve(1e4, 128, np.arange(start, start + n))
    assert np.max(np.abs(got - ref)) < 1e-8


def test_bound_curve_starts_at_half_dim():
    b = bb.bound_curve(bb.geometric_inv_freq(1e4, 64), 10)
    assert b[0] == pytest.approx(32.0)


@pytest.mark.parametrize("base", [300.0, 2e3, 5e3, 9e3, 2e4, 1e5])
def test_first_negative_and_support_match_brute_force(base):
    L = 4000
    ref = brute_curve(base, 128, np.arange(L + 1))
    neg = np.flatnonzero(ref < -1e-9)
    expect = int(neg[0]) if neg.size else None
    inv = bb.geometric_inv_freq(base, 128)
    assert bb.first_negative(inv, L) == expect
    assert bb.supports_context(inv, L) == (expect is None)


def test_min_base_is_first_valid_point_of_the_grid():
    L, dim = 1024, 128
    b = bb.min_base(L, dim)
    ms = np.arange(L + 1)
    assert brute_curve(b, dim, ms).min() >= -1e-9
    # every grid point below (96 per decade from 2) fails
    k_hi = math.floor(math.log10(b) * 96 - 1e-9)
    for k in range(math.ceil(math.log10(2.0) * 96), k_hi + 1):
        assert brute_curve(10 ** (k / 96), dim, ms).min() < -1e-9


def test_module_quotes_the_same_table():
    assert list(bb.PAPER_TABLE.items()) == PAPER_TABLE


@pytest.mark.parametrize("L,table", PAPER_TABLE)
def test_min_base_against_paper_table_row(L, table):
    """Each row of the paper's table, in its order: our bound is valid, and within the table's +-30 % band
    unless the table's value itself fails the criterion (then the row is no bound under the definition)."""
    b = min_base_128(L)
    assert bb.supports_context(bb.geometric_inv_freq(b, 128), L)
    if abs(b / table - 1) > BAND:
        assert not bb.supports_context(bb.geometric_inv_freq(table, 128), L), (L, b, table)


@pytest.mark.slow  # the largest rows (slow on their own) are recomputed here when they are deselected
def test_min_base_follows_the_table_order():
    """Over the table's rows (context ascending) our bound ascends too, like the table's."""
    ours = [min_base_128(L) for L, _ in PAPER_TABLE]
    assert [t for _, t in PAPER_TABLE] == sorted(t for _, t in PAPER_TABLE)
    assert ours == sorted(ours)


def test_min_base_grows_with_context_and_tracks_paper_fit():
    values = [bb.min_base(L, 128) for L in (1024, 8192, 65536)]
    assert values == sorted(values)
    for L, b in zip((1024, 8192, 65536), values, strict=True):
        assert 0.5 < b / bb.paper_fit(L) < 2.0


def test_min_base_for_other_dims():
    # smaller rotary dims need a larger base for the same context (fewer slow frequencies)
    assert bb.min_base(4096, 32) > bb.min_base(4096, 128)


def test_bad_arguments():
    with pytest.raises(ValueError):
        bb.min_base(0)
    with pytest.raises(ValueError):
        bb.min_base(1024, dim=7)
