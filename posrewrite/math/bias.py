"""Score biases b_h(i, j) added to attention scores, described by what they compute (numpy only).

A bias read at a few lengths is split into a mask (entries not finite, at or below `FILL_THRESHOLD`, or a
repeated fill value at or below `MASK_THRESHOLD`: causal or sliding-window masks folded into the bias) and
values. The values are then described as
- a function of the distance δ = i - j (a Toeplitz matrix; symmetric in δ, causal δ >= 0, or two-sided), or
- a function of the key position j alone (plus any per-row constant: Bloom's m_h j),
and fitted per head by the families of the field, x = |δ| (or δ when the bias is not symmetric):

    linear        c_h - m_h x                             ALiBi (Press et al. 2021; slopes m_h)
    kerple_log    c_h - r1_h log(1 + r2_h x)              KERPLE, logarithmic kernel (Chi et al. 2022)
    kerple_power  c_h - r1_h x^r2_h                       KERPLE, power kernel
    sandwich      c_h + s_h sum_k cos(x base^(-2k/dim))   Sandwich (Chi et al. 2023): p_i . p_j of
                                                          sinusoids, k = first .. first + dim/2 - 1
    bucketed      table_h[bucket(δ)]                      T5 buckets (Raffel et al. 2020)

A constant c_h per head (or per query row) changes nothing after softmax; it is reported and kept. Fits are
accepted when the largest residual is within `fit_tolerance` (the dtype's round-off of the largest value),
so a fitted family reproduces the bias exactly in its dtype. `bias_values` is the formula the rewrites use,
evaluated in float64 here (the graph evaluates it in float32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from posrewrite.math.absolute import t5_relative_bucket
from posrewrite.math.alibi import alibi_slopes
from posrewrite.math.precision import dtype_name, unit_roundoff

__all__ = [
    "MASK_THRESHOLD",
    "FAMILIES",
    "BiasFit",
    "MaskRule",
    "DistanceProfile",
    "split_mask",
    "mask_rule",
    "mask_matrix",
    "distance_profile",
    "key_profile",
    "fit_tolerance",
    "fit_linear",
    "fit_kerple_log",
    "fit_kerple_power",
    "fit_sandwich",
    "fit_buckets",
    "fit_profile",
    "family_values",
    "bias_values",
    "paper_slopes_match",
    "near_bias_precision",
]

MASK_THRESHOLD = -1e4  # a fill value at or below this, repeated over at least a row, masks the key
FILL_THRESHOLD = -1e8  # an entry at or below this (or -inf, nan) masks the key whatever else is there
FAMILIES = ("linear", "kerple_log", "kerple_power", "sandwich", "bucketed")
_ROUNDOFF_FACTOR = 64  # a formula of a few ops (a sum of dim/2 cosines for Sandwich) rounded in the dtype


# ------------------------------------------------------------------------------------------------- masks


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Which keys a mask folded into the bias hides: "none", "causal" (j > i), "sliding" (j > i or
    i - j >= window), "window" (|i - j| >= window, two-sided) or "other" (any other pattern)."""

    kind: str
    window: int | None = None
    value: float = float("-inf")  # the value of a masked entry

    def to_dict(self) -> dict[str, Any]:
        value: float | str = self.value if math.isfinite(self.value) else str(self.value)
        return {"kind": self.kind, "window": self.window, "value": value}


