"""Rescaling RoPE sites of an fx graph; every number comes from `posrewrite.math.rope`.

- static methods (linear, ntk, yarn, llama3, a new base): the inv_freq buffer/constant gets the new
  values and the attention factor is written into the ``mul`` after cos and sin (inserted if missing);
- runtime methods (dynamic, longrope): inv_freq is computed in the graph from the runtime length
  ``max(positions) + 1``, in float32 and in the order HF computes it per forward pass (dynamic NTK: the
  base ``b * ((s * n / L) - (s - 1)) ** (d / (d - 2))`` for n > L; longrope: ``where(n > L, long, short)``).

- angles identified by probing (`ProbedAngles`: 1-D angles the graph writes in a form not split into positions x
  inv_freq; `GridAngles`: 2-D RoPE over a patch grid) are rescaled in angle space, as on the ONNX side: the
  angle tensor cos/sin read is multiplied by a per-element ratio (new / old frequency of each element; per axis
  for a grid, `posrewrite.math.rope_grid`), static methods only;
- xPos (a probed position-dependent magnitude): the rotation is rescaled like any RoPE; with
  ``xpos_decay="scaled"`` every decay factor is also raised to 1/s (its positions divided by s).

Sites whose angles come from a precomputed table are refused with the reason (not rescaled here).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.errors import UsageError
from posrewrite.math import rope as rope_math
from posrewrite.math import rope_grid
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx._graph import GraphWriter, aten
from posrewrite.passes.fx.detect_rope import RUNTIME_META, RUNTIME_NOTE, TABLE_NOTE
from posrewrite.passes.fx.sites import FxAngleHandles, FxComputedHandles, FxRopeSite
from posrewrite.sites.rope import AngleSource, CachedTable, ComputedAngles, GridAngles

__all__ = ["RUNTIME_METHODS", "XPOS_DECAY_CONVENTIONS", "RescalePlan", "plan_rescale", "plan_grid", "apply_rescale",
           "RescaleRefused", "decay_operands"]

RUNTIME_METHODS = ("dynamic", "longrope")


class RescaleRefused(ValueError):
    """A site that cannot take the requested scaling (the message says why)."""


@dataclasses.dataclass
class RescalePlan:
    """New numbers for one site (computed before the graph is touched)."""

    site: FxRopeSite
    params: rope_math.RopeParameters
    inv_freq: np.ndarray | None  # static methods: float32 [rotary_dim / 2]
    attention_factor: float
    runtime: bool
    angle_ratio: np.ndarray | None = None  # probed / 2-D angles: the angle tensor times this (channel shape)
    decay_ratio: float = 1.0  # xPos: exponent multiplier of the decay (1/s for xpos_decay="scaled")
    grid: tuple[tuple[int, int], tuple[int, int]] | None = None  # 2-D RoPE: (original, target) patch grids

    def describe(self) -> str:
        p = self.params
        extra = f", attention factor {self.attention_factor:.6g}" if self.attention_factor != 1.0 else ""
        if self.grid is not None:
            (oh, ow), (th, tw) = self.grid
            return (f"2-D rope ({self.site.rotations} q/k applications): {p.rope_type} per axis, grid {oh}x{ow} -> "
                    f"{th}x{tw}{extra}")
        what = f"{p.rope_type} x{p.effective_factor():g}"
        if p.rope_theta is not None:
            what += f", base {p.rope_theta:g}"
        mode = ", inv_freq from the runtime length" if self.runtime else ""
        angles = " (in angle space)" if self.angle_ratio is not None else ""
        return (f"rope ({self.site.rotations} applications, rotary_dim {self.site.rotary_dim}): "
                f"{what}{extra}{mode}{angles}")


#: why a 2-D RoPE takes no 1-D rescale (the ONNX side's words)
GRID_1D_NOTE = ("2-D RoPE over a patch grid: rescale it with original_grid=(H, W) and target_grid=(H, W) (per-axis), "
                "not with a 1-D rope_scale")
#: the conventions for the decay of a rescaled xPos rotation (as `posrewrite.passes.onnx.rope.xpos`)
XPOS_DECAY_CONVENTIONS = ("angles", "scaled")


def plan_rescale(site: FxRopeSite, params: rope_math.RopeParameters, *, xpos_decay: str = "angles") -> RescalePlan:
    """The new inv_freq / attention factor of ``site`` (or the ratio its probed angles are multiplied by); raises
    `RescaleRefused` when impossible. ``xpos_decay``: "angles" (an xPos decay keeps reading the original positions,
    x-transformers' interpolation) or "scaled" (the decay's positions are divided too, rotary-embedding-torch's
    interpolate_factor; linear only)."""
    where = site.applications[0].output.name
    if site.angles == AngleSource.GRID:
        raise RescaleRefused(f"{GRID_1D_NOTE} ({where})")
    if site.angles == AngleSource.PROBED and params.rope_type in RUNTIME_METHODS:
        raise RescaleRefused(f"{params.rope_type} computes frequencies at run time, which needs the graph's "
                             f"positions x inv_freq product; these angles were identified by probing only ({where})")
    if site.angles != AngleSource.PROBED and (not isinstance(site.source, ComputedAngles) or site.inv_freq is None):
        why = TABLE_NOTE if isinstance(site.source, CachedTable) else RUNTIME_NOTE
        raise RescaleRefused(f"{why}: cannot rescale ({where})")
    if xpos_decay not in XPOS_DECAY_CONVENTIONS:
        raise UsageError(f"xpos_decay must be 'angles' or 'scaled', not {xpos_decay!r}")
    try:
        params.validate()
        params = rope_math.parameters_for_site(params, site.base, site.prior_scaling)
        inv, factor = rope_math.scaled_inv_freq(params, inv_freq=site.inv_freq, base=site.base, dim=site.rotary_dim)
    except ValueError as e:
        raise RescaleRefused(str(e)) from None
    runtime = params.rope_type in RUNTIME_METHODS
    decay_ratio = 1.0
    if site.encoding.decay is not None and xpos_decay == "scaled":
        if params.rope_type != "linear" or params.rope_theta is not None:
            raise UsageError("xpos_decay='scaled' divides the decay's positions like the angles': it goes with "
                             "rope_method='linear' only")
        decay_ratio = 1.0 / float(params.factor)
    ratio = None
    if site.angles == AngleSource.PROBED:
        from posrewrite.passes.onnx.rope.probe import frequency_ratio
        from posrewrite.passes.onnx.rope.tables import NotUnderstood

        handles = site.handles
        assert isinstance(handles, FxAngleHandles) and handles.channel_freq is not None
        try:
            ratio = frequency_ratio(handles.channel_freq, site.inv_freq, inv).reshape(handles.channel_shape)
        except NotUnderstood as exc:
            raise RescaleRefused(f"{exc} ({where})") from None
    return RescalePlan(site, params, None if runtime else inv, factor, runtime, angle_ratio=ratio,
                       decay_ratio=decay_ratio)


def plan_grid(site: FxRopeSite, method: str, original: tuple[int, int], target: tuple[int, int]) -> RescalePlan:
    """Per-axis rescale of a 2-D RoPE to run at the ``target`` patch grid (numbers from
    `posrewrite.math.rope_grid`, as the ONNX side); `RescaleRefused` when the site cannot take it."""
    source, handles = site.source, site.handles
    if not isinstance(source, GridAngles) or not isinstance(handles, FxAngleHandles):
        raise RescaleRefused(f"original_grid/target_grid rescale 2-D RoPE; this is {site.angles.value} RoPE "
                             f"({site.applications[0].output.name})")
    try:
        ratio, attention, params = rope_grid.grid_rescale(source.axes, method, original, target)
    except ValueError as exc:
        raise RescaleRefused(str(exc)) from None
    return RescalePlan(site, params, None, float(attention) * source.attention_factor, False,
                       angle_ratio=ratio.reshape(handles.channel_shape), grid=(tuple(original), tuple(target)))


def _replace_inv_freq(ep: ExportedProgram, w: GraphWriter, node: Node, value: torch.Tensor) -> None:
    """Give the inv_freq ``node`` a new value (in place for placeholders, a new constant otherwise)."""
    if node.op == "placeholder" and g.placeholder_tensor(ep, node) is not None:
        old = g.placeholder_tensor(ep, node)
        g.set_placeholder_tensor(ep, node, value.reshape(old.shape).to(old.dtype))
        return
    old_val = g.val(node)
    const = w.add_constant("posrewrite_inv_freq", value.reshape(old_val.shape).to(old_val.dtype))
    node.replace_all_uses_with(const)


def _set_attention_factor(w: GraphWriter, site: FxRopeSite, factor: float) -> None:
    """cos and sin carry ``factor`` in all: a scalar mul the export already has takes it (the new method's factor
    replaces the old one, as new rope_parameters do in HF); without one, a mul is inserted (by ``factor`` over
    the amplitude the probe measured, for probed angles)."""
    src = site.handles
    assert isinstance(src, FxComputedHandles | FxAngleHandles)
    if isinstance(src, FxAngleHandles) and src.cos_scale is None and site.attention_factor != 0:
        factor = factor / site.attention_factor
    for fn, scale in ((src.cos_node, src.cos_scale), (src.sin_node, src.sin_scale)):
        if scale is not None:
            a, b = scale.args
            scale.args = (a, factor) if isinstance(a, Node) else (factor, b)
        elif factor != 1.0:
            users = list(fn.users)
            with w.graph.inserting_after(fn):
                mul = w.call(aten.mul.Tensor, (fn, factor))
            for u in users:
                u.replace_input_with(fn, mul)


class FxOps:
    """`posrewrite.math.rope.RuntimeOps` as ATen calls inserted before ``anchor``: scalars stay Python numbers
    (ATen's Tensor-Scalar overloads), vectors become constant placeholders."""

    def __init__(self, w: GraphWriter, anchor: Node) -> None:
        self.w, self.anchor = w, anchor

    def _call(self, target, args: tuple) -> Node:
        with self.w.graph.inserting_before(self.anchor):
            node = self.w.call(target, args)
        node.meta[RUNTIME_META] = True  # a later detection does not probe these angles as pos·f
        return node

    def const(self, value: np.ndarray) -> Node | float:
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 0:
            return float(value)
        return self.w.add_constant("posrewrite_runtime_const", torch.from_numpy(value.copy()))

    def mul(self, a, b) -> Node:
        return self._call(aten.mul.Tensor, (b, a) if not isinstance(a, Node) else (a, b))

    def div(self, a, b) -> Node:
        if isinstance(a, Node):
            return self._call(aten.div.Tensor, (a, b))
        recip = self._call(aten.reciprocal.default, (b,))  # torch's scalar / tensor
        return recip if a == 1.0 else self._call(aten.mul.Tensor, (recip, a))

    def sub(self, a, b) -> Node:
        return self._call(aten.sub.Tensor, (a, b))

    def pow(self, a, b) -> Node:
        return self._call(aten.pow.Tensor_Tensor if isinstance(b, Node) else aten.pow.Tensor_Scalar, (a, b))

    def greater(self, a, b) -> Node:
        return self._call(aten.gt.Tensor if isinstance(b, Node) else aten.gt.Scalar, (a, b))

    def where(self, condition, a, b) -> Node:
        return self._call(aten.where.self, (condition, a, b))


def _runtime_inv_freq(w: GraphWriter, plan: RescalePlan) -> Node:
    """float32 [d/2] inv_freq computed from max(positions) + 1 (inserted before the angle product), by the
    formula in `posrewrite.math.rope.runtime_inv_freq`."""
    site = plan.site
    src = site.computed_handles()
    ops = FxOps(w, src.angles)
    seq = ops._call(aten.add.Tensor, (ops._call(aten.max.default, (src.positions,)), 1))
    return rope_math.runtime_inv_freq(ops, seq, plan.params, inv_freq=site.inv_freq, base=site.base,
                                      dim=site.rotary_dim)


def apply_rescale(ep: ExportedProgram, plans: list[RescalePlan]) -> list[str]:
    """Rewrite ``ep`` (in place) by ``plans``; returns one line per site."""
    w = GraphWriter(ep)
    done: list[str] = []
    replaced: set[Node] = set()
    for plan in plans:
        if plan.decay_ratio != 1.0:
            done.append(_scale_decay(w, plan.site, plan.decay_ratio))
        if plan.angle_ratio is not None:
            _scale_angles(ep, w, plan)
            done.append(plan.describe())
            continue
        src = plan.site.computed_handles()
        if plan.runtime:
            _swap_operand_root(w, src.angles, src.inv_freq_operand, src.inv_freq_node, _runtime_inv_freq(w, plan))
        elif src.inv_freq_node not in replaced:
            _replace_inv_freq(ep, w, src.inv_freq_node, torch.from_numpy(plan.inv_freq))
            replaced.add(src.inv_freq_node)
        _set_attention_factor(w, plan.site, plan.attention_factor)
        done.append(plan.describe())
    w.graph.eliminate_dead_code()
    return done


def _swap_operand_root(w: GraphWriter, user: Node, operand: Node, root: Node, new_root: Node) -> None:
    """Make ``user`` read ``operand`` recomputed from ``new_root`` instead of ``root``: the view/cast chain
    root -> operand is copied (before ``user``) on top of ``new_root``; other readers of root keep it."""
    chain: list[Node] = []
    cur = operand
    while cur is not root:
        chain.append(cur)
        cur = cur.args[0]
    env = {root: new_root}
    if g.shape(root) != g.shape(new_root):
        with w.graph.inserting_before(user):
            env[root] = w.call(aten.view.default, (new_root, list(g.shape(root))))
    for n in reversed(chain):
        with w.graph.inserting_before(user):
            copy = w.graph.node_copy(n, lambda a: env.get(a, a))
        w._fill_meta(copy)
        env[n] = copy
    user.replace_input_with(operand, env[operand])


def _scale_angles(ep: ExportedProgram, w: GraphWriter, plan: RescalePlan) -> None:
    """The angle tensor times the plan's per-element ratio, read by the site's cos and sin (the graph's own way of
    making the angles is left as it is); the plan's attention factor on cos and sin."""
    handles = plan.site.handles
    assert isinstance(handles, FxAngleHandles) and plan.angle_ratio is not None
    angles = handles.angles
    dtype = g.dtype(angles) or torch.float32
    value = torch.from_numpy(np.asarray(plan.angle_ratio, np.float32)).to(dtype)
    ratio = w.add_constant("posrewrite_angle_ratio", value)
    order = {n: k for k, n in enumerate(w.graph.nodes)}
    first = min((handles.cos_node, handles.sin_node), key=order.__getitem__)
    with w.graph.inserting_before(first):
        scaled = w.call(aten.mul.Tensor, (angles, ratio))
    for trig in (handles.cos_node, handles.sin_node):
        trig.replace_input_with(angles, scaled)
    _set_attention_factor(w, plan.site, plan.attention_factor)


def decay_operands(site: FxRopeSite) -> list[tuple[Node, int]]:
    """(mul, argument index) of every xPos decay factor the site's rotations multiply with: operands of muls in a
    rotation's cone that do not depend on x and are not its cos/sin terms (the fx side of
    `posrewrite.passes.onnx.rope.xpos.decay_operands`)."""
    found = []
    for app in site.applications:
        if app.decay is None:
            continue
        from_x = {app.rotated, app.x}
        for n in app.nodes:  # graph order: a node's inputs come before it
            if any(i in from_x for i in n.all_input_nodes):
                from_x.add(n)
        for n in app.nodes:
            if not g.is_op(n, aten.mul) or len(n.args) != 2 or not all(isinstance(a, Node) for a in n.args):
                continue
            flags = [a in from_x for a in n.args]
            if flags.count(True) != 1:
                continue
            k = flags.index(False)
            other = n.args[k]
            if other is app.cos or other is app.sin:
                continue
            found.append((n, k))
    return found


def _scale_decay(w: GraphWriter, site: FxRopeSite, ratio: float) -> str:
    """Raises every decay factor of ``site`` to ``ratio`` (1/s: the decay of positions divided by s)."""
    operands = decay_operands(site)
    if not operands:
        raise RescaleRefused("no decay factor found in the xPos rotations")
    done: dict[Node, Node] = {}
    for mul, k in operands:
        value = mul.args[k]
        if value not in done:
            with w.graph.inserting_before(mul):
                done[value] = w.call(aten.pow.Tensor_Scalar, (value, ratio))
        mul.replace_input_with(value, done[value])
    return f"xPos decay exponent x{ratio:.6g} on {len(done)} factor(s) ({len(operands)} use(s))"
