"""The base of an inv_freq vector found in a graph: plain geometric, already scaled, or the base an earlier
posrewrite rescale recorded. Adds the notes `inspect` shows about it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.math import rope as rope_math
from posrewrite.math import rope_fit
from posrewrite.math.dtypes import round_to_dtype
from posrewrite.sites.rope import RescaleRecord


def half_rounded(inv_freq: np.ndarray) -> str | None:
    """"float16" / "bfloat16" when every frequency of a wider vector is exactly a value of that type (a model
    cast to half precision whose exporter upcast its frequencies again: the round-off is the half type's)."""
    f = np.asarray(inv_freq, np.float64).reshape(-1)
    if f.size < 2 or not np.all(np.isfinite(f)):
        return None
    for name in ("float16", "bfloat16"):
        if np.array_equal(round_to_dtype(f, name), f):
            return name
    return None


def _stored_dtype(stored: ir.Value | None, inv_freq: np.ndarray | None = None) -> str | None:
    """The float type an inv_freq vector is stored in (its round-off bounds the base fit), or None; a float32
    vector holding only half-precision values counts as that half type (`half_rounded`)."""
    if stored is None or stored.dtype is None or not stored.dtype.is_floating_point():
        return None
    if stored.dtype == ir.DataType.FLOAT and inv_freq is not None:
        return half_rounded(inv_freq) or stored.dtype.name
    return stored.dtype.name


def stored_base(inv_freq: np.ndarray, stored: ir.Value | None) -> float | None:
    """The base of an inv_freq vector, within the round-off of the precision it is stored in."""
    return rope_fit.fit_base(inv_freq, dtype=_stored_dtype(stored, inv_freq))


def scaled_base(
    inv_freq: np.ndarray, stored: ir.Value | None, notes: list[str]
) -> tuple[float | None, rope_math.PriorScaling | None]:
    """(base, PriorScaling) of an already-scaled inv_freq, or (None, None); adds a note saying what was found."""
    fitted = rope_fit.fit_scaled_base(inv_freq, dtype=_stored_dtype(stored, inv_freq))
    if fitted is None:
        notes.append("inv_freq is not geometric and its scaling is not recognised: pass --rope-base (or a "
                     "config.json with rope_theta beside the model) to rescale it")
        return None, None
    base, prior = fitted
    notes.append(f"inv_freq is already scaled: {prior.describe()}, base {base:g}; a rescale replaces that "
                 "scaling (as new rope_parameters in config.json would)")
    return base, prior


def table_base(
    inv_freq: np.ndarray, record: RescaleRecord | None, notes: list[str]
) -> tuple[float | None, rope_math.PriorScaling | None]:
    """(base, prior scaling) of frequencies fitted from tables: plain, already scaled, or (when neither fits
    and posrewrite wrote the caches: `record`) the base its rescale recorded."""
    base = rope_fit.fit_base(inv_freq)
    if base is not None:
        return base, None
    base, prior = scaled_base(inv_freq, None, notes)
    if base is not None or record is None or record.base is None:
        return base, prior
    notes[:] = [n for n in notes if "not geometric" not in n and "already scaled" not in n]
    factor = record.factor or 1.0
    notes.append(f"caches written by posrewrite ({record.rope_type} x{factor:g} from base "
                 f"{record.base:g}); a rescale starts again from that base")
    return record.base, rope_math.PriorScaling("rewritten", float(factor), 0)