def split_mask(bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64 with masked entries set to nan, mask) for a bias [..., Sq, Sk]."""
    b = np.asarray(bias, dtype=np.float64)
    mask = ~np.isfinite(b) | (b <= FILL_THRESHOLD)
    rest = b[~mask]
    if rest.size:  # a fill value such as -10000 or float16's -65504: the least value, at least a row's worth
        low = float(rest.min())
        if low <= MASK_THRESHOLD and int(np.count_nonzero(b == low)) >= b.shape[-1]:
            mask |= b == low
    return np.where(mask, np.nan, b), mask


def _delta(sq: int, sk: int) -> np.ndarray:
    """δ = i - j [Sq, Sk], the queries being the last Sq of Sk keys."""
    i = np.arange(sk - sq, sk)[:, None]
    return i - np.arange(sk)[None, :]


def mask_matrix(rule: MaskRule, sq: int, sk: int) -> np.ndarray:
    """The mask [Sq, Sk] of `rule` (True: hidden)."""
    d = _delta(sq, sk)
    if rule.kind == "none":
        return np.zeros(d.shape, dtype=bool)
    if rule.kind == "causal":
        return d < 0
    if rule.kind == "sliding":
        return (d < 0) | (d >= int(rule.window))
    if rule.kind == "window":
        return np.abs(d) >= int(rule.window)
    raise ValueError(f"no matrix for mask rule {rule.kind!r}")


def mask_rule(mask: np.ndarray, bias: np.ndarray | None = None) -> MaskRule:
    """The rule of a mask [..., Sq, Sk] (the same for every leading index, else "other")."""
    m = np.asarray(mask, dtype=bool)
    sq, sk = m.shape[-2:]
    flat = m.reshape(-1, sq, sk)
    value = float("-inf")
    if bias is not None and m.any():
        value = float(np.asarray(bias, dtype=np.float64)[m].max())
    if not all(np.array_equal(flat[0], x) for x in flat[1:]):
        return MaskRule("other", None, value)
    m0 = flat[0]
    if not m0.any():
        return MaskRule("none", None, value)
    d = _delta(sq, sk)
    if np.array_equal(m0, d < 0):
        return MaskRule("causal", None, value)
    for w in range(1, sk):
        if np.array_equal(m0, (d < 0) | (d >= w)):
            return MaskRule("sliding", w, value)
        if np.array_equal(m0, np.abs(d) >= w):
            return MaskRule("window", w, value)
    return MaskRule("other", None, value)


# ------------------------------------------------------------------------------------------------ profiles


@dataclasses.dataclass(frozen=True)
class DistanceProfile:
    """f_h(x) of a bias that depends on δ = i - j only: `x` the distances seen (|δ| when `symmetric`, δ >= 0
    when causal, signed δ otherwise), `values` [heads, len(x)]."""

    x: np.ndarray
    values: np.ndarray
    symmetric: bool
    two_sided: bool


def distance_profile(values: np.ndarray, atol: float) -> DistanceProfile | None:
    """The profile of `values` [H, Sq, Sk] (nan where masked) when every head is a function of δ = i - j
    (within `atol`); None otherwise."""
    h, sq, sk = values.shape
    d = _delta(sq, sk)
    deltas = np.unique(d[np.isfinite(values[0])])
    if deltas.size < 2:
        return None
    prof = np.empty((h, deltas.size))
    for k, dv in enumerate(deltas):
        col = values[:, d == dv]
        if not np.isfinite(col).all():
            return None  # the mask differs along a diagonal: not a function of the distance
        if np.max(col.max(axis=1) - col.min(axis=1)) > atol:
            return None
        prof[:, k] = col.mean(axis=1)
    two_sided = bool(deltas.min() < 0 and deltas.max() > 0)
    if two_sided:
        pos = {int(v): k for k, v in enumerate(deltas)}
        pairs = [(pos[v], pos[-v]) for v in pos if v > 0 and -v in pos]
        symmetric = bool(pairs) and all(np.max(np.abs(prof[:, a] - prof[:, b])) <= atol for a, b in pairs)
        if symmetric:
            keep = deltas >= 0
            return DistanceProfile(deltas[keep].astype(np.float64), prof[:, keep], True, True)
        return DistanceProfile(deltas.astype(np.float64), prof, False, True)
    if deltas.max() <= 0:  # only j >= i seen (an anti-causal mask): a function of j - i
        return DistanceProfile(-deltas[::-1].astype(np.float64), prof[:, ::-1], True, False)
    return DistanceProfile(deltas.astype(np.float64), prof, True, False)


def key_profile(values: np.ndarray, atol: float) -> np.ndarray | None:
    """g_h(j) [H, Sk] when values[h, i, j] = g_h(j) + c_h(i) (within `atol`; nan where masked), taken from
    the last query row (it sees every key under a causal mask); None otherwise."""
    h, sq, sk = values.shape
    last = values[:, -1, :]
    if not np.isfinite(last).all():
        return None
    g = last - last[:, :1]
    rows = values - values[:, :, :1]
    diff = np.abs(rows - g[:, None, :])
    if np.nanmax(diff) > atol:
        return None
    return g


# -------------------------------------------------------------------------------------------- formulas


def fit_tolerance(values: np.ndarray, dtype: Any = "float32") -> float:
    """Largest residual a fit may leave: the round-off of a short formula in `dtype` at the bias's size."""
    name = dtype_name(dtype)
    u = unit_roundoff(name if name in ("bfloat16", "float16", "float32", "float64") else "float32")
    scale = float(np.nanmax(np.abs(values))) if np.size(values) else 0.0
    return _ROUNDOFF_FACTOR * u * max(scale, 1.0)


