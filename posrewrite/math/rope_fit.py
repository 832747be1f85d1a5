"""Reading RoPE parameters back from the numbers a model holds: the base of a stored ``b^(-2i/d)`` within the
storage dtype's round-off (`fit_base`, `inv_freq_tolerance`), the float32 vector a half-precision export rounded
(`recover_base`, `recover_inv_freq`, `round_base_inv_freq`), and an already-scaled vector's base and scaling
(`fit_scaled_base`, a `PriorScaling`).

The formulas these fits invert live elsewhere: the plain ``default_inv_freq`` and `PriorScaling` in
`posrewrite.math.rope_freq`, the scaling methods in `posrewrite.math.rope` (which calls `fit_base` when a base is
not given); this module only compares numbers with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from posrewrite.math.dtypes import dtype_name, mantissa_bits, round_to_dtype, smallest_subnormal, unit_roundoff
from posrewrite.math.rope_freq import PriorScaling, default_inv_freq

__all__ = [
    "fit_base",
    "fit_scaled_base",
    "inv_freq_tolerance",
    "recover_base",
    "recover_inv_freq",
    "round_base_inv_freq",
]

_NICE_DIGITS = range(1, 8)

# How far an exporter's float32 b^(-2i/d) can be from the exact value, whatever its operation order.
# exp(-x * ln b): ln b and the product each round, so the exponent y carries up to 3 roundings of |y| (x itself
# one more where 2i/d is not exact), which exp turns into 3 u |y| relative; exp and a final cast add ~3 u.
# 1 / b**x: only x's rounding reaches the exponent (u |y|); pow (<= 2 ulp), the reciprocal and a cast ~6 u.
# The bound covers both: u |f| (6 + 3 |ln f|).
_EXPONENT_ROUNDINGS = 3
_VALUE_ROUNDINGS = 6


def inv_freq_tolerance(inv_freq: np.ndarray, dtype: Any = "float32") -> np.ndarray:
    """Per-element bound on |stored - exact| for a stored ``b^(-2i/d)`` (or a scaled one), whatever operation
    order computed it in ``dtype`` (the storage type; at least float32 is assumed for the arithmetic):
    ``u * |f| * (_VALUE_ROUNDINGS + _EXPONENT_ROUNDINGS * |ln f|)``, plus the type's spacing near zero for
    values stored as subnormals (the slowest frequencies of a large base in float16)."""
    f = np.abs(np.asarray(inv_freq, dtype=np.float64))
    u = max(unit_roundoff(dtype), unit_roundoff("float32"))
    log_f = np.abs(np.log(np.where(f > 0, f, 1.0)))
    return u * f * (_VALUE_ROUNDINGS + _EXPONENT_ROUNDINGS * log_f) + smallest_subnormal(dtype)


def _storage_dtype(inv_freq: np.ndarray, dtype: Any) -> str:
    if dtype is not None:
        return dtype_name(dtype)
    name = np.asarray(inv_freq).dtype.name
    return name if name in ("float16", "float32") else "float32"


def _agrees(candidate: np.ndarray, stored: np.ndarray, dtype: str) -> bool:
    """``candidate`` (exact or float32) and ``stored`` agree within a stored vector's round-off."""
    diff = np.abs(np.asarray(candidate, dtype=np.float64) - np.asarray(stored, dtype=np.float64))
    return bool(np.all(diff <= inv_freq_tolerance(stored, dtype)))


def _exact_inv_freq(base: float, dim: int, count: int | None = None) -> np.ndarray:
    """float64 b^(-2i/d), the value every exporter's float32 or half vector approximates."""
    k = dim // 2 if count is None else count
    return np.exp(-(2.0 * np.arange(k) / dim) * math.log(base))


