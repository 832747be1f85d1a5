"""The angles of a RoPE found by what they compute: the angle tensor (the one input of the Cos/Sin nodes behind a
rotation's cos and sin) evaluated on probe position inputs, and each channel's angle fitted as a function of the
positions. No weight is read: only the cone of the angle tensor is evaluated (onnx's reference ops, through
`ConstantEvaluator`), with made-up values for the graph inputs it depends on.

Two position forms are probed:

- **position rows** (an integer input of shape [batch, seq] or [rows, batch, seq], e.g. HF's ``position_ids`` and
  Qwen2-VL's 3-row M-RoPE ``position_ids``): one probe per row, that row holding 0..S-1 and the others 0. The
  rotation's cos/sin read at token 1 give, per rotated frequency, which row it reads and its frequency
  (`position_rows`).
- **a patch grid** (no position input: the angles are made from the spatial size of an image input, 2-D RoPE):
  the image is fed at two grids of different sizes and shapes; each angle channel is fitted as
  a·row + b·column + c over the grid (`fit_grid`). Slopes that change with the grid size mean coordinates
  normalised by the grid (the model adapts to resolution by itself).

`cone_trig` finds the angle tensor structurally only as far as needed: whatever sits between the Cos/Sin and the
rotation (sections picked per row, sin and cos concatenated then split, repeats) is not read, only evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from posrewrite.math import rope_grid
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, model_opset
from posrewrite.passes.onnx.rope.tables import NotUnderstood
from posrewrite.sites.rope import Layout
from posrewrite.sites.rope_axes import GridAxes, PositionRows

#: nodes walked upstream from a rotation's cos/sin looking for the Cos/Sin nodes (a bounded search)
_CONE_LIMIT = 400
#: nodes a probe evaluation may run (the angle cone is small; a bigger one is not an angle computation)
_EVAL_LIMIT = 4000
#: the probe sequence length and grids: sizes unlikely to equal a channel count (odd, prime)
_SEQ = 7
_SEQ_2 = 13  # a second probe length (the token axis is the one that follows the length)
#: elements a probe input may hold (a static axis of 2**40 positions is refused, not allocated)
_MAX_PROBE_ELEMENTS = 1 << 24
_GRIDS = rope_grid.PROBE_GRIDS


@dataclasses.dataclass(frozen=True)
class ConeTrig:
    """The Cos and Sin nodes of one angle tensor behind a rotation's cos and sin, and the nodes in between."""

    angles: ir.Value
    cos: ir.Node
    sin: ir.Node
    factor: float  # a constant scalar Mul right after both Cos and Sin (an attention factor), else 1
    cos_scale: ir.Node | None
    sin_scale: ir.Node | None
    between: tuple[ir.Node, ...]  # nodes from the Cos/Sin outputs to the rotation's operands


def cone_trig(cos: ir.Value, sin: ir.Value, fold: ConstantEvaluator) -> ConeTrig:
    """The single angle tensor whose Cos and Sin the rotation's `cos` and `sin` operands are made of, found by a
    bounded upstream search; NotUnderstood when there is none or several."""
    trig: dict[int, ir.Node] = {}
    between: dict[int, ir.Node] = {}
    stack, seen = [cos, sin], set()
    while stack:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _CONE_LIMIT:
            raise NotUnderstood("no Cos/Sin within reach of the rotation's cos/sin")
        if node.op_type in ("Cos", "Sin") and node.domain in ("", "ai.onnx"):
            trig[id(node)] = node
            continue
        between[id(node)] = node
        stack.extend(i for i in node.inputs if i is not None)
    angle_values = {id(n.inputs[0]): n.inputs[0] for n in trig.values()}
    if not angle_values:
        raise NotUnderstood("the rotation's cos/sin are not made from a Cos/Sin of angles")
    if len(angle_values) != 1:
        raise NotUnderstood(f"the rotation's cos/sin read Cos/Sin of {len(angle_values)} different angle tensors")
    angles = next(iter(angle_values.values()))
    cos_nodes = [u.node for u in angles.uses() if u.node.op_type == "Cos"]
    sin_nodes = [u.node for u in angles.uses() if u.node.op_type == "Sin"]
    if len(cos_nodes) != 1 or len(sin_nodes) != 1:
        raise NotUnderstood(f"angles {angles.name} feed {len(cos_nodes)} Cos and {len(sin_nodes)} Sin nodes")
    cos_node, sin_node = cos_nodes[0], sin_nodes[0]
    cs, cf = _scalar_after(cos_node, fold)
    ss, sf = _scalar_after(sin_node, fold)
    if (cs is None) != (ss is None) or not np.isclose(cf, sf, rtol=1e-6):
        cs = ss = None
        cf = 1.0
    # only the nodes on paths from the trig outputs to the operands (not the position computation beside them)
    downstream = _downstream({id(cos_node): cos_node, id(sin_node): sin_node}, between)
    return ConeTrig(angles, cos_node, sin_node, cf, cs, ss, tuple(downstream))


