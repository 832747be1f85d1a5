"""The RoPE base bound of Men et al. 2024, "Base of RoPE Bounds Context Length" (arXiv 2405.14591).

With inverse frequencies theta_i (theta_i = b^(-2i/d) for plain RoPE, i = 0..d/2-1) the paper's criterion for
a model to still be able to attend more to a similar token than to a random one at relative distance m is

    B(m) = sum_i cos(m * theta_i) >= 0.

The smallest base b for which B(m) >= 0 holds for every integer m in 0..L is the lower bound of the base for
context length L.  Everything here is computed from that definition (no fitted curve):

* ``bound_curve(inv_freq, n)``      B(m) for m = 0..n-1 (float64)
* ``first_negative(inv_freq, L)``   the smallest m <= L with B(m) < 0, or None
* ``supports_context(inv_freq, L)`` B(m) >= 0 for all m in 0..L
* ``min_base(L, dim)``              the smallest base b with B(m) >= 0 on 0..L

Evaluation is float64 and fast: positions m = m0 + j are split into a block start m0 (a multiple of 512) and
an offset j < 512, and cos((m0 + j) theta) = cos(m0 theta) cos(j theta) - sin(m0 theta) sin(j theta), so B
over n positions is two (n/512 x d/2) @ (d/2 x 512) matrix products (and few cosines: see ``_Curve``).
Searches look first where a too-small base fails (short distances, a sparse probe, the longest distances) and
only then at the whole range.

Note: for a fixed m, B(m) is not monotone in b, so the set of valid bases is not exactly an interval: there are
narrow pockets of valid bases below the bound and (rarely) narrow invalid ones above it.  ``min_base`` tries
every point of a log grid (96 points per decade) in increasing order and returns the first valid one, refined by
bisection against the grid point before it; a pocket narrower than the grid step can be missed.  To judge a
concrete model, test its inverse frequencies directly with :func:`supports_context` (the advisor does).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PAPER_TABLE",
    "paper_fit",
    "geometric_inv_freq",
    "bound_curve",
    "first_negative",
    "supports_context",
    "min_base",
]

# The minimal bases for head dim 128 as quoted from the paper's table by secondary sources (the project's
# reference notes flag these as "+-30 %, check before quoting"); the tests state which ones our direct
# computation reproduces and how closely.
PAPER_TABLE: dict[int, float] = {
    1024: 4.3e3,
    2048: 1.6e4,
    4096: 2.7e4,
    8192: 8.4e4,
    16384: 3.1e5,
    32768: 6.4e5,
    65536: 2.1e6,
    131072: 7.8e6,
    262144: 3.6e7,
    524288: 6.4e7,
    1048576: 5.1e8,
}

_TOL = 1e-9  # B(m) counts as >= 0 above -_TOL (B(m) is a sum of d/2 terms of size <= 1)


def paper_fit(context: int) -> float:
    """The paper's fitted curve b_min ~ 0.0424 * L^1.628 (for comparison only)."""
    return 0.0424 * float(context) ** 1.628


def geometric_inv_freq(base: float, dim: int) -> np.ndarray:
    """float64 b^(-2i/d), i = 0..d/2-1."""
    if dim < 2 or dim % 2:
        raise ValueError(f"rotary dim must be even and >= 2, got {dim}")
    return np.exp(-np.arange(0, dim, 2, dtype=np.float64) / dim * math.log(base))


_C = 512  # offsets j per block
_G = 4  # blocks per matrix product
_R = 64  # blocks per super-block
_DIRECT = 128  # ranges this short are evaluated directly