def fit_base(inv_freq: np.ndarray, dim: int | None = None, *, rtol: float | None = None,
             dtype: Any = None) -> float | None:
    """Recover b from ``inv_freq_i = b^(-2i/dim)``; None when the vector is not geometric (within ``rtol``,
    element-wise; default 1e-4, or a few units of a half-precision storage type) or has fewer than two entries.

    ``dtype`` is the type the vector was stored in (default: its numpy dtype, float32 for anything else;
    "bfloat16" may be named). The fitted value is snapped to the shortest decimal (1 to 7 significant digits)
    whose exact vector agrees with ``inv_freq`` within that type's round-off (`inv_freq_tolerance`), so 10000
    comes back exact whatever operation order the exporter computed its vector in."""
    store = _storage_dtype(inv_freq, dtype)
    if rtol is None:
        rtol = max(1e-4, 2.0 ** (1 - mantissa_bits(store)))
    f = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    k = f.size
    if k < 2 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        return None
    dim = 2 * k if dim is None else int(dim)
    if dim // 2 != k:
        raise ValueError(f"inv_freq has {k} entries, rotary dim {dim} needs {dim // 2}")
    if abs(f[0] - 1.0) > rtol:
        return None
    log_b = _log_base(f, dim)
    if log_b is None:
        return None
    base = math.exp(log_b)
    x = 2.0 * np.arange(k) / dim
    model = np.exp(-x * log_b)
    if np.any(np.abs(model - f) > rtol * f + smallest_subnormal(store)):
        return None
    # The base is known to within the round-off of the slowest frequency over its exponent.
    window = max(1e-5, 2.0 * float(inv_freq_tolerance(f[-1:], store)[0] / f[-1]) / x[-1])
    return _snap(base, lambda b: b > 1.0 and _agrees(_exact_inv_freq(b, dim), f, store), rel=window)


def _log_base(f: np.ndarray, dim: int) -> float | None:
    """Least-squares ln b of ``f_i = b^(-2i/dim)`` (a line through the origin in (2i/dim, -ln f)); None when
    ``f`` has fewer than two entries, is not finite and positive, or the fit is not a base > 1."""
    if f.size < 2 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        return None
    x = 2.0 * np.arange(f.size) / dim
    log_b = float(np.dot(x, -np.log(f)) / np.dot(x, x))
    return log_b if math.isfinite(log_b) and log_b > 0 else None


def _round_base(inv_freq: np.ndarray, matches: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, float] | None:
    """(float32 HF ``b^(-2i/d)``, b) for the shortest decimal b (1 to 7 significant digits) near the base
    fitted to ``inv_freq`` (d = 2 * its length, first entry within 1e-2 of 1) whose vector ``matches``."""
    f = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    if f.size < 2 or abs(f[0] - 1.0) > 1e-2:
        return None
    log_b = _log_base(f, 2 * f.size)
    if log_b is None:
        return None
    for nice in _decimals(math.exp(log_b)):
        if nice <= 1.0:
            continue
        cand = default_inv_freq(nice, 2 * f.size)
        if matches(cand.astype(np.float64)):
            return cand, nice
    return None


def recover_base(stored: np.ndarray, dtype: Any) -> tuple[np.ndarray, float] | None:
    """(float32 frequencies, base) of HF's ``b^(-2i/d)`` (d = 2 * len(stored)) whose rounding to ``dtype``
    is exactly ``stored``, b a round decimal (10000, 500000, 1e6...) near the fitted base; None otherwise.
    This recovers the float32 vector a half-precision export rounded."""
    f = np.asarray(stored).astype(np.float64).reshape(-1)  # ml_dtypes' bfloat16 converts exactly too
    name = dtype_name(dtype)
    return _round_base(f, lambda cand: bool(np.array_equal(round_to_dtype(cand, name), f)))


def recover_inv_freq(stored: np.ndarray, dtype: Any, candidates: Sequence[np.ndarray] = ()) -> np.ndarray | None:
    """The float32 inverse frequencies whose rounding to ``dtype`` is exactly ``stored``, or None.

    Tries ``candidates`` first, then HF's b^(-2i/d) for a round base fitted to ``stored`` (`recover_base`)."""
    f = np.asarray(stored).astype(np.float64).reshape(-1)
    name = dtype_name(dtype)
    for c in candidates:
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if c.size == f.size and np.array_equal(round_to_dtype(c, name), f):
            return c.astype(np.float32)
    found = recover_base(f, name)
    return None if found is None else found[0]