def _scalar_after(node: ir.Node, fold: ConstantEvaluator) -> tuple[ir.Node | None, float]:
    """A Mul by a constant scalar that is the only reader of the Cos/Sin output (an attention factor)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Mul":
        return None, 1.0
    mul = uses[0].node
    other = mul.inputs[1 - uses[0].idx]
    arr = fold(other)
    if arr is None or arr.size != 1:
        return None, 1.0
    return mul, float(np.asarray(arr).reshape(-1)[0])


def _downstream(trig: dict[int, ir.Node], candidates: dict[int, ir.Node]) -> list[ir.Node]:
    """The candidates that read (directly or through other candidates) an output of a trig node."""
    reached: dict[int, ir.Node] = {}
    stack = [out for n in trig.values() for out in n.outputs]
    while stack:
        v = stack.pop()
        for use in v.uses():
            n = use.node
            if id(n) in candidates and id(n) not in reached:
                reached[id(n)] = n
                stack.extend(n.outputs)
    return list(reached.values())


# -- graph inputs of a cone ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConeInputs:
    """The graph inputs a value depends on: read as data, or only through their shape."""

    data: tuple[ir.Value, ...]
    shape_only: tuple[ir.Value, ...]


def cone_inputs(model: ir.Model, values: Iterable[ir.Value]) -> ConeInputs:
    graph_inputs = {id(v) for v in model.graph.inputs}
    data: dict[int, ir.Value] = {}
    shaped: dict[int, ir.Value] = {}
    stack = [(v, False) for v in values]
    seen: set[tuple[int, bool]] = set()
    while stack:
        v, via_shape = stack.pop()
        if v is None or (id(v), via_shape) in seen:
            continue
        seen.add((id(v), via_shape))
        if id(v) in graph_inputs:
            (shaped if via_shape else data)[id(v)] = v
            continue
        node = v.producer()
        if node is None:
            continue
        shape_op = node.op_type in ("Shape", "Size")
        stack.extend((i, via_shape or shape_op) for i in node.inputs if i is not None)
    return ConeInputs(tuple(data.values()), tuple(v for k, v in shaped.items() if k not in data))


def _np_dtype(value: ir.Value) -> np.dtype:
    try:
        return np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
    except Exception:  # noqa: BLE001 - an exotic dtype: zeros of float32 say nothing wrong about a shape
        return np.dtype(np.float32)


def _zeros(value: ir.Value, sizes: dict[str, int], default: int = 1) -> np.ndarray | None:
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) else sizes.get(str(d), default) for d in value.shape]
    if math.prod(dims) > _MAX_PROBE_ELEMENTS:  # a huge static size is never materialised
        raise NotUnderstood(f"graph input {value.name} {value.shape} is too large to probe")
    return np.zeros(dims, dtype=_np_dtype(value))


def _evaluator(model: ir.Model, feeds: dict[int, np.ndarray]) -> ConstantEvaluator:
    return ConstantEvaluator(model_opset(model), feed=lambda v: feeds.get(id(v)), inputs=model.graph.inputs,
                             max_nodes=_EVAL_LIMIT)


# -- position rows (1-D RoPE and M-RoPE) -----------------------------------------------------------------


def position_input(model: ir.Model, angles: ir.Value) -> ir.Value | None:
    """The integer graph input the angles read as data (positions), when there is exactly one."""
    found = cone_inputs(model, [angles])
    ints = [v for v in found.data if v.dtype is not None and not v.dtype.is_floating_point()
            and v.shape is not None and len(v.shape) in (2, 3)]
    return ints[0] if len(ints) == 1 else None


def _row_probes(model: ir.Model, values: list[ir.Value], positions: ir.Value) -> list[list[np.ndarray | None]]:
    """`values` evaluated at positions all 0 (first), then with row r = 0..S-1 and the others 0, per row."""
    shape = positions.shape
    rows = shape[0] if len(shape) == 3 else 1
    if not isinstance(rows, int) or rows < 1 or rows > 8:
        raise NotUnderstood(f"position input {positions.name}: {rows} rows")
    sizes = {str(shape[-1]): _SEQ}
    inputs = cone_inputs(model, values)
    base = {}
    for v in (*inputs.data, *inputs.shape_only):
        z = _zeros(v, sizes)
        if z is None:
            raise NotUnderstood(f"graph input {v.name} has no shape to probe with")
        base[id(v)] = z
    pos_zero = base.get(id(positions))
    if pos_zero is None or pos_zero.shape[-1] != _SEQ:
        raise NotUnderstood(f"position input {positions.name}: its sequence axis is not the last one")
    results = []
    for r in range(-1, rows):
        feeds = dict(base)
        p = np.zeros_like(pos_zero)
        if r >= 0:
            if len(shape) == 3:
                p[r] = np.arange(_SEQ, dtype=p.dtype)
            else:
                p[...] = np.arange(_SEQ, dtype=p.dtype)
        feeds[id(positions)] = p
        fold = _evaluator(model, feeds)
        results.append([fold(v) for v in values])
    return results


def position_rows(model: ir.Model, positions: ir.Value, cos: ir.Value, sin: ir.Value, layout: Layout,
                  rotary_dim: int) -> PositionRows | None:
    """Which row of a multi-row position input each rotated frequency reads (M-RoPE), from the rotation's own
    cos and sin at token 1 (angle = atan2(sin, cos)); None for a one-row input. NotUnderstood when a frequency
    reads several rows or the probe cannot be evaluated."""
    shape = positions.shape
    if shape is None or len(shape) != 3:
        return None
    probes = _row_probes(model, [cos, sin], positions)
    if any(a is None for probe in probes for a in probe):
        raise NotUnderstood(f"the rotation's cos/sin cannot be evaluated on probe values of {positions.name}")
    rows = len(probes) - 1
    phis = []
    for c_arr, s_arr in probes[1:]:
        phis.append(_token_step(c_arr, s_arr))
    phi = np.stack(phis)  # [rows, channels]
    if phi.shape[1] < rotary_dim:
        raise NotUnderstood(f"the rotation's cos has {phi.shape[1]} channels, fewer than rotary_dim {rotary_dim}")
    half = rotary_dim // 2
    freq = phi[:, :half] if layout == Layout.ROTATE_HALF else phi[:, 0:rotary_dim:2]
    nonzero = np.abs(freq) > 1e-9
    if np.any(nonzero.sum(axis=0) > 1):
        raise NotUnderstood("a rotated frequency reads several rows of the position input")
    row_of = tuple(int(np.argmax(col)) if col.any() else 0 for col in nonzero.T)
    return PositionRows(rows=rows, row_of_channel=row_of)


def _token_row(arr: np.ndarray, token: int) -> np.ndarray:
    """The channel vector (last axis) at `token` of the sequence axis (the last axis of size _SEQ before the
    channels), first index along every other axis."""
    arr = np.asarray(arr, dtype=np.float64)
    axes = [k for k in range(arr.ndim - 1) if arr.shape[k] == _SEQ]
    if not axes:
        raise NotUnderstood(f"no sequence axis of size {_SEQ} in the probed cos/sin {arr.shape}")
    index = tuple(token if k == axes[-1] else 0 for k in range(arr.ndim - 1))
    return arr[index]


@dataclasses.dataclass(frozen=True)
class RowFit:
    """Angles read as pos[row(c)]·f_c from probes of a position input."""

    inv_freq: np.ndarray  # float32 [rotary_dim / 2]: each rotated frequency, from the rotation's cos/sin
    channel_freq: np.ndarray  # float64, the angle tensor's channel shape: each element's frequency
    channel_shape: tuple[int, ...]  # the angle tensor's shape with its token axis set to 1
    rows: PositionRows | None  # multi-row positions (M-RoPE)
    attention_factor: float


def fit_rows(model: ir.Model, trig: ConeTrig, positions: ir.Value, cos: ir.Value, sin: ir.Value, layout: Layout,
             rotary_dim: int) -> RowFit:
    """Each element of the angle tensor fitted as pos·f along its token axis (zero at position 0), and each
    rotated frequency read from the rotation's own cos/sin at token 1; NotUnderstood when the angles are not
    linear in the positions."""
    probes = _row_probes(model, [trig.angles, cos, sin], positions)
    if any(a is None for probe in probes for a in probe):
        raise NotUnderstood(f"angles {trig.angles.name} cannot be evaluated on probe values of {positions.name}")
    # θ = f·pos + c: a phase offset c (positions shifted inside the model) is allowed; a rescale multiplies the
    # whole angle, i.e. f·s'·(pos + c/f): the offset is a position like any other (interpolated with them)
    base = np.asarray(probes[0][0], np.float64)
    deltas = [np.asarray(p[0], np.float64) - base for p in probes[1:]]
    token, freq = rope_grid.read_position_deltas(
        deltas, _SEQ, max(1.0, float(np.max(np.abs(base), initial=0.0))), NotUnderstood)
    phi = sum(_token_step(p[1], p[2]) for p in probes[1:])
    if phi.shape[0] < rotary_dim:
        raise NotUnderstood(f"the rotation's cos has {phi.shape[0]} channels, fewer than rotary_dim {rotary_dim}")
    inv = unalias(phi[: rotary_dim // 2] if layout == Layout.ROTATE_HALF else phi[0:rotary_dim:2], freq)
    c0, s0 = (np.asarray(a, np.float64) for a in probes[0][1:])
    amplitude = np.sqrt(c0 ** 2 + s0 ** 2)
    factor = trig.factor
    if trig.cos_scale is None and amplitude.size and np.ptp(amplitude) <= 1e-5 * max(float(np.max(amplitude)), 1.0):
        factor = float(np.median(amplitude))
    rows = position_rows(model, positions, cos, sin, layout, rotary_dim) if len(positions.shape) == 3 else None
    return RowFit(np.asarray(inv, np.float32), freq, tuple(freq.shape), rows, factor)


def _token_step(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Per channel, the angle the rotation's cos/sin turn by from token 0 to token 1 (the frequency, modulo 2π),
    whatever the angle at token 0 (a phase offset)."""
    c1, s1 = _token_row(cos, 1), _token_row(sin, 1)
    c0, s0 = _token_row(cos, 0), _token_row(sin, 0)
    return np.arctan2(s1 * c0 - c1 * s0, c1 * c0 + s1 * s0)


