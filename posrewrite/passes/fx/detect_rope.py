"""Finding RoPE in ATen graphs of `torch.export` programs.

A rotation is recognised from its arithmetic, not from names or fixed literals:

    output = x * cos + rotate(x) * sin          (add; either operand order of every add/mul)
    output = x * cos - rotate'(x) * sin         (sub, with rotate' = -rotate)

``rotate`` is one of the forms in `ROTATIONS` (data, not copies of a rule): rotate-half
``cat([-x[h:], x[:h]])`` and interleaved ``flatten(stack([-x[1::2], x[0::2]], -1))``, with halves taken by
``slice`` or ``split``/``chunk`` and negation by ``neg`` or ``mul(-1)``. Slice bounds are read from the
graph and checked against the head size found in the tensors' shapes. A partial rotation is
``cat([rotation(x[..., :r]), x[..., r:]])``.

Rotations sharing cos/sin are grouped by their angle source, traced up from cos/sin through views, casts,
broadcasts, duplications (``cat([f, f])``, ``repeat_interleave``) and attention-factor multiplications to
either ``cos(positions x inv_freq)`` (computed; inv_freq a buffer/constant or a constant expression) or a
table placeholder gathered by positions (cached).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math import rope_fit
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx import probe as fx_probe
from posrewrite.passes.fx._graph import aten
from posrewrite.passes.fx.sites import (
    FxAngleHandles,
    FxComputedHandles,
    FxRopeApplication,
    FxRopeSite,
    FxTableHandles,
    FxTrigHandles,
    Layout,
)
from posrewrite.passes.rotation_reading import probed_site_facts
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import (
    CachedTable,
    ComputedAngles,
    GridAngles,
    InvFreqOrigin,
    ProbedAngles,
    RopeEncoding,
)


class NotUnderstood(Exception):
    """A cos/sin source detection cannot describe; the message is the refusal's reason."""


#: why a table site is not rescaled (the fx side reads tables but does not fit them)
TABLE_NOTE = "cos/sin are read from a precomputed table"
#: why computed angles without a constant inv_freq are not rescaled
RUNTIME_NOTE = "angles are not positions x a constant inv_freq"
#: meta key on the nodes a run-time rescale (dynamic, longrope) writes: their angles are not probed as pos·f
RUNTIME_META = "posrewrite_runtime_inv_freq"

__all__ = ["ROTATIONS", "RUNTIME_META", "detect_rope", "match_rotation", "trace_angle_source"]


# --------------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rotation:
    """``node`` computes ``sign * R(x)``, R the canonical rotation of ``layout`` on x's last axis."""

    x: Node
    layout: Layout
    half: int
    sign: int
    nodes: tuple[Node, ...]


def _negation_split(p0: object, p1: object) -> tuple[Node, Node, int] | None:
    """(moved_to_front, moved_to_back, sign) for ``[-a, b]`` (+1) or ``[a, -b]`` (-1)."""
    n0, n1 = g.negated(p0), g.negated(p1)
    if n0 is not None and n1 is None:
        return n0, p1, +1
    if n1 is not None and n0 is None:
        return p0, n1, -1
    return None


def _rotate_half(node: Node) -> Rotation | None:
    """``cat([-x2, x1], last)`` with x1 = x[..., :h], x2 = x[..., h:2h]."""
    if not g.is_op(node, aten.cat):
        return None
    parts, dim = node.args[0], g.arg(node, 1, "dim", 0)
    if len(parts) != 2 or not g.is_last_dim(node, dim, of=node):
        return None
    split = _negation_split(*parts)
    if split is None:
        return None
    second, first, sign = split
    s2, s1 = g.slice_of(second), g.slice_of(first)
    if s1 is None or s2 is None or s1.source is not s2.source or s1.step != 1 or s2.step != 1:
        return None
    x = s1.source
    width = g.last_dim(x)
    if width is None or s1.dim != g.rank(x) - 1 or s2.dim != s1.dim:
        return None
    h = s1.end
    if s1.start != 0 or h is None or 2 * h != width or s2.start != h or s2.end not in (None, width):
        return None
    return Rotation(x, Layout.ROTATE_HALF, h, sign, (node, second, first))


