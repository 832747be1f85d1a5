"""Finds RoPE in an ONNX graph and describes it as `RopeSite`s.

Three steps: (1) the rotation patterns (`patterns`) find every q/k application and the cos/sin
values it multiplies with; (2) each cos/sin value is traced upstream through broadcasting ops to its
source (`sources`): Cos/Sin of computed angles or a row selection of a constant table; (3) the
source is read: the angle computation (`angles`: inv_freq as a constant, folded from a base, a run-time
formula or a LongRoPE selection; positions and their dtype; any attention factor) or the tables
(`tables`). Applications sharing a source form one site. Fused RoPE ops (RotaryEmbedding, attention
ops with rotary inside) are described by `fused`. The base of what was found: `base`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from posrewrite.math import rope as rope_math
from posrewrite.math import rope_fit
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, last_dim
from posrewrite.passes.onnx.rope.angles import read_angles
from posrewrite.passes.onnx.rope.base import half_rounded, scaled_base, stored_base, table_base
from posrewrite.passes.onnx.rope.fused import FusedRopeDetector
from posrewrite.passes.onnx.rope.lint import unclaimed_cos, unmatched_uses
from posrewrite.passes.onnx.rope.patterns import ApplicationMatch, find_applications, read_slice
from posrewrite.passes.onnx.rope.position_feed import position_feeds
from posrewrite.passes.onnx.rope.probe import (
    ConeTrig,
    angle_offsets,
    cone_trig,
    fit_grid,
    fit_length,
    fit_rows,
    position_input,
    position_rows,
)
from posrewrite.passes.onnx.rope.rotation_probe import describe_pairs, find_probed, rotation_seeds
from posrewrite.passes.onnx.rope.sources import TableSource, TrigSource, trace_source
from posrewrite.passes.onnx.rope.tables import NotUnderstood, fit_tables, table_array, table_eps
from posrewrite.passes.rotation_reading import probed_site_facts
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import (
    CachedTable,
    ComputedAngles,
    GridAngles,
    Layout,
    OnnxAngleHandles,
    OnnxCachedHandles,
    OnnxComputedHandles,
    OnnxTableRead,
    OnnxTrig,
    ProbedAngles,
    RopeApplication,
    RopeEncoding,
    RopeSite,
)

__all__ = ["RopeDetector", "detect_rope"]


class RopeDetector:
    """Finds the q/k rotations, traces their cos/sin to a source and assembles one `RopeSite` per source;
    fused RoPE ops are described by `FusedRopeDetector`. What is not understood goes to `refusals`."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        _ensure_ranks(model)
        opset = model.opset_imports.get("", 18)
        self.fold = ConstantEvaluator(opset)
        self.tracer = orp.MatchingTracer()
        self.refusals: list[Refusal] = []
        self.probe_failures: list[str] = []
        self._cones: dict[int, ConeTrig] = {}  # angle tensors found by searching the cone (probed sites)

    # -- assembling sites ------------------------------------------------------------------------
    def detect(self) -> list[RopeSite]:
        applications = find_applications(self.model, self.fold, self.tracer)
        applications.extend(self._probed(applications))
        groups: dict[tuple[int, ...], list[tuple[ApplicationMatch, TrigSource | TableSource,
                                                  TrigSource | TableSource]]] = {}
        for app in applications:
            try:
                cs, ss = trace_source(app.cos, self.fold), trace_source(app.sin, self.fold)
            except NotUnderstood as refused:
                try:  # what lies between Cos/Sin and the rotation is evaluated, not read (probe.py)
                    cs, ss = self._cone_sources(app)
                except NotUnderstood as also:
                    baked = self._baked(app)
                    reason = baked if baked is not None else f"{refused}; {also}"
                    self.refusals.append(Refusal("rope", app.output.name or "?", reason))
                    continue
            if type(cs) is not type(ss):
                self.refusals.append(
                    Refusal("rope", app.output.name or "?", "cos and sin come from different kinds of source")
                )
                continue
            key = (id(cs.angles),) if isinstance(cs, TrigSource) else (id(cs.table), id(ss.table))
            groups.setdefault(key, []).append((app, cs, ss))
        sites = []
        for members in groups.values():
            try:
                sites.append(self._make_site(members))
            except NotUnderstood as refused:
                self.refusals.append(Refusal("rope", members[0][0].output.name or "?", str(refused)))
        fused = FusedRopeDetector(self.model, self.fold)
        sites.extend(fused.detect())
        self.refusals.extend(fused.refusals)
        closest = _best_failure(self.tracer)
        if self.probe_failures:
            closest = f"probing {self.probe_failures[0]}" + (f"; pattern: {closest}" if closest else "")
        self.refusals.extend(unclaimed_cos(self.model, sites, closest))
        for site in sites:
            self.refusals.extend(unmatched_uses(site, self.fold))
        return sites

    def _probed(self, matched: list[ApplicationMatch]) -> list[ApplicationMatch]:
        """Rotations no pattern matched, identified by what they compute (`rotation_probe`); those identified
        but not rewritable become refusals with the reason."""
        claimed = {id(o) for app in matched for n in app.nodes for o in n.outputs}
        seeds = rotation_seeds(self.model)
        if not seeds:
            return []
        try:
            rotations, refused, failed = find_probed(self.model, seeds, claimed)
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError, RecursionError) as exc:
            self.probe_failures.append(f"the graph could not be probed: {type(exc).__name__}: {exc}"[:200])
            return []
        for where, why in refused:
            self.refusals.append(Refusal("rope", where.name or "?", why))
        found = []
        for rot in rotations:
            where = rot.output.name or "?"
            if rot.layout is None:
                self.refusals.append(Refusal("rope", where, (
                    f"a RoPE rotation pairing channels {describe_pairs(rot.pairs)}: no rewrite supports that "
                    "pairing")))
                continue
            if rot.decay is not None and rot.decay.probed_length and not np.all(rot.decay.log_rate != 0):
                self.refusals.append(Refusal("rope", where, "xPos decay on only some channels"))
                continue
            found.append(ApplicationMatch(
                x=rot.x, cos=rot.cos, sin=rot.sin, output=rot.output, layout=rot.layout, rotary_dim=rot.rotary_dim,
                nodes=rot.nodes, head_dim=rot.head_dim, num_heads=rot.heads_in_last_axis if
                rot.heads_in_last_axis > 1 else None, decay=rot.decay, probed=True,
                steps=_wrapped(rot.angles[1] - rot.angles[0]) if rot.angles.shape[0] > 1 else None))
        for where, why in failed:
            self.probe_failures.append(f"{where.name}: {why}")
        return found

    def _baked(self, app: ApplicationMatch) -> str | None:
        """The reason for a rotation whose cos and sin are constants (a static export baked them for its one
        length or grid), None when they are not."""
        cos, sin = self.fold(app.cos), self.fold(app.sin)
        if cos is None or sin is None or cos.shape != sin.shape or cos.size == 0:
            return None
        amplitude = np.sqrt(np.asarray(cos, np.float64) ** 2 + np.asarray(sin, np.float64) ** 2)
        if np.ptp(amplitude) > 1e-3 * max(float(np.max(amplitude)), 1e-30):
            return None
        return (f"RoPE cos/sin baked into constants of shape {list(cos.shape)} by a static export: the model runs "
                "at that one length (or patch grid) only and there is nothing to rescale; re-export with a dynamic "
                "sequence axis (timm ViTs: dynamic_img_size=True and dynamic image height/width)")

    def _cone_sources(self, app: ApplicationMatch) -> tuple[TrigSource, TrigSource]:
        cone = cone_trig(app.cos, app.sin, self.fold)
        self._cones[id(cone.angles)] = cone
        cos_value = cone.cos_scale.outputs[0] if cone.cos_scale is not None else cone.cos.outputs[0]
        sin_value = cone.sin_scale.outputs[0] if cone.sin_scale is not None else cone.sin.outputs[0]
        return (TrigSource(cos_value, cone.cos, cone.factor, cone.cos_scale),
                TrigSource(sin_value, cone.sin, cone.factor, cone.sin_scale))

    def _application(self, app: ApplicationMatch) -> RopeApplication:
        x, out = app.x, app.output
        if app.head_dim is not None and app.num_heads is not None:
            # [B, S, H·D]: H heads on the last axis, each rotated on its first rotary_dim channels
            return RopeApplication(input=x, output=out, layout=app.layout, rotary_dim=app.rotary_dim,
                                   head_dim=app.head_dim, num_heads=app.num_heads, nodes=tuple(app.nodes),
                                   cos=app.cos, sin=app.sin, decay=app.decay, heads_in_last_axis=app.num_heads)
        head_dim = last_dim(x)
        nodes = list(app.nodes)
        # partial rotary: x = full[..., :rd] and out is concatenated with full[..., rd:]
        prod = x.producer()
        if prod is not None and prod.op_type == "Slice":
            spec = read_slice(prod, self.fold)
            full = prod.inputs[0]
            if spec is not None and spec.axis == -1 and spec.start == 0 and spec.step == 1:
                for use in out.uses():
                    cat = use.node
                    if cat.op_type == "Concat" and len(cat.inputs) == 2 and cat.inputs[0] is out:
                        other = cat.inputs[1].producer()
                        ospec = read_slice(other, self.fold) if other is not None else None
                        if ospec is not None and other.inputs[0] is full and ospec.start == spec.end:
                            x, out, head_dim = full, cat.outputs[0], last_dim(full)
                            nodes.extend([prod, other, cat])
                        break
        if head_dim is None:
            head_dim = app.rotary_dim if last_dim(x) is None else last_dim(x)
        num_heads = None
        if x.shape is not None and len(x.shape) == 4 and isinstance(x.shape[1], int):
            num_heads = x.shape[1]
        return RopeApplication(input=x, output=out, layout=app.layout, rotary_dim=app.rotary_dim,
                               head_dim=head_dim, num_heads=num_heads, nodes=tuple(nodes), cos=app.cos, sin=app.sin,
                               decay=app.decay)

    def _make_site(self, members: list[tuple[ApplicationMatch, TrigSource | TableSource, TrigSource | TableSource]]
                   ) -> RopeSite:
        apps = [self._application(m[0]) for m in members]
        _, cs, ss = members[0]
        layouts = {a.layout for a in apps}
        rotary_dims = {a.rotary_dim for a in apps}
        if len(layouts) != 1 or len(rotary_dims) != 1:
            raise NotUnderstood("applications sharing one cos/sin disagree on layout or rotary_dim")
        layout, rotary_dim = layouts.pop(), rotary_dims.pop()
        head_dims = {a.head_dim for a in apps if a.head_dim is not None}
        head_dim = max(head_dims) if head_dims else None
        if isinstance(cs, TrigSource) and isinstance(ss, TrigSource):
            site = self._computed_site(apps, cs, ss, layout, rotary_dim, head_dim)
        elif isinstance(cs, TableSource) and isinstance(ss, TableSource):
            site = self._cached_site(apps, cs, ss, layout, rotary_dim, head_dim)
        else:
            raise NotUnderstood("cos and sin come from different kinds of source")
        site = self._with_position_feeds(site)
        probed = [m[0] for m in members if m[0].probed]
        if not probed:
            return site
        return _with_probe_facts(site, probed)

    def _with_position_feeds(self, site: RopeSite) -> RopeSite:
        """The site with the feeds of its integer position inputs that give positions 0..S-1 (`position_feed`)."""
        handles = site.handles
        if isinstance(handles, OnnxComputedHandles):
            angles, freqs = handles.product.outputs[0], site.inv_freq
        elif isinstance(handles, OnnxAngleHandles) and site.inv_freq is not None:
            angles, freqs = handles.angles, site.inv_freq
        elif isinstance(handles, OnnxCachedHandles) and site.positions is not None:
            angles, freqs = site.positions, np.ones(1)  # the row index is the position
        else:
            return site
        feeds = position_feeds(self.model, angles, freqs)
        return dataclasses.replace(site, position_feeds=feeds) if feeds else site

    def _computed_site(self, apps: list[RopeApplication], cs: TrigSource, ss: TrigSource, layout: Layout,
                       rotary_dim: int, head_dim: int | None) -> RopeSite:
        cone = self._cones.get(id(cs.angles))
        if ss.angles is not cs.angles:
            raise NotUnderstood("cos and sin are computed from different angles")
        grid_refused = None
        if cone is not None and position_input(self.model, cs.angles) is None:
            # no position input read as data: angles made from the input's shape (a patch grid)
            try:
                return self._shape_site(apps, cone, layout, rotary_dim, head_dim)
            except NotUnderstood as refused:
                grid_refused = refused
        try:
            info = read_angles(cs.angles, self.fold)
            inv_freq = info.inv_freq
            if 2 * inv_freq.size != rotary_dim:
                raise NotUnderstood(
                    f"inv_freq has {inv_freq.size} entries but the rotation spans {rotary_dim} channels")
        except NotUnderstood as refused:
            if grid_refused is not None:
                raise NotUnderstood(f"{grid_refused}; {refused}") from None
            try:
                cone = cone or cone_trig(apps[0].cos, apps[0].sin, self.fold)
                positions = position_input(self.model, cone.angles)
                if positions is not None:  # angles of positions, written in a form not read term by term
                    return self._probed_site(apps, cone, positions, layout, rotary_dim, head_dim)
                return self._shape_site(apps, cone, layout, rotary_dim, head_dim)
            except NotUnderstood as also:
                raise NotUnderstood(f"{refused}; {also}") from None
        if not np.isclose(cs.factor, ss.factor, rtol=1e-6):
            raise NotUnderstood("cos and sin are scaled by different factors")
        notes = []
        if info.runtime is not None:
            r = info.runtime
            notes.append(f"inv_freq computed at run time ({r.rope_type} x{r.factor:g} "
                         f"from L={r.original_max_position_embeddings}, "
                         "written by posrewrite); base and inv_freq shown are the model's before that rescale")
        base = stored_base(inv_freq, info.inv_freq_root)
        prior = None
        if info.selection is not None:
            sel = info.selection
            ratio = sel.short.astype(np.float64) / sel.long.astype(np.float64)
            prior = rope_math.PriorScaling("by_length", float(np.max(ratio)), 0)
            notes.append(f"inv_freq switches at run time (LongRoPE export): the short frequencies up to "
                         f"{sel.threshold} tokens, the long ones (up to {np.max(ratio):.4g}x slower) beyond; "
                         "inv_freq shown is the short one")
            if base is None:
                notes.append("the base is not recoverable from LongRoPE frequencies: a rescale needs "
                             "--rope-base or a config.json with rope_theta beside the model")
        elif base is None and info.rescaled is not None and info.rescaled.base:
            r = info.rescaled
            base = float(r.base)
            prior = rope_math.PriorScaling("rewritten", float(r.factor or 1.0), 0)
            notes.append(f"inv_freq written by posrewrite ({r.rope_type} x{r.factor or 1:g} from base "
                         f"{base:g}); a rescale starts again from that base")
        elif base is None:
            base, prior = scaled_base(inv_freq, info.inv_freq_root, notes)
        half = half_rounded(inv_freq) if info.inv_freq_root.dtype == ir.DataType.FLOAT else None
        if base is not None and (info.inv_freq_root.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) or half):
            # a half-precision copy of b^(-2i/d): the frequencies the model means are the exact ones
            inv_freq = rope_math.default_inv_freq(base, rotary_dim)
            notes.append(f"inv_freq stored in {half or dtype_name(info.inv_freq_root)}: exact base-{base:g} "
                         "frequencies assumed")
        root_dtype = info.inv_freq_root.dtype
        source = ComputedAngles(
            position_dtype=info.position_dtype, angle_dtype=info.angle_dtype, inv_freq_origin=info.origin,
            inv_freq_dtype=root_dtype.name if root_dtype is not None and root_dtype.is_floating_point() else None,
            attention_factor=cs.factor, runtime=info.runtime, selection=info.selection, rescaled=info.rescaled,
            duplicated=info.duplicated, rows=self._rows(apps[0], info.position_source, layout, rotary_dim),
        )
        if source.rows is not None:
            rows = source.rows
            notes.append(f"M-RoPE: {rows.rows}-row positions, mrope_section {list(rows.sections)}"
                         + (" (interleaved)" if rows.interleaved else ""))
        offset = self._offsets(cs.angles, inv_freq, notes)
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=base,
                                inv_freq=inv_freq, prior_scaling=prior, notes=tuple(notes), position_offset=offset)
        handles = OnnxComputedHandles(
            product=info.product, inv_freq=info.inv_freq_root, inv_freq_consumer=info.inv_freq_consumer,
            positions=info.positions, position_source=info.position_source,
            cos=OnnxTrig(cs.trig, cs.scale), sin=OnnxTrig(ss.trig, ss.scale),
        )
        return RopeSite(encoding=encoding, cos=cs.value, sin=ss.value, positions=info.positions,
                        inv_freq_value=info.inv_freq_root, applications=tuple(apps),
                        source_nodes=(cs.trig, ss.trig, info.product, *(cone.between if cone else ())),
                        handles=handles)

    def _offsets(self, angles: ir.Value, inv_freq: np.ndarray, notes: list[str]) -> np.ndarray | None:
        """The positions the angles start at (`probe.angle_offsets`), with a note; None when they start at 0."""
        offset = angle_offsets(self.model, angles, inv_freq)
        if offset is not None:
            shown = (f"{float(offset[0]):g}" if np.ptp(offset) <= 1e-6 * max(1.0, float(np.max(np.abs(offset))))
                     else "per frequency")
            notes.append(f"positions start at {shown}, not 0 (an offset inside the model): a rescale scales it "
                         "with the positions")
        return offset

    def _shape_site(self, apps: list[RopeApplication], cone: ConeTrig, layout: Layout, rotary_dim: int,
                    head_dim: int | None) -> RopeSite:
        """Angles made from the input's shape alone: a patch grid (2-D RoPE), else one sequence axis (1-D)."""
        try:
            return self._grid_site(apps, cone, layout, rotary_dim, head_dim)
        except NotUnderstood as grid:
            try:
                return self._length_site(apps, cone, layout, rotary_dim, head_dim)
            except NotUnderstood as length:
                raise NotUnderstood(f"{grid}; {length}") from None

    def _length_site(self, apps: list[RopeApplication], cone: ConeTrig, layout: Layout, rotary_dim: int,
                     head_dim: int | None) -> RopeSite:
        """1-D angles a·t + c made from the sequence length alone, fitted by probing two lengths."""
        fit = fit_length(self.model, cone, apps[0].cos, apps[0].sin, layout, rotary_dim)
        notes = ["angles identified by probing (token index x frequency per channel): a rescale multiplies them"]
        base = None if fit.normalised else rope_fit.fit_base(fit.inv_freq, rotary_dim)
        offset = None
        if fit.normalised:
            notes.append("positions normalised by the sequence length (coordinates of a fixed range): the model "
                         "already adapts to length, nothing to rescale")
        else:
            offset = self._offsets(cone.angles, fit.inv_freq, notes)
            if base is None:
                notes.append("the frequencies are not base^(-2i/d): linear and llama3 apply, methods needing a "
                             "base need --rope-base")
        source = ProbedAngles(position_dtype=dtype_name(cone.angles), angle_dtype=dtype_name(cone.angles),
                              attention_factor=fit.attention_factor, normalised=fit.normalised)
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=base,
                                inv_freq=fit.inv_freq, notes=tuple(notes), position_offset=offset)
        handles = OnnxAngleHandles(cone.angles, (cone.cos, cone.sin), fit.channel_shape, fit.channel_freq)
        return RopeSite(encoding=encoding, cos=cone.cos.outputs[0], sin=cone.sin.outputs[0], positions=None,
                        applications=tuple(apps), source_nodes=(cone.cos, cone.sin, *cone.between),
                        handles=handles)

    def _rows(self, app: RopeApplication, positions: ir.Value, layout: Layout, rotary_dim: int):
        """M-RoPE: the row each frequency reads, when the positions are a multi-row graph input."""
        if not any(positions is v for v in self.model.graph.inputs) or positions.shape is None \
                or len(positions.shape) != 3:
            return None
        return position_rows(self.model, positions, app.cos, app.sin, layout, rotary_dim)

    def _probed_site(self, apps: list[RopeApplication], cone: ConeTrig, positions: ir.Value, layout: Layout,
                     rotary_dim: int, head_dim: int | None) -> RopeSite:
        """Angles pos·f_c (or pos[row(c)]·f_c) fitted by probing the angle tensor and the rotation's cos/sin."""
        fit = fit_rows(self.model, cone, positions, apps[0].cos, apps[0].sin, layout, rotary_dim)
        notes = ["angles identified by probing (pos x frequency per channel): a rescale multiplies them"]
        base = rope_fit.fit_base(fit.inv_freq, rotary_dim)
        if base is None:
            notes.append("the frequencies are not base^(-2i/d): linear and llama3 apply, methods needing a base "
                         "need --rope-base")
        if fit.rows is not None:
            notes.append(f"M-RoPE: {fit.rows.rows}-row positions, mrope_section {list(fit.rows.sections)}"
                         + (" (interleaved)" if fit.rows.interleaved else ""))
        offset = self._offsets(cone.angles, fit.inv_freq, notes)
        source = ProbedAngles(position_dtype=dtype_name(positions), angle_dtype=dtype_name(cone.angles),
                              attention_factor=fit.attention_factor, rows=fit.rows)
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=base,
                                inv_freq=fit.inv_freq, notes=tuple(notes), position_offset=offset)
        handles = OnnxAngleHandles(cone.angles, (cone.cos, cone.sin), fit.channel_shape, fit.channel_freq)
        return RopeSite(encoding=encoding, cos=cone.cos.outputs[0], sin=cone.sin.outputs[0], positions=positions,
                        applications=tuple(apps), source_nodes=(cone.cos, cone.sin, *cone.between),
                        handles=handles)

    def _grid_site(self, apps: list[RopeApplication], cone: ConeTrig, layout: Layout, rotary_dim: int,
                   head_dim: int | None) -> RopeSite:
        """Angles made from a patch grid (2-D RoPE), fitted by probing the angle tensor."""
        fit = fit_grid(self.model, cone, apps[0].cos, apps[0].sin)
        axes = fit.axes
        rows, cols = axes.channels_per_axis()
        if axes.normalised:
            note = ("2-D RoPE on grid coordinates normalised by the grid size: the model already adapts to "
                    "resolution, nothing to rescale")
        elif axes.mixed:
            note = f"2-D RoPE, mixed: {axes.axis_of_channel.count(-1)} angle channels read both grid axes"
        else:
            note = f"2-D RoPE, axial: {rows} angle channels read the grid row, {cols} the column"
        source = GridAngles(axes=axes, angle_dtype=fit.angle_dtype, attention_factor=fit.attention_factor)
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=None,
                                inv_freq=None, notes=(note,))
        handles = OnnxAngleHandles(cone.angles, (cone.cos, cone.sin), fit.channel_shape)
        return RopeSite(encoding=encoding, cos=cone.cos.outputs[0], sin=cone.sin.outputs[0], positions=None,
                        applications=tuple(apps), source_nodes=(cone.cos, cone.sin, *cone.between),
                        handles=handles)

    def _cached_site(self, apps: list[RopeApplication], cs: TableSource, ss: TableSource, layout: Layout,
                     rotary_dim: int, head_dim: int | None) -> RopeSite:
        cos_table = table_array(self.fold, cs.table, cs.columns, cs.component)
        sin_table = table_array(self.fold, ss.table, ss.columns, ss.component)
        if cos_table is None or sin_table is None or cos_table.shape != sin_table.shape:
            raise NotUnderstood("cos/sin tables have different or unknown shapes")
        inv_freq, factor = fit_tables(cos_table, sin_table, layout, table_eps(cs.table))
        if 2 * inv_freq.size != rotary_dim:
            raise NotUnderstood(f"cache holds {2 * inv_freq.size} rotary channels but the rotation spans {rotary_dim}")
        sel = cs.select
        positions = sel.inputs[1] if sel.op_type in ("Gather", "GatherElements", "GatherND") else None
        notes: list[str] = []
        base, prior = table_base(inv_freq, None, notes)
        source = CachedTable(
            rows=int(cos_table.shape[0]), dtype=dtype_name(cs.table),
            position_dtype=dtype_name(positions) if positions is not None else "int64", row_selection=sel.op_type,
            attention_factor=factor * cs.factor, cos_columns=cs.columns, sin_columns=ss.columns,
            cos_component=cs.component, sin_component=ss.component,
            cos_scale=cs.factor, sin_scale=ss.factor,
        )
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=base,
                                inv_freq=inv_freq, prior_scaling=prior, notes=tuple(notes))
        handles = OnnxCachedHandles(OnnxTableRead(cs.table, cs.select, cs.scale),
                                    OnnxTableRead(ss.table, ss.select, ss.scale))
        return RopeSite(encoding=encoding, cos=cs.value, sin=ss.value, positions=positions, cos_cache=cs.table,
                        sin_cache=ss.table, applications=tuple(apps), source_nodes=(cs.select, ss.select),
                        handles=handles)


