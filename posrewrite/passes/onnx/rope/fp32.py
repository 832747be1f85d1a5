"""fp32-safe positions: the precision analysis behind ``posrewrite check`` and the ``--fp32-positions`` rewrite.

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

Rewrite (:class:`Fp32PositionsPass`): for each unsafe computed site the whole cone from the positions to the
cos/sin values that multiply q/k is rebuilt in float32 — lossy casts to half precision are skipped, Range
and arithmetic run in float32, inverse frequencies stored in half precision are regenerated from fp32 math
when their values are the rounding of a geometric base^(-2i/d) (or of a rescale plan's frequencies) — and
one Cast to the activation dtype is inserted where cos/sin meet q/k. The old nodes are left to be removed
when nothing else reads them; every other value keeps its dtype. Half-precision cos/sin tables whose values
are not those of fp32 math are regenerated from fp32 math (correctly rounded to the table dtype). Sites that
are already safe are not touched, so a safe model comes out unchanged. ALiBi sites given to the pass are made
safe by ``posrewrite.passes.onnx.alibi.fp32.make_alibi_fp32`` (the pipeline runs ``Fp32AlibiPass`` as its own step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.math import precision
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._build import add_initializer, unique_name
from posrewrite.passes.onnx.alibi.fp32 import is_fp32_safe, make_alibi_fp32
from posrewrite.pipeline import PipelineContext, ReportingPass, site_key
from posrewrite.sites.rope import AngleSource, CachedTable, Layout, OnnxCachedHandles, OnnxComputedHandles, RopeSite

__all__ = [
    "Fp32PositionsPass",
    "RopeDtypeTrace",
    "TablePrecision",
    "needs_fp32_positions",
    "rope_site_precision",
    "site_needs_fp32",
    "table_precision",
    "trace_rope_dtypes",
]

_F32 = ir.DataType.FLOAT
_HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_FLOAT_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)
_NAMES = {
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.FLOAT: "float32",
    ir.DataType.DOUBLE: "float64",
}
_HALF_NAMES = ("float16", "bfloat16")

# Ops whose floating inputs can all be recomputed in float32 with the same attributes (indices, axes,
# shapes and conditions are integer/bool inputs and are kept as they are).
_LIFTABLE = frozenset({
    "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity", "Tile", "Flatten",
    "Slice", "Gather", "GatherElements", "GatherND", "Split", "Concat", "Pad",
    "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "CumSum",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Sum", "Mean", "Sqrt", "Pow", "Reciprocal",
    "Floor", "Ceil", "Round", "Mod", "Exp", "Log", "Cos", "Sin", "Clip", "Where",
    "MatMul", "Einsum", "Range",
})
# Ops a position or angle passes through unchanged in value (only broadcast, moved or retyped).
_PASS_THROUGH = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Identity", "Tile",
                           "Flatten", "Cast", "Concat"})
_MAX_CONE = 512  # nodes walked upstream of one value before giving up


# ---------------------------------------------------------------------------------------------------------------
# dtype helpers
# ---------------------------------------------------------------------------------------------------------------


def _dtype(value: ir.Value | None) -> str:
    if value is None or value.dtype is None:
        return "unknown"
    return _NAMES.get(value.dtype, str(value.dtype).lower())


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _FLOAT_TYPES


def _rank(name: str) -> tuple[int, int]:
    """Sort key: lower is less precise (mantissa bits, then exponent range). Non-floats rank highest."""
    try:
        return (precision.mantissa_bits(name), precision.max_exponent(name))
    except ValueError:
        return (10**6, 10**6)


def _lowest(names: Iterable[str], default: str) -> str:
    floats = [n for n in names if n in _NAMES.values()]
    return min(floats, key=_rank) if floats else default


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def _as_float64(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr).astype(np.float64)  # ml_dtypes' bfloat16 converts exactly too


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
        return any(d in _HALF_NAMES for d in (self.position_dtype, self.inv_freq_dtype, self.angle_dtype))

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
        if v is None or id(v) in seen or not _is_float(v):
            continue
        seen.add(id(v))
        node = v.producer()
        const = ir.convenience.get_const_tensor(v) is not None
        if node is None or const or (node.op_type == "Constant"):
            if const:
                if include_constants:
                    out.append(("constant", _dtype(v), v))
            else:
                out.append(("input", _dtype(v), v))
                if v.dtype in _HALF_TYPES:
                    inputs.append(v.name or "?")
            continue
        nodes += 1
        out.append((node.op_type, _dtype(v), v))
        stack.extend(node.inputs)
    return out, inputs


def _chain(value: ir.Value) -> list[str]:
    """"op:dtype" steps of the main chain into ``value`` (first floating, non-constant input), source first."""
    steps: list[str] = []
    v: ir.Value | None = value
    for _ in range(32):
        if v is None or not _is_float(v) or ir.convenience.get_const_tensor(v) is not None:
            break
        node = v.producer()
        step = f"{node.op_type if node is not None else 'input'}:{_dtype(v)}"
        if not steps or steps[-1] != step:
            steps.append(step)
        if node is None:
            break
        v = next((i for i in node.inputs if _is_float(i) and ir.convenience.get_const_tensor(i) is None), None)
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
    position_dtype = _lowest((dt for _, dt, _ in pos_cone), _dtype(positions))
    inv_cone, _ = _upstream(inv, include_constants=True)
    inv_dtype = _lowest((dt for _, dt, _ in inv_cone), _dtype(inv))
    product_dtype = _dtype(product.outputs[0])
    angle_dtypes = [product_dtype]
    trig = site.computed_handles().cos.trig
    v = trig.inputs[0]
    for _ in range(32):
        if v is None or v is product.outputs[0]:
            break
        angle_dtypes.append(_dtype(v))
        node = v.producer()
        if node is None or node.op_type not in _PASS_THROUGH:
            break
        v = node.inputs[0]
    applied = [_dtype(a.cos) for a in site.applications if a.cos is not None] or [_dtype(site.cos)]
    return RopeDtypeTrace(
        positions=steps[-8:],
        position_dtype=position_dtype,
        inv_freq_dtype=inv_dtype,
        product_dtype=product_dtype,
        angle_dtype=_lowest(angle_dtypes, product_dtype),
        cos_sin_dtype=_dtype(trig.outputs[0]),
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
            arr = _const_array(v)
            if arr is not None and arr.size == site.rotary_dim // 2:
                stored, stored_dtype = _as_float64(arr).reshape(-1), _dtype(v)
                break
    if stored is None:
        stored = np.asarray(site.inv_freq, dtype=np.float64).reshape(-1)
    true, recovered = stored, True
    if stored_dtype in _HALF_NAMES:
        exact = rope_math.recover_inv_freq(stored, stored_dtype)
        if exact is None:
            recovered = False
        else:
            true = exact.astype(np.float64)
    effective = stored
    if trace.inv_freq_dtype in _HALF_NAMES:
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
        c, s = _const_array(site.cos_cache), _const_array(site.sin_cache)
        if c is None or s is None:
            return None
        return _as_float64(c).reshape(c.shape[0], -1), _as_float64(s).reshape(s.shape[0], -1), _dtype(site.cos_cache)
    if not isinstance(site.handles, OnnxCachedHandles) or not isinstance(site.source, CachedTable):
        return None
    handles, source = site.handles, site.source
    out = []
    for read, columns in ((handles.cos, source.cos_columns), (handles.sin, source.sin_columns)):
        t = _const_array(read.table)
        if t is None:
            return None
        t = _as_float64(t)
        if columns is not None:
            t = t[..., columns[0]:columns[1]]
        kept = [d for d in t.shape[:-1] if d != 1] or [1]
        if len(kept) != 1:
            return None
        t = t.reshape(kept[0], t.shape[-1])
        w = t.shape[1]
        if 2 * w != site.rotary_dim:
            t = t[:, : w // 2] if site.layout == Layout.ROTATE_HALF else t[:, 0::2]
        out.append(t)
    return out[0], out[1], _dtype(handles.cos.table)


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
    dname = dtype if dtype in _NAMES.values() else "float32"
    snapped = rope_math.round_base_inv_freq(site.inv_freq, rtol=2e-3) if site.inv_freq is not None else None
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
        index_dtype = _dtype(site.positions) if site.positions is not None else "int64"
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
                site.position_dtype in _HALF_NAMES or site.angle_dtype in _HALF_NAMES)
        tp = table_precision(site)
        return tp is not None and not tp.correct
    if getattr(site, "kind", None) == "alibi":
        return not is_fp32_safe(site)
    return False


def needs_fp32_positions(sites: Iterable[Any]) -> bool:
    """True when some site computes positions/angles (or ALiBi distances) in half precision, i.e. when a rescale
    of this model should imply ``--fp32-positions``."""
    return any(site_needs_fp32(s) for s in sites)


# ---------------------------------------------------------------------------------------------------------------
# rewriting a computed site in float32
# ---------------------------------------------------------------------------------------------------------------


class _Lift:
    """Builds float32 copies of values, recomputing their whole cone from exact or float32 sources."""

    def __init__(self, graph: ir.Graph, stem: str, candidates: Sequence[tuple[np.ndarray, np.ndarray]],
                 notes: list[str]) -> None:
        self.graph = graph
        self.stem = stem
        self.candidates = list(candidates)
        self.notes = notes
        self.nodes: list[ir.Node] = []  # new nodes, in dependency order
        self.replaced: list[ir.Node] = []  # old nodes whose outputs were lifted
        self.replaced_constants: list[ir.Value] = []
        self._memo: dict[int, ir.Value] = {}
        self._clean: dict[int, bool] = {}
        self.regenerated: list[str] = []
        self.kept_rounded: list[str] = []

    # a value is clean when neither it nor anything it is computed from is in half precision
    def clean(self, value: ir.Value) -> bool:
        key = id(value)
        if key in self._clean:
            return self._clean[key]
        self._clean[key] = True  # cycles cannot happen in a DAG; guards re-entry
        if _is_float(value) and value.dtype in _HALF_TYPES:
            result = False
        else:
            node = value.producer()
            if node is None or ir.convenience.get_const_tensor(value) is not None or not _is_float(value):
                result = True
            else:
                result = all(self.clean(i) for i in node.inputs if i is not None and _is_float(i))
        self._clean[key] = result
        return result

    def _new(self, op_type: str, inputs: list[ir.Value | None], attributes: Iterable[ir.Attr] = (), *,
             num_outputs: int = 1, domain: str = "") -> ir.Node:
        name = unique_name(self.graph, f"{self.stem}_{op_type}")
        node = ir.Node(domain, op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in attributes],
                       num_outputs=num_outputs, name=name)
        for k, out in enumerate(node.outputs):
            out.name = f"{name}_out{k}" if num_outputs > 1 else f"{name}_out"
        self.nodes.append(node)
        return node

    def cast(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        node = self._new("Cast", [value], [ir.AttrInt64("to", int(dtype))])
        out = node.outputs[0]
        out.dtype = dtype
        out.shape = value.shape
        return out

    def __call__(self, value: ir.Value) -> ir.Value:
        key = id(value)
        if key not in self._memo:
            self._memo[key] = self._lift(value)
        return self._memo[key]

    def _lift(self, value: ir.Value) -> ir.Value:
        if not _is_float(value):
            return value
        if self.clean(value):
            return value if value.dtype == _F32 else self.cast(value, _F32)
        node = value.producer()
        is_leaf = node is None or node.op_type == "Constant" or value.const_value is not None
        const = _const_array(value) if is_leaf else None
        if const is not None:
            return self._lift_constant(value, const)
        if node is None:  # a half-precision graph input: its values are already rounded
            self.notes.append(f"{value.name} enters the graph in {_dtype(value)}: cast to float32, but values the "
                              "caller rounded stay rounded (feed positions as int64)")
            return self.cast(value, _F32)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return self._fallback(value, node)
        if op == "Cast":
            src = node.inputs[0]
            if not _is_float(src):  # int -> half: cast the exact integers straight to float32
                return self.cast(src, _F32)
            lifted = self(src)
            self.replaced.append(node)
            return lifted
        if op == "CastLike":
            self.replaced.append(node)
            return self(node.inputs[0]) if _is_float(node.inputs[0]) else self.cast(node.inputs[0], _F32)
        if op not in _LIFTABLE:
            return self._fallback(value, node)
        inputs = [self(i) if (i is not None and _is_float(i)) else i for i in node.inputs]
        new = self._new(op, inputs, node.attributes.values(), num_outputs=len(node.outputs))
        for old_out, new_out in zip(node.outputs, new.outputs, strict=True):
            new_out.dtype = _F32 if _is_float(old_out) else old_out.dtype
            new_out.shape = old_out.shape
            self._memo[id(old_out)] = new_out
        self.replaced.append(node)
        return new.outputs[list(node.outputs).index(value)]

    def _fallback(self, value: ir.Value, node: ir.Node) -> ir.Value:
        self.notes.append(f"cannot recompute {node.op_type} ({node.name}) in float32: its {_dtype(value)} output is "
                          "cast to float32 as it is")
        return self.cast(value, _F32)

    def _lift_constant(self, value: ir.Value, arr: np.ndarray) -> ir.Value:
        dname = _dtype(value)
        values = _as_float64(arr)
        exact = None
        for match, replacement in self.candidates:  # values a rescale wrote in half precision
            if match.size == values.size and np.array_equal(precision.round_to_dtype(match, dname), values.reshape(-1)):
                exact = replacement
                break
        if exact is None and values.size > 1:
            exact = rope_math.recover_inv_freq(values, dname)
        if exact is not None:
            values = np.asarray(exact, dtype=np.float64).reshape(values.shape)
            self.regenerated.append(value.name or "?")
        elif values.size > 1:
            self.kept_rounded.append(f"{value.name} ({values.size} values)")
        new = add_initializer(self.graph, values.astype(np.float32), f"{value.name or 'const'}_fp32", _F32)
        self.replaced_constants.append(value)
        return new


def _meeting_uses(site: RopeSite) -> list[tuple[ir.Node, int, ir.Value, ir.Value]]:
    """(q/k Mul, input index, cos-or-sin value, the other operand) for every place cos/sin meet q/k."""
    found = []
    seen = set()
    for app in site.applications:
        app_nodes = {id(n) for n in app.nodes}
        for v in (app.cos, app.sin):
            if v is None:
                continue
            for use in v.uses():
                node = use.node
                if id(node) not in app_nodes or node.op_type != "Mul" or (id(node), use.idx) in seen:
                    continue
                seen.add((id(node), use.idx))
                other = node.inputs[1 - use.idx] if len(node.inputs) == 2 else None
                found.append((node, use.idx, v, other))
    return found


def _remove_dead(graph: ir.Graph, nodes: Sequence[ir.Node], constants: Sequence[ir.Value]) -> None:
    outputs = {id(v) for v in graph.outputs}
    pending = list(dict.fromkeys(nodes))
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if node.graph is not graph:
                pending.remove(node)
                continue
            if any(out.uses() or id(out) in outputs for out in node.outputs):
                continue
            graph.remove(node, safe=True)
            pending.remove(node)
            changed = True
    for v in constants:
        if not v.uses() and v.name in graph.initializers and v not in graph.inputs and id(v) not in outputs:
            graph.initializers.pop(v.name)


def _plan_candidates(site: RopeSite, plans: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values a rescale plan wrote, what they should be) for the plans of ``site`` (found by `site_key`: the
    plan was made on the detection before the rescale, ``site`` comes from the one after it).

    A plan made on a half-precision site starts from the rounded frequencies it found; when those are the
    rounding of a round base, the plan's frequencies (and attention factor) are recomputed from the exact
    ones, so that the float32 constants carry no half-precision rounding at all."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for plan in plans:
        if site_key(plan.site) != site_key(site) or plan.inv_freq is None:
            continue
        planned = plan.site  # the numbers the plan started from (the site before the rescale)
        stored_dtype = (_dtype(planned.inv_freq_value) if planned.inv_freq_value is not None
                        else planned.angle_dtype)
        original = None
        if planned.inv_freq is not None and stored_dtype in _HALF_NAMES:
            original = rope_math.recover_base(planned.inv_freq, stored_dtype)
        match = np.asarray(plan.inv_freq, dtype=np.float64).reshape(-1)
        exact, factor = match, float(plan.attention_factor)
        if original is not None:
            try:
                inv, factor = rope_math.scaled_inv_freq(plan.params, inv_freq=original[0], base=original[1],
                                                        dim=planned.rotary_dim, seq_len=None)
                exact = np.asarray(inv, dtype=np.float64).reshape(-1)
            except ValueError:
                pass
        out.append((match, exact))
        if plan.attention_factor != 1.0:  # the rescale wrote the new factor in place of the old one
            out.append((np.array([plan.attention_factor]), np.array([factor])))
    return out


def _rewrite_computed(graph: ir.Graph, site: RopeSite, index: int, plans: Sequence[Any]) -> tuple[list[str], list[str]]:
    notes: list[str] = []
    meetings = _meeting_uses(site)
    if not meetings:
        return [], [f"rope site {index}: cos/sin do not meet q/k in a Mul; left as it is"]
    lift = _Lift(graph, f"rope{index}_fp32", _plan_candidates(site, plans), notes)
    casts: dict[tuple[int, int], ir.Value] = {}
    redirect = []
    for node, idx, v, other in meetings:
        v32 = lift(v)
        act = other.dtype if other is not None and other.dtype is not None else v.dtype
        if act == _F32 or act is None:
            new = v32
        else:
            key = (id(v), int(act))
            if key not in casts:
                casts[key] = lift.cast(v32, act)
            new = casts[key]
        redirect.append((node, idx, new))
    # every new node only reads values computed before the first q/k Mul that reads cos/sin
    meeting_ids = {id(n) for n, *_ in meetings}
    anchor = next(n for n in graph if id(n) in meeting_ids)
    if lift.nodes:
        graph.insert_before(anchor, lift.nodes)
    for node, idx, new in redirect:
        node.replace_input_with(idx, new)
    _remove_dead(graph, lift.replaced, lift.replaced_constants)
    act_names = sorted({_dtype(other) for _, _, _, other in meetings if other is not None})
    what = (f"rope site {index} ({site.rotations} q/k applications): positions, angles and cos/sin computed in "
            f"float32, cast to {'/'.join(act_names) or 'the activation dtype'} where they meet q/k")
    if lift.regenerated:
        what += f"; inverse frequencies regenerated from fp32 math ({', '.join(lift.regenerated)})"
    if lift.kept_rounded:
        notes.append(f"rope site {index}: half-precision constants kept their rounded values in float32: "
                     + ", ".join(lift.kept_rounded))
    return [what], notes


# ---------------------------------------------------------------------------------------------------------------
# regenerating tables
# ---------------------------------------------------------------------------------------------------------------


def _part_layout(site: RopeSite, width: int) -> str:
    if 2 * width == site.rotary_dim:
        return "half"
    return "interleaved" if site.layout == Layout.INTERLEAVED else "rotate_half"


def _rewrite_tables(graph: ir.Graph, site: RopeSite, index: int, tp: TablePrecision) -> tuple[list[str], list[str]]:
    rows = tp.rows
    notes = []
    if not tp.recovered:
        notes.append(f"rope site {index}: no round base matches the table; regenerated from the fitted frequencies")
    if site.angles == AngleSource.FUSED_OP:
        c, s = rope_math.cos_sin_tables(tp.inv_freq, rows, attention_factor=tp.attention_factor, layout="half")
        old = _const_array(site.cos_cache)
        dtype = site.cos_cache.dtype
        cos_v = add_initializer(graph, c.reshape(old.shape), f"{site.cos_cache.name}_fp32math", dtype)
        sin_v = add_initializer(graph, s.reshape(old.shape), f"{site.sin_cache.name}_fp32math", dtype)
        olds = (site.cos_cache, site.sin_cache)
        for node in site.fused_nodes:
            for k, inp in enumerate(node.inputs):
                if inp is olds[0]:
                    node.replace_input_with(k, cos_v)
                elif inp is olds[1]:
                    node.replace_input_with(k, sin_v)
        _remove_dead(graph, [], list(olds))
    else:
        handles, source = site.cached_handles(), site.source
        assert isinstance(source, CachedTable)
        tables: dict[int, tuple[ir.Value, list[tuple[tuple[int, int] | None, str]]]] = {}
        for read, columns, fn in ((handles.cos, source.cos_columns, "cos"), (handles.sin, source.sin_columns, "sin")):
            tables.setdefault(id(read.table), (read.table, []))[1].append((columns, fn))
        for table_value, parts in tables.values():
            old = _const_array(table_value)
            row_axis = next(k for k, d in enumerate(old.shape[:-1]) if d == rows)
            new = np.zeros(old.shape, dtype=np.float32)
            for columns, fn in parts:
                lo, hi = columns if columns is not None else (0, old.shape[-1])
                c, s = rope_math.cos_sin_tables(tp.inv_freq, rows, attention_factor=tp.attention_factor,
                                                layout=_part_layout(site, hi - lo))
                block = c if fn == "cos" else s
                shape = [rows if k == row_axis else 1 for k in range(old.ndim - 1)] + [hi - lo]
                new[..., lo:hi] = block.reshape(shape)
            replacement = add_initializer(graph, new, f"{table_value.name}_fp32math", table_value.dtype)
            for use in list(table_value.uses()):
                use.node.replace_input_with(use.idx, replacement)
            _remove_dead(graph, [], [table_value])
    what = (f"rope site {index}: {tp.table_dtype} cos/sin tables ({rows} rows, computed in {tp.math_dtype}) "
            f"regenerated from fp32 math (angle error {tp.max_angle_error:.3g} -> {tp.stored_angle_error:.3g} rad)")
    return [what], notes


# ---------------------------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------------------------


class Fp32PositionsPass(ReportingPass):
    """Moves the position/angle/cos/sin computation of every unsafe site to float32 (see the module doc).

    ``sites``: the sites to make safe (from detection on the model the pass is run on); None: the sites of the
    pipeline's detection of the model as the pass finds it (re-detected after an earlier rewrite). ``plans``
    (default: the RoPE plans claimed in the context's report) let frequencies that a rescale stored in half
    precision be restored exactly. ``alibi``: ALiBi sites among them are made safe too (`make_alibi_fp32`);
    the pipeline runs `Fp32AlibiPass` as its own step instead. After a call, ``changes`` and ``notes``
    describe what was done; ``modified`` is False (and the model untouched) when every site was already safe."""

    def __init__(self, sites: Iterable[Any] | None = None, *, plans: Iterable[Any] | None = None,
                 alibi: bool = True, context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__(context, preface=preface)
        self.sites = None if sites is None else list(sites)
        self.plans = None if plans is None else tuple(plans)
        self.alibi = alibi

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = self.sites if self.sites is not None else self.context.detection(model).sites
        plans = self.plans if self.plans is not None else tuple(self.context.report.rope_plans)
        modified = False
        alibi = []
        for k, site in enumerate(sites):
            if isinstance(site, RopeSite):
                if site.angles == AngleSource.COMPUTED:
                    if not site_needs_fp32(site):
                        continue
                    changes, notes = _rewrite_computed(graph, site, k, plans)
                else:
                    tp = table_precision(site)
                    if tp is None or tp.correct:
                        continue
                    changes, notes = _rewrite_tables(graph, site, k, tp)
                self.changes.extend(changes)
                self.notes.extend(notes)
                modified = modified or bool(changes)
            elif self.alibi and getattr(site, "kind", None) == "alibi":
                alibi.append(site)
        if alibi:
            modified = make_alibi_fp32(model, alibi, self.changes, self.notes) or modified
        return ir.passes.PassResult(model, modified)