def round_base_inv_freq(fitted: np.ndarray, rtol: float) -> np.ndarray | None:
    """HF's float32 b^(-2i/d) for a round base b whose every frequency is within ``rtol`` (relative) of
    ``fitted`` (frequencies measured from a cos/sin table, say), or None."""
    f = np.asarray(fitted, dtype=np.float64).reshape(-1)
    found = _round_base(f, lambda cand: bool(np.max(np.abs(cand - f) / cand) <= rtol))
    return None if found is None else found[0]


def _decimals(value: float) -> Iterator[float]:
    """``value`` written with 1 to 7 significant digits, shortest first."""
    for digits in _NICE_DIGITS:
        yield float(f"{value:.{digits}g}")


def _snap(value: float, matches: Callable[[float], bool], *, rel: float = 1e-3) -> float:
    """The shortest decimal (1 to 7 significant digits) near ``value`` for which ``matches`` holds."""
    for nice in _decimals(value):
        if nice > 0 and abs(nice - value) <= rel * value and matches(nice):
            return nice
    return value


def fit_scaled_base(inv_freq: np.ndarray, dim: int | None = None, *, rtol: float | None = None,
                    dtype: Any = None) -> tuple[float, PriorScaling] | None:
    """(base, scaling) for an inverse-frequency vector that is a *scaled* ``b^(-2i/dim)``; None when it is
    plainly geometric (see `fit_base`) or not recognisable.

    Two shapes are recognised without knowing the method's parameters: a constant divisor (linear position
    interpolation: ``b^(-2i/d) / s``) and a divisor growing from 1 at the highest frequencies to ``s`` at
    the lowest (llama3, YaRN, NTK-by-parts all leave the fastest-turning frequencies alone). In the second
    case the base comes from the unchanged leading frequencies alone, so at least three must be unchanged.
    ``rtol`` and ``dtype`` as in `fit_base`; snapped values agree with the vector within its round-off.
    """
    store = _storage_dtype(inv_freq, dtype)
    if rtol is None:
        rtol = max(1e-4, 2.0 ** (1 - mantissa_bits(store)))
    f = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    k = f.size
    if k < 3 or not np.all(np.isfinite(f)) or np.any(f <= 0) or np.any(np.diff(f) >= 0):
        return None
    dim = 2 * k if dim is None else int(dim)
    if dim // 2 != k:
        raise ValueError(f"inv_freq has {k} entries, rotary dim {dim} needs {dim // 2}")

    if abs(f[0] - 1.0) > rtol:  # linear: f = b^(-2i/d) / s
        scale = 1.0 / f[0]
        base = fit_base(f * scale, dim, rtol=rtol, dtype=store)
        if base is None:
            return None
        factor = _snap(scale, lambda s: _agrees(f[:1] * s, np.ones(1), store), rel=1e-5)
        base = _snap(base, lambda b: _agrees(_exact_inv_freq(b, dim) / factor, f, store), rel=1e-5)
        return base, PriorScaling("linear", factor, 0)

    x = 2.0 * np.arange(k) / dim
    y = -np.log(f)
    run = 2
    log_b = y[1] / x[1]
    while run < k and abs(math.exp(-x[run] * log_b) - f[run]) <= rtol * f[run]:
        run += 1
        log_b = float(np.dot(x[:run], y[:run]) / np.dot(x[:run], x[:run]))
    if run < 3 or run == k or not log_b > 0:
        return None
    base = math.exp(log_b)
    divisor = np.exp(-x * log_b) / f  # 1 at the unchanged frequencies, growing to s
    if np.any(np.diff(divisor) < -rtol * divisor[1:]) or divisor[-1] <= 1.0 + rtol:
        return None
    factor = _snap(float(divisor[-1]), lambda s: _agrees(f[-1:] * s, np.exp(-x[-1:] * log_b), store), rel=1e-4)
    base = _snap(base, lambda b: _agrees(_exact_inv_freq(b, dim, run), f[:run], store), rel=1e-4)
    return base, PriorScaling("by_frequency", factor, run)