def _sandwich_sum(x: np.ndarray, dim: int, base: float, first: int) -> np.ndarray:
    k = np.arange(first, first + dim // 2, dtype=np.float64)
    w = base ** (-2.0 * k / dim)
    return np.cos(np.asarray(x, dtype=np.float64)[..., None] * w).sum(axis=-1)


def family_values(family: str, params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """f_h(x) [H, len(x)] of a fitted family (x = |i - j|, or i - j for a two-sided asymmetric bias)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(params["offset"], dtype=np.float64)[:, None]
    if family == "linear":
        return c - np.asarray(params["slopes"], dtype=np.float64)[:, None] * x[None, :]
    if family == "kerple_log":
        r1, r2 = (np.asarray(params[k], dtype=np.float64)[:, None] for k in ("r1", "r2"))
        return c - r1 * np.log1p(r2 * x[None, :])
    if family == "kerple_power":
        r1, r2 = (np.asarray(params[k], dtype=np.float64)[:, None] for k in ("r1", "r2"))
        return c - r1 * np.abs(x[None, :]) ** r2
    if family == "sandwich":
        s = np.asarray(params["scale"], dtype=np.float64)[:, None]
        return c + s * _sandwich_sum(x, int(params["dim"]), float(params["base"]), int(params["first"]))[None, :]
    if family == "bucketed":
        table = np.asarray(params["table"], dtype=np.float64)  # [H, num_buckets]
        rel = -np.asarray(x, dtype=np.int64)  # T5's rel = j - i
        buckets = t5_relative_bucket(rel, params["bidirectional"], params["num_buckets"], params["max_distance"])
        return table[:, buckets] + c
    raise ValueError(f"unknown bias family {family!r}")


def bias_values(
    family: str, params: dict[str, Any], query_length: int, key_length: int | None = None, *, form: str = "relative",
    symmetric: bool = True, scale: float = 1.0,
) -> np.ndarray:
    """The bias [H, Sq, Sk] (float64, no mask) of a fitted family, queries the last Sq keys; distances
    divided by `scale` (distance interpolation). form "key_only": linear in the key position j (Bloom),
    c_h + m_h j."""
    sk = int(key_length if key_length is not None else query_length)
    d = _delta(int(query_length), sk).astype(np.float64)
    if form == "key_only":
        j = np.arange(sk, dtype=np.float64)
        m = np.asarray(params["slopes"], dtype=np.float64)[:, None, None]
        c = np.asarray(params["offset"], dtype=np.float64)[:, None, None]
        return np.broadcast_to(c + m * j[None, None, :] / scale, (m.shape[0], int(query_length), sk)).copy()
    x = np.abs(d) if symmetric else d
    flat = family_values(family, params, (x / scale).reshape(-1))
    return flat.reshape(flat.shape[0], *d.shape)


# ------------------------------------------------------------------------------------------------ fitting


@dataclasses.dataclass(frozen=True)
class BiasFit:
    """A family fitted to a profile: per-head parameters (lists, JSON-ready), the largest residual and the
    tolerance it was held to."""

    family: str
    params: dict[str, Any]
    residual: float
    tolerance: float

    @property
    def exact(self) -> bool:
        return self.residual <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": self.params, "residual": self.residual,
                "tolerance": self.tolerance, "exact": self.exact}


def _affine(phi: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares f_h ≈ c_h + a_h phi (phi [n] shared by the heads, f [H, n]): (a, c, max |residual|)."""
    pc = phi - phi.mean()
    fc = f - f.mean(axis=1, keepdims=True)
    den = float(pc @ pc)
    a = (fc @ pc) / den if den > 0 else np.zeros(f.shape[0])
    c = f.mean(axis=1) - a * phi.mean()
    res = np.abs(f - c[:, None] - a[:, None] * phi[None, :]).max(axis=1)
    return a, c, res


def _golden(fn, lo: float, hi: float, iters: int = 80) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(d)
    return (a + b) / 2


def _fit_one_parameter(x: np.ndarray, f: np.ndarray, phi, lo: float, hi: float) -> tuple:
    """Per head: θ in [lo, hi] (searched in log space) and the affine (a, c) minimising the squared error of
    f_h ≈ c + a phi(x; θ). Returns (theta [H], a [H], c [H], max residual [H])."""
    thetas, aa, cc, rr = [], [], [], []
    grid = np.geomspace(lo, hi, 97)
    for h in range(f.shape[0]):
        fh = f[h : h + 1]

        def sse(t: float, fh=fh) -> float:
            p = phi(x, math.exp(t))
            pc = p - p.mean()
            fc = fh[0] - fh[0].mean()
            den = float(pc @ pc)
            return float(fc @ fc) - (float(fc @ pc) ** 2 / den if den > 0 else 0.0)

        errs = [sse(math.log(t)) for t in grid]
        k = int(np.argmin(errs))
        t = _golden(sse, math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, grid.size - 1)]))
        a, c, r = _affine(phi(x, math.exp(t)), fh)
        thetas.append(math.exp(t))
        aa.append(float(a[0]))
        cc.append(float(c[0]))
        rr.append(float(r[0]))
    return np.array(thetas), np.array(aa), np.array(cc), np.array(rr)


