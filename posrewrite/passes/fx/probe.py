"""RoPE angles on torch.export graphs read by what they compute, as the ONNX side does
(`posrewrite/passes/onnx/rope/probe.py`): the cos/sin of one angle tensor found behind a rotation whatever lies
in between (M-RoPE sections, pairs stacked then indexed), and the rotation's cos/sin evaluated with torch on
probe positions to tell which row of a multi-row position input each frequency reads. Only the cone of those
values runs (program constants and made-up user inputs); no weight is read.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math import rope_grid
from posrewrite.passes.fx import _graph as g
from posrewrite.sites.rope import Layout
from posrewrite.sites.rope_axes import GridAxes, PositionRows

aten = torch.ops.aten

_CONE_LIMIT = 400
_EVAL_LIMIT = 4000
_SEQ = 7
_MAX_COPY = 1 << 22


class ProbeFailed(Exception):
    """The probe could not be run or read (the reason is the message)."""


def cone_trig(cos: Node, sin: Node) -> tuple[Node, Node]:
    """The aten.cos and aten.sin nodes of the one angle tensor the rotation's `cos` and `sin` are made from."""
    trig: dict[Node, None] = {}
    stack, seen = [cos, sin], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        if len(seen) > _CONE_LIMIT:
            raise ProbeFailed("no cos/sin within reach of the rotation's cos/sin")
        if g.is_op(node, aten.cos, aten.sin):
            trig[node] = None
            continue
        stack.extend(node.all_input_nodes)
    angles = {n.args[0] for n in trig}
    if len(angles) != 1:
        raise ProbeFailed(f"the rotation's cos/sin read cos/sin of {len(angles)} angle tensors")
    (angle,) = angles
    cos_nodes = [u for u in angle.users if g.is_op(u, aten.cos)]
    sin_nodes = [u for u in angle.users if g.is_op(u, aten.sin)]
    if len(cos_nodes) != 1 or len(sin_nodes) != 1:
        raise ProbeFailed("the angles feed several cos or sin nodes")
    return cos_nodes[0], sin_nodes[0]


def _concrete(v: object, size: int) -> int:
    return int(v) if isinstance(v, int) else size


def _user_inputs(ep: ExportedProgram) -> list[Node]:
    return [n for n in ep.graph.nodes if n.op == "placeholder" and g.placeholder_tensor(ep, n) is None]


