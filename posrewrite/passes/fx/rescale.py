"""Rescaling RoPE sites of an fx graph; every number comes from `posrewrite.math.rope`.

- static methods (linear, ntk, yarn, llama3, a new base): the inv_freq buffer/constant gets the new
  values and the attention factor is written into the ``mul`` after cos and sin (inserted if missing);
- runtime methods (dynamic, longrope): inv_freq is computed in the graph from the runtime length
  ``max(positions) + 1``, in float32 and in the order HF computes it per forward pass (dynamic NTK: the
  base ``b * ((s * n / L) - (s - 1)) ** (d / (d - 2))`` for n > L; longrope: ``where(n > L, long, short)``).

Sites whose angles come from a precomputed table are refused with the reason (not rescaled here).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math import rope as rope_math
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx._graph import GraphWriter, aten
from posrewrite.passes.fx.detect_rope import RUNTIME_NOTE, TABLE_NOTE
from posrewrite.passes.fx.sites import FxRopeSite
from posrewrite.sites.rope import AngleSource, CachedTable, ComputedAngles

__all__ = ["RUNTIME_METHODS", "RescalePlan", "plan_rescale", "apply_rescale", "RescaleRefused"]

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

    def describe(self) -> str:
        p = self.params
        what = f"{p.rope_type} x{p.effective_factor():g}"
        if p.rope_theta is not None:
            what += f", base {p.rope_theta:g}"
        extra = f", attention factor {self.attention_factor:.6g}" if self.attention_factor != 1.0 else ""
        mode = ", inv_freq from the runtime length" if self.runtime else ""
        return (f"rope ({self.site.rotations} applications, rotary_dim {self.site.rotary_dim}): "
                f"{what}{extra}{mode}")


def plan_rescale(site: FxRopeSite, params: rope_math.RopeParameters) -> RescalePlan:
    """The new inv_freq / attention factor of ``site``; raises `RescaleRefused` when impossible."""
    if not isinstance(site.source, ComputedAngles) or site.inv_freq is None:
        why = (TABLE_NOTE if isinstance(site.source, CachedTable) else site.notes[0]
               if site.angles == AngleSource.GRID and site.notes else RUNTIME_NOTE)
        raise RescaleRefused(f"{why}: cannot rescale ({site.applications[0].output.name})")
    try:
        params.validate()
        params = rope_math.parameters_for_site(params, site.base, site.prior_scaling)
        inv, factor = rope_math.scaled_inv_freq(params, inv_freq=site.inv_freq, base=site.base, dim=site.rotary_dim)
    except ValueError as e:
        raise RescaleRefused(str(e)) from None
    runtime = params.rope_type in RUNTIME_METHODS
    return RescalePlan(site, params, None if runtime else inv, factor, runtime)


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
    src = site.computed_handles()
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
            return self.w.call(target, args)

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