class _Curve:
    """B(m) over ranges of m for one frequency vector.

    Positions are m = start + 512 (64 u + v) + j with j < 512, v < 64, so e^{i m theta} is a product of three
    small tables of unit complex numbers (few transcendental evaluations), and B(m) = Re(sum_i Z[r, i] E[j, i])
    with Z = e^{i (start + 512 r) theta}, E = e^{i j theta}: two real matrix products per 512 positions.  The
    products are batched as small (4 x k) @ (k x 512) matrices so that OpenBLAS runs each on one thread (its
    threads spin badly on a busy machine).  Error ~1e-10 at m ~ 1e6 (float64)."""

    def __init__(self, theta: np.ndarray):
        self.theta = theta
        self._tables = None

    def tables(self):
        if self._tables is None:
            t = self.theta
            e = np.exp(1j * np.outer(np.arange(_C, dtype=np.float64), t))  # [C, k]
            v = np.exp(1j * np.outer(_C * np.arange(_R, dtype=np.float64), t))  # [R, k]
            self._tables = (np.ascontiguousarray(e.real.T), np.ascontiguousarray(e.imag.T), v)
        return self._tables

    def __call__(self, start: int, stop: int) -> np.ndarray:
        n = stop - start
        t = self.theta
        if n <= 0:
            return np.zeros(0)
        if n <= _DIRECT:
            return np.cos(np.outer(np.arange(start, stop, dtype=np.float64), t)).sum(axis=1)
        k = t.size
        er, ei, v = self.tables()
        rows = -(-n // _C)
        supers = -(-rows // _R)
        u = np.exp(1j * np.outer(start + _C * _R * np.arange(supers, dtype=np.float64), t))  # [U, k]
        z = (u[:, None, :] * v[None, :, :]).reshape(-1, k)[:rows]  # [rows, k]
        pad = -rows % _G
        if pad:
            z = np.concatenate([z, np.zeros((pad, k), dtype=z.dtype)])
        z = z.reshape(-1, _G, k)
        out = np.matmul(np.ascontiguousarray(z.real), er)
        out -= np.matmul(np.ascontiguousarray(z.imag), ei)  # [groups, G, C]
        return out.reshape(-1)[:n]


def _curve(theta: np.ndarray, start: int, stop: int) -> np.ndarray:
    """B(m) for m in [start, stop) (float64)."""
    return _Curve(theta)(start, stop)


def _theta(inv_freq) -> np.ndarray:
    t = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.all(np.isfinite(t)):
        raise ValueError("inv_freq must be a non-empty vector of finite numbers")
    return t


def bound_curve(inv_freq, n: int) -> np.ndarray:
    """B(m) = sum_i cos(m * inv_freq_i) for m = 0..n-1, float64."""
    return _curve(_theta(inv_freq), 0, int(n))


_FIRST_STAGE = 512
_MAX_CHUNK = 1 << 20


def first_negative(inv_freq, context: int) -> int | None:
    """The smallest integer m in 0..context with B(m) < 0, or None when B stays >= 0 up to ``context``.

    Positions are evaluated in doubling ranges (0..127, 128..511, 512..1023, ...), so a base that fails at
    distance m costs about 2m evaluations, not ``context``."""
    curve = _Curve(_theta(inv_freq))
    stop_all = int(context) + 1
    start, stop = 0, min(_DIRECT, stop_all)
    while start < stop_all:
        neg = np.flatnonzero(curve(start, stop) < -_TOL)
        if neg.size:
            return int(start + neg[0])
        start, stop = stop, min(stop_all, max(_FIRST_STAGE, stop + min(stop, _MAX_CHUNK)))
    return None


def supports_context(inv_freq, context: int) -> bool:
    """True when B(m) >= 0 for every integer m in 0..context.

    Ranges are checked in the order that finds a violation soonest: the first 128 distances (where a far too
    small base fails), then the longest distances downward in doubling ranges (where a base a little too small
    fails: B(m) drifts down with m), after a direct look at 256 distances spread over the whole range; only a
    base that passes (or nearly) pays for every distance."""
    theta = _theta(inv_freq)
    curve = _Curve(theta)
    top = int(context) + 1
    first = min(_DIRECT, top)
    if np.any(curve(0, first) < -_TOL):
        return False
    if top > first:  # a spread of 256 distances, evaluated directly: catches most bases that are too small
        probe = np.unique(np.linspace(first, top - 1, 256).round())
        if np.any(np.cos(np.outer(probe, theta)).sum(axis=1) < -_TOL):
            return False
    size = 2048
    hi = top
    while hi > first:
        lo = max(first, hi - size)
        if np.any(curve(lo, hi) < -_TOL):
            return False
        hi, size = lo, min(2 * size, _MAX_CHUNK)
    return True


def min_base(
    context: int, dim: int = 128, *, per_decade: int = 96, rtol: float = 1e-3, lo: float = 2.0, hi: float = 1e16
) -> float:
    """The smallest RoPE base b with B(m) >= 0 for all integer m in 0..context, for rotary dimension ``dim``.

    Scans b upward on a log grid (``per_decade`` points per decade, starting at ``lo``) for the first valid
    base, then bisects between it and the (invalid) grid point below to relative precision ``rtol``.
    Raises ValueError when no base up to ``hi`` works.
    """
    context = int(context)
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if dim < 2 or dim % 2:
        raise ValueError(f"rotary dim must be even and >= 2, got {dim}")

    def ok(b: float) -> bool:
        return supports_context(geometric_inv_freq(b, dim), context)

    # every point of the log grid is tried in increasing order; a too-small base usually fails at a short
    # distance, which first_negative finds after evaluating only the first few hundred positions
    k0 = math.floor(math.log10(lo) * per_decade)
    k1 = math.ceil(math.log10(hi) * per_decade)
    for k in range(k0, k1 + 1):
        if ok(10 ** (k / per_decade)):
            break
    else:
        raise ValueError(f"no RoPE base up to {hi:g} keeps B(m) >= 0 up to context {context} with dim {dim}")
    if k == k0:
        return float(10 ** (k / per_decade))
    lo_b, hi_b = 10 ** ((k - 1) / per_decade), 10 ** (k / per_decade)
    while hi_b / lo_b > 1 + rtol:
        mid = math.sqrt(lo_b * hi_b)
        if ok(mid):
            hi_b = mid
        else:
            lo_b = mid
    return float(hi_b)