def _interleaved(node: Node) -> Rotation | None:
    """``flatten(stack([-x[1::2], x[0::2]], -1))`` (flatten as view/reshape/flatten, or a cat of unsqueezes)."""
    if not g.is_op(node, aten.view, aten.reshape, aten._unsafe_view, aten.flatten):
        return None
    inner = node.args[0]
    if g.is_op(inner, aten.stack):
        parts, dim = inner.args[0], g.arg(inner, 1, "dim", 0)
        if len(parts) != 2 or not g.is_last_dim(inner, dim, of=inner):
            return None
    elif g.is_op(inner, aten.cat):
        parts, dim = inner.args[0], g.arg(inner, 1, "dim", 0)
        if len(parts) != 2 or not g.is_last_dim(inner, dim, of=inner):
            return None
        if not all(g.is_op(p, aten.unsqueeze) and g.is_last_dim(p, p.args[1], of=p) for p in parts):
            return None
        parts = [p.args[0] for p in parts]
    else:
        return None
    split = _negation_split(*parts)
    if split is None:
        return None
    odd, even, sign = split
    so, se = g.slice_of(odd), g.slice_of(even)
    if so is None or se is None or so.source is not se.source or so.step != 2 or se.step != 2:
        return None
    x = se.source
    width = g.last_dim(x)
    if width is None or width % 2 or se.dim != g.rank(x) - 1 or so.dim != se.dim:
        return None
    if se.start != 0 or so.start != 1 or se.end not in (None, width) or so.end not in (None, width):
        return None
    if g.shape(node) != g.shape(x):
        return None
    return Rotation(x, Layout.INTERLEAVED, width // 2, sign, (node, inner))


#: The rotation forms detection knows; each maps a node to a `Rotation` or None.
ROTATIONS: tuple[Callable[[Node], Rotation | None], ...] = (_rotate_half, _interleaved)


def _rotation(node: object) -> Rotation | None:
    if not isinstance(node, Node):
        return None
    for form in ROTATIONS:
        r = form(node)
        if r is not None:
            return r
    # ``rotate(x).float()`` (Ernie 4.5, GLM-4.5): a cast to x's own dtype changes nothing
    target = g.cast_dtype(node)
    if target is not None and node.args and isinstance(node.args[0], Node):
        inner = _rotation(node.args[0])
        if inner is not None and g.dtype(inner.x) == target:
            return dataclasses.replace(inner, nodes=inner.nodes + (node,))
    return None


def _mul_pair(node: object) -> tuple[Node, Node] | None:
    if g.is_op(node, aten.mul) and len(node.args) == 2 and all(isinstance(a, Node) for a in node.args):
        return node.args[0], node.args[1]
    return None


def _alpha_one(node: Node) -> bool:
    return node.kwargs.get("alpha", 1) == 1


def match_rotation(node: Node) -> FxRopeApplication | None:
    """The RoPE application whose sum is ``node`` (an add/sub), or None."""
    if g.is_op(node, aten.add) and _alpha_one(node):
        orders = [(node.args[0], node.args[1], +1), (node.args[1], node.args[0], +1)]
    elif g.is_op(node, aten.sub) and _alpha_one(node):
        orders = [(node.args[0], node.args[1], -1)]
    else:
        return None
    for cos_term, sin_term, want_sign in orders:
        pc, ps = _mul_pair(cos_term), _mul_pair(sin_term)
        if pc is None or ps is None:
            continue
        for rot_node, sin in (ps, ps[::-1]):
            rot = _rotation(rot_node)
            if rot is None or rot.sign != want_sign:
                continue
            if pc[0] is rot.x:
                cos = pc[1]
            elif pc[1] is rot.x:
                cos = pc[0]
            else:
                continue
            return _application(node, rot, cos, sin)
    return None


def _application(out: Node, rot: Rotation, cos: Node, sin: Node) -> FxRopeApplication:
    """Widen a rotation of x[..., :r] followed by cat([rotated, x[..., r:]]) into a partial application."""
    r = 2 * rot.half
    x, output = rot.x, out
    sx = g.slice_of(rot.x)
    if (sx is not None and sx.start == 0 and sx.step == 1 and sx.dim == g.rank(sx.source) - 1
            and (sx.end == r or (sx.end is None and g.last_dim(sx.source) == r))):
        width = g.last_dim(sx.source)
        for user in out.users:
            if not g.is_op(user, aten.cat) or not g.is_last_dim(user, g.arg(user, 1, "dim", 0), of=user):
                continue
            # [rotated, x[..., r:]], or with an empty x[..., :0] before (rotary-embedding-torch's t_left)
            at = 0
            for part in user.args[0]:
                piece = (0, r) if part is out else None
                sp = g.slice_of(part) if part is not out else None
                if sp is not None and sp.source is sx.source and sp.step == 1 and sp.dim == sx.dim:
                    piece = (sp.start, width if sp.end is None else sp.end)
                if piece is None or piece[0] != at:
                    break
                at = piece[1]
            else:
                if at == width and width is not None:
                    x, output = sx.source, user
                    break
    head_dim = g.last_dim(x) or r
    return FxRopeApplication(x=x, output=output, rotated=rot.x, layout=rot.layout, rotary_dim=r, head_dim=head_dim,
                             cos=cos, sin=sin, nodes=rot.nodes)


# --------------------------------------------------------------------------------------------------
# Angle sources
# --------------------------------------------------------------------------------------------------

# Ops that keep the values of their first input per last-axis column (views, casts, broadcasts, row
# selections): walking up through them from cos/sin reaches where the angles are made.
_CARRY = g.CAST_OPS + g.VIEW_OPS + (aten.slice, aten.index, aten.gather, aten.index_select, aten.repeat_interleave)


def _walk_up(node: object, stop: Callable[[Node], bool], limit: int = 64) -> tuple[Node | None, list[Node]]:
    """From ``node`` upward through `_CARRY` ops, duplications and scalar multiplications until ``stop``."""
    path: list[Node] = []
    cur = node
    for _ in range(limit):
        if not isinstance(cur, Node):
            return None, path
        if stop(cur):
            return cur, path
        path.append(cur)
        sm = g.scalar_mul(cur)
        if sm is not None:
            cur = sm[0]
        elif g.is_op(cur, aten.div) and isinstance(cur.args[1], int | float) and isinstance(cur.args[0], Node):
            cur = cur.args[0]  # angles / a number (x-transformers' interpolation factor)
        elif g.is_op(cur, aten.cat, aten.stack) and len(cur.args[0]) == 2 and cur.args[0][0] is cur.args[0][1]:
            cur = cur.args[0][0]  # [f, f] (rotate-half) or stack([f, f], -1) (each angle for both of a pair)
        elif g.is_op(cur, *_CARRY):
            cur = cur.args[0]
        elif g.is_op(cur, aten.embedding):
            cur = cur.args[0]
        elif g.slice_of(cur) is not None:  # a piece of split/chunk
            cur = g.slice_of(cur).source
        else:
            return None, path
    return None, path


def _constant_value(ep: ExportedProgram, node: Node, limit: int = 40) -> torch.Tensor | None:
    """The value of ``node`` when it depends only on program constants (evaluated on real tensors)."""
    t = g.placeholder_tensor(ep, node)
    if t is not None:
        return t
    if node.op != "call_function":
        return None
    env: dict[Node, object] = {}
    order: list[Node] = []

    def visit(n: Node) -> bool:
        if n in env or n in order:
            return True
        if len(order) > limit:
            return False
        if n.op == "placeholder":
            v = g.placeholder_tensor(ep, n)
            if v is None:
                return False
            env[n] = v
            return True
        if n.op != "call_function":
            return False
        for a in n.all_input_nodes:
            if not visit(a):
                return False
        order.append(n)
        return True

    if not visit(node):
        return None
    for n in order:
        args = torch.fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        kwargs = {k: (torch.device("cpu") if k == "device" else v) for k, v in kwargs.items()}
        try:
            env[n] = n.target(*args, **kwargs)
        except Exception:
            return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None


def _split_product(ep: ExportedProgram, angles: Node, half: int):
    """(inv_freq node, value, positions, position cast) for ``angles = positions x inv_freq``."""
    if g.is_op(angles, aten.mul, aten.matmul, aten.bmm) and all(isinstance(a, Node) for a in angles.args[:2]):
        a, b = angles.args[:2]
    elif (g.is_op(angles, aten.einsum) and len(angles.args) > 1 and len(angles.args[1]) == 2
          and all(isinstance(a, Node) for a in angles.args[1])):  # einsum('i,j->ij', positions, inv_freq)
        a, b = angles.args[1]
    else:
        return None
    for freq_side, pos_side in ((a, b), (b, a)):
        top, passed = g.through(freq_side, g.CAST_OPS + g.VIEW_OPS)
        value = _constant_value(ep, top) if isinstance(top, Node) else None
        if value is None or value.numel() != half or not value.is_floating_point():
            continue
        pos, pos_path = g.through(pos_side, g.CAST_OPS + g.VIEW_OPS)
        if not isinstance(pos, Node):  # (positions may be constant: arange(n) of a static export)
            continue
        cast = next((n for n in pos_path if g.is_op(n, aten._to_copy, aten.to)), None)
        return top, value, pos, cast, freq_side
    return None


def trace_angle_source(
    ep: ExportedProgram, app: FxRopeApplication
) -> (tuple[ComputedAngles, FxComputedHandles, np.ndarray] | tuple[ComputedAngles, FxTrigHandles, None]
      | tuple[CachedTable, FxTableHandles, None]):
    """Where the cos/sin of ``app`` come from: computed angles (with inv_freq when it is a constant) or a
    precomputed table. Raises NotUnderstood with the reason otherwise."""
    half = app.rotary_dim // 2
    cos_node, cos_path = _walk_up(app.cos, lambda n: g.is_op(n, aten.cos))
    sin_node, sin_path = _walk_up(app.sin, lambda n: g.is_op(n, aten.sin))
    if cos_node is None or sin_node is None:  # something not walked lies in between (M-RoPE sections, ...)
        try:
            cos_node, sin_node = fx_probe.cone_trig(app.cos, app.sin)
        except fx_probe.ProbeFailed:
            cos_node = sin_node = None
        else:
            cos_path = [n for n in (fx_probe.trig_factor(cos_node)[0],) if n is not None]
            sin_path = [n for n in (fx_probe.trig_factor(sin_node)[0],) if n is not None]
    if cos_node is not None and sin_node is not None:
        emb_c, emb_s = cos_node.args[0], sin_node.args[0]
        if emb_c is not emb_s:
            raise NotUnderstood("cos and sin are taken of different angles")
        angles, _ = _walk_up(emb_c, lambda n: (g.is_op(n, aten.mul, aten.matmul, aten.bmm, aten.einsum)
                                               and g.scalar_mul(n) is None))
        split = _split_product(ep, angles, half) if angles is not None else None
        if split is None:  # inv_freq made at run time (a dynamic rescale's output, ...)
            source = ComputedAngles(position_dtype="unknown", angle_dtype="unknown",
                                    inv_freq_origin=InvFreqOrigin.RUNTIME)
            return source, FxTrigHandles(cos_node, sin_node), None
        inv_node, inv_value, positions, cast, inv_operand = split
        cos_scale = next((n for n in cos_path if g.scalar_mul(n) is not None and g.scalar_mul(n)[0] is cos_node), None)
        sin_scale = next((n for n in sin_path if g.scalar_mul(n) is not None and g.scalar_mul(n)[0] is sin_node), None)
        factor = 1.0
        for n in cos_path:
            sm = g.scalar_mul(n)
            if sm is not None:
                factor *= sm[1]
        pos_dtype = g.dtype(cast) if cast is not None else g.dtype(positions)
        source = ComputedAngles(
            position_dtype=str(pos_dtype).replace("torch.", ""),
            angle_dtype=str(g.dtype(angles)).replace("torch.", ""),
            inv_freq_origin=InvFreqOrigin.CONSTANT,
            inv_freq_dtype=str(inv_value.dtype).replace("torch.", ""),
            attention_factor=factor,
        )
        handles = FxComputedHandles(
            positions=positions, inv_freq_node=inv_node, inv_freq_operand=inv_operand, angles=angles,
            cos_node=cos_node, sin_node=sin_node, position_cast=cast, cos_scale=cos_scale, sin_scale=sin_scale,
        )
        return source, handles, inv_value.detach().to(torch.float32).reshape(-1).cpu().numpy()
    # A table placeholder gathered by positions?
    table, _ = _walk_up(app.cos, lambda n: n.op == "placeholder")
    t = g.placeholder_tensor(ep, table) if table is not None else None
    if t is not None and t.dim() >= 2:
        source = CachedTable(rows=int(t.shape[-2]), dtype=str(t.dtype).replace("torch.", ""),
                             position_dtype="unknown", row_selection="unknown", attention_factor=1.0)
        return source, FxTableHandles(table), None
    raise NotUnderstood("cos/sin source not recognised")


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


def _site_key(app: FxRopeApplication, handles: FxComputedHandles | FxTrigHandles | FxTableHandles) -> tuple:
    if isinstance(handles, FxComputedHandles | FxTrigHandles):
        return ("computed", handles.cos_node, app.layout, app.rotary_dim)
    return ("table", handles.table_node, app.layout, app.rotary_dim)


def _probed_applications(ep: ExportedProgram, groups: dict, refusals: list[Refusal]) -> list[FxRopeApplication]:
    """Rotations no form in `ROTATIONS` matched, identified by evaluating them (`fx.rotation_probe`)."""
    from posrewrite.passes.fx.rotation_probe import cone, probed_rotations

    claimed: set[Node] = set()
    for members in groups.values():
        for app, *_ in members:
            claimed.update(cone(app.x, app.output))
    found, _, static = probed_rotations(ep, claimed)
    refusals.extend(Refusal("rope", y.name, why) for y, why in static)
    apps = []
    for x, y, cos, sin, reading, nodes in found:
        if reading.layout is None:
            shown = ", ".join(f"({a},{b})" for a, b in reading.pairs[:4])
            more = f", ... ({len(reading.pairs)} pairs)" if len(reading.pairs) > 4 else ""
            refusals.append(Refusal("rope", y.name, f"a RoPE rotation pairing channels {shown}{more}: no rewrite "
                                                    "supports that pairing"))
            continue
        if reading.decay is not None and not np.all(reading.decay.log_rate != 0):
            refusals.append(Refusal("rope", y.name, "xPos decay on only some channels"))
            continue
        rot = Rotation(x, reading.layout, reading.rotary_dim // 2, 1, nodes)
        app = _application(y, rot, cos, sin)
        if reading.heads_in_last_axis > 1:  # [.., H·D]: H heads on x's last axis, each rotated alike
            app = dataclasses.replace(app, head_dim=reading.head_dim, heads_in_last_axis=reading.heads_in_last_axis)
        apps.append(dataclasses.replace(app, decay=reading.decay))
    return apps


def detect_rope(ep: ExportedProgram) -> tuple[list[FxRopeSite], list[Refusal]]:
    """Every RoPE site of ``ep``'s graph, and refusals for rotation-like subgraphs not understood."""
    groups: dict[tuple, list[tuple[FxRopeApplication, ComputedAngles | CachedTable,
                                   FxComputedHandles | FxTrigHandles | FxTableHandles, np.ndarray | None]]] = {}
    refusals: list[Refusal] = []
    claimed: set[Node] = set()
    for node in ep.graph.nodes:
        if node in claimed or not g.is_op(node, aten.add, aten.sub):
            continue
        app = match_rotation(node)
        if app is None:
            continue
        claimed.add(app.output)
        try:
            source, handles, inv_freq = trace_angle_source(ep, app)
        except NotUnderstood as refused:
            refusals.append(Refusal("rope", app.output.name, f"{app.describe()}: {refused}"))
            continue
        groups.setdefault(_site_key(app, handles), []).append((app, source, handles, inv_freq))
    probed = _probed_applications(ep, groups, refusals)
    for app in probed:
        try:
            source, handles, inv_freq = trace_angle_source(ep, app)
        except NotUnderstood as refused:
            refusals.append(Refusal("rope", app.output.name, f"{app.describe()}: {refused}"))
            continue
        groups.setdefault(_site_key(app, handles), []).append((app, source, handles, inv_freq))
    probed_ids = {id(a) for a in probed}
    sites: list[FxRopeSite] = []
    for members in groups.values():
        apps = tuple(m[0] for m in members)
        try:
            site = _make_site(ep, apps, *members[0][1:])
            sites.append(_with_probe_facts(site, [a for a in apps if id(a) in probed_ids]))
        except NotUnderstood as refused:
            refusals.append(Refusal("rope", apps[0].output.name, str(refused)))
    return sites, refusals


#: what probing a malformed or unusual graph may raise: the candidate is then not described that way (never an
#: internal error)
_PROBE_ERRORS = (fx_probe.ProbeFailed, ValueError, TypeError, IndexError, KeyError, AttributeError, ArithmeticError,
                 RuntimeError)


#: ops by which angles may switch with the run-time length (LongRoPE's choice of frequencies, a dynamic base)
_SWITCHING = (aten.where, aten.gt, aten.ge, aten.lt, aten.le, aten.max, aten.amax)


def _length_dependent(angles: Node, limit: int = 200) -> bool:
    """Whether the angle cone may choose its frequencies by the run-time length: it holds nodes a posrewrite
    run-time rescale wrote, a comparison or a max (probing at one length could not see another)."""
    stack, seen = [angles], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.meta.get(RUNTIME_META) or g.is_op(n, *_SWITCHING):
            return True
        stack.extend(n.all_input_nodes)
    return len(seen) >= limit


def _grid_site(ep: ExportedProgram, apps: tuple[FxRopeApplication, ...], cos_node: Node, sin_node: Node,
               factor: float, cos_scale: Node | None, sin_scale: Node | None) -> FxRopeSite | None:
    """A 2-D RoPE site when the angles are made from the two spatial axes of one input (read only through its
    size), else None."""
    angles = cos_node.args[0]
    try:
        fit = fx_probe.grid_fit(ep, angles)
    except _PROBE_ERRORS:  # not a grid (or a graph the probe cannot run): described otherwise
        return None
    axes = fit.axes
    rows, cols = axes.channels_per_axis()
    if axes.normalised:
        note = ("2-D RoPE on grid coordinates normalised by the grid size: the model already adapts to "
                "resolution, nothing to rescale")
    elif axes.mixed:
        note = f"2-D RoPE, mixed: {axes.axis_of_channel.count(-1)} angle channels read both grid axes"
    else:
        note = f"2-D RoPE, axial: {rows} angle channels read the grid row, {cols} the column"
    source = GridAngles(axes=axes, angle_dtype=str(g.dtype(angles)).replace("torch.", ""), attention_factor=factor)
    encoding = RopeEncoding(layout=apps[0].layout, head_dim=apps[0].head_dim, rotary_dim=apps[0].rotary_dim,
                            source=source, base=None, inv_freq=None, notes=(note,))
    handles = FxAngleHandles(angles, cos_node, sin_node, fit.channel_shape, cos_scale=cos_scale, sin_scale=sin_scale)
    return FxRopeSite(encoding=encoding, applications=apps, handles=handles)


def _probed_site(ep: ExportedProgram, apps: tuple[FxRopeApplication, ...], handles: FxTrigHandles
                 ) -> FxRopeSite | None:
    """Angles pos·f_c (or pos[row(c)]·f_c) fitted by probing the angle tensor and the rotation's cos/sin, when
    the graph computes them in a form not split into positions x a constant inv_freq; None when they are not
    that (e.g. a run-time inv_freq)."""
    angles = handles.cos_node.args[0]
    if not isinstance(angles, Node) or _length_dependent(angles):
        return None
    app = apps[0]
    try:
        fit = fx_probe.fit_rows(ep, angles, app.cos, app.sin, app.layout, app.rotary_dim)
    except _PROBE_ERRORS:
        return None
    notes = ["angles identified by probing (pos x frequency per channel): a rescale multiplies them"]
    base = rope_fit.fit_base(fit.inv_freq, app.rotary_dim)
    if base is None:
        notes.append("the frequencies are not base^(-2i/d): linear and llama3 apply, methods needing a base "
                     "need rope_base")
    if fit.rows is not None:
        notes.append(f"M-RoPE: {fit.rows.rows}-row positions, mrope_section {list(fit.rows.sections)}"
                     + (" (interleaved)" if fit.rows.interleaved else ""))
    cos_scale, _ = fx_probe.trig_factor(handles.cos_node)
    sin_scale, _ = fx_probe.trig_factor(handles.sin_node)
    source = ProbedAngles(position_dtype=fit.position_dtype, angle_dtype=str(g.dtype(angles)).replace("torch.", ""),
                          attention_factor=fit.attention_factor, rows=fit.rows)
    encoding = RopeEncoding(layout=app.layout, head_dim=app.head_dim, rotary_dim=app.rotary_dim, source=source,
                            base=base, inv_freq=fit.inv_freq, notes=tuple(notes))
    fx_handles = FxAngleHandles(angles, handles.cos_node, handles.sin_node, fit.channel_shape, fit.channel_freq,
                                cos_scale=cos_scale, sin_scale=sin_scale)
    return FxRopeSite(encoding=encoding, applications=apps, handles=fx_handles)


def _make_site(ep: ExportedProgram, apps: tuple[FxRopeApplication, ...],
               source: ComputedAngles | CachedTable, handles: FxComputedHandles | FxTrigHandles | FxTableHandles,
               inv_freq: np.ndarray | None) -> FxRopeSite:
    """One site from the applications sharing a cos/sin source; NotUnderstood with the reason when it cannot be
    described."""
    if len({(a.layout, a.rotary_dim) for a in apps}) != 1:
        raise NotUnderstood("applications sharing one cos/sin disagree on layout or rotary_dim")
    if isinstance(handles, FxComputedHandles | FxTrigHandles):
        if isinstance(handles, FxComputedHandles):
            cos_scale, sin_scale, factor = handles.cos_scale, handles.sin_scale, source.attention_factor
        else:
            (cos_scale, factor), (sin_scale, _) = (fx_probe.trig_factor(handles.cos_node),
                                                   fx_probe.trig_factor(handles.sin_node))
        # angles made from the input's shape (no position input read as data): a patch grid?
        grid = _grid_site(ep, apps, handles.cos_node, handles.sin_node, factor, cos_scale, sin_scale)
        if grid is not None:
            return grid
    if isinstance(handles, FxTrigHandles):
        probed = _probed_site(ep, apps, handles)
        if probed is not None:
            return probed
    notes: list[str] = []
    base = prior = None
    if inv_freq is not None:
        if inv_freq.size * 2 != apps[0].rotary_dim:
            raise NotUnderstood(f"inv_freq has {inv_freq.size} values for rotary_dim {apps[0].rotary_dim}")
        dtype = source.inv_freq_dtype if isinstance(source, ComputedAngles) else None
        base = rope_fit.fit_base(inv_freq, dtype=dtype)
        if base is None:
            fitted = rope_fit.fit_scaled_base(inv_freq, dtype=dtype)
            if fitted is None:
                notes.append("inv_freq is not geometric and its scaling is not recognised: pass rope_base "
                             "(or the model's config) to rescale it")
            else:
                base, prior = fitted
                notes.append(f"inv_freq is already scaled: {prior.describe()}, base {base:g}; a rescale "
                             "replaces that scaling (as new rope_parameters in the config would)")
    if isinstance(source, CachedTable):
        if not fx_probe.reads_user_inputs(ep, [apps[0].cos, apps[0].sin]):
            shape = list(g.shape(apps[0].cos) or ())
            raise NotUnderstood(f"RoPE cos/sin baked into constants of shape {shape} by a static export: the program "
                                "runs at that one length (or patch grid) only and there is nothing to rescale; "
                                "re-export with a dynamic sequence axis (timm ViTs: dynamic_img_size=True and "
                                "dynamic image height/width)")
        notes.append(TABLE_NOTE)
    elif inv_freq is None:
        notes.append(RUNTIME_NOTE)
    if isinstance(handles, FxComputedHandles) and isinstance(source, ComputedAngles):
        try:  # M-RoPE: which row of a multi-row position input each frequency reads
            rows = fx_probe.position_rows(ep, handles.positions, apps[0].cos, apps[0].sin, apps[0].layout,
                                          apps[0].rotary_dim)
        except fx_probe.ProbeFailed as failed:
            raise NotUnderstood(f"M-RoPE positions not read: {failed}") from None
        if rows is not None:
            source = dataclasses.replace(source, rows=rows)
            notes.append(f"M-RoPE: {rows.rows}-row positions, mrope_section {list(rows.sections)}"
                         + (" (interleaved)" if rows.interleaved else ""))
    encoding = RopeEncoding(layout=apps[0].layout, head_dim=apps[0].head_dim, rotary_dim=apps[0].rotary_dim,
                            source=source, base=base, inv_freq=inv_freq, prior_scaling=prior, notes=tuple(notes))
    return FxRopeSite(encoding=encoding, applications=apps, handles=handles)


def _with_probe_facts(site: FxRopeSite, probed: list[FxRopeApplication]) -> FxRopeSite:
    """The site's encoding with what probing read (as the ONNX side records it): identified_by, the xPos decay
    (q's, whose scale grows towards early positions; k's is its inverse), the heads of a [.., H·D] rotation."""
    if not probed:
        return site
    encoding = site.encoding
    decay, read = probed_site_facts([a.decay for a in site.applications if a.decay is not None],
                                    len(site.applications), {a.heads_in_last_axis for a in probed
                                                             if a.heads_in_last_axis > 1},
                                    encoding.head_dim, NotUnderstood)
    notes = [*encoding.notes, *read]
    encoding = dataclasses.replace(encoding, decay=decay, identified_by="probe", notes=tuple(notes))
    return dataclasses.replace(site, encoding=encoding)