def fit_linear(x: np.ndarray, f: np.ndarray, tol: float) -> BiasFit:
    """ALiBi: f_h = c_h - m_h x (slopes m_h > 0 attenuate with distance)."""
    a, c, r = _affine(np.asarray(x, dtype=np.float64), f)
    return BiasFit("linear", {"slopes": (-a).tolist(), "offset": c.tolist()}, float(r.max()), tol)


def fit_kerple_log(x: np.ndarray, f: np.ndarray, tol: float) -> BiasFit:
    """KERPLE log: f_h = c_h - r1_h log(1 + r2_h x)."""
    r2, a, c, r = _fit_one_parameter(np.asarray(x, np.float64), f, lambda x, t: np.log1p(t * x), 1e-4, 1e4)
    return BiasFit("kerple_log", {"r1": (-a).tolist(), "r2": r2.tolist(), "offset": c.tolist()}, float(r.max()), tol)


def fit_kerple_power(x: np.ndarray, f: np.ndarray, tol: float) -> BiasFit:
    """KERPLE power: f_h = c_h - r1_h x^r2_h (r2 in (0, 2] in the paper; searched in [1e-3, 4])."""
    r2, a, c, r = _fit_one_parameter(np.asarray(x, np.float64), f, lambda x, t: np.abs(x) ** t, 1e-3, 4.0)
    return BiasFit("kerple_power", {"r1": (-a).tolist(), "r2": r2.tolist(), "offset": c.tolist()}, float(r.max()), tol)


def _sandwich_error(x: np.ndarray, f: np.ndarray, ratio: float, first: int, kmax: int) -> np.ndarray:
    """Sum of squared residuals over heads of f_h ≈ c_h + s_h sum_{k<K} cos(x ratio^(k+first)), for every
    number of terms K = 1..kmax (vectorised by cumulative sums)."""
    k = np.arange(first, first + kmax, dtype=np.float64)
    g = np.cumsum(np.cos(x[:, None] * ratio**k[None, :]), axis=1)  # [n, K]
    gc = g - g.mean(axis=0, keepdims=True)
    fc = f - f.mean(axis=1, keepdims=True)
    den = (gc * gc).sum(axis=0)
    proj = fc @ gc  # [H, K]
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(den > 1e-300, (proj**2).sum(axis=0) / den, 0.0)
    return (fc * fc).sum() - gain


