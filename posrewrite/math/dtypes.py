"""The one dtype table: explicit mantissa bits, exponent range, machine epsilon, unit round-off, subnormals
and rounding to a dtype, for every float and integer type posrewrite meets (numpy only).

Below `math.rope` and `math.precision` (the half-precision analysis), which both use it."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "FLOAT_FORMATS",
    "INTEGER_BITS",
    "dtype_name",
    "exact_integer_limit",
    "float32_to_bfloat16_bits",
    "machine_epsilon",
    "mantissa_bits",
    "max_exponent",
    "round_to_dtype",
    "smallest_subnormal",
    "unit_roundoff",
]

# name -> (explicit mantissa bits, smallest normal exponent, largest exponent)
FLOAT_FORMATS = {
    "bfloat16": (7, -126, 127),
    "float16": (10, -14, 15),
    "float32": (23, -126, 127),
    "float64": (52, -1022, 1023),
}
INTEGER_BITS = {"int8": 7, "int16": 15, "int32": 31, "int64": 63, "uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}
_ALIASES = {
    "bf16": "bfloat16",
    "bfloat": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "single": "float32",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "long": "int64",
    "int": "int32",
}


def dtype_name(dtype: Any) -> str:
    """Canonical name ("bfloat16", "float16", "float32", "float64", "int64", ...) of a dtype given as a
    string, alias ("bf16", "fp16", "half", "torch.float16", "tensor(float16)"), numpy dtype or type."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, np.dtype):
        name = dtype.name
    elif isinstance(dtype, type) and issubclass(dtype, np.generic):
        name = np.dtype(dtype).name
    else:
        name = str(dtype)
    name = name.strip().lower()
    for prefix in ("torch.", "np.", "numpy.", "tensor(", "ml_dtypes."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.rstrip(")")
    name = _ALIASES.get(name, name)
    if name not in FLOAT_FORMATS and name not in INTEGER_BITS:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return name


def mantissa_bits(dtype: Any) -> int:
    """Explicit mantissa bits p: bfloat16 7, float16 10, float32 23, float64 52."""
    name = dtype_name(dtype)
    if name not in FLOAT_FORMATS:
        raise ValueError(f"{name} is not a floating-point type")
    return FLOAT_FORMATS[name][0]


def max_exponent(dtype: Any) -> int:
    """emax, the exponent of a float format's largest finite value (float16 15, bfloat16 and float32 127)."""
    name = dtype_name(dtype)
    if name not in FLOAT_FORMATS:
        raise ValueError(f"{name} is not a floating-point type")
    return FLOAT_FORMATS[name][2]


def machine_epsilon(dtype: Any) -> float:
    """eps = 2^-p, the spacing of a float format's values just above 1 (bfloat16 2^-7, float16 2^-10,
    float32 2^-23, float64 2^-52)."""
    return 2.0 ** -mantissa_bits(dtype)


def unit_roundoff(dtype: Any = "float32") -> float:
    """u = 2^-(p+1) = eps / 2, the largest relative error of rounding to nearest (float32 2^-24, float16 2^-11)."""
    return 2.0 ** -(mantissa_bits(dtype) + 1)


def smallest_subnormal(dtype: Any) -> float:
    """2^(emin - p): the spacing of a float format's values near zero (float16: 2^-24, float32: 2^-149)."""
    name = dtype_name(dtype)
    if name not in FLOAT_FORMATS:
        raise ValueError(f"{name} is not a floating-point type")
    p, emin, _ = FLOAT_FORMATS[name]
    return 2.0 ** (emin - p)


def exact_integer_limit(dtype: Any) -> int:
    """Largest N such that every integer 0..N is exact: 2^(p+1) for floats (256, 2048, 2^24, 2^53);
    the largest value of an integer type."""
    name = dtype_name(dtype)
    if name in INTEGER_BITS:
        return 2 ** INTEGER_BITS[name] - 1
    return 2 ** (FLOAT_FORMATS[name][0] + 1)


def _round_generic(x: np.ndarray, p: int, emin: int, emax: int) -> np.ndarray:
    """Round float64 values to p mantissa bits, nearest-even, with subnormals below 2^emin and overflow to
    inf past the largest finite value."""
    out = np.array(x, dtype=np.float64, copy=True)
    finite = np.isfinite(out) & (out != 0)
    v = out[finite]
    _, e = np.frexp(v)  # v = m * 2^e, 0.5 <= |m| < 1 -> binade exponent e - 1
    q = np.maximum(e - 1, emin) - p  # ulp exponent
    r = np.ldexp(np.rint(np.ldexp(v, -q)), q)
    max_finite = (2.0 - 2.0 ** (-p)) * 2.0**emax
    r = np.where(np.abs(r) > max_finite, np.copysign(np.inf, v), r)
    out[finite] = r
    return out


def round_to_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """float64 copy of ``x`` with every value rounded (nearest, ties to even) to ``dtype``.

    float16/float32 use numpy's casts (correctly rounded from float64); bfloat16 drops mantissa bits of the
    float64 pattern (its normal range equals float32's; subnormals go through a generic path), which equals
    torch's cast for float32 inputs. Rounding straight from float64 can differ from torch's float64 ->
    bfloat16/float16 casts, which round twice via float32, in rare halfway cases. Integer dtypes round to
    the nearest integer (ties to even).
    """
    name = dtype_name(dtype)
    a = np.asarray(x, dtype=np.float64)
    if name == "float64":
        return a.copy()
    if name == "float32":
        with np.errstate(over="ignore"):
            return a.astype(np.float32).astype(np.float64)
    if name == "float16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).astype(np.float64)
    if name == "bfloat16":
        return _round_bfloat16(a)
    return np.rint(a)


def _round_bfloat16(a: np.ndarray) -> np.ndarray:
    drop = 52 - 7  # float64 mantissa bits that bfloat16 does not keep
    bits = np.ascontiguousarray(a).view(np.uint64)
    lsb = (bits >> np.uint64(drop)) & np.uint64(1)
    rounded = (bits + (np.uint64((1 << (drop - 1)) - 1) + lsb)) & ~np.uint64((1 << drop) - 1)
    out = rounded.view(np.float64).reshape(a.shape)
    tiny = np.abs(a) < 2.0**-126
    if np.any(tiny):
        out = np.where(tiny, _round_generic(a, 7, -126, 127), out)
    out = np.where(np.isnan(a), a, out)
    max_finite = (2.0 - 2.0**-7) * 2.0**127
    out = np.where(np.isfinite(a) & (np.abs(out) > max_finite), np.copysign(np.inf, a), out)
    return out


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of float32 values (nearest-even; NaN stays a quiet NaN)."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = f.view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if np.any(nan):
        rounded = np.where(nan, ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded.reshape(f.shape)
