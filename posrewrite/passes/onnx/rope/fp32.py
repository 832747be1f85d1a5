"""fp32-safe positions: the ``--fp32-positions`` rewrite (the analysis it acts on is in
:mod:`posrewrite.passes.onnx.rope.precision`).

Rewrite (:class:`Fp32PositionsPass`): for each unsafe computed site the whole cone from the positions to the
cos/sin values that multiply q/k is rebuilt in float32 — lossy casts to half precision are skipped, Range
and arithmetic run in float32, inverse frequencies stored in half precision are regenerated from fp32 math
when their values are the rounding of a geometric base^(-2i/d) (or of a rescale plan's frequencies) — and
one Cast to the activation dtype is inserted where cos/sin meet q/k. The old nodes are left to be removed
when nothing else reads them; every other value keeps its dtype. Half-precision cos/sin tables whose values
are not those of fp32 math are regenerated from fp32 math (correctly rounded to the table dtype). Sites that
are already safe are not touched, so a safe model comes out unchanged. Sites that are not RoPE (ALiBi, score
biases) are left alone: ``Fp32AlibiPass`` and ``Fp32ScoreBiasPass`` make those safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from posrewrite.math import precision, rope_fit
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._build import NodeWriter, add_initializer
from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.passes.onnx.rope._dtypes import (
    F32,
    HALF_NAMES,
    HALF_TYPES,
    as_float64,
    const_array,
    dtype_of,
    is_float,
)
from posrewrite.passes.onnx.rope.precision import TablePrecision, site_needs_fp32, table_precision
from posrewrite.passes.onnx.rope.tables import part_width, write_part
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.rope import AngleSource, CachedTable, Layout, RopeSite, site_key

if TYPE_CHECKING:
    from posrewrite.passes.onnx.rope.rescale import SitePlan

__all__ = ["Fp32PositionsPass"]

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
        self.writer = NodeWriter(graph, None, stem)  # new nodes, in dependency order
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
        if is_float(value) and value.dtype in HALF_TYPES:
            result = False
        else:
            node = value.producer()
            if node is None or const_tensor(value) is not None or not is_float(value):
                result = True
            else:
                result = all(self.clean(i) for i in node.inputs if i is not None and is_float(i))
        self._clean[key] = result
        return result

    def _new(self, op_type: str, inputs: list[ir.Value | None], attributes: Iterable[ir.Attr] = (), *,
             num_outputs: int = 1, domain: str = "") -> ir.Node:
        copies = {a.name: ir.Attr(a.name, a.type, a.value) for a in attributes}
        return self.writer.op_multi(op_type, *inputs, _num_outputs=num_outputs, _domain=domain, **copies)[0].producer()

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
        if not is_float(value):
            return value
        if self.clean(value):
            return value if value.dtype == F32 else self.cast(value, F32)
        node = value.producer()
        is_leaf = node is None or node.op_type == "Constant" or value.const_value is not None
        const = const_array(value) if is_leaf else None
        if const is not None:
            return self._lift_constant(value, const)
        if node is None:  # a half-precision graph input: its values are already rounded
            self.notes.append(f"{value.name} enters the graph in {dtype_of(value)}: cast to float32, but values the "
                              "caller rounded stay rounded (feed positions as int64)")
            return self.cast(value, F32)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return self._fallback(value, node)
        if op == "Cast":
            src = node.inputs[0]
            if not is_float(src):  # int -> half: cast the exact integers straight to float32
                return self.cast(src, F32)
            lifted = self(src)
            self.replaced.append(node)
            return lifted
        if op == "CastLike":
            self.replaced.append(node)
            return self(node.inputs[0]) if is_float(node.inputs[0]) else self.cast(node.inputs[0], F32)
        if op not in _LIFTABLE:
            return self._fallback(value, node)
        inputs = [self(i) if (i is not None and is_float(i)) else i for i in node.inputs]
        new = self._new(op, inputs, node.attributes.values(), num_outputs=len(node.outputs))
        for old_out, new_out in zip(node.outputs, new.outputs, strict=True):
            new_out.dtype = F32 if is_float(old_out) else old_out.dtype
            new_out.shape = old_out.shape
            self._memo[id(old_out)] = new_out
        self.replaced.append(node)
        return new.outputs[list(node.outputs).index(value)]

    def _fallback(self, value: ir.Value, node: ir.Node) -> ir.Value:
        self.notes.append(f"cannot recompute {node.op_type} ({node.name}) in float32: its {dtype_of(value)} output is "
                          "cast to float32 as it is")
        return self.cast(value, F32)

    def _lift_constant(self, value: ir.Value, arr: np.ndarray) -> ir.Value:
        dname = dtype_of(value)
        values = as_float64(arr)
        exact = None
        for match, replacement in self.candidates:  # values a rescale wrote in half precision
            if match.size == values.size and np.array_equal(precision.round_to_dtype(match, dname), values.reshape(-1)):
                exact = replacement
                break
        if exact is None and values.size > 1:
            exact = rope_fit.recover_inv_freq(values, dname)
        if exact is not None:
            values = np.asarray(exact, dtype=np.float64).reshape(values.shape)
            self.regenerated.append(value.name or "?")
        elif values.size > 1:
            self.kept_rounded.append(f"{value.name} ({values.size} values)")
        new = add_initializer(self.graph, values.astype(np.float32), f"{value.name or 'const'}_fp32", F32)
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


def _plan_candidates(site: RopeSite, plans: Sequence[SitePlan]) -> list[tuple[np.ndarray, np.ndarray]]:
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
        stored_dtype = (dtype_of(planned.inv_freq_value) if planned.inv_freq_value is not None
                        else planned.angle_dtype)
        original = None
        if planned.inv_freq is not None and stored_dtype in HALF_NAMES:
            original = rope_fit.recover_base(planned.inv_freq, stored_dtype)
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


def _rewrite_computed(
    graph: ir.Graph, site: RopeSite, index: int, plans: Sequence[SitePlan]
) -> tuple[list[str], list[str]]:
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
        if act == F32 or act is None:
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
    lift.writer.anchor = anchor
    lift.writer.commit()
    for node, idx, new in redirect:
        node.replace_input_with(idx, new)
    _remove_dead(graph, lift.replaced, lift.replaced_constants)
    act_names = sorted({dtype_of(other) for _, _, _, other in meetings if other is not None})
    what = (f"rope site {index} ({site.rotations} q/k rotations): positions, angles and cos/sin computed in "
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
        old = const_array(site.cos_cache)
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
        tables: dict[int, tuple[ir.Value, list[tuple[tuple[int, int] | None, str, int | None]]]] = {}
        for read, columns, fn, comp in ((handles.cos, source.cos_columns, "cos", source.cos_component),
                                        (handles.sin, source.sin_columns, "sin", source.sin_component)):
            tables.setdefault(id(read.table), (read.table, []))[1].append((columns, fn, comp))
        for table_value, parts in tables.values():
            old = const_array(table_value)
            row_axis = next(k for k, d in enumerate(old.shape[:-1]) if d == rows)
            new = np.zeros(old.shape, dtype=np.float32)
            for columns, fn, comp in parts:
                lo, hi = part_width(old.shape, columns, comp)
                c, s = rope_math.cos_sin_tables(tp.inv_freq, rows, attention_factor=tp.attention_factor,
                                                layout=_part_layout(site, hi - lo))
                write_part(new, c if fn == "cos" else s, columns, comp, row_axis, rows)
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
    precision be restored exactly. Sites other than RoPE are skipped (`Fp32AlibiPass` handles ALiBi). After a
    call, ``changes`` and ``notes`` describe what was done; ``modified`` is False (and the model untouched) when
    every site was already safe."""

    def __init__(self, *, sites: Iterable[EncodingSite] | None = None, plans: Iterable[SitePlan] | None = None,
                 context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.sites = None if sites is None else list(sites)
        self.plans = None if plans is None else tuple(plans)

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        sites = self.sites if self.sites is not None else self.context.detection(model).sites
        plans = self.plans if self.plans is not None else tuple(self.context.report.rope_plans)
        modified = False
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
        return ir.passes.PassResult(model, modified)