def fit_sandwich(x: np.ndarray, f: np.ndarray, tol: float, max_dim: int = 512) -> BiasFit:
    """Sandwich: f_h = c_h + s_h sum_{k=first}^{first+dim/2-1} cos(x base^(-2k/dim)), dim, base and first
    (0 or 1) shared by the heads. The frequency ratio r = base^(-2/dim) is searched on the near distances for
    every number of terms at once (cumulative sums), then refined per candidate on ever longer distances
    (the error in r grows with the distance: a window of half-width ~1/x keeps the search in its basin)."""
    x_all, f_all = np.asarray(x, dtype=np.float64), f
    kmax = max_dim // 2
    near = x_all <= 24
    grid = np.linspace(0.3, 0.9995, 300)
    candidates: list[tuple[float, int, int, float]] = []
    for first in (0, 1):
        errs = np.array([_sandwich_error(x_all[near], f_all[:, near], float(r), first, kmax) for r in grid])
        best_ratio, best_err = grid[errs.argmin(axis=0)], errs.min(axis=0)
        floor = float(best_err.min())
        for k in np.flatnonzero(best_err <= max(100 * floor, 1e-12 * float((f_all**2).sum())))[:48]:
            candidates.append((float(best_err[k]), first, int(k) + 1, float(best_ratio[k])))
    candidates.sort()
    best = (math.inf, 0.5, 0, 1)
    width = 2 * float(grid[1] - grid[0])
    for _, first, terms_k, ratio in candidates[:48]:
        for reach in (24, 64, 160, float(x_all.max())):
            sel = x_all <= reach
            if x_all[sel].size > 160:  # the near distances, then a geometric sample of the far ones
                idx = np.flatnonzero(sel)
                sel = idx[np.unique(np.concatenate([np.arange(64), np.geomspace(64, idx.size - 1, 96).astype(int)]))]

            def sse(r: float, first=first, terms_k=terms_k, sel=sel) -> float:
                return float(_sandwich_error(x_all[sel], f_all[:, sel], r, first, terms_k)[terms_k - 1])

            half = max(width * 24 / max(reach, 24), 1e-7)
            ratio = _golden(sse, max(ratio - half, 1e-3), min(ratio + half, 1 - 1e-12), iters=50)
        err = float(_sandwich_error(x_all, f_all, ratio, first, terms_k)[terms_k - 1])
        if err < best[0]:
            best = (err, ratio, first, terms_k)
    _, ratio, first, terms = best
    dim = 2 * terms
    base = ratio ** (-terms)
    g = _sandwich_sum(x_all, dim, base, first)
    s, c, r = _affine(g, f_all)
    params = {"dim": dim, "base": float(base), "first": first, "scale": s.tolist(), "offset": c.tolist()}
    return BiasFit("sandwich", params, float(r.max()), tol)


