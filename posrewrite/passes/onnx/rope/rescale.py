"""Rescales RoPE sites: new inverse frequencies, attention factor and cos/sin tables.

All numbers come from `posrewrite.math.rope`; this module only decides where they go in the graph:
- computed angles, static methods (linear, ntk, yarn, llama3, new base): the inv_freq constant is replaced
  and the attention factor multiplies cos and sin;
- computed angles, runtime methods (dynamic, longrope): inv_freq is computed in the graph from the runtime
  length max(position)+1, exactly as HF does per forward pass;
- cached tables and fused RotaryEmbedding caches: regenerated (fp32 math, then cast) to the new length;
  for runtime methods the table is computed in the graph from the runtime inv_freq.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite import errors
from posrewrite.limits import MAX_LENGTH
from posrewrite.math import rope as rope_math
from posrewrite.math import rope_grid
from posrewrite.passes.onnx._build import NodeWriter, add_initializer, insert_after_and_redirect
from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.passes.onnx.rope.fused import fused_cache_indices
from posrewrite.passes.onnx.rope.markers import RESCALED_KEY, RUNTIME_INV_FREQ_KEY, mark_rescaled_cache
from posrewrite.passes.onnx.rope.tables import part_width, write_part
from posrewrite.sites.rope import (
    AngleSource,
    CachedTable,
    GridAngles,
    Layout,
    LengthSelection,
    OnnxAngleHandles,
    OnnxSwitchedCaches,
    OnnxTableRead,
    RopeSite,
)

RUNTIME_METHODS = ("dynamic", "longrope")
_F32 = ir.DataType.FLOAT


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """What the rewrite does to one site (pure numbers; made before touching the graph). Frozen: a step that
    needs other numbers derives a new plan (`dataclasses.replace`)."""

    site: RopeSite
    params: rope_math.RopeParameters
    inv_freq: np.ndarray | None  # static methods
    attention_factor: float
    new_length: int | None  # rows of regenerated tables
    runtime: bool
    keep_rows: bool = False  # extension only: the original rows are copied, new rows appended
    decay_ratio: float = 1.0  # xPos: exponent multiplier of the decay (1/s for --xpos-decay scaled), rope/xpos.py
    grid: GridRequest | None = None  # 2-D RoPE: per-channel ratios on the angle tensor (angle_ratio)

    @property
    def extends_only(self) -> bool:
        """Same frequencies, longer tables (--max-positions without a rescale)."""
        return self.params.rope_type == "default" and self.params.rope_theta is None

    def describe(self) -> str:
        if self.grid is not None:
            g = self.grid
            extra = f", attention factor {self.attention_factor:.6g}" if self.attention_factor != 1.0 else ""
            return (f"2-D rope ({self.site.rotations} q/k applications): {self.params.rope_type} per axis, grid "
                    f"{g.original[0]}x{g.original[1]} -> {g.target[0]}x{g.target[1]}{extra}")
        if self.extends_only:
            return (f"{self.site.angles.value} rope ({self.site.rotations} q/k rotations): tables "
                    f"{self.site.max_positions} -> {self.new_length} rows, same frequencies (trained rows kept)")
        factor = self.params.effective_factor()
        if self.params.rope_type == "default" and factor == 1 and self.params.rope_theta is not None:
            what = f"new base {self.params.rope_theta:g} (no context scaling)"
        else:
            what = f"{self.params.rope_type} x{factor:g}"
            if self.params.rope_theta is not None:
                what += f", base {self.params.rope_theta:g}"
        where = (f"{self.site.angles.value} rope ({self.site.rotations} q/k rotations, "
                 f"rotary_dim {self.site.rotary_dim})")
        extra = f", attention factor {self.attention_factor:.6g}" if self.attention_factor != 1.0 else ""
        rows = f", tables {self.site.max_positions} -> {self.new_length} rows" if self.site.max_positions else ""
        mode = ", inv_freq from the runtime length" if self.runtime else ""
        return f"{where}: {what}{extra}{rows}{mode}"


@dataclasses.dataclass(frozen=True)
class GridRequest:
    """A 2-D RoPE rescale: trained and target patch grids, and the resulting ratio per angle channel."""

    original: tuple[int, int]
    target: tuple[int, int]
    angle_ratio: np.ndarray  # float64, the angle tensor's channel shape (1 on its grid axes)


class NotRewritable(ValueError):
    """The site was identified but this request cannot be applied to it (exit 5 with the reason)."""


def plan_grid_site(site: RopeSite, method: str, original: tuple[int, int], target: tuple[int, int]) -> SitePlan:
    """Per-axis rescale of a 2-D RoPE (posrewrite.math.rope_grid); NotRewritable when the site cannot take it."""
    source = site.source
    if not isinstance(source, GridAngles) or not isinstance(site.handles, OnnxAngleHandles):
        raise NotRewritable(f"--original-grid/--target-grid rescale 2-D RoPE; this is {site.angles.value} RoPE")
    try:
        ratio, attention, params = rope_grid.grid_rescale(source.axes, method, original, target)
    except ValueError as exc:
        raise NotRewritable(str(exc)) from None
    ratio = ratio.reshape(site.handles.channel_shape)
    return SitePlan(site, params, None, float(attention) * source.attention_factor, None, False,
                    grid=GridRequest(tuple(original), tuple(target), ratio))


def plan_site(site: RopeSite, params: rope_math.RopeParameters) -> SitePlan:
    """Computes the new numbers for a site. Raises ValueError for requests the site cannot take."""
    params.validate()
    if site.angles == AngleSource.GRID:
        raise NotRewritable("2-D RoPE over a patch grid: rescale it with --original-grid HxW --target-grid HxW "
                            "(per-axis), not with a 1-D --rope-scale")
    if getattr(site.source, "normalised", False):
        raise NotRewritable("this RoPE reads positions normalised by the sequence length: the model already adapts "
                            "to length, there is nothing to rescale")
    if site.angles == AngleSource.PROBED and params.rope_type in RUNTIME_METHODS:
        raise NotRewritable(f"{params.rope_type} computes frequencies at run time, which needs the graph's "
                            "positions x inv_freq product; these angles were identified by probing only")
    if site.encoding.runtime is not None:
        raise ValueError("this RoPE already computes inv_freq at run time (a posrewrite dynamic/longrope rewrite): "
                         "rescale the original model instead")
    dim = site.rotary_dim
    base = site.base
    params = rope_math.parameters_for_site(params, base, site.prior_scaling)
    runtime = params.rope_type in RUNTIME_METHODS
    inv_freq, factor = rope_math.scaled_inv_freq(params, inv_freq=site.inv_freq, base=base, dim=dim, seq_len=None)
    if runtime:
        inv_freq = None
    new_length = None
    if site.max_positions is not None:
        target = params.target_length()
        trained = switched_threshold(site) or site.max_positions  # LongRoPE caches: the short length
        scaled = int(round(trained * params.effective_factor()))
        new_length = max(site.max_positions, scaled, target or 0)  # never fewer rows than the model had
    return SitePlan(site, params, inv_freq, factor, new_length, runtime)


def switched_threshold(site: RopeSite) -> int | None:
    """The trained length of a fused site whose caches hold more rows: L of onnxruntime-genai's LongRoPE caches
    (short up to L tokens, long beyond), or the L a posrewrite rescale recorded; None for other sites."""
    switched = _switched(site)
    if switched is not None:
        return switched[0].threshold
    record = site.encoding.rescaled
    if site.angles == AngleSource.FUSED_OP and record is not None and record.original_max_position_embeddings:
        return int(record.original_max_position_embeddings)
    return None


def _switched(site: RopeSite) -> tuple[LengthSelection, OnnxSwitchedCaches] | None:
    """onnxruntime-genai's LongRoPE caches (an If choosing them by length), with the If's handles; else None."""
    selection = site.encoding.selection
    if selection is None or not isinstance(site.handles, OnnxSwitchedCaches):
        return None
    return selection, site.handles


def plan_extension(site: RopeSite, rows: int) -> SitePlan | None:
    """--max-positions on a RoPE site with a cos/sin table (GPT-J, CodeGen, fused caches): the table grows
    to `rows` with the site's own frequencies and attention factor; rows it had are kept bit for bit, so
    logits within the old length do not change. None when the site needs nothing."""
    if site.angles == AngleSource.COMPUTED or site.max_positions is None or site.max_positions >= rows:
        return None
    inv = site.inv_freq
    switched = _switched(site)
    if switched is not None:  # LongRoPE caches: the long ones grow (and are what the plan describes past L)
        selection = switched[0]
        inv = selection.long
        factor = site.attention_factor if selection.long_factor is None else selection.long_factor
        source = dataclasses.replace(site.source, attention_factor=float(factor))
        site = dataclasses.replace(site, encoding=dataclasses.replace(
            site.encoding, inv_freq=np.asarray(inv, np.float32), source=source))
    elif site.base is not None and site.prior_scaling is None:
        inv = rope_math.default_inv_freq(site.base, site.rotary_dim)  # exact, rather than fitted from the table
    params = rope_math.RopeParameters(rope_type="default")
    return SitePlan(site, params, np.asarray(inv, np.float32), float(site.attention_factor), int(rows), False,
                    keep_rows=True)


def rescaled_record(plan: SitePlan) -> dict:
    """What a static rescale did, as recorded for inspect and later rescales (RESCALED_KEY)."""
    base = plan.params.rope_theta if plan.params.rope_theta is not None else plan.site.base
    return {"rope_type": plan.params.rope_type, "factor": plan.params.factor,
            "original_max_position_embeddings": plan.params.original_max_position_embeddings, "base": base}


class OnnxOps:
    """`posrewrite.math.rope.RuntimeOps` as ONNX nodes written by a NodeWriter."""

    def __init__(self, w: NodeWriter) -> None:
        self.w = w

    def const(self, value: np.ndarray) -> ir.Value:
        return self.w.const(np.asarray(value, dtype=np.float32))

    def mul(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Mul", a, b)

    def div(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Div", a, b)

    def sub(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Sub", a, b)

    def pow(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Pow", a, b)

    def greater(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Greater", a, b)

    def where(self, condition: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.w.op("Where", condition, a, b)


def runtime_inv_freq(w: NodeWriter, plan: SitePlan, seq: ir.Value) -> ir.Value:
    """float32 [d/2] inverse frequencies for the runtime length `seq` (float32 scalar): HF's formulas, written
    once in `posrewrite.math.rope.runtime_inv_freq`."""
    site = plan.site
    return rope_math.runtime_inv_freq(OnnxOps(w), seq, plan.params, inv_freq=site.inv_freq, base=site.base,
                                      dim=site.rotary_dim)


def table_angles(w: NodeWriter, inv: ir.Value, rows: ir.Value) -> ir.Value:
    """float32 [rows, d/2] angles p * inv_freq for p = 0..rows-1 (an int64 scalar), the rows of a cos/sin table
    built in the graph from a run-time inv_freq."""
    positions = w.op("Cast", w.op("Range", w.const(np.int64(0)), rows, w.const(np.int64(1))), to=_F32)
    return w.op("Mul", w.op("Unsqueeze", positions, w.const(np.array([1], np.int64))),
                w.op("Unsqueeze", inv, w.const(np.array([0], np.int64))))


def seq_from_positions(w: NodeWriter, positions: ir.Value) -> ir.Value:
    """max(positions) + 1 as a float32 scalar (HF: torch.max(position_ids) + 1)."""
    as_float = w.op("Cast", positions, to=_F32)
    return w.op("Add", w.op("ReduceMax", as_float, keepdims=0), w.const(np.float32(1.0)))


class RescaleError(ValueError):
    pass


class RescaleRopePass(ReportingPass):
    """Rescales (or extends) the RoPE sites of a model; claims each site's plan in the shared report.

    Give either ``params`` or ``plans``:

    - ``params`` (`posrewrite.math.rope.RopeParameters`, HF's ``rope_parameters`` names): the pass detects the
      RoPE sites of the model as it finds it and plans each one (`plan_site`) when it runs, so it is correct
      after any earlier pass, posrewrite's or not. No RoPE site: `NoEncodingError` (exit 4); a site that cannot
      take the request: `PartialMatchError` (exit 5) or `UsageError` (exit 2).
    - ``plans``: frozen `SitePlan`s made beforehand from a detection of the model (what the pipeline does, with
      the plans its planning checked). They must come from the model as it is when the pass runs: `requires`
      refuses a model that an earlier pass of the same context modified, or whose graph no longer holds a
      plan's rotations.

    ``usage_errors``: a plan the graph cannot take is a usage error (exit 2), as for a user's rescale.
    With ``params`` each site's plan is `plan_site`'s, bounded by `posrewrite.limits.MAX_LENGTH` rows; what the
    CLI adds to a request (--max-positions rows, the xPos decay, 2-D grids, config.json's values) comes with
    plans made by the rewrite's planning."""

    def __init__(self, *, params: rope_math.RopeParameters | None = None, plans: Sequence[SitePlan] | None = None,
                 usage_errors: bool = True, context: PipelineContext | None = None,
                 preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        if (params is None) == (plans is None):
            raise ValueError("RescaleRopePass takes either params (planned on the model it runs on) or plans")
        if params is not None:
            params.validate()
        self.params = params
        self.plans: tuple[SitePlan, ...] = () if plans is None else tuple(plans)
        self.usage_errors = usage_errors
        self._generation = self.context.generation

    def requires(self, model: ir.Model) -> None:
        if self.params is not None:
            return
        if self.context.generation != self._generation:
            raise ir.passes.PreconditionError(
                "RescaleRopePass: the model was rewritten after its plans were made; plan on a new detection")
        graphs = {id(g) for g in model.graphs()}
        for plan in self.plans:
            nodes = [n for a in plan.site.applications for n in a.nodes] or list(plan.site.fused_nodes)
            if any(n.graph is None or id(n.graph) not in graphs for n in nodes):
                raise ir.passes.PreconditionError(
                    "RescaleRopePass: a plan's rotations are not in this model (plans made on another model, or "
                    "before a pass replaced them); plan on a detection of this model, or give params")

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        plans = self.plans if self.params is None else self._plan(model)
        if not plans:
            return ir.passes.PassResult(model, False)
        with self.context.progress.stage("rescaling", total=len(plans)) as stage:
            for plan in plans:
                try:
                    self.changes.extend(rescale_site(model.graph, plan))
                except RescaleError as exc:
                    if not self.usage_errors:
                        raise
                    raise errors.UsageError(str(exc)) from None
                self.context.report.claim_plan(plan)
                stage.advance()
        return ir.passes.PassResult(model, True)

    def _plan(self, model: ir.Model) -> tuple[SitePlan, ...]:
        sites = self.context.detection(model).rope_sites
        if not sites:
            raise errors.NoEncodingError("RescaleRopePass: no RoPE site found in the model")
        plans = []
        for site in sites:
            try:
                plan = plan_site(site, self.params)
            except NotRewritable as exc:
                raise errors.PartialMatchError(str(exc)) from None
            except ValueError as exc:
                raise errors.UsageError(str(exc)) from None
            if plan.new_length is not None and plan.new_length > MAX_LENGTH:
                raise errors.UsageError(f"RescaleRopePass: the rescaled length {plan.new_length} is over the limit of "
                                        f"{MAX_LENGTH} (a smaller factor)")
            plans.append(plan)
        return tuple(plans)


def rescale_site(graph: ir.Graph, plan: SitePlan) -> list[str]:
    site = plan.site
    if plan.decay_ratio != 1.0:
        from posrewrite.passes.onnx.rope.xpos import scale_decay

        return scale_decay(graph, site, plan.decay_ratio) + rescale_site(
            graph, dataclasses.replace(plan, decay_ratio=1.0))
    if plan.grid is not None:
        return _rescale_grid(graph, plan)
    if site.angles == AngleSource.PROBED:
        return _rescale_probed(graph, plan)
    if site.angles == AngleSource.COMPUTED:
        return _rescale_computed(graph, plan)
    if site.angles == AngleSource.CACHED:
        return _rescale_cached(graph, plan)
    return _rescale_fused(graph, plan)


def _rescale_computed(graph: ir.Graph, plan: SitePlan) -> list[str]:
    site = plan.site
    handles = site.computed_handles()
    root = handles.inv_freq
    consumer = handles.inv_freq_consumer
    index = next(i for i, v in enumerate(consumer.inputs) if v is root)
    static = root.shape is not None and root.shape.is_static()
    shape = list(root.shape.dims) if static else [-1]
    dtype = root.dtype or _F32
    if not plan.runtime:
        new = add_initializer(graph, plan.inv_freq.reshape(shape), (root.name or "inv_freq"), dtype)
        if not static and root.producer() is not None:
            # a folded value of unknown shape (optimum's Gemma export: inv_freq[None, :, None] expanded to a batch
            # of 1 the exporter made constant): the new frequencies take its shape, whatever it is
            w = NodeWriter(graph, consumer, "rope_inv_freq")
            new = w.op("Reshape", new, w.op("Shape", root))
            new.dtype = dtype
            w.commit()
    else:
        w = NodeWriter(graph, consumer, "rope_runtime")
        positions = (
            handles.position_source
            if handles.position_source.dtype in (ir.DataType.INT64, ir.DataType.INT32)
            else handles.positions
        )
        seq = seq_from_positions(w, positions)
        inv = runtime_inv_freq(w, plan, seq)
        target = w.op("Shape", root) if not static and root.producer() is not None else w.const(
            np.array(shape, dtype=np.int64))
        inv = w.op("Reshape", inv, target)
        new = w.op("Cast", inv, to=dtype) if dtype != _F32 else inv
        new.producer().metadata_props[RUNTIME_INV_FREQ_KEY] = json.dumps({
            "rope_type": plan.params.rope_type, "factor": plan.params.factor,
            "original_max_position_embeddings": plan.params.original_max_position_embeddings,
            "base": site.base, "inv_freq": [float(f) for f in site.inv_freq]})
        w.commit()
    consumer.replace_input_with(index, new)
    if not plan.runtime:
        # lets a later inspect / rescale of the output know the base its frequencies were built from
        base = plan.params.rope_theta if plan.params.rope_theta is not None else site.base
        consumer.metadata_props[RESCALED_KEY] = json.dumps({
            "rope_type": plan.params.rope_type, "factor": plan.params.factor,
            "original_max_position_embeddings": plan.params.original_max_position_embeddings, "base": base})
    _set_attention_factor(graph, site, plan.attention_factor)
    return [plan.describe()]


def _rescale_grid(graph: ir.Graph, plan: SitePlan) -> list[str]:
    """2-D RoPE: the angles times the plan's per-channel (per-axis) ratios."""
    assert plan.grid is not None
    _scale_angles(graph, plan, plan.grid.angle_ratio, "rope_grid_ratio")
    return [plan.describe()]


def _rescale_probed(graph: ir.Graph, plan: SitePlan) -> list[str]:
    """Probed angles: each element times new/old of its frequency (static methods)."""
    from posrewrite.passes.onnx.rope.probe import frequency_ratio
    from posrewrite.passes.onnx.rope.tables import NotUnderstood

    handles = plan.site.handles
    assert isinstance(handles, OnnxAngleHandles) and handles.channel_freq is not None and plan.inv_freq is not None
    try:
        ratio = frequency_ratio(handles.channel_freq, plan.site.inv_freq, plan.inv_freq)
    except NotUnderstood as exc:
        raise RescaleError(str(exc)) from None
    _scale_angles(graph, plan, ratio, "rope_angle_ratio")
    return [plan.describe()]


def _scale_angles(graph: ir.Graph, plan: SitePlan, ratio_array: np.ndarray, stem: str) -> None:
    """The angle tensor times a per-channel ratio, read by the site's Cos and Sin (the graph's own way of making
    the angles is left as it is); the plan's attention factor multiplies cos and sin."""
    handles = plan.site.handles
    assert isinstance(handles, OnnxAngleHandles)
    angles = handles.angles
    ratio = add_initializer(graph, np.asarray(ratio_array, np.float32), stem, angles.dtype or _F32)
    first = min(handles.trig, key=lambda n: list(graph).index(n))
    w = NodeWriter(graph, first, "rope_grid")
    scaled = w.op("Mul", angles, ratio)
    scaled.dtype, scaled.shape = angles.dtype, angles.shape
    w.commit()
    for node in handles.trig:
        node.replace_input_with(0, scaled)
    extra = plan.attention_factor / plan.site.attention_factor  # on top of what the export already multiplies
    if extra != 1.0:
        for node in handles.trig:
            out = node.outputs[0]
            scale = add_initializer(graph, np.array(extra), "attention_factor", out.dtype or _F32)
            insert_after_and_redirect(graph, out, "Mul", scale, "attention_factor_mul")


def _set_attention_factor(graph: ir.Graph, site: RopeSite, factor: float) -> None:
    """Make cos and sin carry `factor` in all: the new method's attention factor replaces any factor the
    export already had (a YaRN/LongRoPE export), as new rope_parameters do in HF."""
    handles = site.computed_handles()
    for trig in (handles.cos, handles.sin):
        if trig.scale is not None:
            node = trig.scale
            k = next(
                i
                for i, v in enumerate(node.inputs)
                if v is not None
                and v.const_value is not None
                or (v is not None and v.producer() is not None and v.producer().op_type == "Constant")
            )
            old = node.inputs[k]
            node.replace_input_with(
                k,
                add_initializer(
                    graph, np.array(factor).reshape(old.shape.dims if old.shape else ()), "attention_factor", old.dtype
                ),
            )
        elif factor != 1.0:
            value = trig.trig.outputs[0]
            scale = add_initializer(graph, np.array(factor), "attention_factor", value.dtype or _F32)
            insert_after_and_redirect(graph, value, "Mul", scale, "attention_factor_mul")


def _table_layout(site: RopeSite, width: int) -> str:
    if width * 2 == site.rotary_dim:
        return "half"
    return "interleaved" if site.layout == Layout.INTERLEAVED else "rotate_half"


def _rescale_cached(graph: ir.Graph, plan: SitePlan) -> list[str]:
    site = plan.site
    handles, source = site.cached_handles(), site.source
    assert isinstance(source, CachedTable)
    changes = [plan.describe()]
    tables: dict[int, tuple[ir.Value, list[tuple[OnnxTableRead, tuple[int, int] | None, float, str, int | None]]]] = {}
    for read, columns, scale, fn, comp in (
            (handles.cos, source.cos_columns, source.cos_scale, "cos", source.cos_component),
            (handles.sin, source.sin_columns, source.sin_scale, "sin", source.sin_component)):
        tables.setdefault(id(read.table), (read.table, []))[1].append((read, columns, scale, fn, comp))
    for table_value, parts in tables.values():
        old = (
            table_value.const_value.numpy()
            if table_value.const_value is not None
            else const_tensor(table_value).numpy()
        )
        dtype = table_value.dtype
        select = parts[0][0].select
        # the table carries what the Mul after the gather (if any) does not
        factor = plan.attention_factor / parts[0][2]
        row_axis = next(k for k, d in enumerate(old.shape[:-1]) if d == site.max_positions)
        new_shape = list(old.shape)
        new_shape[row_axis] = plan.new_length
        if not plan.runtime:
            new = np.zeros(new_shape, dtype=np.float64)
            for _read, columns, _scale, fn, comp in parts:
                lo, hi = part_width(old.shape, columns, comp)
                layout = _table_layout(site, hi - lo)
                cos, sin = rope_math.cos_sin_tables(
                    plan.inv_freq, plan.new_length, attention_factor=factor, layout=layout
                )
                write_part(new, cos if fn == "cos" else sin, columns, comp, row_axis, plan.new_length)
            if plan.keep_rows:
                kept = [slice(None)] * old.ndim
                kept[row_axis] = slice(0, old.shape[row_axis])
                new[tuple(kept)] = old
            replacement = add_initializer(
                graph, new.astype(np.float32), f"{table_value.name}_{plan.params.rope_type}", dtype
            )
        else:
            if any(p[4] is not None for p in parts):
                raise NotRewritable(f"{plan.params.rope_type} computes the table at run time; this table stacks cos "
                                    "and sin on its last axis, which the run-time table does not write")
            w = NodeWriter(graph, select, "rope_table")
            if select.op_type in ("Gather", "GatherElements", "GatherND"):
                seq = seq_from_positions(w, select.inputs[1])
            else:
                seq = w.op("Cast", w.op("ReduceMax", select.inputs[2], keepdims=0), to=_F32)
            inv = runtime_inv_freq(w, plan, seq)
            angles = table_angles(w, inv, w.const(np.int64(plan.new_length)))
            pieces = []
            for _read, columns, _scale, fn, _comp in sorted(parts, key=lambda p: (p[1] or (0, 0))[0]):
                lo, hi = columns if columns is not None else (0, old.shape[-1])
                t = w.op("Cos" if fn == "cos" else "Sin", angles)
                if factor != 1.0:
                    t = w.op("Mul", t, w.const(np.float32(factor)))
                layout = _table_layout(site, hi - lo)
                if layout == "rotate_half":
                    t = w.op("Concat", t, t, axis=-1)
                elif layout == "interleaved":
                    t = w.op(
                        "Reshape",
                        w.op(
                            "Concat",
                            w.op("Unsqueeze", t, w.const(np.array([-1], np.int64))),
                            w.op("Unsqueeze", t, w.const(np.array([-1], np.int64))),
                            axis=-1,
                        ),
                        w.const(np.array([0, -1], np.int64)),
                    )
                pieces.append(t)
            table = pieces[0] if len(pieces) == 1 else w.op("Concat", *pieces, axis=-1)
            if old.ndim > 2:
                table = w.op("Reshape", table, w.const(np.array(new_shape, np.int64)))
            replacement = w.op("Cast", table, to=dtype) if dtype != _F32 else table
            w.commit()
        for use in list(table_value.uses()):
            use.node.replace_input_with(use.idx, replacement)
    return changes


def _rescale_fused(graph: ir.Graph, plan: SitePlan) -> list[str]:
    site = plan.site
    node0 = site.fused_nodes[0]
    factor = plan.attention_factor
    dtype = site.cos_cache.dtype
    if plan.runtime:
        positions = site.positions
        total = _attention_total_length(node0)
        if total is None and (positions is None or positions.shape is None or len(positions.shape) != 2):
            raise RescaleError(f"{plan.params.rope_type} on a fused RotaryEmbedding needs 2-D position_ids")
        w = NodeWriter(graph, node0, "rope_cache")
        # rotary attention: the run-time length is the op's total_sequence_length (past + new tokens), which is
        # max(position)+1 of the tokens it rotates
        seq = w.op("Cast", total, to=_F32) if total is not None else seq_from_positions(w, positions)
        inv = runtime_inv_freq(w, plan, seq)
        angles = table_angles(w, inv, w.const(np.int64(plan.new_length)))
        cos, sin = w.op("Cos", angles), w.op("Sin", angles)
        if factor != 1.0:
            cos, sin = w.op("Mul", cos, w.const(np.float32(factor))), w.op("Mul", sin, w.const(np.float32(factor)))
        if dtype != _F32:
            cos, sin = w.op("Cast", cos, to=dtype), w.op("Cast", sin, to=dtype)
        w.commit()
    elif plan.keep_rows and _switched(site) is not None:
        return _extend_switched(plan)
    else:
        c, s = rope_math.cos_sin_tables(plan.inv_freq, plan.new_length, attention_factor=factor, layout="half")
        if plan.keep_rows:
            for table, cache in ((c, site.cos_cache), (s, site.sin_cache)):
                old = const_tensor(cache).numpy()
                table[: old.shape[0]] = old
        cos = add_initializer(graph, c, "cos_cache", dtype)
        sin = add_initializer(graph, s, "sin_cache", dtype)
        if not plan.keep_rows:
            mark_rescaled_cache(graph, cos, rescaled_record(plan))
    graph.metadata_props.pop(f"{RESCALED_KEY}:{site.cos_cache.name}", None)  # the old caches' record, if any
    for node in site.fused_nodes:
        ci, si = fused_cache_indices(node)
        node.replace_input_with(ci, cos)
        node.replace_input_with(si, sin)
    return [plan.describe()]


def _attention_total_length(node: ir.Node) -> ir.Value | None:
    """GroupQueryAttention's total_sequence_length input (a scalar), None for other fused nodes."""
    if node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention" and len(node.inputs) > 6:
        return node.inputs[6]
    return None


def _extend_switched(plan: SitePlan) -> list[str]:
    """--max-positions on onnxruntime-genai's LongRoPE caches: the long caches (the If's then branch) grow to
    plan.new_length rows with their own frequencies and attention factor, trained rows kept bit for bit."""
    switched = _switched(plan.site)
    assert switched is not None
    selection, handles = switched
    factor = float(plan.site.attention_factor if selection.long_factor is None else selection.long_factor)
    c, s = rope_math.cos_sin_tables(np.asarray(selection.long, np.float32), plan.new_length,
                                    attention_factor=factor, layout="half")
    for node, table in zip((handles.long_cos, handles.long_sin), (c, s), strict=True):
        old = node.attributes["value"].value
        kept = old.numpy()
        table[: kept.shape[0]] = kept
        new = ir.tensor(table.astype(kept.dtype), name=old.name)
        node.attributes["value"] = ir.AttrTensor("value", new)
        out = node.outputs[0]
        if out.shape is not None:
            out.shape = ir.Shape([plan.new_length, table.shape[1]])
    return [f"LongRoPE caches inside {plan.site.op} (switch at {selection.threshold} tokens): long caches "
            f"{plan.site.max_positions} -> {plan.new_length} rows, same frequencies (trained rows kept); "
            "short caches unchanged"]
