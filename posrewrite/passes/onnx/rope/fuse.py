"""Replaces every detected RoPE rotation with one fused RotaryEmbedding node.

    --fuse ort   com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)   (onnxruntime contrib op;
                 a model below opset 13 is raised to 13, the opset of the ops written around it)
    --fuse onnx  RotaryEmbedding-23(x, cos_cache, sin_cache, position_ids)              (the model's opset is
                 raised to 23 first, or the fusion is refused naming the op that cannot be raised)

The opset is raised by onnxscript's version converter (passes/onnx/opset.py).

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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from posrewrite import errors
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._build import NodeWriter, add_initializer, unique_name
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, rank
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.passes.onnx.opset import OpsetConversionError, convert_opset, model_onnx_opset
from posrewrite.passes.onnx.rope.markers import mark_rescaled_cache
from posrewrite.passes.onnx.rope.tables import table_part

if TYPE_CHECKING:
    from posrewrite.passes.onnx.rope.rescale import SitePlan
from posrewrite.sites.rope import (
    AngleSource,
    CachedTable,
    FusedCaches,
    Layout,
    OnnxCachedHandles,
    OnnxComputedHandles,
    RopeApplication,
    RopeSite,
    site_key,
)

#: cache rows when nothing tells the model's maximum length (computed angles, no rescale, no config.json)
DEFAULT_MAX_POSITIONS = 4096
ONNX_ROTARY_OPSET = 23
#: the oldest default-domain opset of the ops the pass writes (Unsqueeze with axes as an input); a model below it
#: is raised to it by the version converter
WRITTEN_OPSET = 13
CONTRIB_DOMAIN = "com.microsoft"

_I64 = ir.DataType.INT64
_F32 = ir.DataType.FLOAT


class FuseRefusal(errors.UsageError):
    """A fusion that cannot be done as asked (the message says why and what to do instead)."""


class FuseNotPossible(errors.PartialMatchError):
    """A rotation the fused op's contract cannot express (a property of the model, exit 5, not a usage error)."""


@dataclasses.dataclass
class _Caches:
    cos: ir.Value
    sin: ir.Value
    rows: int | None  # None: computed in the graph for the runtime length


