"""Learned and sinusoidal position encodings run past their training length (`rewrite --max-positions`,
`--pos-scale`); called per site by `ExtendTablesPass`.

- learned absolute: the table gets N interpolated rows after its original ones; positions read the
  original rows while the sequence fits the trained length L, and the interpolated block (position p reads
  trained position p / S, S = N / L or --pos-scale) past it. Logits within L are unchanged.
- sinusoidal constant table: rows regenerated up to N with the same formula (original rows kept as they
  are); --pos-scale S divides positions (all rows). Computed sinusoids run at any length; S divides
  positions. Arange buffers that positions are sliced from (BERT) are regenerated to N.

Each function returns (changes, notes): what was rewritten, and what was left as is and why; a site was
rewritten exactly when a change is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite.math.absolute import interpolate_table, sinusoidal_table
from posrewrite.passes.onnx._build import NodeWriter, divide_input, replace_initializer
from posrewrite.passes.onnx._graph import numpy_dtype, trace_through
from posrewrite.sites.absolute import LearnedAbsoluteSite, SinusoidalSite

__all__ = ["extend_learned", "extend_sinusoidal"]

_VIEWS = ("Expand", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast")  # between a buffer and its Gather


def _target(trained: int, max_positions: int | None, pos_scale: float | None) -> tuple[int, float] | None:
    """(rows of the new block, position scale) or None when nothing is asked past `trained`."""
    if max_positions is None and pos_scale is None:
        return None
    scale = pos_scale if pos_scale is not None else max_positions / trained
    n = max_positions if max_positions is not None else math.ceil(trained * scale)
    if n <= trained and pos_scale is None:
        return None
    return n, scale


def extend_learned(
    graph: ir.Graph, site: LearnedAbsoluteSite, *, max_positions: int | None, pos_scale: float | None
) -> tuple[list[str], list[str]]:
    """Interpolated rows past the trained ones, read only when the sequence is longer than the trained length
    (see module doc)."""
    L = site.max_positions
    target = _target(L, max_positions, pos_scale)
    if target is None:
        return [], [f"learned table {site.table.name}: {L} positions already cover the request"]
    if any(r.op_type != "Gather" for r in site.reads):
        return [], [f"learned table {site.table.name}: read by Slice, not extended (not implemented)"]
    n, scale = target
    old = site.table.const_value.numpy()
    block = interpolate_table(old, site.offset + n, site.offset, scale=scale)[site.offset :]
    new_table = np.concatenate([old, block.astype(old.dtype)], axis=0)
    table = replace_initializer(graph, site.table, new_table)
    first = site.offset
    for gather, idx in zip(site.reads, site.indices, strict=False):
        w = NodeWriter(graph, gather, "learned_pos")
        top = w.op("ReduceMax", idx, keepdims=0)
        past = w.op("Greater", top, w.const(np.array(first + L - 1, dtype=numpy_dtype(idx.dtype))))
        real = w.op("GreaterOrEqual", idx, w.const(np.array(first, dtype=numpy_dtype(idx.dtype))))
        shifted = w.op("Add", idx, w.const(np.array(L, dtype=numpy_dtype(idx.dtype))))
        new_idx = w.op("Where", w.op("And", past, real), shifted, idx)
        for node in w.nodes:
            node.outputs[0].dtype = (
                ir.DataType.BOOL if node.op_type in ("Greater", "GreaterOrEqual", "And") else idx.dtype
            )
        w.commit()
        gather.replace_input_with(1, new_idx)
    changes, notes = _extend_buffer(graph, site.position_buffer, site.offset + n)
    changes += _extend_indexed_buffers(graph, site.indices, site.table, site.offset + L, site.offset + n)
    changes.append(
        f"learned table {site.table.name} -> {table.name}: {L} trained rows + {n} interpolated rows "
        f"(position p reads trained position p/{scale:g}) used when the sequence is longer than {L}; "
        f"offset rows ({site.offset}) kept"
    )
    notes.append(
        f"learned table {site.table.name}: interpolated rows are an approximation (as for ViT position "
        f"tables); quality past {L} tokens is not what the model was trained for"
    )
    return changes, notes


def _extend_buffer(graph: ir.Graph, buffer: ir.Value | None, rows: int) -> tuple[list[str], list[str]]:
    """Regenerates an arange buffer that positions are sliced from (BERT's position_ids)."""
    if buffer is None or buffer.const_value is None:
        return [], []
    arr = buffer.const_value.numpy()
    flat = arr.reshape(-1)
    if arr.shape[-1] != flat.size or not np.array_equal(flat, flat[0] + np.arange(flat.size)):
        return [], [f"position buffer {buffer.name} is not an arange: left as is"]
    if flat.size >= rows:
        return [], []
    new = (flat[0] + np.arange(rows)).astype(arr.dtype).reshape(arr.shape[:-1] + (rows,))
    replace_initializer(graph, buffer, new)
    return [f"position buffer {buffer.name}: arange of {flat.size} -> {rows}"], []


def _extend_indexed_buffers(
    graph: ir.Graph, indices: Sequence[ir.Value], table: ir.Value, old: int, new: int
) -> list[str]:
    """Other constants read by the same positions (BERT's token_type_ids buffer, gathered by
    position_ids) would fail past `old` too: they are padded with their last column."""
    changes = []
    for idx in indices:
        for use in list(idx.uses()):
            node = use.node
            if node.op_type not in ("Gather", "GatherElements") or use.idx != 1:
                continue
            data, _ = trace_through(node.inputs[0], _VIEWS)
            c = data.const_value
            if data is table or c is None or data.shape is None or old not in tuple(data.shape):
                continue
            arr = c.numpy()
            axis = len(arr.shape) - 1 - list(reversed(arr.shape)).index(old)
            pad = [(0, 0)] * arr.ndim
            pad[axis] = (0, max(new, old) - old)
            replace_initializer(graph, data, np.pad(arr, pad, mode="edge"))
            changes.append(f"buffer {data.name} read by positions: {old} -> {new} (last column repeated)")
    return changes


def extend_sinusoidal(
    graph: ir.Graph, site: SinusoidalSite, *, max_positions: int | None, pos_scale: float | None
) -> tuple[list[str], list[str]]:
    """A constant table regenerated to `max_positions` rows by its own formula, positions divided by
    `pos_scale`; a computed sinusoid only gets its positions divided (see module doc)."""
    if site.source == "computed":
        if pos_scale is None or pos_scale == 1:
            return [], ["computed sinusoidal encoding: runs at any length as is"]
        x = site.sin.producer().inputs[0]
        divide_input(graph, x.producer(), site.positions_value, pos_scale, "sin_pos_scale")
        return [f"computed sinusoidal encoding: positions divided by {pos_scale:g}"], []
    L = site.max_positions
    target = _target(L, max_positions, pos_scale)
    if target is None:
        return [], [f"sinusoidal table {site.table.name}: {L} positions already cover the request"]
    n, _ = target
    old = site.table.const_value.numpy()
    axis = 0 if len(old.shape) == 2 else next(k for k, r in enumerate(old.shape) if r == site.offset + L)
    old2 = np.moveaxis(old, axis, 0)
    rows = site.offset + max(n, L)
    scale = 1.0 if pos_scale is None else float(pos_scale)
    kw = dict(layout=site.layout, frequencies=site.frequencies)
    if scale == 1.0:
        extra = sinusoidal_table(rows - old2.shape[0], site.dim, start=old2.shape[0], **kw)
        new2 = np.concatenate([old2, extra.reshape((-1,) + old2.shape[1:]).astype(old.dtype)], axis=0)
    else:  # positions p -> p / S for every row past the offset rows
        pos = np.arange(rows, dtype=np.float64)
        pos[site.offset :] = site.offset + (pos[site.offset :] - site.offset) / scale
        full = sinusoidal_table(rows, site.dim, **kw)  # rows at integer positions, replaced below
        ang = pos[:, None] * site.frequencies[None, :]
        if site.layout == "interleaved":
            full[:, 0::2], full[:, 1::2] = np.sin(ang), np.cos(ang)
        else:
            full[:, : site.dim // 2], full[:, site.dim // 2 :] = np.sin(ang), np.cos(ang)
        full[: site.offset] = old2[: site.offset].reshape(site.offset, -1)
        new2 = full.reshape((rows,) + old2.shape[1:]).astype(old.dtype)
    replace_initializer(graph, site.table, np.moveaxis(new2, 0, axis))
    changes, notes = _extend_buffer(graph, site.position_buffer, rows)
    how = "same formula" + ("" if scale == 1.0 else f", positions divided by {scale:g}")
    changes.append(f"sinusoidal table {site.table.name}: {L} -> {rows - site.offset} positions ({how})")
    return changes, notes
