"""Absolute and bucketed relative position encodings in plain numpy: sinusoidal tables (both layouts),
fitting a table to the sinusoidal formula, interpolating learned tables, T5 relative buckets."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "sinusoidal_frequencies",
    "sinusoidal_table",
    "fit_sinusoidal",
    "interpolate_table",
    "t5_relative_bucket",
    "fit_t5_buckets",
]


def sinusoidal_frequencies(dim: int, base: float = 10000.0, rule: str = "vaswani") -> np.ndarray:
    """Frequencies of the dim/2 sin/cos pairs (float64). "vaswani": base^(-2i/dim); "fairseq" (fairseq,
    M2M100, Whisper): base^(-i/(dim/2 - 1))."""
    half = dim // 2
    i = np.arange(half, dtype=np.float64)
    if rule == "vaswani":
        return base ** (-2.0 * i / dim)
    if rule == "fairseq":
        return base ** (-i / max(half - 1, 1))
    raise ValueError(f"unknown frequency rule {rule!r}")


def sinusoidal_table(
    n: int,
    dim: int,
    base: float = 10000.0,
    *,
    layout: str = "interleaved",
    rule: str = "vaswani",
    frequencies: np.ndarray | None = None,
    scale: float = 1.0,
    start: int = 0,
) -> np.ndarray:
    """Rows start..start+n-1 of the table (float64 [n, dim]); row p encodes position p / scale.

    layout "interleaved": PE(p, 2i) = sin(p f_i), PE(p, 2i+1) = cos(p f_i) (Vaswani et al.);
    "concat": [sin(p f) | cos(p f)].
    """
    f = sinusoidal_frequencies(dim, base, rule) if frequencies is None else np.asarray(frequencies, np.float64)
    pos = (np.arange(start, start + n, dtype=np.float64) / float(scale))[:, None]
    angles = pos * f[None, :]
    table = np.zeros((n, dim), dtype=np.float64)
    if layout == "interleaved":
        table[:, 0 : 2 * f.size : 2] = np.sin(angles)
        table[:, 1 : 2 * f.size : 2] = np.cos(angles)
    elif layout == "concat":
        table[:, : f.size] = np.sin(angles)
        table[:, f.size : 2 * f.size] = np.cos(angles)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return table


def fit_sinusoidal(table: np.ndarray, atol: float = 2e-3) -> dict | None:
    """Recognises a sinusoidal table. Rows that are all zero (padding rows) are skipped; row r is taken to
    encode position r (fairseq and M2M100 keep their offset rows in the formula).

    Returns {layout, rule, base, frequencies} or None. Frequencies come from the row-1 angles; the base
    and rule are kept when base^(-2i/dim) or base^(-i/(dim/2-1)) reproduces the table, else rule "custom".
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 3 or t.shape[1] < 2 or t.shape[1] % 2:
        return None
    rows, dim = t.shape
    half = dim // 2
    live = np.flatnonzero(np.any(t != 0, axis=1))
    if live.size < 3:
        return None
    for layout in ("interleaved", "concat"):
        if layout == "interleaved":
            s, c = t[:, 0::2], t[:, 1::2]
        else:
            s, c = t[:, :half], t[:, half:]
        r0 = live[0]
        r1 = live[1]
        # angles at two rows give the frequencies (first frequencies may wrap: use the smallest row gap)
        a0 = np.arctan2(s[r0], c[r0])
        a1 = np.arctan2(s[r1], c[r1])
        f = np.mod(a1 - a0, 2 * np.pi) / (r1 - r0)
        candidates = []
        fitted = fit_frequencies(f, dim, rtol=1e-2)
        if fitted is not None:
            candidates.append((layout, fitted[1], fitted[0], sinusoidal_frequencies(dim, fitted[0], fitted[1])))
        candidates.append((layout, "custom", None, f))
        for lay, rule, base, freqs in candidates:
            ref = sinusoidal_table(rows, dim, layout=lay, frequencies=freqs)
            if np.max(np.abs(ref[live] - t[live])) <= atol:
                return {"layout": lay, "rule": rule, "base": base, "frequencies": freqs}
    return None


def _roundness(x: float) -> float:
    """Relative distance of x to the nearest number with one significant digit (10000, 500000, ...)."""
    k = math.floor(math.log10(x))
    lead = round(x / 10**k)
    return abs(x - lead * 10**k) / x


