"""ALiBi (Press et al. 2021, arXiv 2108.12409) in plain numpy: slopes, bias tables, fitting slopes from a
baked table, and how exact the bias is for near tokens when it is formed in low precision.

bias_h(i, j) = -m_h * (i - j) added to causal attention scores; HF Bloom adds m_h * j (absolute key
position), which softmax cannot tell apart (it differs by a constant per query row).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from posrewrite.math.precision import dtype_name, round_to_dtype

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "fit_linear_bias",
    "is_standard_slopes",
    "near_bias_error",
]


def _power_of_two_slopes(n: int, alibi_bias_max: float) -> np.ndarray:
    h = np.arange(1, n + 1, dtype=np.float64)
    return 2.0 ** (-alibi_bias_max * h / n)


def alibi_slopes(num_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """Slopes m_1..m_n (float64). n a power of two: m_h = 2^(-8h/n). Otherwise, with p the largest power of
    two below n: the slopes for p heads, then every other slope for 2p heads, the first n - p of them."""
    n = int(num_heads)
    if n <= 0:
        raise ValueError("num_heads must be positive")
    p = 2 ** int(math.floor(math.log2(n)))
    slopes = _power_of_two_slopes(p, alibi_bias_max)
    if p == n:
        return slopes
    extra = _power_of_two_slopes(2 * p, alibi_bias_max)[0::2][: n - p]
    return np.concatenate([slopes, extra])


def is_standard_slopes(slopes: np.ndarray, alibi_bias_max: float = 8, rtol: float = 1e-6) -> bool:
    slopes = np.asarray(slopes, dtype=np.float64).reshape(-1)
    return bool(np.allclose(slopes, alibi_slopes(slopes.size, alibi_bias_max), rtol=rtol, atol=0))


def alibi_bias(
    slopes: np.ndarray,
    query_length: int,
    key_length: int | None = None,
    *,
    form: str = "relative",
    scale: float = 1.0,
) -> np.ndarray:
    """Bias [heads, query_length, key_length] (float64); queries are the last `query_length` keys.

    form "relative": -m (i - j) (the paper); "absolute": m j (Bloom); "anchored": m (j - (key_length-1))
    (MPT's table, 0 at the last key). `scale` S divides distances (slope interpolation, arXiv 2310.13017).
    """
    m = np.asarray(slopes, dtype=np.float64).reshape(-1, 1, 1) / float(scale)
    k = int(key_length if key_length is not None else query_length)
    j = np.arange(k, dtype=np.float64)
    i = np.arange(k - query_length, k, dtype=np.float64)
    if form == "relative":
        d = j[None, :] - i[:, None]
    elif form == "absolute":
        d = np.broadcast_to(j[None, :], (query_length, k))
    elif form == "anchored":
        d = np.broadcast_to(j[None, :] - (k - 1), (query_length, k))
    else:
        raise ValueError(f"unknown ALiBi form {form!r}")
    return m * d[None]


def fit_linear_bias(table: np.ndarray, axis: int = -1, rtol: float = 1e-3) -> tuple[np.ndarray, np.ndarray] | None:
    """Fits table[h, ..., j] = a_h + m_h * j along `axis` with every other axis reduced to heads.

    Returns (slopes m, intercepts a) per head (the non-singleton axis other than `axis`), or None when the
    table is not linear along `axis` (within rtol of its largest value) or varies along any other axis.
    """
    t = np.moveaxis(np.asarray(table, dtype=np.float64), axis, -1)
    length = t.shape[-1]
    if length < 2:
        return None
    rows = t.reshape(-1, length)
    j = np.arange(length, dtype=np.float64)
    slopes = (rows[:, -1] - rows[:, 0]) / (length - 1)
    intercepts = rows[:, 0]
    fitted = intercepts[:, None] + slopes[:, None] * j[None, :]
    scale = max(float(np.max(np.abs(rows))), 1e-30)
    if float(np.max(np.abs(fitted - rows))) > rtol * scale:
        return None
    return slopes, intercepts


def _ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    p = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}[dtype]
    emin = {"bfloat16": -126, "float16": -14, "float32": -126, "float64": -1022}[dtype]
    x = np.abs(np.asarray(x, dtype=np.float64))
    _, e = np.frexp(np.where(x == 0, 1.0, x))
    return np.where(x == 0, 0.0, np.ldexp(1.0, np.maximum(e - 1, emin) - p))


def near_bias_error(
    slopes: np.ndarray,
    max_length: int,
    *,
    position_dtype: Any,
    compute_dtype: Any,
    dtype: Any,
    form: str,
    window: int = 256,
) -> dict[str, float]:
    """Emulates the bias of the last query (position max_length - 1) over its `window` nearest keys.

    Positions enter the product in `position_dtype`, slopes and the product are in `compute_dtype`, the
    bias is stored in `dtype`. What softmax sees is b(i, j) - b(i, i); it is compared with the exact
    -m (i - j). A distance counts as exact when the error is at most half an ulp of m (i - j) in `dtype`,
    i.e. when it is as good as storing the true relative bias. Returns exact_fraction and max_error.
    """
    n = int(max_length)
    pos_t, comp_t, out_t = dtype_name(position_dtype), dtype_name(compute_dtype), dtype_name(dtype)
    comp_float = comp_t if comp_t in ("bfloat16", "float16", "float32", "float64") else "float64"
    out_float = out_t if out_t in ("bfloat16", "float16", "float32", "float64") else "float64"
    m = round_to_dtype(np.asarray(slopes, dtype=np.float64).reshape(-1, 1), comp_float)
    d = np.arange(min(window, n), dtype=np.float64)[None, :]  # distance i - j
    i = float(n - 1)

    def emulate(x: np.ndarray) -> np.ndarray:
        x = round_to_dtype(round_to_dtype(x, pos_t), comp_float)
        return round_to_dtype(round_to_dtype(m * x, comp_float), out_float)

    if form == "absolute":
        eff = emulate(i - d) - emulate(np.array([[i]]))
    elif form in ("relative", "anchored"):
        eff = emulate(-d) - emulate(np.zeros((1, 1)))
    else:
        raise ValueError(f"unknown ALiBi form {form!r}")
    exact_values = -np.asarray(slopes, dtype=np.float64).reshape(-1, 1) * d
    err = np.abs(eff - exact_values)
    ok = err <= 0.5 * _ulp(exact_values, out_float) * (1 + 1e-12)
    return {"exact_fraction": float(np.mean(ok)), "max_error": float(np.max(err)), "window": int(d.size)}
