"""Finding ALiBi in ATen graphs: ``slopes x distances`` added to attention scores.

A site is a multiplication of a per-head constant vector that `posrewrite.math.alibi` recognises as
ALiBi slopes (the slopes may be a buffer or a constant expression such as Bloom's
``pow(full(2^(-8/n)), arange(1, n + 1))``) by a tensor that depends on the inputs (relative or absolute
key positions), whose result reaches an addition to attention scores (add, baddbmm, or the mask of
scaled_dot_product_attention) through views and casts.
"""

from __future__ import annotations

from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math import alibi as alibi_math
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx._graph import aten
from posrewrite.passes.fx.detect_rope import _constant_value
from posrewrite.passes.fx.sites import FxAlibiSite

__all__ = ["detect_alibi"]

_SCORE_OPS = (aten.add, aten.baddbmm, aten.scaled_dot_product_attention, aten.masked_fill, aten.where)


def _reaches_scores(node: Node, depth: int = 8) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if g.is_op(u, *_SCORE_OPS):
                    return True
                if g.is_op(u, *(g.CAST_OPS + g.VIEW_OPS + (aten.slice, aten.mul, aten.sub, aten.neg))):
                    nxt.append(u)
        frontier = nxt
    return False


def detect_alibi(ep: ExportedProgram) -> list[FxAlibiSite]:
    sites: list[FxAlibiSite] = []
    for node in ep.graph.nodes:
        if not g.is_op(node, aten.mul) or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
            continue
        for slope_side, dist_side in (node.args, node.args[::-1]):
            top, _ = g.through(slope_side, g.CAST_OPS + g.VIEW_OPS)
            value = _constant_value(ep, top) if isinstance(top, Node) else None
            if value is None or not value.is_floating_point() or value.numel() < 1:
                continue
            slopes = value.detach().double().reshape(-1).cpu().numpy()
            if not alibi_math.is_standard_slopes(slopes, rtol=1e-4):
                continue
            dist, _ = g.through(dist_side, g.CAST_OPS + g.VIEW_OPS)
            if _constant_value(ep, dist) is not None or not _reaches_scores(node):
                continue
            sites.append(FxAlibiSite(slopes=slopes.astype("float32"), slopes_node=top, bias=node, distances=dist,
                                     distance_dtype=str(g.dtype(dist_side)).replace("torch.", ""),
                                     num_heads=int(slopes.size)))
            break
    return sites