def _with_probe_facts(site: RopeSite, probed: list[ApplicationMatch]) -> RopeSite:
    """The site's encoding with what probing read: identified_by, the xPos decay (q's, growing with position;
    k's is its inverse), the heads of a [.., H·D] rotation."""
    encoding = site.encoding
    decay, read = probed_site_facts([a.decay for a in probed if a.decay is not None], len(site.applications),
                                    {a.num_heads for a in probed if a.num_heads}, encoding.head_dim, NotUnderstood)
    notes = [*encoding.notes, *read]
    sign = _angle_sign(encoding.inv_freq, [a.steps for a in probed])
    if sign < 0:
        notes.append("rotation by -theta (each pair turned the other way: x_f cos + x_s sin): rescaled in angle "
                     "space as any other; checked and fused with sin negated")
    import dataclasses as _dc

    encoding = _dc.replace(encoding, decay=decay, identified_by="probe", notes=tuple(notes), angle_sign=sign)
    return _dc.replace(site, encoding=encoding)


def _wrapped(angle: np.ndarray) -> np.ndarray:
    """Angles modulo 2π in (-π, π]."""
    return np.angle(np.exp(1j * np.asarray(angle, np.float64)))


def _angle_sign(inv_freq: np.ndarray | None, steps: list[np.ndarray | None]) -> int:
    """+1 when the probed rotations turn by +f per position (f: the site's frequencies, read from its angles or
    tables), -1 when they turn by -f (a rotation by -θ; pairs put in the standard orientation by the probe keep
    the sign in their angles). A pair with f ≡ -f (mod 2π) says nothing; a rotation turning some pairs one way and
    some the other, or q and k in opposite directions, is NotUnderstood (q·k would not depend on m - n)."""
    if inv_freq is None:
        return 1
    f = np.asarray(inv_freq, np.float64).reshape(-1)
    # +f and -f are told apart where they lie apart modulo 2π (not f ≈ 0 or π): a pair votes for the one its
    # step is clearly nearer (half-precision cos/sin put ~1e-3 rad of noise on the step)
    separable = np.abs(_wrapped(2 * f)) > 0.05
    signs = set()
    for step in steps:
        if step is None or np.size(step) != f.size:
            continue
        d_plus = np.abs(_wrapped(np.asarray(step) - f))
        d_minus = np.abs(_wrapped(np.asarray(step) + f))
        plus = separable & (d_plus < 0.25 * d_minus)
        minus = separable & (d_minus < 0.25 * d_plus)
        telling = plus | minus
        if not np.any(telling):
            continue
        if np.all(plus[telling]):
            signs.add(1)
        elif np.all(minus[telling]):
            signs.add(-1)
        else:
            raise NotUnderstood("a rotation turning some pairs by +theta and others by -theta")
    if len(signs) > 1:
        raise NotUnderstood("rotations of one cos/sin turning in opposite directions (q·k would not depend on "
                            "m - n)")
    return signs.pop() if signs else 1