def _mutates(node: Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _view_base(node: Node) -> Node:
    """The tensor a chain of views (slice, select, view...) is taken of: an in-place write into the view writes
    into it."""
    for _ in range(64):
        target = node.target if node.op == "call_function" else None
        if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable or not target._schema.arguments:
            return node
        alias = target._schema.arguments[0].alias_info
        if alias is None or not isinstance(node.args[0], Node):
            return node
        node = node.args[0]
    return node


def evaluate(ep: ExportedProgram, targets: list[Node], feeds: dict[Node, torch.Tensor]) -> list[torch.Tensor]:
    """`targets` computed by running their cone with torch in graph order, user inputs taken from `feeds`. An
    in-place op (kept by torch.export, e.g. ``freqs[..., idx] = ...``) on values of the cone runs too."""
    cone: set[Node] = set()

    def add(roots: list[Node]) -> None:
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n in cone:
                continue
            cone.add(n)
            if len(cone) > _EVAL_LIMIT:
                raise ProbeFailed("the cone of the angles is too large to probe")
            stack.extend(n.all_input_nodes)

    add(list(targets))
    grew = True
    while grew:  # in-place writes into a value of the cone (its first argument), with what they write
        grew = False
        for n in ep.graph.nodes:
            if n not in cone and n.op == "call_function" and _mutates(n) and n.args \
                    and isinstance(n.args[0], Node) and _view_base(n.args[0]) in cone:
                add([n])
                grew = True
    env: dict[Node, object] = {}
    with torch.no_grad():
        for n in ep.graph.nodes:
            if n not in cone:
                continue
            if n.op == "placeholder":
                value = feeds.get(n)
                if value is None:
                    value = g.placeholder_tensor(ep, n)
                if value is None:
                    raise ProbeFailed(f"input {n.name} is not fed")
                if value.numel() > _MAX_COPY:
                    raise ProbeFailed(f"{n.name} is a large tensor (a weight), not an angle input")
                env[n] = value.clone()  # an in-place op of the cone must not write into the program
                continue
            if n.op != "call_function":
                raise ProbeFailed(f"{n.op} node {n.name} in the cone")
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
            try:
                env[n] = n.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure means the probe says nothing
                raise ProbeFailed(f"{n.name} cannot be evaluated on probe inputs: {exc}") from None
    out = [env[t] for t in targets]
    if not all(isinstance(t, torch.Tensor) for t in out):
        raise ProbeFailed("a probed value is not a tensor")
    return out


def position_rows(ep: ExportedProgram, positions: Node, cos: Node, sin: Node, layout: Layout,
                  rotary_dim: int) -> PositionRows | None:
    """M-RoPE: the row of a [rows, batch, seq] position input each rotated frequency reads, from the rotation's
    cos/sin at token 1 with one row at a time holding 0..S-1; None for other position inputs."""
    meta = g.val(positions)
    if not isinstance(meta, torch.Tensor) or meta.dim() != 3 or not isinstance(meta.shape[0], int):
        return None
    rows = int(meta.shape[0])
    feeds = {}
    for n in _user_inputs(ep):
        v = g.val(n)
        if isinstance(v, torch.Tensor):
            feeds[n] = torch.zeros([_concrete(d, _SEQ) for d in v.shape], dtype=v.dtype)
    base = feeds.get(positions)
    if base is None or base.shape[-1] != _SEQ:
        raise ProbeFailed(f"position input {positions.name}: its sequence axis is not the last one")
    phis = []
    for r in range(rows):
        p = torch.zeros_like(base)
        p[r] = torch.arange(_SEQ, dtype=p.dtype)
        c, s = evaluate(ep, [cos, sin], {**feeds, positions: p})
        phi = np.arctan2(s.double().numpy(), c.double().numpy())
        axes = [k for k in range(phi.ndim - 1) if phi.shape[k] == _SEQ]
        if not axes:
            raise ProbeFailed("no sequence axis in the probed cos/sin")
        phis.append(phi[tuple(1 if k == axes[-1] else 0 for k in range(phi.ndim - 1))])
    phi = np.stack(phis)
    freq = phi[:, : rotary_dim // 2] if layout != Layout.INTERLEAVED else phi[:, 0:rotary_dim:2]
    nonzero = np.abs(freq) > 1e-9
    if np.any(nonzero.sum(axis=0) > 1):
        raise ProbeFailed("a rotated frequency reads several rows of the position input")
    return PositionRows(rows=rows, row_of_channel=tuple(int(np.argmax(c)) if c.any() else 0 for c in nonzero.T))


def _shape_only_inputs(ep: ExportedProgram, value: Node) -> tuple[list[Node], list[Node]]:
    """User inputs in the cone of `value`: read as data, and read only through their size (sym_size / size)."""
    users = set(_user_inputs(ep))
    data: dict[Node, None] = {}
    shaped: dict[Node, None] = {}
    stack: list[tuple[Node, bool]] = [(value, False)]
    seen: set[tuple[Node, bool]] = set()
    while stack:
        n, via_size = stack.pop()
        if (n, via_size) in seen or len(seen) > _EVAL_LIMIT:
            continue
        seen.add((n, via_size))
        if n in users:
            (shaped if via_size else data)[n] = None
            continue
        size_op = g.is_op(n, aten.sym_size, aten.size) if n.op == "call_function" else False
        stack.extend((a, via_size or size_op) for a in n.all_input_nodes)
    return list(data), [n for n in shaped if n not in data]


def _patch_stride(image: Node) -> int:
    """The stride of the patch embedding reading `image` (through casts and pads), 1 when there is none."""
    stack, seen = [image], set()
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if g.is_op(user, aten.conv2d, aten.convolution) and len(user.args) > 3:
                stride = user.args[3]
                return int(max(stride)) if isinstance(stride, list | tuple) else int(stride)
            if g.is_op(user, *g.CAST_OPS, aten.pad, aten.constant_pad_nd):
                stack.append(user)
    return 1


def fit_grid(ep: ExportedProgram, angles: Node) -> GridAxes:
    """2-D RoPE: each channel of `angles` fitted as a·row + b·column + c over patch grids made by feeding an
    image input (read only through its size) at two grid sizes."""
    return grid_fit(ep, angles).axes


@dataclasses.dataclass(frozen=True)
class GridFit:
    """A 2-D RoPE's angles fitted over patch grids (`grid_fit`)."""

    axes: GridAxes
    channel_shape: tuple[int, ...]  # the angle tensor's shape with its grid axes set to 1


def grid_fit(ep: ExportedProgram, angles: Node) -> GridFit:
    """`fit_grid` with the shape of a per-channel constant that broadcasts on `angles` (1 on the grid axes)."""
    data, shaped = _shape_only_inputs(ep, angles)
    if data:
        raise ProbeFailed(f"angles read input {data[0].name} as data, not only its size")
    candidates = []
    for n in shaped:
        v = g.val(n)
        if isinstance(v, torch.Tensor):
            spatial = [k for k, d in enumerate(v.shape) if k > 0 and not isinstance(d, int)]
            if len(spatial) == 2:
                candidates.append((n, v, spatial))
    if len(candidates) != 1:
        raise ProbeFailed("angles are not made from the two spatial axes of one input")
    image, meta, spatial = candidates[0]
    stride = _patch_stride(image)
    fits = []
    for h, w in rope_grid.PROBE_GRIDS:
        dims = [_concrete(d, 1) for d in meta.shape]
        dims[spatial[0]], dims[spatial[1]] = h * stride, w * stride
        (arr,) = evaluate(ep, [angles], {image: torch.zeros(dims, dtype=meta.dtype)})
        try:
            fits.append(rope_grid.fit_grid_angles(arr.double().numpy(), h, w))
        except ValueError as exc:
            raise ProbeFailed(str(exc)) from None
    (slope1, channel_shape), (slope2, _) = fits
    axes = GridAxes(row_slope=slope1[0], col_slope=slope1[1],
                    normalised=rope_grid.slopes_depend_on_grid(slope1, slope2), probe_grid=rope_grid.PROBE_GRIDS[0])
    return GridFit(axes, tuple(int(d) for d in channel_shape))


@dataclasses.dataclass(frozen=True)
class RowFit:
    """Angles read as pos[row(c)]·f_c by probing (the torch side of the ONNX `probe.RowFit`)."""

    inv_freq: np.ndarray  # float32 [rotary_dim / 2]: each rotated frequency, from the rotation's cos/sin
    channel_freq: np.ndarray  # float64, `channel_shape`: each element's frequency
    channel_shape: tuple[int, ...]  # the angle tensor's shape with its token axis set to 1
    rows: PositionRows | None
    attention_factor: float
    position_dtype: str


def _feeds_for(ep: ExportedProgram, values: list[Node], positions: Node | None) -> tuple[dict[Node, torch.Tensor], str]:
    """Zero feeds for the user inputs the cone of `values` reads (the sequence axis _SEQ long, other symbolic
    axes 1) and the name of the sequence axis' symbol: the last axis of `positions`, else the one symbol of the
    angles' shape."""
    if positions is not None:
        seq = str(g.val(positions).shape[-1])
    else:
        symbols = {str(d) for d in g.val(values[0]).shape if not isinstance(d, int)}
        if len(symbols) != 1:
            raise ProbeFailed("cannot tell the sequence axis of the angles")
        (seq,) = symbols
    feeds: dict[Node, torch.Tensor] = {}
    users = set(_user_inputs(ep))
    for n in _cone_user_inputs(values, users):
        v = g.val(n)
        if not isinstance(v, torch.Tensor):
            raise ProbeFailed(f"input {n.name} is not a tensor")
        dims = [d if isinstance(d, int) else (_SEQ if str(d) == seq else 1) for d in v.shape]
        feeds[n] = torch.zeros(dims, dtype=v.dtype)
    return feeds, seq


def _cone_user_inputs(values: list[Node], users: set[Node]) -> list[Node]:
    found: dict[Node, None] = {}
    stack, seen = list(values), set()
    while stack:
        n = stack.pop()
        if n in seen or len(seen) > _EVAL_LIMIT:
            continue
        seen.add(n)
        if n in users:
            found[n] = None
            continue
        stack.extend(n.all_input_nodes)
    return list(found)


def reads_user_inputs(ep: ExportedProgram, values: list[Node]) -> bool:
    """Whether `values` depend on any user input (as data or through its size)."""
    return bool(_cone_user_inputs(values, set(_user_inputs(ep))))


def position_input(ep: ExportedProgram, angles: Node) -> Node | None:
    """The integer user input of rank 2 or 3 the angles read as data (positions), when there is exactly one."""
    data, _ = _shape_only_inputs(ep, angles)
    ints = [n for n in data if isinstance(g.val(n), torch.Tensor) and not g.val(n).dtype.is_floating_point
            and g.val(n).dim() in (2, 3)]
    return ints[0] if len(ints) == 1 and len(data) == 1 else None


def fit_rows(ep: ExportedProgram, angles: Node, cos: Node, sin: Node, layout: Layout, rotary_dim: int) -> RowFit:
    """Each element of the angle tensor fitted as pos·f along its token axis (zero at position 0), with positions
    from an integer position input (one probe per row, that row 0..S-1) or made from an input's length; each
    rotated frequency read from the rotation's own cos/sin at token 1. ProbeFailed when the angles are not
    linear in the positions."""
    data, _ = _shape_only_inputs(ep, angles)
    positions = position_input(ep, angles)
    if data and positions is None:
        raise ProbeFailed(f"angles read input {data[0].name} as data, not a position input")
    feeds, _ = _feeds_for(ep, [angles, cos, sin], positions)
    if positions is None:
        runs = [evaluate(ep, [angles, cos, sin], feeds)]
        base = torch.zeros_like(runs[0][0])
        rows = 0
    else:
        zero = feeds[positions]
        base = evaluate(ep, [angles], feeds)[0]
        rows = int(zero.shape[0]) if zero.dim() == 3 else 1
        if rows > 8:
            raise ProbeFailed(f"position input {positions.name}: {rows} rows")
        runs = []
        for r in range(rows):
            p = torch.zeros_like(zero)
            (p[r] if zero.dim() == 3 else p)[...] = torch.arange(_SEQ, dtype=p.dtype)
            runs.append(evaluate(ep, [angles, cos, sin], {**feeds, positions: p}))
    base_np = base.double().numpy()
    if np.max(np.abs(base_np), initial=0.0) > 1e-6:
        raise ProbeFailed("the angles are not 0 at position 0 (an offset the probe does not model)")
    deltas = [r[0].double().numpy() - base_np for r in runs]
    token, freq = rope_grid.read_position_deltas(deltas, _SEQ, 1.0, ProbeFailed)
    phi = sum(_token_vector(np.arctan2(r[2].double().numpy(), r[1].double().numpy())) for r in runs)
    if phi.shape[0] < rotary_dim:
        raise ProbeFailed(f"the rotation's cos has {phi.shape[0]} channels, fewer than rotary_dim {rotary_dim}")
    inv = phi[: rotary_dim // 2] if layout != Layout.INTERLEAVED else phi[0:rotary_dim:2]
    c0, s0 = runs[0][1].double().numpy(), runs[0][2].double().numpy()
    amplitude = np.sqrt(c0 ** 2 + s0 ** 2)
    factor = 1.0
    if amplitude.size and np.ptp(amplitude) <= 1e-5 * max(float(np.max(amplitude)), 1.0):
        factor = float(np.median(amplitude))
    row_fit = None
    if positions is not None and rows > 1:
        row_fit = position_rows(ep, positions, cos, sin, layout, rotary_dim)
    dtype = str(g.dtype(positions) if positions is not None else g.dtype(angles)).replace("torch.", "")
    return RowFit(np.asarray(inv, np.float32), freq, tuple(freq.shape), row_fit, factor, dtype)


def _token_vector(arr: np.ndarray, token: int = 1) -> np.ndarray:
    axes = [k for k in range(arr.ndim - 1) if arr.shape[k] == _SEQ]
    if not axes:
        raise ProbeFailed(f"no sequence axis of size {_SEQ} in the probed cos/sin {arr.shape}")
    return arr[tuple(token if k == axes[-1] else 0 for k in range(arr.ndim - 1))]


def trig_factor(trig: Node) -> tuple[Node | None, float]:
    """A scalar multiplication that is the only user of a cos/sin node (an attention factor)."""
    users = list(trig.users)
    if len(users) == 1:
        sm = g.scalar_mul(users[0])
        if sm is not None and sm[0] is trig and math.isfinite(sm[1]):
            return users[0], float(sm[1])
    return None, 1.0


__all__ = ["GridFit", "ProbeFailed", "RowFit", "cone_trig", "evaluate", "fit_grid", "fit_rows", "grid_fit",
           "position_input", "position_rows", "reads_user_inputs", "trig_factor"]
