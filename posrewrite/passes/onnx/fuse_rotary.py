"""Replaces every detected RoPE rotation with one fused RotaryEmbedding node.

    --fuse ort   com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)   (onnxruntime contrib op)
    --fuse onnx  RotaryEmbedding-23(x, cos_cache, sin_cache, position_ids)              (the model's opset is
                 raised to 23 first, or the fusion is refused naming the op that cannot be raised)

Both ops take caches [rows, rotary_dim/2] in the activation dtype and position ids [batch, seq] (int64).
Where the caches come from, per site (the numbers always come from `posrewrite.math.rope`):

- angles computed on the fly, no rescale: fp32 tables of `max_positions` rows (--max-positions, else
  config.json's max_position_embeddings, else 4096) from the graph's inv_freq and attention factor;
- rescaled with a static method (linear, ntk, yarn, llama3, new base): the plan's inv_freq and attention
  factor, `plan.new_length` rows (or the method's target length, at least the rows above);
- rescaled with a runtime method (dynamic, longrope): computed in the graph from the runtime inv_freq for rows
  0..max(position)+1, the same fp32 arithmetic as the rescaled graph (never shorter than the positions used);
- cached tables (gathered or sliced by position): their own values, cut to [rows, rotary_dim/2] (no rounding).

Positions past the cache: onnxruntime's CPU kernels of both ops reject them with an error ("position_ids value
N is out of range"); the CUDA contrib kernel has been seen to pass the input through unrotated. The caches are
sized to the model's (possibly rescaled) maximum length and every change line says how many rows they hold.

Rotations on [B, H, S, D] feed the op directly; [B, S, H, D] (GPT-J, hand-written code) goes through a 3-D
[B, S, H*D] view with `num_heads`. Partial rotary sets `rotary_embedding_dim`; q and k (GQA: fewer k heads)
of one site share caches and position ids. The replaced nodes and the cos/sin computation left without a
consumer are removed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from posrewrite import errors
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._build import NodeWriter, add_initializer, unique_name
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, rank
from posrewrite.passes.onnx.rope_markers import mark_rescaled_cache
from posrewrite.sites.rope import (
    AngleSource,
    CachedTable,
    FusedCaches,
    Layout,
    OnnxCachedHandles,
    OnnxComputedHandles,
    RopeApplication,
    RopeSite,
)

#: cache rows when nothing tells the model's maximum length (computed angles, no rescale, no config.json)
DEFAULT_MAX_POSITIONS = 4096
ONNX_ROTARY_OPSET = 23
CONTRIB_DOMAIN = "com.microsoft"

_I64 = ir.DataType.INT64
_F32 = ir.DataType.FLOAT


class FuseRefusal(errors.UsageError):
    """A fusion that cannot be done as asked (the message says why and what to do instead)."""


@dataclasses.dataclass
class _Caches:
    cos: ir.Value
    sin: ir.Value
    rows: int | None  # None: computed in the graph for the runtime length


class FuseRotaryPass(ir.passes.InPlacePass):
    """One RotaryEmbedding node per q/k rotation of every RoPE site (see the module docstring).

    `changes` and `notes` are filled with one line per site / per thing the user should know.
    """

    def __init__(
        self, sites, *, target: str = "ort", plans=(), max_positions: int | None = None, fuse_attention: bool = True
    ) -> None:
        super().__init__()
        if target not in ("ort", "onnx"):
            raise FuseRefusal(f"--fuse must be 'ort' or 'onnx', not {target!r}")
        self.sites: list[RopeSite] = list(sites)
        self.target = target
        self.plans = {id(p.site): p for p in plans or ()}
        self.max_positions = max_positions
        self.fuse_attention = fuse_attention
        #: rows of the shortest static fused cache (positions from here on are outside it); None: none static
        self.cache_rows: int | None = None
        self.changes: list[str] = []
        self.notes: list[str] = []
        self.fused_nodes: list[ir.Node] = []

    # -----------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        todo = [s for s in self.sites if s.angles != AngleSource.FUSED_OP and s.applications]
        for s in self.sites:
            if s.angles == AngleSource.FUSED_OP:
                self.notes.append(
                    f"already fused: {len(s.fused_nodes)} RotaryEmbedding node(s) "
                    f"({s.notes[0] if s.notes else ''}) left as they are"
                )
        if not todo:
            return ir.passes.PassResult(model, False)
        if self.target == "onnx":
            upgraded = raise_opset(model, ONNX_ROTARY_OPSET)
            if upgraded:
                self.changes.append(upgraded)
        else:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        graph = model.graph
        self._order = {id(n): k for k, n in enumerate(graph)}
        self._fold = ConstantEvaluator(model.opset_imports.get("", 18))
        cache_memo: dict[tuple, _Caches] = {}
        for site in todo:
            self._fuse_site(graph, site, cache_memo)
        _remove_dead_and_sort(model)
        source_ids = {id(n) for s in todo for n in s.source_nodes if n is not None}
        left = [n for n in graph if id(n) in source_ids and n.op_type in ("Cos", "Sin")]
        if left:
            self.notes.append(f"{len(left)} Cos/Sin node(s) still in the graph (used by something other than q/k)")
        if self.fuse_attention:
            from posrewrite.passes.onnx.fuse_attention import FuseAttentionPass

            att = FuseAttentionPass(self.fused_nodes, target=self.target)
            att(model)
            self.changes.extend(att.changes)
            self.notes.extend(att.notes)
        return ir.passes.PassResult(model, True)

    # -----------------------------------------------------------------------------------------------
    def _fuse_site(self, graph: ir.Graph, site: RopeSite, memo: dict) -> None:
        plan = self.plans.get(id(site))
        apps = sorted(site.applications, key=lambda a: min(self._order.get(id(n), 1 << 30) for n in a.nodes))
        forms = []
        for app in apps:
            form = _input_form(app)
            if isinstance(form, str):
                raise FuseRefusal(f"cannot fuse the rotation producing {app.output.name}: {form}")
            forms.append(form)
        anchor = min((n for n in apps[0].nodes), key=lambda n: self._order.get(id(n), 1 << 30))
        w = NodeWriter(graph, anchor, "rope_fuse")
        positions = self._position_ids(w, site, apps[0], forms[0])
        caches_by_dtype: dict[ir.DataType, _Caches] = {}
        for app in apps:
            dtype = app.input.dtype or _F32
            if dtype not in caches_by_dtype:
                caches_by_dtype[dtype] = self._caches(graph, w, site, plan, dtype, positions, memo)
        w.commit()
        nodes = []
        for app, form in zip(apps, forms, strict=True):
            caches = caches_by_dtype[app.input.dtype or _F32]
            nodes.append(self._replace(graph, site, app, form, positions, caches))
        if plan is not None:
            # the site is now a fused op: validation checks its caches (cos_cache / sin_cache) against the plan
            first = caches_by_dtype[apps[0].input.dtype or _F32]
            node0 = nodes[0]
            fused = FusedCaches(
                op=f"{node0.domain}.{node0.op_type}" if node0.domain not in ("", "ai.onnx") else node0.op_type,
                rows=first.rows,
                dtype=dtype_name(first.cos),
                position_dtype="int64",
                attention_factor=site.attention_factor,
                rescaled=site.encoding.rescaled,
                runtime=site.encoding.runtime,
                selection=site.encoding.selection,
            )
            plan.site = dataclasses.replace(
                site,
                encoding=dataclasses.replace(site.encoding, source=fused),
                handles=None,
                fused_nodes=tuple(nodes),
                cos_cache=first.cos,
                sin_cache=first.sin,
                cos=first.cos,
                sin=first.sin,
                positions=positions,
                applications=(),
            )
        rows = {c.rows for c in caches_by_dtype.values()}
        rows_text = "rows = max(position)+1 at run time" if rows == {None} else f"{max(r for r in rows if r)} rows"
        op = "com.microsoft.RotaryEmbedding" if self.target == "ort" else "RotaryEmbedding-23"
        kinds = sorted({f.kind for f in forms})
        partial = (
            f", rotary_dim {site.rotary_dim} of {site.head_dim}"
            if site.head_dim and site.rotary_dim < site.head_dim
            else ""
        )
        self.changes.append(
            f"fused {len(apps)} {site.layout.value} rotation(s) ({site.angles.value} angles{partial}, "
            f"{'/'.join(kinds)}) into {op}; caches {rows_text}, {', '.join(dtype_name_of(d) for d in caches_by_dtype)}"
        )
        if site.angles == AngleSource.COMPUTED and site.position_dtype in ("float16", "bfloat16"):
            self.notes.append(
                f"the graph computed RoPE positions in {site.position_dtype}; the fused caches are fp32-exact, "
                "so the fused model also fixes that precision loss (its outputs differ from the original's)"
            )
        if all(r is not None for r in rows):
            shortest = min(r for r in rows if r)
            self.cache_rows = shortest if self.cache_rows is None else min(self.cache_rows, shortest)
            self.notes.append(
                f"positions >= {max(r for r in rows if r)} are outside the fused caches: onnxruntime CPU rejects them "
                "with an error, the CUDA contrib kernel has been seen to pass q/k through unrotated; use "
                "--max-positions N (or a rescale) to size the caches"
            )

    # -- position ids [B, S] int64 ------------------------------------------------------------------
    def _position_ids(self, w: NodeWriter, site: RopeSite, app: RopeApplication, form: _Form) -> ir.Value:
        source = _integer_positions(site, self._fold)
        if source is None:
            # rows selected by a Slice table[start:start+S]: positions start .. start+S-1
            sel = site.handles.cos.select if isinstance(site.handles, OnnxCachedHandles) else None
            start = None
            if sel is not None and sel.op_type == "Slice" and len(sel.inputs) > 1:
                s0 = self._fold(sel.inputs[1])
                start = 0 if s0 is not None and int(np.asarray(s0).reshape(-1)[0]) == 0 else sel.inputs[1]
            seq = w.op("Shape", app.input, start=form.seq_axis, end=form.seq_axis + 1)
            seq = w.op("Squeeze", seq, w.const(np.array([0], np.int64)))
            source = w.op("Range", w.const(np.int64(0)), seq, w.const(np.int64(1)))
            source.shape, source.dtype = ir.Shape([_dim(app.input, form.seq_axis)]), _I64
            if start is not None and not isinstance(start, int):
                source = w.op(
                    "Add", source, w.op("Cast", w.op("Reshape", start, w.const(np.array([], np.int64))), to=_I64)
                )
        r = rank(source)
        source_shape = source.shape
        if source.dtype != _I64:
            source = w.op("Cast", source, to=_I64)
            source.shape, source.dtype = source_shape, _I64
        if r == 1:
            source = w.op("Unsqueeze", source, w.const(np.array([0], np.int64)))
        elif r != 2:
            dims = list(source.shape) if source.shape is not None else []
            if len(dims) < 3 or not all(_is_one(d) for d in dims[2:]):
                raise FuseRefusal(f"positions {source.name} of shape {source.shape} are not [batch, seq]")
            source = w.op("Reshape", source, w.const(np.array([0, -1], np.int64)))
        batch = w.op("Shape", app.input, start=0, end=1)
        shape = w.op("Concat", batch, w.const(np.array([1], np.int64)), axis=0)
        out = w.op("Expand", source, shape)
        out.dtype = _I64
        out.shape = ir.Shape([_dim(app.input, 0), _dim(app.input, form.seq_axis)])
        return out

    # -- caches ---------------------------------------------------------------------------------------
    def _caches(
        self, graph, w: NodeWriter, site: RopeSite, plan, dtype: ir.DataType, positions: ir.Value, memo
    ) -> _Caches:
        half = site.rotary_dim // 2
        if plan is not None and plan.runtime:
            return self._runtime_caches(w, site, plan, dtype, positions)
        computed = site.handles if plan is None and isinstance(site.handles, OnnxComputedHandles) else None
        if computed is not None and (site.encoding.runtime is not None or site.encoding.selection is not None):
            # inv_freq chosen at run time (a LongRoPE export, a posrewrite dynamic rewrite): caches from that value
            inv = w.op("Reshape", computed.inv_freq, w.const(np.array([-1], np.int64)))
            if computed.inv_freq.dtype not in (None, _F32):
                inv = w.op("Cast", inv, to=_F32)
            return self._caches_from_inv(w, inv, site.attention_factor, dtype, positions)
        if plan is not None:
            factor = plan.attention_factor  # replaces the export's own factor (HF semantics)
            rows = int(plan.new_length or plan.params.target_length() or 0)
            if site.angles == AngleSource.COMPUTED:
                rows = max(rows, self._default_rows(site))
            rows = rows or self._default_rows(site)
            inv_freq = np.asarray(plan.inv_freq, np.float32)
            key = ("plan", inv_freq.tobytes(), float(factor), rows, dtype)
            if key not in memo:
                c, s = rope_math.cos_sin_tables(inv_freq, rows, attention_factor=factor, layout="half")
                memo[key] = _Caches(
                    add_initializer(graph, c, "rope_cos_cache", dtype),
                    add_initializer(graph, s, "rope_sin_cache", dtype),
                    rows,
                )
                if not plan.extends_only:  # lets inspect / a later rescale of the fused model find the base
                    from posrewrite.passes.onnx.rescale import rescaled_record

                    mark_rescaled_cache(graph, memo[key].cos, rescaled_record(plan))
            return memo[key]
        if site.angles == AngleSource.CACHED:
            tables = []
            cached, source = site.cached_handles(), site.source
            assert isinstance(source, CachedTable)
            for read, columns in ((cached.cos, source.cos_columns), (cached.sin, source.sin_columns)):
                t = self._fold(read.table)
                if t is None:
                    raise FuseRefusal(f"cos/sin table {read.table.name} is not a constant")
                t = np.asarray(t)
                if columns is not None:
                    t = t[..., columns[0] : columns[1]]
                kept = [d for d in t.shape[:-1] if d != 1] or [1]
                t = t.reshape(kept + [t.shape[-1]])
                if t.ndim != 2:
                    raise FuseRefusal(
                        f"cos/sin table {read.table.name} of shape {t.shape} is not [positions, channels]"
                    )
                tables.append(_half_columns(t, site.layout, half))
            key = (
                "table",
                id(cached.cos.table),
                id(cached.sin.table),
                source.cos_columns,
                dtype,
            )
            if key not in memo:
                c, s = tables
                memo[key] = _Caches(
                    add_initializer(graph, c, "rope_cos_cache", dtype),
                    add_initializer(graph, s, "rope_sin_cache", dtype),
                    int(c.shape[0]),
                )
            return memo[key]
        rows = self._default_rows(site)
        inv_freq = np.asarray(site.inv_freq, np.float32)
        key = ("computed", inv_freq.tobytes(), float(site.attention_factor), rows, dtype)
        if key not in memo:
            c, s = rope_math.cos_sin_tables(inv_freq, rows, attention_factor=site.attention_factor, layout="half")
            memo[key] = _Caches(
                add_initializer(graph, c, "rope_cos_cache", dtype),
                add_initializer(graph, s, "rope_sin_cache", dtype),
                rows,
            )
            rescaled = site.encoding.rescaled
            if rescaled is not None:  # a posrewrite rescale's output being fused: its record follows the caches
                mark_rescaled_cache(graph, memo[key].cos, rescaled.to_json())
        return memo[key]

    def _default_rows(self, site: RopeSite) -> int:
        return int(self.max_positions or site.max_positions or DEFAULT_MAX_POSITIONS)

    def _runtime_caches(self, w: NodeWriter, site: RopeSite, plan, dtype, positions: ir.Value) -> _Caches:
        """dynamic/longrope: the runtime inv_freq (from max(position)+1, HF's rule), rows 0..max(position)."""
        from posrewrite.passes.onnx.rescale import runtime_inv_freq, seq_from_positions

        seq = seq_from_positions(w, positions)
        inv = runtime_inv_freq(w, plan, seq)
        return self._caches_from_inv(w, inv, plan.attention_factor, dtype, positions, seq)

    def _caches_from_inv(self, w: NodeWriter, inv: ir.Value, factor: float, dtype, positions: ir.Value,
                         seq: ir.Value | None = None) -> _Caches:
        """cos/sin caches for rows 0..max(position) from a float32 [d/2] inv_freq computed in the graph."""
        from posrewrite.passes.onnx.rescale import seq_from_positions, table_angles

        if seq is None:
            seq = seq_from_positions(w, positions)
        angles = table_angles(w, inv, w.op("Cast", seq, to=_I64))
        cos, sin = w.op("Cos", angles), w.op("Sin", angles)
        if factor != 1.0:
            cos, sin = w.op("Mul", cos, w.const(np.float32(factor))), w.op("Mul", sin, w.const(np.float32(factor)))
        if dtype != _F32:
            cos, sin = w.op("Cast", cos, to=dtype), w.op("Cast", sin, to=dtype)
        return _Caches(cos, sin, None)

    # -- the fused node ------------------------------------------------------------------------------
    def _replace(
        self, graph: ir.Graph, site: RopeSite, app: RopeApplication, form: _Form, positions, caches: _Caches
    ) -> ir.Node:
        w = NodeWriter(graph, app.output.producer(), "rope_fused")
        x = app.input
        attrs: dict = {"interleaved": int(app.layout == Layout.INTERLEAVED)}
        head_dim = app.head_dim or site.head_dim
        partial = head_dim is not None and app.rotary_dim < head_dim
        if partial:
            attrs["rotary_embedding_dim"] = int(app.rotary_dim)
            if not form.num_heads:
                raise FuseRefusal(f"partial rotary on {x.name}: the number of heads is not static (num_heads needed)")
        if form.kind == "bshd":
            x = w.op("Reshape", x, w.const(np.array([0, 0, -1], np.int64)))
            attrs["num_heads"] = int(form.num_heads)
        elif form.num_heads:
            attrs["num_heads"] = int(form.num_heads)
        if self.target == "ort":
            node = ir.node("RotaryEmbedding", [x, positions, caches.cos, caches.sin], attrs, domain=CONTRIB_DOMAIN)
        else:
            node = ir.node("RotaryEmbedding", [x, caches.cos, caches.sin, positions], attrs)
        node.name = unique_name(graph, "rope_RotaryEmbedding")
        y = node.outputs[0]
        y.name = node.name + "_out"
        y.dtype = app.input.dtype
        w.nodes.append(node)
        if form.kind == "bshd":
            y.shape = None
            y = w.op("Reshape", y, w.const(np.array([0, 0, -1, head_dim], np.int64)))
        y.dtype = app.output.dtype or app.input.dtype
        y.shape = app.output.shape
        w.commit()
        self.fused_nodes.append(node)
        _redirect(graph, app.output, y)
        return node


def dtype_name_of(dtype: ir.DataType) -> str:
    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(
        dtype, str(dtype)
    )


# ---------------------------------------------------------------------------------------------------
# how the rotated tensor is laid out
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Form:
    kind: str  # "bhsd" (fed as is) | "bshd" (viewed as [B, S, H*D])
    seq_axis: int
    num_heads: int | None


def _is_one(d) -> bool:
    return isinstance(d, int) and d == 1


def _input_form(app: RopeApplication) -> _Form | str:
    x = app.input
    if x.shape is None or len(x.shape) != 4:
        return f"the rotated tensor {x.name} is not 4-D (shape {x.shape})"
    seq_axis = None
    cos_shape = app.cos.shape if app.cos is not None else None
    if cos_shape is not None and len(cos_shape) == 4:
        candidates = [a for a in (1, 2) if not _is_one(cos_shape[a])]
        if len(candidates) == 1:
            seq_axis = candidates[0]
    if seq_axis is None:
        statics = [a for a in (1, 2) if isinstance(x.shape[a], int)]
        if len(statics) == 1:
            seq_axis = 3 - statics[0]
    if seq_axis is None:
        return f"cannot tell the heads axis from the sequence axis of {x.name} {x.shape}"
    heads_axis = 3 - seq_axis
    heads = x.shape[heads_axis] if isinstance(x.shape[heads_axis], int) else app.num_heads
    if seq_axis == 2:
        return _Form("bhsd", 2, heads)
    if heads is None:
        return f"the number of heads of {x.name} {x.shape} is not static"
    return _Form("bshd", 1, heads)


def _dim(value: ir.Value, axis: int):
    if value.shape is None or len(value.shape) <= axis:
        return None
    return value.shape[axis]


# ---------------------------------------------------------------------------------------------------
# positions and tables
# ---------------------------------------------------------------------------------------------------


def _integer_positions(site: RopeSite, fold: ConstantEvaluator) -> ir.Value | None:
    """The positions as found in the graph, before casts and broadcasts (a Range, position_ids...)."""
    if site.angles == AngleSource.COMPUTED:
        if not isinstance(site.handles, OnnxComputedHandles):
            return None
        return site.handles.position_source
    if site.positions is None:
        return None
    v = site.positions
    for _ in range(16):
        node = v.producer()
        if node is None:
            break
        if node.op_type in ("Cast", "Identity"):
            v = node.inputs[0]
            continue
        if node.op_type in ("Expand", "Tile", "Unsqueeze") and (rank(v) or 0) > 2:
            v = node.inputs[0]  # GPT-J: positions tiled over the table's columns for GatherElements
            continue
        break
    return v


def _half_columns(table: np.ndarray, layout: Layout, half: int) -> np.ndarray:
    """[N, w] cos or sin table -> [N, rotary_dim/2] (the fused ops' cache form), values unchanged."""
    width = table.shape[1]
    if width == half:
        return table
    if width == 2 * half:
        return table[:, :half] if layout == Layout.ROTATE_HALF else table[:, 0::2]
    raise FuseRefusal(f"cos/sin table has {width} columns, expected {half} or {2 * half}")


# ---------------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------------


def _redirect(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    if old.is_graph_output():
        name = old.name
        old.name = None
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def _remove_dead_and_sort(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)


# ---------------------------------------------------------------------------------------------------
# raising the default-domain opset (for RotaryEmbedding-23)
# ---------------------------------------------------------------------------------------------------

#: versions whose meaning changed without the schema saying so (attributes/inputs look alike)
_SEMANTIC_CHANGES = {
    ("GroupNormalization", 21): "scale/bias became per channel",
    ("GridSample", 20): "mode names and the sampling rule changed",
    ("DFT", 20): "axis moved to an input with a new default",
}
#: ops whose `axes` attribute became an input at opset 18 (moved by `raise_opset`)
_REDUCE_18 = (
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)


def raise_opset(model: ir.Model, target: int) -> str | None:
    """Raises the default-domain opset to `target` in place; returns a change line, None when nothing to do.

    A version step is taken only when it keeps the node's meaning: same inputs (new ones optional), every
    attribute the node sets still exists, every default it relies on unchanged; the `axes` attribute of
    Reduce* ops (an input since 18) is moved. Any other step refuses with the op named (FuseRefusal), before
    the model is touched.
    """
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if current is None:
        model.opset_imports[""] = target
        return None
    if current >= target:
        return None
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain in ("", "ai.onnx")]
    for fn in model.functions.values():
        nodes.extend(n for n in ir.traversal.RecursiveGraphIterator(fn) if n.domain in ("", "ai.onnx"))
    moves = []
    problems: dict[str, str] = {}
    for node in nodes:
        version = node.version or current
        verdict = _upgrade_verdict(node, version, target)
        if verdict == "move_axes":
            moves.append(node)
        elif verdict is not None:
            problems.setdefault(node.op_type, verdict)
    if problems:
        what = "; ".join(f"{op}: {why}" for op, why in sorted(problems.items()))
        raise FuseRefusal(
            f"--fuse onnx needs opset {target} and this model (opset {current}) has ops whose meaning changes "
            f"on the way: {what}. Use --fuse ort (com.microsoft.RotaryEmbedding works at any opset)"
        )
    for node in moves:
        axes = node.attributes.pop("axes")
        const = ir.node("Constant", [], {"value": ir.tensor(np.asarray(axes.value, dtype=np.int64))})
        const.outputs[0].name = (node.name or node.op_type) + "_axes"
        node.graph.insert_before(node, const)
        node.resize_inputs(2)
        node.replace_input_with(1, const.outputs[0])
    for node in nodes:
        node.version = None
    model.opset_imports[""] = target
    model.opset_imports.pop("ai.onnx", None)
    for fn in model.functions.values():
        if "" in fn.opset_imports:
            fn.opset_imports[""] = target
    needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    model.ir_version = max(model.ir_version or 0, needed_ir)
    return f"default-domain opset {current} -> {target} (for RotaryEmbedding-23)"


def _upgrade_verdict(node: ir.Node, version: int, target: int) -> str | None:
    """None when every version step from `version` to `target` keeps `node`'s meaning; else why not."""
    try:
        old = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return f"no schema at opset {version}"
    move_axes = False
    while True:
        try:
            new = onnx.defs.get_schema(node.op_type, target, "")
        except onnx.defs.SchemaError:
            return f"removed before opset {target}"
        # the next version after `old`
        step = None
        for v in range(old.since_version + 1, target + 1):
            s = onnx.defs.get_schema(node.op_type, v, "")
            if s.since_version != old.since_version:
                step = s
                break
        if step is None:
            return "move_axes" if move_axes else None
        why = _SEMANTIC_CHANGES.get((node.op_type, step.since_version))
        if why:
            return f"{why} at opset {step.since_version}"
        if node.op_type in _REDUCE_18 and step.since_version == 18 and "axes" in node.attributes:
            move_axes = True
            old = step
            continue
        reason = _step_breaks(node, old, step)
        if reason:
            return f"{reason} at opset {step.since_version}"
        old = step
        del new


def _step_breaks(node: ir.Node, old, new) -> str | None:
    old_in = [i.name for i in old.inputs]
    new_in = [i.name for i in new.inputs]
    if new_in[: len(old_in)] != old_in:
        return f"inputs changed ({old_in} -> {new_in})"
    for extra in new.inputs[len(old_in) :]:
        if extra.option != onnx.defs.OpSchema.FormalParameterOption.Optional:
            return f"new required input {extra.name}"
    if len(new.outputs) < len(old.outputs):
        return "outputs removed"
    for name, attr in old.attributes.items():
        default = attr.default_value.SerializeToString() if attr.default_value is not None else b""
        if name not in new.attributes:
            if name in node.attributes or default:
                return f"attribute {name} removed"
            continue
        new_default = new.attributes[name].default_value
        new_default = new_default.SerializeToString() if new_default is not None else b""
        if name not in node.attributes and default != new_default:
            return f"default of {name} changed"
    for name, attr in new.attributes.items():
        if name not in old.attributes and attr.required:
            return f"new required attribute {name}"
    return None