def _ensure_ranks(model: ir.Model) -> None:
    """Older exporters (TorchScript) leave intermediate shapes out; the patterns need ranks to tell which
    axis is last. Shape inference is run only then (onnx_ir's pass leaves big weights out of it)."""
    needs = any(
        n.op_type == "Neg" and n.inputs and n.inputs[0] is not None and n.inputs[0].shape is None for n in model.graph
    )
    if needs:
        from onnx_ir.passes.common import ShapeInferencePass

        try:
            ShapeInferencePass()(model)
        except Exception:  # noqa: BLE001 - detection then works with what it has
            pass


def _best_failure(tracer: orp.MatchingTracer) -> str | None:
    """The reason of the failed match that got furthest (highest `MatchInfo.score`: most pattern nodes
    matched), the first of equals; None when no pattern failed with a reason."""
    best, best_score = None, -1
    for infos in tracer.best_matches_map.values():
        for info in infos:
            if (info.status != orp.MatchStatus.SUCCESS and info.match_result.reason
                    and info.score() > best_score):
                best, best_score = info.match_result.reason, info.score()
    return best


def detect_rope(model: ir.Model) -> tuple[list[RopeSite], list[Refusal]]:
    detector = RopeDetector(model)
    sites = detector.detect()
    return sites, detector.refusals