def unalias(step: np.ndarray, channel_freq: np.ndarray) -> np.ndarray:
    """The frequencies of the angle tensor (`channel_freq`, exact: read as slopes) that the rotation's per-token
    steps (`step`, modulo 2π) are: at integer positions f and f + 2πk turn the same, so a frequency above π
    (rotary-embedding-torch's pixel frequencies, up to max_freq/2·π) is read back from the angle tensor. A step
    matching none of them is kept as read."""
    known = np.unique(np.asarray(channel_freq, np.float64).reshape(-1))
    known = known[known != 0]
    out = np.asarray(step, np.float64).copy()
    for k, phi in enumerate(out):
        if known.size == 0:
            break
        wrapped = np.abs((known - phi + np.pi) % (2 * np.pi) - np.pi)
        tol = 1e-4 * np.maximum(np.abs(known), 1.0)
        hits = known[wrapped <= tol]
        if hits.size:
            out[k] = hits[np.argmin(np.abs(hits - phi))]  # the nearest (no aliasing) where several fit
    return out


def frequency_ratio(channel_freq: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """new/old for each element of `channel_freq`, matched to the nearest of the `old` frequencies (1 where an
    element does not rotate); NotUnderstood when an element matches none."""
    f = np.abs(np.asarray(channel_freq, np.float64))
    old = np.abs(np.asarray(old, np.float64))
    ratio = np.ones(f.shape)
    flat, out = f.reshape(-1), ratio.reshape(-1)
    for k, v in enumerate(flat):
        if v == 0:
            continue
        i = int(np.argmin(np.abs(old - v)))
        if abs(old[i] - v) > 1e-4 * v:
            raise NotUnderstood(f"an angle channel's frequency {v:.6g} is none of the rotation's")
        out[k] = float(new[i]) / old[i]
    return ratio


# -- affine positions: a phase offset, positions made from the length alone --------------------------------


def _call_feeds(model: ir.Model, values: list[ir.Value], length: int) -> dict[int, np.ndarray]:
    """Feeds for a call over `length` positions (batch 1) of the graph inputs `values` depend on."""
    from posrewrite.passes.onnx._graph import call_input

    inputs = cone_inputs(model, values)
    feeds = {}
    for v in (*inputs.data, *inputs.shape_only):
        if v.shape is None:
            raise NotUnderstood(f"graph input {v.name} has no shape to probe with")
        static = [d for d in v.shape.dims if isinstance(d, int)]
        if math.prod(static) * length > _MAX_PROBE_ELEMENTS:  # a huge static size is never materialised
            raise NotUnderstood(f"graph input {v.name} {v.shape} is too large to probe")
        feeds[id(v)] = call_input(v, 1, length)
    return feeds


def angle_offsets(model: ir.Model, angles: ir.Value, inv_freq: np.ndarray) -> np.ndarray | None:
    """Per frequency of `inv_freq`, the position b_c of the first token when the angles are f_c·(t + b_c) (positions
    an affine map of the index: an offset added inside the model, coordinates from -1 to 1): the angle tensor
    evaluated on a call over positions 0..S-1 (no weight read), each element's angle at token 0 divided by its
    step per token. None when every angle is 0 at token 0 (the usual RoPE) or the angle tensor cannot be
    evaluated alone; NotUnderstood when elements of one frequency disagree."""
    try:
        arr = _evaluator(model, _call_feeds(model, [angles], _SEQ))(angles)
        if arr is None or not np.any(np.asarray(arr) != 0):
            return None
        other = _evaluator(model, _call_feeds(model, [angles], _SEQ_2))(angles)
    except NotUnderstood:
        return None
    if other is None or np.ndim(other) != np.ndim(arr):
        return None
    arr = np.asarray(arr, np.float64)
    # the token axis: the one axis whose size follows the call's length (never a channel axis of the same size)
    axes = [k for k in range(arr.ndim) if arr.shape[k] == _SEQ and np.shape(other)[k] == _SEQ_2]
    if len(axes) != 1:
        return None
    token = axes[0]
    first = np.moveaxis(np.take(arr, [0], axis=token), token, -1).reshape(-1)
    step = np.moveaxis(np.take(arr, [1], axis=token), token, -1).reshape(-1) - first
    if np.max(np.abs(first), initial=0.0) <= 1e-7 * max(1.0, float(np.max(np.abs(step), initial=0.0))):
        return None
    out = np.zeros(np.asarray(inv_freq).size)
    for k, f in enumerate(np.asarray(inv_freq, np.float64)):
        mine = np.abs(np.abs(step) - abs(f)) <= 1e-4 * abs(f)
        if not mine.any():
            raise NotUnderstood(f"no element of the angle tensor turns by the frequency {f:.6g} per token")
        b = first[mine] / step[mine]
        if np.ptp(b) > 1e-4 * max(1.0, float(np.max(np.abs(b)))):
            raise NotUnderstood("angle elements of one frequency start at different positions")
        out[k] = float(np.median(b))
    return out


@dataclasses.dataclass(frozen=True)
class LengthFit:
    """1-D angles made from the sequence length alone (no position input), fitted as a·t + c per element."""

    inv_freq: np.ndarray  # float32 [rotary_dim / 2]: per rotated frequency, its turn per token
    channel_freq: np.ndarray  # float64, the angle tensor's channel shape: each element's turn per token
    channel_shape: tuple[int, ...]
    normalised: bool  # the turn per token changes with the length (coordinates divided by the length)
    attention_factor: float


def _length_symbol(model: ir.Model, angles: ir.Value) -> tuple[ir.Value, str]:
    """The one symbolic dimension of the graph inputs that changes the angle tensor's shape (the sequence)."""
    found = cone_inputs(model, [angles])
    if found.data:
        raise NotUnderstood(f"angles read graph input {found.data[0].name} as data, not only its shape")
    symbols = []
    for v in found.shape_only:
        for d in v.shape.dims if v.shape is not None else ():
            if not isinstance(d, int) and str(d) not in [s for _, s in symbols]:
                symbols.append((v, str(d)))
    hits = []
    for v, sym in symbols:
        feeds = {}
        for u in found.shape_only:
            z = _zeros(u, {sym: _SEQ})
            if z is None:
                raise NotUnderstood(f"graph input {u.name} has no shape to probe with")
            feeds[id(u)] = z
        arr = _evaluator(model, feeds)(angles)
        if arr is not None and _SEQ in np.shape(arr):
            hits.append((v, sym))
    if len(hits) != 1:
        raise NotUnderstood("angles are not made from the length of one sequence axis")
    return hits[0]


def fit_length(model: ir.Model, trig: ConeTrig, cos: ir.Value, sin: ir.Value, layout: Layout,
               rotary_dim: int) -> LengthFit:
    """Each element of the angle tensor fitted as a·t + c over the tokens t of calls at two lengths, and each
    rotated frequency read from the rotation's own cos/sin (its turn from token 0 to 1, un-aliased against the
    angle tensor's slopes); NotUnderstood when the angles are not affine in the token index."""
    _, sym = _length_symbol(model, trig.angles)
    found = cone_inputs(model, [trig.angles, cos, sin])
    slopes = []
    phi = None
    factor = trig.factor
    for n in (_SEQ, _SEQ_2):
        feeds = {}
        for u in (*found.data, *found.shape_only):
            z = _zeros(u, {sym: n})
            if z is None:
                raise NotUnderstood(f"graph input {u.name} has no shape to probe with")
            feeds[id(u)] = z
        fold = _evaluator(model, feeds)
        arr, c_arr, s_arr = fold(trig.angles), fold(cos), fold(sin)
        if arr is None or c_arr is None or s_arr is None:
            raise NotUnderstood(f"angles {trig.angles.name} cannot be evaluated at {n} tokens")
        arr = np.asarray(arr, np.float64)
        token = max((k for k in range(arr.ndim) if arr.shape[k] == n), default=None)
        if token is None:
            raise NotUnderstood(f"no token axis of size {n} in the probed angles {arr.shape}")
        steps = np.arange(n).reshape([-1 if k == token else 1 for k in range(arr.ndim)])
        first = np.take(arr, [0], axis=token)
        slope = np.take(arr, [1], axis=token) - first
        scale = max(1.0, float(np.max(np.abs(arr), initial=0.0)))
        if np.max(np.abs(arr - first - slope * steps), initial=0.0) > 1e-5 * scale:
            raise NotUnderstood("the angles are not affine in the token index")
        slopes.append(slope)
        if phi is None:
            if n != _SEQ:
                raise NotUnderstood("internal: first probe length")
            phi = _token_step(c_arr, s_arr)
            c0, s0 = np.asarray(c_arr, np.float64), np.asarray(s_arr, np.float64)
            amplitude = np.sqrt(c0 ** 2 + s0 ** 2)
            if trig.cos_scale is None and amplitude.size and \
                    np.ptp(amplitude) <= 1e-5 * max(float(np.max(amplitude)), 1.0):
                factor = float(np.median(amplitude))
    freq = slopes[0]
    normalised = rope_grid.slopes_depend_on_grid(slopes[0].reshape(1, -1), slopes[1].reshape(1, -1))
    if phi.shape[0] < rotary_dim:
        raise NotUnderstood(f"the rotation's cos has {phi.shape[0]} channels, fewer than rotary_dim {rotary_dim}")
    inv = unalias(phi[: rotary_dim // 2] if layout == Layout.ROTATE_HALF else phi[0:rotary_dim:2], freq)
    return LengthFit(np.asarray(inv, np.float32), freq, tuple(freq.shape), bool(normalised), factor)


# -- patch grids (2-D RoPE) ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridFit:
    axes: GridAxes
    channel_shape: tuple[int, ...]  # the angle tensor's shape with its grid axes set to 1
    angle_dtype: str
    attention_factor: float


def _grid_input(model: ir.Model, angles: ir.Value) -> tuple[ir.Value, tuple[int, int], int]:
    """The image input whose spatial size makes the grid, its two spatial axes and the patch stride."""
    found = cone_inputs(model, [angles])
    if found.data:
        raise NotUnderstood(f"angles read graph input {found.data[0].name} as data, not only its shape")
    candidates = []
    for v in found.shape_only:
        if v.shape is None:
            continue
        spatial = [k for k, d in enumerate(v.shape) if k > 0 and not isinstance(d, int)]
        if len(spatial) == 2:
            candidates.append((v, (spatial[0], spatial[1])))
    if len(candidates) != 1:
        raise NotUnderstood("angles are not made from the two spatial axes of one input")
    image, spatial = candidates[0]
    return image, spatial, _patch_stride(image, spatial)


def _patch_stride(image: ir.Value, spatial: tuple[int, int]) -> int:
    """The stride of the patch embedding reading `image` (a Conv's stride), 1 when there is none."""
    stack, seen = [image], set()
    while stack:
        v = stack.pop()
        for use in v.uses():
            n = use.node
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv":
                strides = n.attributes.get("strides")
                if strides is not None:
                    return int(max(strides.value))
                return 1
            if n.op_type in ("Cast", "Identity", "Pad"):
                stack.extend(n.outputs)
    return 1


def fit_grid(model: ir.Model, trig: ConeTrig, cos: ir.Value, sin: ir.Value) -> GridFit:
    """Each channel of the angle tensor fitted as a·row + b·column + c over patch grids of two sizes."""
    image, spatial, stride = _grid_input(model, trig.angles)
    fits = []
    factor = trig.factor
    for k, (h, w) in enumerate(_GRIDS):
        sizes = {str(image.shape[spatial[0]]): h * stride, str(image.shape[spatial[1]]): w * stride}
        feeds = {}
        for v in (image,):
            z = _zeros(v, sizes)
            if z is None:
                raise NotUnderstood(f"graph input {v.name} has no shape to probe with")
            feeds[id(v)] = z
        fold = _evaluator(model, feeds)
        arr = fold(trig.angles)
        if arr is None:
            raise NotUnderstood(f"angles {trig.angles.name} cannot be evaluated on a {h}x{w} probe grid")
        try:
            fits.append(rope_grid.fit_grid_angles(np.asarray(arr, np.float64), h, w))
        except ValueError as exc:
            raise NotUnderstood(str(exc)) from None
        if k == 0 and trig.cos_scale is None:
            c_arr, s_arr = fold(cos), fold(sin)
            if c_arr is not None and s_arr is not None:
                amplitude = np.sqrt(np.asarray(c_arr, np.float64) ** 2 + np.asarray(s_arr, np.float64) ** 2)
                if amplitude.size and np.ptp(amplitude) <= 1e-5 * max(float(np.max(amplitude)), 1.0):
                    factor = float(np.median(amplitude))
    (slope1, channel_shape), (slope2, _) = fits
    normalised = rope_grid.slopes_depend_on_grid(slope1, slope2)
    axes = GridAxes(row_slope=slope1[0], col_slope=slope1[1], normalised=bool(normalised), probe_grid=_GRIDS[0])
    return GridFit(axes, channel_shape, dtype_name(trig.angles), factor)


__all__ = ["ConeTrig", "GridFit", "LengthFit", "RowFit", "angle_offsets", "cone_trig", "fit_grid", "fit_length",
           "fit_rows", "frequency_ratio", "position_input", "position_rows", "unalias"]
