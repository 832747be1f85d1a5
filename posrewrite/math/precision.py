"""How much low-precision position arithmetic loses, in plain numpy.

A float format with p explicit mantissa bits holds every integer up to 2^(p+1) (bfloat16: 256, float16:
2048, float32: 2^24); between 2^k and 2^(k+1) only every 2^(k-p)-th integer. Positions cast to such a type
collide, and the angle m * theta computed in it is off by up to half an ulp of the angle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from posrewrite.math.dtypes import (
    FLOAT_FORMATS,
    INTEGER_BITS,
    dtype_name,
    exact_integer_limit,
    float32_to_bfloat16_bits,
    machine_epsilon,
    mantissa_bits,
    max_exponent,
    round_to_dtype,
    smallest_subnormal,
    unit_roundoff,
)
from posrewrite.math.rope import default_inv_freq

__all__ = [
    "DEFAULT_ANGLE_TOLERANCE",
    "mantissa_bits",
    "machine_epsilon",
    "max_exponent",
    "unit_roundoff",
    "smallest_subnormal",
    "dtype_name",
    "exact_integer_limit",
    "round_to_dtype",
    "float32_to_bfloat16_bits",
    "exact_position_count",
    "colliding_positions",
    "angle_error",
    "default_angle_tolerance",
    "PrecisionReport",
    "analyse_positions",
]

# Floor of the default angle tolerance, radians (see default_angle_tolerance).
DEFAULT_ANGLE_TOLERANCE = 1e-3


def _float_format(names: list[str]) -> tuple[int, int] | None:
    """(p, emax) of the integers exact in every float format of ``names`` (None when all are integer
    types). Exact integers of a float format are those with at most p+1 significant bits below 2^(emax+1),
    so an intersection of such sets is the same kind of set with the smallest p and emax."""
    floats = [FLOAT_FORMATS[n] for n in names if n in FLOAT_FORMATS]
    if not floats:
        return None
    return min(f[0] for f in floats), min(f[2] for f in floats)


def _exact_count(n: int, p: int, emax: int) -> int:
    count = min(n, 2 ** (p + 1))  # 0 .. 2^(p+1)-1
    j = p + 1
    while j <= emax and 2**j < n:  # binade [2^j, 2^(j+1)), spacing 2^(j-p)
        step = 2 ** (j - p)
        top = min(n, 2 ** (j + 1))
        count += -(-(top - 2**j) // step)
        j += 1
    return count


def exact_position_count(n: int, dtype: Any) -> int:
    """How many of the integers 0..n-1 ``dtype`` represents exactly (analytic: all below 2^(p+1), then one
    in 2^(j-p) in each binade [2^j, 2^(j+1)), none past the largest finite value)."""
    n = int(n)
    if n <= 0:
        return 0
    name = dtype_name(dtype)
    if name in INTEGER_BITS:
        return min(n, exact_integer_limit(name) + 1)
    p, _, emax = FLOAT_FORMATS[name]
    return _exact_count(n, p, emax)


_CHUNK = 1 << 20


def _round_chain(x: np.ndarray, names: list[str]) -> np.ndarray:
    for name in names:
        x = round_to_dtype(x, name)
    return x


def _colliding(n: int, names: list[str]) -> int:
    fmt = _float_format(names)
    if fmt is None or n <= 2 ** (fmt[0] + 1) + 1:
        return 0
    total = 0
    prev_val = None  # value of the last position of the previous chunk
    prev_counted = False  # whether that position was already counted
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        vals = _round_chain(np.arange(start, stop, dtype=np.float64), names)
        same_prev = np.empty(vals.size, dtype=bool)
        same_prev[1:] = vals[1:] == vals[:-1]
        same_prev[0] = prev_val is not None and vals[0] == prev_val
        same_next = np.zeros(vals.size, dtype=bool)
        same_next[:-1] = same_prev[1:]
        colliding = same_prev | same_next
        total += int(np.count_nonzero(colliding))
        if same_prev[0] and not prev_counted:
            total += 1  # the previous chunk's last position collides with this chunk's first
        prev_val = vals[-1]
        prev_counted = bool(colliding[-1])
    return total


def colliding_positions(n: int, dtype: Any) -> int:
    """How many of 0..n-1 round to a value that another position of 0..n-1 also rounds to.

    Rounding is monotone, so positions sharing a value form runs; this counts the positions in runs longer
    than one. Zero up to 2^(p+1)+1 positions; otherwise a chunked pass over 0..n-1 (O(n) time, bounded
    memory). Values past the largest finite one all become inf and count as colliding."""
    return _colliding(int(n), [dtype_name(dtype)])


def angle_error(inv_freq: np.ndarray, n: int, *, position_dtype: Any, angle_dtype: Any) -> float:
    """Worst |angle_lowprec - angle_exact| in radians over positions 0..n-1 and all frequencies.

    Emulates the graph: positions cast to ``position_dtype``, both factors of the product in
    ``angle_dtype`` (inv_freq stored or cast to it), the product rounded to ``angle_dtype``; the reference
    is the float64 product of the exact position and ``inv_freq`` as given."""
    n = int(n)
    freqs = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    if n <= 0 or freqs.size == 0:
        return 0.0
    pos_name, ang_name = dtype_name(position_dtype), dtype_name(angle_dtype)
    f_low = round_to_dtype(freqs, ang_name)
    rows = max(1, _CHUNK // freqs.size)
    worst = 0.0
    for start in range(0, n, rows):
        pos = np.arange(start, min(n, start + rows), dtype=np.float64)
        pos_low = round_to_dtype(round_to_dtype(pos, pos_name), ang_name)
        exact = pos[:, None] * freqs
        # float64 product of two <=24-bit significands is exact, so one rounding emulates the low-precision Mul
        low = round_to_dtype(pos_low[:, None] * f_low, ang_name)
        err = np.max(np.abs(low - exact))
        if not np.isfinite(err):
            return math.inf
        worst = max(worst, float(err))
    return worst


def default_angle_tolerance(inv_freq: np.ndarray | None, n: int) -> float:
    """Default angle tolerance: max(1e-3 rad, 2^-23 * largest angle).

    1e-3 rad moves cos/sin by at most 1e-3, below the half-ulp of a bfloat16 value near 1 (2^-9 ~ 2e-3), so
    it is below what storing cos/sin in bf16 already costs. The second term is twice the worst rounding of
    the same angles computed in float32 (half an ulp, <= angle * 2^-24): HF computes RoPE angles in float32
    and models are trained that way, so float32 angles always count as safe even at long lengths (at 128k
    positions float32 is off by up to ~4e-3 rad)."""
    freqs = _reference_inv_freq() if inv_freq is None else np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    largest = max(0, int(n) - 1) * (float(np.max(np.abs(freqs))) if freqs.size else 0.0)
    return max(DEFAULT_ANGLE_TOLERANCE, largest * 2.0**-23)


def _reference_inv_freq() -> np.ndarray:
    return default_inv_freq(10000.0, 128).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class PrecisionReport:
    max_length: int
    position_dtype: str
    angle_dtype: str
    exact_positions: int
    exact_position_fraction: float
    colliding_positions: int
    max_angle_error: float
    safe: bool
    angle_tolerance: float = DEFAULT_ANGLE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def analyse_positions(
    n: int,
    *,
    position_dtype: Any,
    angle_dtype: Any,
    inv_freq: np.ndarray | None = None,
    angle_tolerance: float | None = None,
) -> PrecisionReport:
    """Precision report for positions 0..n-1 held in ``position_dtype`` and angles computed in
    ``angle_dtype``.

    Positions reach the multiply in ``angle_dtype``, so they count as exact (and collide) as after both
    casts. ``inv_freq`` None stands for standard RoPE (base 10000, rotary dim 128; its theta_0 = 1 gives
    the largest angles, the others are inexact in every format). Safe when every position is exact and
    the worst angle error is at most ``angle_tolerance`` (default :func:`default_angle_tolerance`:
    max(1e-3 rad, twice float32's own rounding bound for these angles)).
    """
    n = int(n)
    pos_name, ang_name = dtype_name(position_dtype), dtype_name(angle_dtype)
    freqs = _reference_inv_freq() if inv_freq is None else np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    chain = [pos_name] if ang_name in INTEGER_BITS else [pos_name, ang_name]  # positions reach the Mul in angle_dtype
    fmt = _float_format(chain)
    exact = n if fmt is None else (_exact_count(n, *fmt) if n > 0 else 0)
    colliding = _colliding(n, chain)
    err = angle_error(freqs, n, position_dtype=pos_name, angle_dtype=ang_name)
    tol = default_angle_tolerance(freqs, n) if angle_tolerance is None else float(angle_tolerance)
    return PrecisionReport(
        max_length=n,
        position_dtype=pos_name,
        angle_dtype=ang_name,
        exact_positions=exact,
        exact_position_fraction=exact / n if n > 0 else 1.0,
        colliding_positions=colliding,
        max_angle_error=err,
        safe=bool(exact == n and err <= tol),
        angle_tolerance=tol,
    )
