"""Finds absolute position encodings: learned and sinusoidal tables read by position, and sinusoids
computed in the graph.

- tables: a constant 2-D (or sliced N-D) float table read by Gather with positions, or by a Slice cut to the
  runtime length, whose result is added to activations. The probe input (see `detect_other.py`) gives the
  positions' offset (OPT's +2, RoBERTa's padding_idx + 1); a table that fits the sinusoid formula is
  sinusoidal, any other is learned.
- computed: [sin(x) | cos(x)] (concatenated or interleaved) with x = positions x constant frequencies.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite.math.absolute import fit_frequencies, fit_sinusoidal
from posrewrite.passes.onnx._graph import dtype_name
from posrewrite.passes.onnx.detect_other import (
    PROBE_LENGTH,
    DetectionContext,
    SinCosConcat,
    SinCosStack,
    TableGather,
    TableSlice,
    cone_ops,
    pattern_matches,
    position_source,
    reaches_add,
    sin_tolerance,
    unit_progression,
)
from posrewrite.sites.absolute import LearnedAbsoluteSite, SinusoidalSite
from posrewrite.sites.base import EncodingSite, Refusal

__all__ = ["detect_position_tables", "detect_computed_sinusoids"]


def detect_position_tables(ctx: DetectionContext) -> tuple[list[EncodingSite], list[Refusal]]:
    """Learned and sinusoidal tables read by position, and the tables that look like one but were not
    understood (read by positions that are not consecutive, or with different offsets)."""
    return _Tables(ctx).run()


@dataclasses.dataclass
class _TableReads:
    """The reads of one constant table by position; the first read gives how positions are formed."""

    table: ir.Value
    source: str  # "range" | "mask_cumsum" | "constant" | "input" (see `position_source`)
    buffer: ir.Value | None  # the arange initializer positions are sliced from, if any
    axis: int  # the table's position axis
    reads: list[ir.Node] = dataclasses.field(default_factory=list)
    indices: list[ir.Value] = dataclasses.field(default_factory=list)
    offsets: set[int] = dataclasses.field(default_factory=set)


class _Tables:
    """Reads of constant tables by position, gathered per table, then classified per table."""

    def __init__(self, ctx: DetectionContext) -> None:
        self.model = ctx.model
        self.probe = ctx.probe
        self.const = ctx.const
        self.sites: list[EncodingSite] = []
        self.refusals: list[Refusal] = []
        self._tables: dict[int, _TableReads] = {}  # id(table) -> its reads by position

    def run(self) -> tuple[list[EncodingSite], list[Refusal]]:
        for node, b in pattern_matches(TableGather(), self.model):
            table, indices = b["table"], b["indices"]
            if not self._is_table(table) or (node.attributes.get("axis") and node.attributes["axis"].value != 0):
                continue
            if len(table.shape) != 2:
                continue
            ops, _, _ = cone_ops(indices)
            if "Log" in ops and table.shape[1] <= 256 and table.shape[0] <= 4096:
                continue  # a bucketed relative bias; found from the scores side (T5)
            if not reaches_add(node.outputs[0]):
                continue  # not an additive encoding (RoPE cos/sin caches are multiplied with q and k)
            idx = self.probe(indices)
            offset = unit_progression(idx)
            if offset is None:
                varies = idx is not None and np.ndim(idx) and idx.size > 1 and np.unique(idx).size > 1
                if {"Range", "CumSum"} & ops and varies and idx.shape[-1] >= 3:  # else token (type) ids
                    self.refusals.append(
                        Refusal(
                            "learned_absolute",
                            node.name or table.name,
                            f"table {table.name} is read by positions that are not consecutive "
                            f"({idx.reshape(-1)[:6].tolist()}...)",
                        )
                    )
                continue  # token / token-type embeddings
            source, buffer = position_source(indices)
            self._add_read(table, node, indices, offset, source, buffer)
        for node, b in pattern_matches(TableSlice(), self.model):
            table = b["table"]
            if not self._is_table(table) or len(table.shape) < 2 or not reaches_add(node.outputs[0]):
                continue
            axis = self._sliced_axis(node)
            if axis is None or table.shape[axis] < 8:
                continue
            dims = [d for k, d in enumerate(table.shape) if k != axis and d != 1]
            if len(dims) != 1:
                continue
            starts, ends = self.probe(node.inputs[1]), self.probe(node.inputs[2])
            if starts is None or ends is None or int(np.reshape(starts, -1)[0]) != 0:
                continue
            if int(np.reshape(ends, -1)[0]) != PROBE_LENGTH:
                continue  # not cut to the runtime length
            self._add_read(table, node, None, 0, "range", None, axis=axis)
        for info in self._tables.values():
            self._classify_table(info)
        return self.sites, self.refusals

    def _is_table(self, table: ir.Value) -> bool:
        return (
            table is not None
            and table.const_value is not None
            and table.dtype is not None
            and table.dtype.is_floating_point()
            and table.shape is not None
        )

    def _sliced_axis(self, node: ir.Node) -> int | None:
        rank = len(node.inputs[0].shape)
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = self.const(node.inputs[3])
            if axes is None or axes.size != 1:
                return None
            return int(axes.reshape(-1)[0]) % rank
        starts = node.inputs[1].shape
        return 0 if starts is not None and starts[0] == 1 else None

    def _add_read(
        self,
        table: ir.Value,
        node: ir.Node,
        indices: ir.Value | None,
        offset: int,
        source: str,
        buffer: ir.Value | None,
        axis: int = 0,
    ) -> None:
        reads = self._tables.setdefault(id(table), _TableReads(table, source, buffer, axis))
        reads.reads.append(node)
        if indices is not None:
            reads.indices.append(indices)
        reads.offsets.add(offset)

    def _classify_table(self, info: _TableReads) -> None:
        table = info.table
        if len(info.offsets) != 1:
            self.refusals.append(
                Refusal("learned_absolute", table.name, f"read with different offsets {sorted(info.offsets)}")
            )
            return
        offset = info.offsets.pop()
        arr = np.moveaxis(table.const_value.numpy(), info.axis, 0)
        arr2 = arr.reshape(arr.shape[0], -1)
        rows, dim = arr2.shape
        common = dict(
            offset=offset,
            positions=info.source,
            dtype=dtype_name(table),
            table=table,
            reads=tuple(info.reads),
            position_buffer=info.buffer,
        )
        fit = fit_sinusoidal(arr2.astype(np.float64), atol=sin_tolerance(table))
        if fit is not None:
            self.sites.append(
                SinusoidalSite(
                    max_positions=rows - offset,
                    dim=dim,
                    base=fit["base"],
                    layout=fit["layout"],
                    frequency_rule=fit["rule"],
                    frequencies=fit["frequencies"],
                    source="constant",
                    **common,
                )
            )
            return
        if offset >= rows:
            self.refusals.append(Refusal("learned_absolute", table.name, f"offset {offset} past the {rows} rows"))
            return
        self.sites.append(LearnedAbsoluteSite(rows=rows, dim=dim, indices=tuple(info.indices), **common))


def detect_computed_sinusoids(ctx: DetectionContext) -> tuple[list[SinusoidalSite], list[Refusal]]:
    """Sinusoids computed in the graph and added to activations, and the sin/cos pairs whose argument is
    not positions x constant frequencies."""
    sites: list[SinusoidalSite] = []
    refusals: list[Refusal] = []
    for pattern, layout in ((SinCosStack(), "interleaved"), (SinCosConcat(), "concat")):
        for node, b in pattern_matches(pattern, ctx.model):
            concat = node if node.op_type == "Concat" else node.inputs[0].producer()
            axis = concat.attributes["axis"].value if "axis" in concat.attributes else None
            rank = len(concat.outputs[0].shape) if concat.outputs[0].shape is not None else None
            if axis is None or rank is None or axis % rank != rank - 1:
                continue
            out = node.outputs[0]
            if not reaches_add(out) or any(s.sin is not None and s.sin is b["x"] for s in sites):
                continue
            found = _computed_sinusoid(ctx, node, b["x"], layout)
            (refusals if isinstance(found, Refusal) else sites).append(found)
    return sites, refusals


def _computed_sinusoid(ctx: DetectionContext, node: ir.Node, x: ir.Value, layout: str) -> SinusoidalSite | Refusal:
    prod = x.producer()
    where = node.name or x.name
    if prod is None or prod.op_type not in ("Mul", "Div", "MatMul"):
        return Refusal("sinusoidal", where, "sin/cos argument is not positions x frequencies")
    freqs = positions = None
    for k in (0, 1):
        f = ctx.const(prod.inputs[1 - k])
        if f is not None and ctx.const(prod.inputs[k]) is None:
            freqs = f.astype(np.float64).reshape(-1)
            if prod.op_type == "Div":
                freqs = 1.0 / freqs
            positions = prod.inputs[k]
            break
    if freqs is None:
        return Refusal("sinusoidal", where, "frequencies are not constant")
    pos_vals = ctx.probe(positions)
    offset = None
    if pos_vals is not None:
        flat = np.asarray(pos_vals)
        flat = flat.reshape(-1, flat.shape[-1]) if flat.shape[-1] > 1 else flat.reshape(1, -1)
        if np.allclose(flat, np.round(flat)):
            offset = unit_progression(np.round(flat).astype(np.int64))
    dim = 2 * freqs.size
    base, rule = fit_frequencies(freqs, dim) or (None, "custom")
    source, _ = position_source(positions)
    sin = next((u.node.outputs[0] for u in x.uses() if u.node.op_type == "Sin"), None)
    cos = next((u.node.outputs[0] for u in x.uses() if u.node.op_type == "Cos"), None)
    notes = () if offset is not None else ("positions are not consecutive integers on the probe input",)
    return SinusoidalSite(
        max_positions=None,
        dim=dim,
        base=base,
        layout=layout,
        frequency_rule=rule,
        frequencies=freqs,
        offset=offset or 0,
        source="computed",
        positions=source,
        dtype=dtype_name(node.outputs[0]),
        reads=(node,),
        positions_value=positions,
        sin=sin,
        cos=cos,
        notes=notes,
    )
