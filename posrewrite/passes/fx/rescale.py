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
from posrewrite.passes.fx.sites import AngleSource, FxRopeSite

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
        return (f"rope ({self.site.sites} applications, rotary_dim {self.site.rotary_dim}): "
                f"{what}{extra}{mode}")


def plan_rescale(site: FxRopeSite, params: rope_math.RopeParameters) -> RescalePlan:
    """The new inv_freq / attention factor of ``site``; raises `RescaleRefused` when impossible."""
    src = site.source
    if src.kind != AngleSource.COMPUTED or src.inv_freq is None:
        raise RescaleRefused(f"{src.reason or 'angle source not understood'}: cannot rescale "
                             f"({site.applications[0].output.name})")
    try:
        params.validate()
        params = rope_math.parameters_for_site(params, site.base, site.prior_scaling)
        inv, factor = rope_math.scaled_inv_freq(params, inv_freq=src.inv_freq, base=site.base, dim=site.rotary_dim)
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
    src = site.source
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


def _runtime_inv_freq(w: GraphWriter, plan: RescalePlan) -> Node:
    """float32 [d/2] inv_freq computed from max(positions) + 1 (inserted before the angle product)."""
    p, site = plan.params, plan.site
    src = site.source
    dim = site.rotary_dim
    L = p.original_max_position_embeddings
    orig = src.inv_freq if p.rope_theta is None else rope_math.default_inv_freq(p.rope_theta, dim)
    with w.graph.inserting_before(src.angles):
        seq = w.call(aten.add.Tensor, (w.call(aten.max.default, (src.positions,)), 1))
        longer = w.call(aten.gt.Scalar, (seq, L))
    if p.rope_type == "longrope":
        short, _ = rope_math.scaled_inv_freq(p, inv_freq=src.inv_freq, base=site.base, dim=dim, seq_len=L)
        long, _ = rope_math.scaled_inv_freq(p, inv_freq=src.inv_freq, base=site.base, dim=dim, seq_len=L + 1)
        short_c = w.add_constant("posrewrite_short_inv_freq", torch.from_numpy(short.astype(np.float32)))
        long_c = w.add_constant("posrewrite_long_inv_freq", torch.from_numpy(long.astype(np.float32)))
        with w.graph.inserting_before(src.angles):
            return w.call(aten.where.self, (longer, long_c, short_c))
    # dynamic NTK, HF's float32 op order: base * ((s * n / L) - (s - 1)) ** (d / (d - 2)); 1 / base ** (2i/d)
    base = float(p.rope_theta if p.rope_theta is not None else site.base)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    exp_c = w.add_constant("posrewrite_rope_exponents", exponents)
    orig_c = w.add_constant("posrewrite_inv_freq", torch.from_numpy(np.asarray(orig, dtype=np.float32)))
    with w.graph.inserting_before(src.angles):
        ratio = w.call(aten.sub.Tensor, (w.call(aten.div.Tensor, (w.call(aten.mul.Tensor, (seq, float(p.factor))), L)),
                                         float(p.factor - 1)))
        new_base = w.call(aten.mul.Tensor, (w.call(aten.pow.Tensor_Scalar, (ratio, dim / (dim - 2))), base))
        dyn = w.call(aten.reciprocal.default, (w.call(aten.pow.Tensor_Tensor, (new_base, exp_c)),))
        return w.call(aten.where.self, (longer, dyn, orig_c))


def apply_rescale(ep: ExportedProgram, plans: list[RescalePlan]) -> list[str]:
    """Rewrite ``ep`` (in place) by ``plans``; returns one line per site."""
    w = GraphWriter(ep)
    done: list[str] = []
    replaced: set[Node] = set()
    for plan in plans:
        src = plan.site.source
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
