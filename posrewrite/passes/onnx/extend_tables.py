"""Lets models with length-limited position encodings run past their training length.

Per kind (sites from `detect_other.py`):
- learned absolute: the table gets N interpolated rows after its original ones; positions read the
  original rows while the sequence fits the trained length L, and the interpolated block (position p reads
  trained position p / S, S = N / L or --pos-scale) past it. Logits within L are unchanged.
- sinusoidal constant table: rows regenerated up to N with the same formula (original rows kept as they
  are); --pos-scale S divides positions (all rows). Computed sinusoids run at any length; S divides
  positions. Arange buffers that positions are sliced from (BERT) are regenerated to N.
- ALiBi: computed from the runtime sequence it extrapolates as is; a bias baked as a table of L keys is
  regenerated for N keys (original columns kept) and the Slice bounds computed from L are moved to N.
  --alibi-scale S divides distances (slopes / S, arXiv 2310.13017).
- T5 relative bias: runs at any length (distances past max_distance share the last bucket).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.limits import MEMORY_BUDGET_BYTES, fits_budget
from posrewrite.math.absolute import interpolate_table, sinusoidal_table
from posrewrite.passes.onnx._build import NodeWriter, add_initializer
from posrewrite.passes.onnx._graph import numpy_dtype
from posrewrite.pipeline import PipelineContext, ReportingPass
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.other import AlibiSite, LearnedAbsoluteSite, SinusoidalSite, T5BiasSite
from posrewrite.sites.rope import RopeSite

__all__ = ["ExtendTablesPass", "extend_square_masks"]

_LENGTH_OPS = frozenset({"Add", "Sub", "Mul", "Max", "Min", "Neg", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Cast"})


class ExtendTablesPass(ReportingPass):
    """Extends the ALiBi / learned / sinusoidal / T5 sites to `max_positions` (see module doc).

    ``sites``: the sites to extend; None: the non-RoPE sites of the model as the pass finds it (the pipeline's
    cached detection). After `call`, `changes` lists what was rewritten and `notes` what was left as is and
    why (also appended to the context's report, the changes as other-encoding claims).
    """

    def __init__(
        self,
        sites: Sequence[EncodingSite] | None = None,
        *,
        max_positions: int | None = None,
        pos_scale: float | None = None,
        alibi_scale: float | None = None,
        context: PipelineContext | None = None,
    ) -> None:
        super().__init__(context)
        if max_positions is not None and max_positions < 1:
            raise ValueError("max_positions must be positive")
        for name, v in (("pos_scale", pos_scale), ("alibi_scale", alibi_scale)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive")
        self.sites = None if sites is None else list(sites)
        self.max_positions = max_positions
        self.pos_scale = pos_scale
        self.alibi_scale = alibi_scale

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        sites = self.sites
        if sites is None:
            sites = [s for s in self.context.detection(model).sites if not isinstance(s, RopeSite)]
        for site in sites:
            if isinstance(site, LearnedAbsoluteSite):
                modified |= self._learned(model.graph, site)
            elif isinstance(site, SinusoidalSite):
                modified |= self._sinusoidal(model.graph, site)
            elif isinstance(site, AlibiSite):
                modified |= self._alibi(model.graph, site)
            elif isinstance(site, T5BiasSite):
                self.notes.append(
                    f"T5 relative bias {site.table.name}: runs at any length as is (distances past "
                    f"max_distance={site.max_distance} share the last bucket)"
                )
        self.context.report.other_changes.extend(self.changes)
        return ir.passes.PassResult(model, modified)


    # -- learned absolute ----------------------------------------------------------------------------
    def _target(self, trained: int) -> tuple[int, float] | None:
        """(rows of the new block, position scale) or None when nothing is asked past `trained`."""
        if self.max_positions is None and self.pos_scale is None:
            return None
        scale = self.pos_scale if self.pos_scale is not None else self.max_positions / trained
        n = self.max_positions if self.max_positions is not None else math.ceil(trained * scale)
        if n <= trained and self.pos_scale is None:
            return None
        return n, scale

    def _learned(self, graph: ir.Graph, site: LearnedAbsoluteSite) -> bool:
        L = site.max_positions
        target = self._target(L)
        if target is None:
            self.notes.append(f"learned table {site.table.name}: {L} positions already cover the request")
            return False
        if any(r.op_type != "Gather" for r in site.reads):
            self.notes.append(f"learned table {site.table.name}: read by Slice, not extended (not implemented)")
            return False
        n, scale = target
        old = site.table.const_value.numpy()
        block = interpolate_table(old, site.offset + n, site.offset, scale=scale)[site.offset :]
        new_table = np.concatenate([old, block.astype(old.dtype)], axis=0)
        table = _replace_initializer(graph, site.table, new_table)
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
        self._extend_buffer(graph, site.position_buffer, site.offset + n)
        self._extend_indexed_buffers(graph, site.indices, site.table, site.offset + L, site.offset + n)
        self.changes.append(
            f"learned table {site.table.name} -> {table.name}: {L} trained rows + {n} interpolated rows "
            f"(position p reads trained position p/{scale:g}) used when the sequence is longer than {L}; "
            f"offset rows ({site.offset}) kept"
        )
        self.notes.append(
            f"learned table {site.table.name}: interpolated rows are an approximation (as for ViT position "
            f"tables); quality past {L} tokens is not what the model was trained for"
        )
        return True

    def _extend_buffer(self, graph: ir.Graph, buffer: ir.Value | None, rows: int) -> None:
        """Regenerates an arange buffer that positions are sliced from (BERT's position_ids)."""
        if buffer is None or buffer.const_value is None:
            return
        arr = buffer.const_value.numpy()
        flat = arr.reshape(-1)
        if arr.shape[-1] != flat.size or not np.array_equal(flat, flat[0] + np.arange(flat.size)):
            self.notes.append(f"position buffer {buffer.name} is not an arange: left as is")
            return
        if flat.size >= rows:
            return
        new = (flat[0] + np.arange(rows)).astype(arr.dtype).reshape(arr.shape[:-1] + (rows,))
        _replace_initializer(graph, buffer, new)
        self.changes.append(f"position buffer {buffer.name}: arange of {flat.size} -> {rows}")

    def _extend_indexed_buffers(self, graph, indices, table, old: int, new: int) -> None:
        """Other constants read by the same positions (BERT's token_type_ids buffer, gathered by
        position_ids) would fail past `old` too: they are padded with their last column."""
        for idx in indices:
            for use in list(idx.uses()):
                node = use.node
                if node.op_type not in ("Gather", "GatherElements") or use.idx != 1:
                    continue
                data, _ = _through(node.inputs[0])
                c = data.const_value
                if data is table or c is None or data.shape is None or old not in tuple(data.shape):
                    continue
                arr = c.numpy()
                axis = len(arr.shape) - 1 - list(reversed(arr.shape)).index(old)
                pad = [(0, 0)] * arr.ndim
                pad[axis] = (0, max(new, old) - old)
                _replace_initializer(graph, data, np.pad(arr, pad, mode="edge"))
                self.changes.append(f"buffer {data.name} read by positions: {old} -> {new} (last column repeated)")

    # -- sinusoidal ----------------------------------------------------------------------------------
    def _sinusoidal(self, graph: ir.Graph, site: SinusoidalSite) -> bool:
        if site.source == "computed":
            if self.pos_scale is None or self.pos_scale == 1:
                self.notes.append("computed sinusoidal encoding: runs at any length as is")
                return False
            x = site.sin.producer().inputs[0]
            prod = x.producer()
            k = list(prod.inputs).index(site.positions_value)
            w = NodeWriter(graph, prod, "sin_pos_scale")
            scaled = w.op(
                "Mul", site.positions_value, w.const(np.array(1.0 / self.pos_scale), dtype=site.positions_value.dtype)
            )
            scaled.dtype = site.positions_value.dtype
            w.commit()
            prod.replace_input_with(k, scaled)
            self.changes.append(f"computed sinusoidal encoding: positions divided by {self.pos_scale:g}")
            return True
        L = site.max_positions
        target = self._target(L)
        if target is None:
            self.notes.append(f"sinusoidal table {site.table.name}: {L} positions already cover the request")
            return False
        n, _ = target
        old = site.table.const_value.numpy()
        axis = 0 if len(old.shape) == 2 else next(k for k, r in enumerate(old.shape) if r == site.offset + L)
        old2 = np.moveaxis(old, axis, 0)
        rows = site.offset + max(n, L)
        scale = 1.0 if self.pos_scale is None else float(self.pos_scale)
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
        _replace_initializer(graph, site.table, np.moveaxis(new2, 0, axis))
        self._extend_buffer(graph, site.position_buffer, rows)
        how = "same formula" + ("" if scale == 1.0 else f", positions divided by {scale:g}")
        self.changes.append(f"sinusoidal table {site.table.name}: {L} -> {rows - site.offset} positions ({how})")
        return True

    # -- ALiBi ---------------------------------------------------------------------------------------
    def _alibi(self, graph: ir.Graph, site: AlibiSite) -> bool:
        modified = False
        scale = 1.0 if self.alibi_scale is None else float(self.alibi_scale)
        if site.source == "computed":
            self.notes.append(
                "ALiBi is built from the runtime sequence: it extrapolates past the training length as is"
            )
            if scale != 1.0:
                _scale_slopes(graph, site, scale)
                self.changes.append(f"ALiBi slopes divided by {scale:g} (distances / {scale:g})")
                modified = True
            return modified
        L = site.max_positions
        n = max(L, self.max_positions or L)
        if n == L and scale == 1.0:
            self.notes.append(f"ALiBi table {site.table.name}: baked for {L} keys; pass --max-positions to extend")
            return False
        old = site.table.const_value.numpy()
        axis = site.table_axis
        m32 = (site.slopes / scale).astype(np.float32)
        j = np.arange(n, dtype=np.float32)
        d = j - np.float32(n - 1) if site.form == "anchored" else j
        lead = [s for s in old.shape[:axis]] + list(old.shape[axis + 1 :])
        values = (m32[:, None] * d[None, :]).astype(old.dtype)  # float32 product as the exporters compute it
        new = values.reshape(tuple(lead) + (n,)) if axis == len(old.shape) - 1 else None
        if new is None:
            self.notes.append(f"ALiBi table {site.table.name}: key axis is not the last one, not extended")
            return False
        if scale == 1.0:  # keep the original columns bit for bit
            if site.form == "anchored":
                new[..., n - L :] = old
            else:
                new[..., :L] = old
        _replace_initializer(graph, site.table, new)
        moved = sum(_retarget_length(graph, s, L, n) for s in site.slices)
        self.changes.append(
            f"ALiBi table {site.table.name}: {L} -> {n} keys"
            + (f", slopes / {scale:g}" if scale != 1.0 else "")
            + (f"; {moved} Slice bound(s) computed from {L} now use {n}" if moved else "")
        )
        return True


class ExtendSquareMasksPass(ReportingPass):
    """--max-positions: causal masks baked as [T, T] constants grow to ``rows`` (`extend_square_masks`)."""

    def __init__(self, rows: int, context: PipelineContext | None = None) -> None:
        super().__init__(context)
        self.rows = int(rows)

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        self.changes.extend(extend_square_masks(model.graph, self.rows))
        self.context.report.other_changes.extend(self.changes)
        return ir.passes.PassResult(model, bool(self.changes))


def _toeplitz_values(square: np.ndarray) -> np.ndarray | None:
    """f(d) for d = -(T-1)..T-1 when square[i, j] == f(i - j) for every i, j; None otherwise."""
    t = square.shape[0]
    f = np.concatenate([square[0, :0:-1], square[:, 0]])  # d = -(T-1)..-1 from row 0, then 0..T-1
    i, j = np.indices(square.shape)
    if not np.array_equal(f[i - j + t - 1], square):
        return None
    return f


def extend_square_masks(graph: ir.Graph, rows: int) -> list[str]:
    """Constant causal / sliding-window masks baked at the training length (GPT-Neo's ``bias`` buffer, older
    GPT-2 and GPT-NeoX exports): a [.., T, T] constant with two values that depends only on i - j and is
    read through Slice fails past T like a position table. It is rebuilt at `rows` x `rows` by the same rule
    (distances beyond T-1 take the value at T-1: causal stays causal, a window narrower than T stays
    closed). Returns one line per extended mask."""
    changes = []
    for value in list(graph.initializers.values()):
        shape = value.shape
        if value.const_value is None or shape is None or len(shape) < 2 or not shape.is_static():
            continue
        t = shape[-1]
        if shape[-2] != t or t >= rows or t < 2 or any(d != 1 for d in list(shape)[:-2]):
            continue
        uses = list(value.uses())
        if not uses or any(_through_users(u.node) != "Slice" for u in uses):
            continue
        square = value.const_value.numpy().reshape(t, t)
        if np.unique(square).size > 2:
            continue
        f = _toeplitz_values(square)
        if f is None:
            continue
        if not fits_budget((rows, rows), square.dtype.itemsize):
            raise UsageError(
                f"--max-positions {rows}: the {t}x{t} mask {value.name} would become {rows}x{rows} "
                f"({rows * rows * square.dtype.itemsize / 2**30:.3g} GiB), over the memory budget of "
                f"{MEMORY_BUDGET_BYTES >> 20} MiB (see README, Reliability)"
            )
        # g[k] = the value at distance i - j = k - (rows - 1); row i of the new mask is g[i + rows - 1 - j] for
        # j = 0..rows-1, a window of g reversed: only the rows x rows result is allocated
        g = f[np.clip(np.arange(-(rows - 1), rows), -(t - 1), t - 1) + t - 1]
        windows = np.lib.stride_tricks.sliding_window_view(g[::-1], rows)[::-1]
        new = np.ascontiguousarray(windows, dtype=square.dtype).reshape(tuple(list(shape)[:-2]) + (rows, rows))
        replaced = _replace_initializer(graph, value, new)
        slices = _forget_shapes(replaced, t)
        moved = sum(_retarget_length(graph, node, t, rows) for node in slices)  # bounds like min(seq, T)
        bounds = f", {moved} slice bound(s) computed from {t} moved to {rows}" if moved else ""
        changes.append(f"mask {value.name} -> {replaced.name}: {t}x{t} -> {rows}x{rows} (same rule in i - j){bounds}")
    return changes


def _forget_shapes(value: ir.Value, old: int, depth: int = 4) -> list[ir.Node]:
    """Shapes recorded by the exporter on the slices of a grown constant may hold its old size as a static
    dim, which onnxruntime would trust: they are dropped (onnxruntime infers them again). Returns the
    Slice nodes met on the way."""
    slices: list[ir.Node] = []
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type not in ("Slice", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
                    continue
                if node.op_type == "Slice" and node not in slices:
                    slices.append(node)
                for out in node.outputs:
                    if out.shape is not None and any(d == old for d in out.shape):
                        out.shape = None
                    nxt.append(out)
        frontier = nxt
    return slices


def _through_users(node: ir.Node) -> str:
    """The op type reached from `node` through shape-only ops (Slice of a Cast of a mask counts as Slice)."""
    for _ in range(4):
        if node.op_type not in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
            return node.op_type
        users = [u.node for out in node.outputs for u in out.uses()]
        if len(users) != 1:
            return node.op_type
        node = users[0]
    return node.op_type


def _through(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    path = []
    while (node := value.producer()) is not None and node.op_type in (
        "Expand",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Cast",
    ):
        path.append(node)
        value = node.inputs[0]
    return value, path


def _replace_initializer(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> ir.Value:
    new = add_initializer(graph, array, (old.name or "table").replace(".", "_"), old.dtype)
    ir.convenience.replace_all_uses_with(old, new)
    for k, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[k] = new
    if old.name in graph.initializers and not list(old.uses()):
        graph.initializers.pop(old.name)
    return new


def _scale_slopes(graph: ir.Graph, site: AlibiSite, scale: float) -> None:
    mul = site.product
    k = list(mul.inputs).index(site.slopes_value)
    w = NodeWriter(graph, mul, "alibi_scale")
    scaled = w.op("Mul", site.slopes_value, w.const(np.array(1.0 / scale), dtype=site.slopes_value.dtype))
    scaled.dtype = site.slopes_value.dtype
    w.commit()
    mul.replace_input_with(k, scaled)


def _retarget_length(graph: ir.Graph, slice_node: ir.Node, old: int, new: int) -> int:
    """Slice bounds computed from the table length (MPT: start = max(0, L - key_length)) are recomputed
    with the new length: the arithmetic path from a constant equal to `old` to the bound is cloned with
    `new` in its place (the original nodes may serve other consumers). Returns how many bounds moved."""
    moved = 0
    for k in (1, 2):
        if k >= len(slice_node.inputs) or slice_node.inputs[k] is None:
            continue
        bound = slice_node.inputs[k]
        path = _path_to_constant(bound, old)
        if path is None:
            continue
        w = NodeWriter(graph, slice_node, "alibi_len")
        new_bound = _clone_with(w, bound, path, old, new, {})
        w.commit()
        slice_node.replace_input_with(k, new_bound)
        moved += 1
    return moved


def _clone_with(w: NodeWriter, v: ir.Value, path: set[ir.Node], old: int, new: int, clones: dict) -> ir.Value:
    """Copy of the computation of `v` restricted to `path`, with the constant `old` replaced by `new`."""
    if id(v) in clones:
        return clones[id(v)]
    c = v.const_value
    if c is not None and c.size == 1 and int(c.numpy().reshape(-1)[0]) == old:
        out = w.const(np.full(tuple(c.shape), new, dtype=c.numpy().dtype))
    elif v.producer() is not None and v.producer() in path:
        node = v.producer()
        attrs = {a.name: a.value for a in node.attributes.values()}
        inputs = [_clone_with(w, i, path, old, new, clones) if i is not None else None for i in node.inputs]
        out = w.op(node.op_type, *inputs, **attrs)
        out.dtype = v.dtype
    else:
        out = v
    clones[id(v)] = out
    return out


def _path_to_constant(value: ir.Value, target: int, depth: int = 8) -> set[ir.Node] | None:
    """Nodes on integer-arithmetic paths from a scalar constant equal to `target` to `value`."""
    c = value.const_value
    if c is not None:
        return set() if c.size == 1 and int(c.numpy().reshape(-1)[0]) == target else None
    node = value.producer()
    if node is None or node.op_type not in _LENGTH_OPS or depth == 0:
        return None
    found: set[ir.Node] | None = None
    for inp in node.inputs:
        if inp is None:
            continue
        sub = _path_to_constant(inp, target, depth - 1)
        if sub is not None:
            found = (found or set()) | sub
    return None if found is None else found | {node}