class FuseRotaryPass(ReportingPass):
    """One RotaryEmbedding node per q/k rotation of every RoPE site (see the module docstring).

    ``sites``: None reads the RoPE sites of the model as the pass finds it (`PipelineContext.rope_sites`: the
    pipeline's detection; after a rescale, the rescaled sites). ``plans`` (default: the plans claimed in the
    context's report) are found again on those sites by `site_key`. `changes` and `notes` get one line per
    site / per thing the user should know; the report gets the fused caches' rows, the fused nodes (what
    attention fusion follows) and, for a planned site, a plan derived for its fused form (the given plans are
    not changed). Attention is fused by `FuseAttentionPass`, the next step of the pipeline; the replaced nodes
    are left to the cleanup.
    """

    def __init__(
        self, *, sites: Iterable[RopeSite] | None = None, target: str = "ort", plans: Iterable[SitePlan] | None = None,
        max_positions: int | None = None, context: PipelineContext | None = None, preface: Sequence[str] = (),
    ) -> None:
        super().__init__(context=context, preface=preface)
        if target not in ("ort", "onnx"):
            raise FuseRefusal(f"--fuse must be 'ort' or 'onnx', not {target!r}")
        self.sites: list[RopeSite] | None = None if sites is None else list(sites)
        self.target = target
        self.given_plans = None if plans is None else tuple(plans)
        self.max_positions = max_positions
        #: the RotaryEmbedding nodes written by the last call
        self.fused_nodes: list[ir.Node] = []

    # -----------------------------------------------------------------------------------------------
    def run(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.sites if self.sites is not None else self.context.rope_sites(model)
        plans = self.given_plans if self.given_plans is not None else tuple(self.context.report.rope_plans)
        self.plans = {site_key(p.site): p for p in plans}
        self.fused_nodes = []
        todo = [s for s in sites if s.angles not in (AngleSource.FUSED_OP, AngleSource.GRID) and s.applications]
        for s in sites:
            if s.angles == AngleSource.GRID:  # a RotaryEmbedding op takes one position per token
                self.notes.append(f"not fused: 2-D RoPE over a patch grid ({len(s.applications)} rotation(s)): "
                                  "RotaryEmbedding reads one position per token")
            if s.angles == AngleSource.FUSED_OP:
                self.notes.append(
                    f"already fused: {len(s.fused_nodes)} RotaryEmbedding node(s) "
                    f"({s.notes[0] if s.notes else ''}) left as they are"
                )
        if not todo:
            return ir.passes.PassResult(model, False)
        if self.target == "onnx":
            upgraded = raise_opset(model, ONNX_ROTARY_OPSET)
        else:
            upgraded = raise_opset(model, WRITTEN_OPSET, purpose="--fuse ort writes")
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        if upgraded:
            self.changes.append(upgraded)
        graph = model.graph
        self._order = {id(n): k for k, n in enumerate(graph)}
        self._fold = ConstantEvaluator(model.opset_imports.get("", 18))
        cache_memo: dict[tuple, _Caches] = {}
        for site in todo:
            self._fuse_site(graph, site, cache_memo)
        source_ids = {id(n) for s in todo for n in s.source_nodes if n is not None}
        live = _live_nodes(graph)
        left = [n for n in graph if id(n) in source_ids and n.op_type in ("Cos", "Sin") and id(n) in live]
        if left:
            self.notes.append(f"{len(left)} Cos/Sin node(s) still in the graph (used by something other than q/k)")
        self.context.report.fused_rotary_nodes.extend(self.fused_nodes)
        return ir.passes.PassResult(model, True)

    # -----------------------------------------------------------------------------------------------
    def _fuse_site(self, graph: ir.Graph, site: RopeSite, memo: dict) -> None:
        plan = self.plans.get(site_key(site))
        apps = sorted(site.applications, key=lambda a: min(self._order.get(id(n), 1 << 30) for n in a.nodes))
        forms = []
        if site.layout not in (Layout.ROTATE_HALF, Layout.INTERLEAVED):
            raise FuseNotPossible(f"cannot fuse the rotation producing {apps[0].output.name}: its {site.layout.value} "
                                  "pairing is not one RotaryEmbedding computes (rotate-half or interleaved in place)")
        if site.encoding.decay is not None:
            raise FuseNotPossible(f"cannot fuse the rotation producing {apps[0].output.name}: RotaryEmbedding has "
                                  "no xPos decay")
        if site.encoding.position_offset is not None:
            raise FuseNotPossible(f"cannot fuse the rotation producing {apps[0].output.name}: its positions start at "
                                  "an offset inside the model, and RotaryEmbedding reads the positions as given")
        for app in apps:
            form = _input_form(app)
            if isinstance(form, str):
                raise FuseNotPossible(f"cannot fuse the rotation producing {app.output.name}: {form}")
            forms.append(form)
        anchor = min((n for n in apps[0].nodes), key=lambda n: self._order.get(id(n), 1 << 30))
        w = NodeWriter(graph, anchor, "rope_fuse")
        positions = self._position_ids(w, site, apps[0], forms[0])
        caches_by_dtype: dict[ir.DataType, _Caches] = {}
        for app in apps:
            dtype = app.input.dtype or _F32
            if dtype not in caches_by_dtype:
                caches = self._caches(graph, w, site, plan, dtype, positions, memo)
                if site.encoding.angle_sign < 0:  # a rotation by -θ: RotaryEmbedding turns by +θ, sin(-θ) = -sin θ
                    caches = _Caches(caches.cos, _negated(graph, w, caches.sin, memo), caches.rows)
                caches_by_dtype[dtype] = caches
        w.commit()
        nodes = []
        for app, form in zip(apps, forms, strict=True):
            caches = caches_by_dtype[app.input.dtype or _F32]
            nodes.append(self._replace(graph, site, app, form, positions, caches))
        if plan is not None:
            # the site is now a fused op: validation checks its caches (cos_cache / sin_cache) against the plan
            # made for it, which the report now claims for the fused form
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
            fused_site = dataclasses.replace(
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
            self.context.report.replace_plan(plan, dataclasses.replace(plan, site=fused_site))
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
            claimed = self.context.report.fused_cache_rows
            self.context.report.fused_cache_rows = shortest if claimed is None else min(claimed, shortest)
            if plan is not None:
                sized = "the rescaled length; --max-positions N makes them longer"
            elif site.encoding.rescaled is not None:
                sized = "the length the model's recorded rescale supports; --max-positions N sizes them otherwise"
            else:
                sized = "--max-positions N sizes them"
            self.notes.append(
                f"positions >= {max(r for r in rows if r)} are outside the fused caches: onnxruntime CPU rejects them "
                f"with an error, the CUDA contrib kernel has been seen to pass q/k through unrotated ({sized})"
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
            seq = w.op("Gather", w.op("Shape", app.input), w.const(np.int64(form.seq_axis)), axis=0)  # a scalar
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
        batch = w.op("Gather", w.op("Shape", app.input), w.const(np.array([0], np.int64)), axis=0)
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
            # the rescaled length, at least --max-positions (or config.json's max_position_embeddings), not 4096
            rows = max(int(plan.new_length or plan.params.target_length() or 0), int(self.max_positions or 0))
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
                    from posrewrite.passes.onnx.rope.rescale import rescaled_record

                    mark_rescaled_cache(graph, memo[key].cos, rescaled_record(plan))
            return memo[key]
        if site.angles == AngleSource.CACHED:
            tables = []
            cached, source = site.cached_handles(), site.source
            assert isinstance(source, CachedTable)
            for read, columns, comp in ((cached.cos, source.cos_columns, source.cos_component),
                                        (cached.sin, source.sin_columns, source.sin_component)):
                t = self._fold(read.table)
                if t is None:
                    raise FuseRefusal(f"cos/sin table {read.table.name} is not a constant")
                t = table_part(np.asarray(t), columns, comp)
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
        """--max-positions, else the site's table length, else the length an earlier posrewrite rescale recorded
        (factor x L), else config.json's max_position_embeddings (the pass's max_positions), else 4096."""
        if self.max_positions:
            return int(self.max_positions)
        if site.max_positions:
            return int(site.max_positions)
        record = site.encoding.rescaled
        if record is not None and record.factor and record.original_max_position_embeddings:
            return int(round(record.factor * record.original_max_position_embeddings))
        return DEFAULT_MAX_POSITIONS

    def _runtime_caches(self, w: NodeWriter, site: RopeSite, plan, dtype, positions: ir.Value) -> _Caches:
        """dynamic/longrope: the runtime inv_freq (from max(position)+1, HF's rule), rows 0..max(position)."""
        from posrewrite.passes.onnx.rope.rescale import runtime_inv_freq, seq_from_positions

        seq = seq_from_positions(w, positions)
        inv = runtime_inv_freq(w, plan, seq)
        return self._caches_from_inv(w, inv, plan.attention_factor, dtype, positions, seq)

    def _caches_from_inv(self, w: NodeWriter, inv: ir.Value, factor: float, dtype, positions: ir.Value,
                         seq: ir.Value | None = None) -> _Caches:
        """cos/sin caches for rows 0..max(position) from a float32 [d/2] inv_freq computed in the graph."""
        from posrewrite.passes.onnx.rope.rescale import seq_from_positions, table_angles

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
        name = unique_name(graph, "rope_RotaryEmbedding")
        if self.target == "ort":
            y = w.op("RotaryEmbedding", x, positions, caches.cos, caches.sin, _domain=CONTRIB_DOMAIN, _name=name,
                     **attrs)
        else:
            y = w.op("RotaryEmbedding", x, caches.cos, caches.sin, positions, _name=name, **attrs)
        node = y.producer()
        y.dtype = app.input.dtype
        if form.kind == "bshd":
            y.shape = None
            y = w.op("Reshape", y, w.const(np.array([0, 0, -1, head_dim], np.int64)))
        y.dtype = app.output.dtype or app.input.dtype
        y.shape = app.output.shape
        w.commit()
        self.fused_nodes.append(node)
        _redirect(graph, app.output, y)
        return node


def _negated(graph: ir.Graph, w: NodeWriter, value: ir.Value, memo: dict) -> ir.Value:
    """-value: a new initializer when `value` is one (shared by the sites reading it), else a Neg node."""
    tensor = value.const_value
    if tensor is None:
        return w.op("Neg", value)
    key = ("negated", id(value))
    if key not in memo:
        memo[key] = add_initializer(graph, -np.asarray(tensor.numpy()), f"{value.name}_negated", tensor.dtype)
    return memo[key]


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


def _live_nodes(graph: ir.Graph) -> set[int]:
    """Ids of the nodes of ``graph`` that the pipeline's cleanup (RemoveUnusedNodesPass) keeps: what the graph
    outputs, or a subgraph, reads (directly or through other kept nodes)."""
    roots = [v.producer() for v in graph.outputs]
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.graph is not graph:  # subgraph nodes read outer values directly
            roots.extend(v.producer() for v in node.inputs if v is not None)
    live: set[int] = set()
    stack = [n for n in roots if n is not None and n.graph is graph]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return live


# ---------------------------------------------------------------------------------------------------
# raising the default-domain opset (for RotaryEmbedding-23)
# ---------------------------------------------------------------------------------------------------


def raise_opset(model: ir.Model, target: int, *, purpose: str = "--fuse onnx needs") -> str | None:
    """Raises the default-domain opset to `target` in place with onnxscript's version converter (see
    passes/onnx/opset.py); returns a change line, None when nothing to do. A node the converter cannot take to
    `target` is a FuseRefusal naming its op, raised before the model is touched."""
    current = model_onnx_opset(model)
    try:
        raised = convert_opset(model, target)
    except OpsetConversionError as exc:
        instead = (" Use --fuse ort (com.microsoft.RotaryEmbedding works at any opset from 13)"
                   if target == ONNX_ROTARY_OPSET else "")
        raise FuseRefusal(f"{purpose} opset {target}: {exc}.{instead}") from None
    if not raised:
        return None
    why = "for RotaryEmbedding-23" if target == ONNX_ROTARY_OPSET else "for the ops the fusion writes"
    return f"default-domain opset {current} -> {target} ({why})"
