"""Precision of RoPE positions and angles in half-precision models: the analysis behind ``posrewrite check``,

Half-precision formats hold every integer only up to 2^(p+1) (bfloat16 256, float16 2048): models that
generate positions in the activation dtype (``t = arange(seq, dtype=inv_freq.dtype)``, the original LLaMA /
Baichuan half-precision bug) give distinct positions the same angle, and an angle ``m * theta`` rounded to
half precision is off by up to half an ulp of the angle (a whole radian at m = 4096 in float16).

Analysis (:func:`trace_rope_dtypes`, :func:`rope_site_precision`): for a computed site the dtypes are read
along the graph — every floating value the positions pass through (Range, Cast, Unsqueeze, Add, Gather...)
up to the position x frequency product (Mul, MatMul, Einsum), the stored dtype of the inverse frequencies,
the product and every value between it and Cos/Sin, cos/sin themselves and where they meet q/k. The
lowest precision on each path is what rounds; the counts and the worst angle error come from
:mod:`posrewrite.math.precision`. For cached tables (and fused RotaryEmbedding caches) the math happened
before export: the table values are compared with the exact angles (the worst angle error is measured from
the stored cos/sin), and the dtype the table was computed in is inferred by emulating float32, float16 and
bfloat16 math.

The rewrite that makes unsafe sites fp32-safe is in :mod:`posrewrite.passes.onnx.rope.fp32`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.math import precision, rope_fit
from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx.alibi.fp32 import is_fp32_safe
from posrewrite.passes.onnx.rope._dtypes import (
    DTYPE_NAMES,
    HALF_NAMES,
    HALF_TYPES,
    as_float64,
    const_array,
    dtype_of,
    is_float,
)
from posrewrite.passes.onnx.rope.tables import table_part
from posrewrite.sites.rope import AngleSource, CachedTable, Layout, OnnxCachedHandles, OnnxComputedHandles, RopeSite

__all__ = [
    "RopeDtypeTrace",
    "TablePrecision",
    "needs_fp32_positions",
    "rope_site_precision",
    "site_needs_fp32",
    "table_precision",
    "trace_rope_dtypes",
]

# Ops a position or angle passes through unchanged in value (only broadcast, moved or retyped).
_PASS_THROUGH = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity", "Tile",
                           "Flatten", "Cast", "Concat"})
_MAX_CONE = 512  # nodes walked upstream of one value before giving up


# ---------------------------------------------------------------------------------------------------------------
# dtype helpers
# ---------------------------------------------------------------------------------------------------------------


def _rank(name: str) -> tuple[int, int]:
    """Sort key: lower is less precise (mantissa bits, then exponent range). Non-floats rank highest."""
    try:
        return (precision.mantissa_bits(name), precision.max_exponent(name))
    except ValueError:
        return (10**6, 10**6)


def _lowest(names: Iterable[str], default: str) -> str:
    floats = [n for n in names if n in DTYPE_NAMES.values()]
    return min(floats, key=_rank) if floats else default





# ---------------------------------------------------------------------------------------------------------------
# tracing dtypes of a computed site
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RopeDtypeTrace:
    """Dtypes along one computed RoPE site (the lowest precision of each stage is what rounds)."""

    positions: list[str]  # "op:dtype" steps the floating positions take, source first
    position_dtype: str  # lowest-precision float dtype the positions pass through
    inv_freq_dtype: str  # lowest-precision dtype of the inverse frequencies (stored constant included)
    product_dtype: str  # dtype of the position x frequency product
    angle_dtype: str  # lowest precision from the product to the Cos/Sin inputs
    cos_sin_dtype: str  # dtype of the Cos/Sin outputs
    applied_dtype: str  # dtype of cos/sin where they multiply q/k
    inexact_sources: list[str] = dataclasses.field(default_factory=list)  # half-precision graph inputs

    @property
    def low_precision(self) -> bool:
        """Positions, frequencies or angles pass through a half-precision value."""
        return any(d in HALF_NAMES for d in (self.position_dtype, self.inv_freq_dtype, self.angle_dtype))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _upstream(value: ir.Value, *, include_constants: bool) -> tuple[list[tuple[str, str, ir.Value]], list[str]]:
    """(op, dtype, value) of the floating values in the upstream cone of ``value`` (itself included), nearest
    first; integer values end the walk (they are exact). Also the names of half-precision graph inputs."""
    out: list[tuple[str, str, ir.Value]] = []
    inputs: list[str] = []
    seen: set[int] = set()
    stack = [value]
    nodes = 0
    while stack and nodes < _MAX_CONE:
        v = stack.pop(0)
        if v is None or id(v) in seen or not is_float(v):
            continue
        seen.add(id(v))
        node = v.producer()
        const = const_tensor(v) is not None
        if node is None or const or (node.op_type == "Constant"):
            if const:
                if include_constants:
                    out.append(("constant", dtype_of(v), v))
            else:
                out.append(("input", dtype_of(v), v))
                if v.dtype in HALF_TYPES:
                    inputs.append(v.name or "?")
            continue
        nodes += 1
        out.append((node.op_type, dtype_of(v), v))
        stack.extend(node.inputs)
    return out, inputs


def _chain(value: ir.Value) -> list[str]:
    """"op:dtype" steps of the main chain into ``value`` (first floating, non-constant input), source first."""
    steps: list[str] = []
    v: ir.Value | None = value
    for _ in range(32):
        if v is None or not is_float(v) or const_tensor(v) is not None:
            break
        node = v.producer()
        step = f"{node.op_type if node is not None else 'input'}:{dtype_of(v)}"
        if not steps or steps[-1] != step:
            steps.append(step)
        if node is None:
            break
        v = next((i for i in node.inputs if is_float(i) and const_tensor(i) is None), None)
    return steps[::-1]


def _positions_operand(site: RopeSite) -> tuple[ir.Node, ir.Value, ir.Value]:
    handles = site.computed_handles()
    product, positions = handles.product, handles.positions
    others = [v for v in product.inputs if v is not positions and v is not None]
    return product, positions, others[0] if others else positions


def trace_rope_dtypes(site: RopeSite) -> RopeDtypeTrace | None:
    """Dtypes along a computed site as the graph is now; None for cached tables and fused ops."""
    if not isinstance(site.handles, OnnxComputedHandles):
        return None
    product, positions, inv = _positions_operand(site)
    pos_cone, half_inputs = _upstream(positions, include_constants=False)
    steps = _chain(positions)
    position_dtype = _lowest((dt for _, dt, _ in pos_cone), dtype_of(positions))
    inv_cone, _ = _upstream(inv, include_constants=True)
    inv_dtype = _lowest((dt for _, dt, _ in inv_cone), dtype_of(inv))
    product_dtype = dtype_of(product.outputs[0])
    angle_dtypes = [product_dtype]
    trig = site.computed_handles().cos.trig
    v = trig.inputs[0]
    for _ in range(32):
        if v is None or v is product.outputs[0]:
            break
        angle_dtypes.append(dtype_of(v))
        node = v.producer()
        if node is None or node.op_type not in _PASS_THROUGH:
            break
        v = node.inputs[0]
    applied = [dtype_of(a.cos) for a in site.applications if a.cos is not None] or [dtype_of(site.cos)]
    return RopeDtypeTrace(
        positions=steps[-8:],
        position_dtype=position_dtype,
        inv_freq_dtype=inv_dtype,
        product_dtype=product_dtype,
        angle_dtype=_lowest(angle_dtypes, product_dtype),
        cos_sin_dtype=dtype_of(trig.outputs[0]),
        applied_dtype=_lowest(applied, applied[0]),
        inexact_sources=half_inputs,
    )


def _true_inv_freq(site: RopeSite, trace: RopeDtypeTrace) -> tuple[np.ndarray, np.ndarray, bool]:
    """(effective, true, recovered), float64: the frequencies that reach the product (after every rounding on
    the way) and the ones they stand for (stored float32 values, or those a half-precision constant rounds)."""
    _, _, inv = _positions_operand(site)
    stored, stored_dtype = None, trace.inv_freq_dtype
    cone, _ = _upstream(inv, include_constants=True)
    for op, _dt, v in cone:
        if op == "constant":
            arr = const_array(v)
            if arr is not None and arr.size == site.rotary_dim // 2:
                stored, stored_dtype = as_float64(arr).reshape(-1), dtype_of(v)
                break
    if stored is None:
        stored = np.asarray(site.inv_freq, dtype=np.float64).reshape(-1)
    true, recovered = stored, True
    if stored_dtype in HALF_NAMES:
        exact = rope_fit.recover_inv_freq(stored, stored_dtype)
        if exact is None:
            recovered = False
        else:
            true = exact.astype(np.float64)
    effective = stored
    if trace.inv_freq_dtype in HALF_NAMES:
        effective = precision.round_to_dtype(stored, trace.inv_freq_dtype)
    return effective, true, recovered


def _angle_error_stored(true: np.ndarray, stored: np.ndarray, n: int, position_dtype: str, angle_dtype: str) -> float:
    """precision.angle_error's emulation with frequencies stored in a lower precision than the product:
    the exact angle uses ``true``, the graph's uses ``stored`` (then rounded like every product operand)."""
    f_low = precision.round_to_dtype(stored, angle_dtype)
    rows = max(1, (1 << 20) // max(1, true.size))
    worst = 0.0
    for start in range(0, n, rows):
        pos = np.arange(start, min(n, start + rows), dtype=np.float64)
        low_pos = precision.round_to_dtype(precision.round_to_dtype(pos, position_dtype), angle_dtype)
        low = precision.round_to_dtype(low_pos[:, None] * f_low, angle_dtype)
        err = float(np.max(np.abs(low - pos[:, None] * true)))
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------------------------
# cached tables
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TablePrecision:
    """What a cos/sin table holds compared with exact angles."""

    table_dtype: str
    rows: int
    math_dtype: str  # the dtype whose emulated math reproduces the table best
    max_angle_error: float  # over the rows checked, radians, measured from the stored cos/sin
    stored_angle_error: float  # the same for the correctly rounded table (what storage alone costs)
    tolerance: float
    inv_freq: np.ndarray  # float32 frequencies the table should hold (snapped base or fitted)
    attention_factor: float
    recovered: bool  # inv_freq from a round base (else: as fitted from the table)

    @property
    def correct(self) -> bool:
        return self.max_angle_error <= self.tolerance


def _site_tables(site: RopeSite) -> tuple[np.ndarray, np.ndarray, str] | None:
    """cos and sin tables of a cached/fused site as float64 [rows, rotary_dim/2], and the table dtype."""
    if site.angles == AngleSource.FUSED_OP:
        c, s = const_array(site.cos_cache), const_array(site.sin_cache)
        if c is None or s is None:
            return None
        return as_float64(c).reshape(c.shape[0], -1), as_float64(s).reshape(s.shape[0], -1), dtype_of(site.cos_cache)
    if not isinstance(site.handles, OnnxCachedHandles) or not isinstance(site.source, CachedTable):
        return None
    handles, source = site.handles, site.source
    out = []
    for read, columns, comp in ((handles.cos, source.cos_columns, source.cos_component),
                                (handles.sin, source.sin_columns, source.sin_component)):
        t = const_array(read.table)
        if t is None:
            return None
        t = table_part(as_float64(t), columns, comp)
        kept = [d for d in t.shape[:-1] if d != 1] or [1]
        if len(kept) != 1:
            return None
        t = t.reshape(kept[0], t.shape[-1])
        w = t.shape[1]
        if 2 * w != site.rotary_dim:
            t = t[:, : w // 2] if site.layout == Layout.ROTATE_HALF else t[:, 0::2]
        out.append(t)
    return out[0], out[1], dtype_of(handles.cos.table)


def _wrap(x: np.ndarray) -> np.ndarray:
    return np.abs(np.mod(x + np.pi, 2 * np.pi) - np.pi)


def table_precision(site: RopeSite, n: int | None = None) -> TablePrecision | None:
    """Compares a cached/fused site's cos/sin tables (first min(n, rows) rows) with exact angles."""
    tables = _site_tables(site)
    if tables is None:
        return None
    cos_t, sin_t, dtype = tables
    rows = cos_t.shape[0]
    m = rows if n is None else max(1, min(int(n), rows))
    dname = dtype if dtype in DTYPE_NAMES.values() else "float32"
    snapped = rope_fit.round_base_inv_freq(site.inv_freq, rtol=2e-3) if site.inv_freq is not None else None
    inv = snapped if snapped is not None else np.asarray(site.inv_freq, dtype=np.float32)
    true = inv.astype(np.float64)
    factor = float(np.median(cos_t[0]))
    if abs(factor - 1.0) <= precision.machine_epsilon(dname):
        factor = 1.0
    step = max(1, (1 << 20) // max(1, true.size))
    err = stored = 0.0
    scores = {d: 0.0 for d in ("float32", "float16", "bfloat16")}
    for start in range(0, m, step):
        pos = np.arange(start, min(m, start + step), dtype=np.float64)
        exact = pos[:, None] * true
        c, s = cos_t[start:start + pos.size], sin_t[start:start + pos.size]
        err = max(err, float(np.max(_wrap(np.arctan2(s, c) - exact))))
        cr = precision.round_to_dtype(np.cos(exact) * factor, dname)
        sr = precision.round_to_dtype(np.sin(exact) * factor, dname)
        stored = max(stored, float(np.max(_wrap(np.arctan2(sr, cr) - exact))))
        for d in scores:
            ang = precision.round_to_dtype(
                precision.round_to_dtype(pos, d)[:, None] * precision.round_to_dtype(true, d), d)
            ce = precision.round_to_dtype(np.cos(ang) * factor, dname)
            se = precision.round_to_dtype(np.sin(ang) * factor, dname)
            scores[d] = max(scores[d], float(np.max(np.abs(ce - c))), float(np.max(np.abs(se - s))))
    math_dtype = min(scores, key=lambda d: (scores[d], -_rank(d)[0]))
    tol = max(precision.default_angle_tolerance(true, m), 2.0 * stored)
    return TablePrecision(dname, rows, math_dtype, err, stored, tol, inv.astype(np.float32), factor,
                          snapped is not None)


# ---------------------------------------------------------------------------------------------------------------
# per-site report (the rows of `posrewrite check`)
# ---------------------------------------------------------------------------------------------------------------


def rope_site_precision(site: RopeSite, n: int, index: int = 0) -> dict[str, Any]:
    """One row of ``posrewrite check`` for a RoPE site at ``n`` positions (0..n-1).

    Keys: kind, site, angles, max_length, position_dtype, angle_dtype, exact_positions,
    exact_position_fraction, colliding_positions, max_angle_error, angle_tolerance, safe, plus
    inv_freq_dtype, cos_sin_dtype, applied_dtype, dtype_path (computed) or table_dtype, math_dtype,
    index_dtype, rows_checked (tables: counts and fraction are over the min(n, rows) rows that exist), and
    notes."""
    n = int(n)
    notes: list[str] = []
    if site.angles == AngleSource.COMPUTED:
        trace = trace_rope_dtypes(site)
        if trace is None:
            report = precision.analyse_positions(n, position_dtype=site.position_dtype, angle_dtype=site.angle_dtype,
                                                 inv_freq=site.inv_freq)
            row = report.to_dict()
        else:
            effective, true, recovered = _true_inv_freq(site, trace)
            report = precision.analyse_positions(n, position_dtype=trace.position_dtype, angle_dtype=trace.angle_dtype,
                                                 inv_freq=true)
            row = report.to_dict()
            if _rank(trace.inv_freq_dtype) < _rank(trace.angle_dtype) and recovered:
                err = _angle_error_stored(true, effective, n, trace.position_dtype, trace.angle_dtype)
                row["max_angle_error"] = err
                row["safe"] = bool(report.exact_positions == n and err <= report.angle_tolerance)
            if not recovered:
                notes.append(f"inverse frequencies are stored in {trace.inv_freq_dtype} and are not the rounding of a "
                             "round base: the angle error is measured against the stored values")
            if trace.inexact_sources:
                notes.append(f"positions enter the graph in half precision ({', '.join(trace.inexact_sources)}): "
                             "callers must pass them exactly")
            row.update(inv_freq_dtype=trace.inv_freq_dtype, cos_sin_dtype=trace.cos_sin_dtype,
                       applied_dtype=trace.applied_dtype, dtype_path=" > ".join(trace.positions))
    else:
        tp = table_precision(site, n)
        index_dtype = dtype_of(site.positions) if site.positions is not None else "int64"
        if tp is None:
            report = precision.analyse_positions(n, position_dtype="int64", angle_dtype="float32",
                                                 inv_freq=site.inv_freq)
            row = report.to_dict()
            row["angle_dtype"] = site.angle_dtype
        else:
            m = min(n, tp.rows)
            report = precision.analyse_positions(m, position_dtype=tp.math_dtype, angle_dtype=tp.math_dtype,
                                                 inv_freq=tp.inv_freq)
            row = report.to_dict()
            row.update(max_length=n, max_angle_error=tp.max_angle_error, angle_tolerance=tp.tolerance,
                       safe=bool(report.exact_positions == m and tp.correct),
                       table_dtype=tp.table_dtype, math_dtype=tp.math_dtype, index_dtype=index_dtype, rows_checked=m)
            notes.append(f"table values match {tp.math_dtype} math (inferred from the stored cos/sin)")
            if not tp.recovered:
                notes.append("frequencies fitted from the table (no round base matches)")
        if site.max_positions is not None and n > site.max_positions:
            notes.append(f"table has {site.max_positions} rows: positions past it fail or read out of bounds")
    if site.encoding.decay is not None:
        from posrewrite.passes.onnx.rope.xpos import decay_precision

        decay_notes, decay_safe = decay_precision(site, n)
        notes.extend(decay_notes)
        row["safe"] = bool(row.get("safe", True) and decay_safe)
    row.update({"site": index, "kind": "rope", "angles": site.angles.value})
    if notes:
        row["notes"] = notes
    return row


def site_needs_fp32(site: Any) -> bool:
    """Whether the rewrite changes this site: a computed RoPE site whose positions, frequencies or angles pass
    through half precision, a table that does not hold fp32 math, an ALiBi site computed in half precision."""
    if isinstance(site, RopeSite):
        if site.angles == AngleSource.COMPUTED:
            trace = trace_rope_dtypes(site)
            return trace.low_precision if trace is not None else (
                site.position_dtype in HALF_NAMES or site.angle_dtype in HALF_NAMES)
        tp = table_precision(site)
        return tp is not None and not tp.correct
    if getattr(site, "kind", None) == "alibi":
        return not is_fp32_safe(site)
    return False


def needs_fp32_positions(sites: Iterable[Any]) -> bool:
    """True when some site computes positions/angles (or ALiBi distances) in half precision, i.e. when a rescale
    of this model should imply ``--fp32-positions``."""
    return any(site_needs_fp32(s) for s in sites)