def fit_frequencies(freqs: np.ndarray, dim: int, rtol: float = 1e-4) -> tuple[float, str] | None:
    """(base, rule) reproducing `freqs` (dim/2 values). The two rules describe the same geometric family
    with different bases (base_v^(2/dim) = base_f^(1/(dim/2-1))); the one whose base is the rounder number
    is kept (10000 rather than 13468), and the base is snapped to that round number when within 1e-3."""
    f = np.asarray(freqs, dtype=np.float64).reshape(-1)
    if f.size < 2 or f[-1] <= 0 or f[0] <= 0:
        return None
    best = None
    for rule, expo in (("vaswani", 2.0 * (f.size - 1) / dim), ("fairseq", 1.0)):
        base = float(math.exp((math.log(f[0]) - math.log(f[-1])) / expo))
        if base <= 1:
            continue
        k = math.floor(math.log10(base))
        nice = round(base / 10**k) * 10**k
        if abs(nice - base) < 1e-3 * base:
            base = float(nice)
        if not np.allclose(sinusoidal_frequencies(dim, base, rule), f, rtol=rtol, atol=0):
            continue
        if best is None or _roundness(base) < _roundness(best[0]) - 1e-9:
            best = (base, rule)
    return best


def interpolate_table(table: np.ndarray, new_rows: int, offset: int = 0, *, scale: float | None = None) -> np.ndarray:
    """Linear interpolation of the trained rows table[offset:] to new_rows - offset rows; the offset rows
    (padding rows, OPT's 2) are kept. New trained row q reads old trained position q * (L - 1) / (L' - 1),
    so the first and last trained rows are kept and the spacing shrinks by (L - 1) / (L' - 1); with
    `scale` S it reads position q / S instead (Position Interpolation), clamped to the last trained row."""
    t = np.asarray(table)
    head, trained = t[:offset], t[offset:].astype(np.float64)
    old = trained.shape[0]
    new = int(new_rows) - offset
    if new < 1 or old < 1:
        raise ValueError("interpolate_table needs at least one trained row on both sides")
    if old == 1 or new == 1:
        out = np.repeat(trained[:1], new, axis=0)
    else:
        if scale is None:
            x = np.arange(new, dtype=np.float64) * (old - 1) / (new - 1)
        else:
            x = np.minimum(np.arange(new, dtype=np.float64) / float(scale), old - 1)
        lo = np.floor(x).astype(np.int64)
        hi = np.minimum(lo + 1, old - 1)
        w = (x - lo)[:, None]
        out = trained[lo] * (1 - w) + trained[hi] * w
    return np.concatenate([head, out.astype(t.dtype)], axis=0)


def t5_relative_bucket(rel, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5's bucket of relative position rel = j - i (memory minus query), as in HF
    `T5Attention._relative_position_bucket`: when bidirectional, half the buckets per direction (positive
    rel in the upper half); exact buckets below max_exact = nb/2; log-spaced up to max_distance; clamped."""
    rel = np.asarray(rel, dtype=np.int64)
    buckets = np.zeros(rel.shape, dtype=np.int64)
    nb = num_buckets
    if bidirectional:
        nb //= 2
        buckets += (rel > 0).astype(np.int64) * nb
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = nb // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(rel, 1).astype(np.float32) / max_exact)
            / math.log(max_distance / max_exact)
            * (nb - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return buckets + np.where(is_small, rel, large)


def fit_t5_buckets(rel: np.ndarray, buckets: np.ndarray, num_buckets: int) -> dict | None:
    """Finds (bidirectional, max_distance) such that t5_relative_bucket reproduces `buckets` for `rel`.
    Searches max_distance near the first distance that reaches the last bucket; "consistent" is the range
    of max_distance values giving the same buckets (a power of two in it is reported); None if none fits."""
    rel = np.asarray(rel, dtype=np.int64).reshape(-1)
    buckets = np.asarray(buckets, dtype=np.int64).reshape(-1)
    for bidirectional in (True, False):
        nb = num_buckets // 2 if bidirectional else num_buckets
        max_exact = nb // 2
        if max_exact < 1:
            continue
        mag = np.abs(rel) if bidirectional else -np.minimum(rel, 0)
        in_half = buckets - ((rel > 0) * nb if bidirectional else 0)
        saturated = mag[in_half == nb - 1]
        if saturated.size:
            r_star = int(saturated.min())
            guess = max_exact * (r_star / max_exact) ** ((nb - max_exact) / max(nb - max_exact - 1, 1))
            lo, hi = max(max_exact + 1, int(guess) - 8), int(guess) + 64
        else:  # never saturates within the probe: max_distance larger than the probe, cannot pin it
            lo, hi = int(mag.max()) + 1, int(mag.max()) + 2
        fits = [
            md
            for md in range(lo, hi)
            if np.array_equal(t5_relative_bucket(rel, bidirectional, num_buckets, md), buckets)
        ]
        if fits:  # coarse bucket tables admit several max_distance values: prefer a power of two
            powers = [md for md in fits if md & (md - 1) == 0]
            md = powers[0] if powers else fits[0]
            return {
                "bidirectional": bidirectional,
                "max_distance": md,
                "saturated": bool(saturated.size),
                "consistent": (fits[0], fits[-1]),
            }
    return None
