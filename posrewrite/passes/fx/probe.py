"""RoPE angles on torch.export graphs read by what they compute, as the ONNX side does
(`posrewrite/passes/onnx/rope/probe.py`): the cos/sin of one angle tensor found behind a rotation whatever lies
in between (M-RoPE sections, pairs stacked then indexed), and the rotation's cos/sin evaluated with torch on
probe positions to tell which row of a multi-row position input each frequency reads. Only the cone of those
values runs (program constants and made-up user inputs); no weight is read.
"""

from __future__ import annotations

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
    freq = phi[:, : rotary_dim // 2] if layout == Layout.ROTATE_HALF else phi[:, 0:rotary_dim:2]
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
    for user in image.users:
        if g.is_op(user, aten.conv2d, aten.convolution) and len(user.args) > 3:
            stride = user.args[3]
            return int(max(stride)) if isinstance(stride, list | tuple) else int(stride)
    return 1


def fit_grid(ep: ExportedProgram, angles: Node) -> GridAxes:
    """2-D RoPE: each channel of `angles` fitted as a·row + b·column + c over patch grids made by feeding an
    image input (read only through its size) at two grid sizes."""
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
    (slope1, _), (slope2, _) = fits
    return GridAxes(row_slope=slope1[0], col_slope=slope1[1],
                    normalised=rope_grid.slopes_depend_on_grid(slope1, slope2), probe_grid=rope_grid.PROBE_GRIDS[0])


def trig_factor(trig: Node) -> tuple[Node | None, float]:
    """A scalar multiplication that is the only user of a cos/sin node (an attention factor)."""
    users = list(trig.users)
    if len(users) == 1:
        sm = g.scalar_mul(users[0])
        if sm is not None and sm[0] is trig and math.isfinite(sm[1]):
            return users[0], float(sm[1])
    return None, 1.0


__all__ = ["ProbeFailed", "cone_trig", "evaluate", "fit_grid", "position_rows", "trig_factor"]