def _partition(labels: np.ndarray) -> np.ndarray:
    """Canonical labels: the index of each value's first occurrence."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse.reshape(-1)]


def fit_buckets(delta: np.ndarray, f: np.ndarray, tol: float, max_buckets: int = 256) -> BiasFit | None:
    """T5 buckets: f_h(δ) = table_h[bucket(j - i)] by T5's rule. The distances are split by equal value
    vectors (over heads); (bidirectional, num_buckets, max_distance) must give the same split. None when no
    rule does (or when the split has fewer than 3 classes: nothing identifies buckets)."""
    delta = np.asarray(delta, dtype=np.int64)
    rel = -delta
    keys = np.round(f.T / max(tol, 1e-30)).astype(np.int64)
    _, labels = np.unique(keys, axis=0, return_inverse=True)
    want = _partition(labels.reshape(-1))
    if want.max() < 2 or want.max() + 1 == want.size:
        return None  # one class, or every distance its own: nothing shows buckets
    classes = int(want.max()) + 1
    one_sided = bool(rel.max() <= 0 or rel.min() >= 0)
    for bidirectional in ((False, True) if one_sided else (True,)):
        start = max(4, classes)
        for nb in range(start + start % 2 if bidirectional else start, max_buckets + 1, 2 if bidirectional else 1):
            half = nb // 2 if bidirectional else nb
            max_exact = half // 2
            if max_exact < 1:
                continue
            mags = np.abs(rel) if bidirectional else -np.minimum(rel, 0)
            top = int(mags.max())
            for md in range(max_exact + 1, max(top + 2, max_exact + 2)):
                b = t5_relative_bucket(rel, bidirectional, nb, md)
                if np.array_equal(_partition(b), want):
                    table = np.full((f.shape[0], nb), np.nan)
                    for k, bk in enumerate(b):
                        table[:, bk] = f[:, k]
                    saturated = bool(np.isin(half - 1, b % half if bidirectional else b))
                    params = {"num_buckets": nb, "max_distance": md, "bidirectional": bidirectional,
                              "table": np.where(np.isnan(table), None, table).tolist(),
                              "offset": [0.0] * f.shape[0], "saturated": saturated}
                    return BiasFit("bucketed", params, 0.0, tol)
                if md > max_exact + 1 and np.array_equal(b, t5_relative_bucket(rel, bidirectional, nb, md - 1)):
                    continue
    return None


def fit_profile(profile: DistanceProfile, dtype: Any = "float32") -> tuple[BiasFit | None, list[BiasFit]]:
    """(the first exact fit in the order linear, KERPLE power, KERPLE log, Sandwich, buckets; every fit tried).
    A two-sided asymmetric profile is fitted by the line in signed δ and by buckets only."""
    x, f = profile.x, profile.values
    tol = fit_tolerance(f, dtype)
    tried = [fit_linear(x, f, tol)]
    if tried[0].exact:
        return tried[0], tried
    if profile.symmetric:
        for fit in (fit_kerple_power, fit_kerple_log, fit_sandwich):
            tried.append(fit(x, f, tol))
            if tried[-1].exact:
                return tried[-1], tried
    signed = x if not profile.symmetric else x  # buckets: signed δ (two-sided) or δ >= 0
    if not profile.two_sided or not profile.symmetric:
        bucket = fit_buckets(signed, f, tol)
        if bucket is not None:
            tried.append(bucket)
            return bucket, tried
    return None, tried


def paper_slopes_match(slopes: np.ndarray, rtol: float = 1e-4) -> bool:
    """Whether ALiBi slopes are the paper's geometric ones for their number of heads (any order kept)."""
    s = np.asarray(slopes, dtype=np.float64).reshape(-1)
    return bool(s.size > 0 and np.allclose(s, alibi_slopes(s.size), rtol=rtol, atol=0))


def near_bias_precision(
    family: str, params: dict[str, Any], max_length: int, *, dtype: Any, symmetric: bool = True, form: str = "relative",
    window: int = 256,
) -> dict[str, float]:
    """How exact the bias of the last query (position max_length - 1) is over its `window` nearest keys when the
    positions, the distance and the formula are all in `dtype` (a bias computed in half precision): each
    position rounded to `dtype`, the formula of the rounded distance rounded to `dtype`, against the formula
    of the exact distance in float64. Returns max_error (absolute), exact_fraction (within half an ulp of the
    exact value in `dtype`) and window."""
    from posrewrite.math.precision import round_to_dtype

    name = dtype_name(dtype)
    name = name if name in ("bfloat16", "float16", "float32", "float64") else "float32"
    n = int(max_length)
    i = float(n - 1)
    d = np.arange(min(window, n), dtype=np.float64)
    j = i - d
    if form == "key_only":
        rounded = round_to_dtype(j - i, name)
    else:
        ri, rj = round_to_dtype(np.array([i]), name), round_to_dtype(j, name)
        rounded = round_to_dtype(ri - rj, name)
        rounded = np.abs(rounded) if symmetric else rounded
    exact = family_values(family, params, d if form != "key_only" else -d)
    got = round_to_dtype(family_values(family, params, np.abs(rounded) if form != "key_only" else rounded), name)
    if form == "key_only":  # m_h j: compare what softmax sees, relative to the query's own key
        exact, got = exact - exact[:, :1], got - got[:, :1]
    err = np.abs(got - exact)
    scale = np.maximum(np.abs(exact), 1e-30)
    ulp_half = scale * unit_roundoff(name)
    return {"max_error": float(err.max()), "exact_fraction": float(np.mean(err <= ulp_half * (1 + 1e-9) + 1e-12)),
            "window": int(d.size)}
