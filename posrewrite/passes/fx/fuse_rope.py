"""Fusing RoPE applications into the `posrewrite::rope_qk` / `posrewrite::rope` custom ops.

The op takes half-form cos/sin (one value per rotated pair). The graph's cos/sin hold every value twice
(``cat([f, f])`` for rotate-half, ``repeat_interleave(f, 2)`` for interleaved); the pass checks that
duplication on the path from the angles to the multiplication and then takes ``cos[..., :r/2]`` or
``cos[..., ::2]``. Applications with the same cos/sin are fused in pairs (q and k of one layer: one
kernel launch); a leftover application gets the single-tensor op. With ``angles="inv_freq"`` the
`posrewrite::rope_qk_freqs` op is used instead where the angles are ``positions x inv_freq`` with a
constant inv_freq: the kernel computes cos/sin itself and the graph's cos/sin computation goes away.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import posrewrite.ops.rope  # noqa: F401  (registers torch.ops.posrewrite.*)
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx._graph import GraphWriter, aten
from posrewrite.passes.fx.detect_rope import _walk_up
from posrewrite.passes.fx.sites import AngleSource, FxComputedHandles, FxRopeApplication, FxRopeSite, Layout

__all__ = ["FusionRefused", "fusable", "fuse_sites", "site_not_fusable"]


class FusionRefused(ValueError):
    pass


def _duplicated(node: Node, layout: Layout, rotary_dim: int) -> bool:
    """Whether the last axis of ``node`` is provably [f, f] (rotate-half) / f repeated per pair."""
    stop_ops = (aten.cat, aten.repeat_interleave)

    def is_dup(n: Node) -> bool:
        if layout == Layout.ROTATE_HALF and g.is_op(n, aten.cat):
            parts, dim = n.args[0], g.arg(n, 1, "dim", 0)
            return len(parts) == 2 and parts[0] is parts[1] and g.is_last_dim(n, dim, of=n)
        if layout == Layout.INTERLEAVED and g.is_op(n, aten.repeat_interleave):
            reps, dim = g.arg(n, 1, "repeats", None), g.arg(n, 2, "dim", None)
            return reps == 2 and isinstance(dim, int) and g.is_last_dim(n, dim, of=n)
        return False

    # Walk up through ops that keep the last axis as it is, checking none of them slices it.
    cur = node
    for _ in range(64):
        if not isinstance(cur, Node):
            return False
        if is_dup(cur):
            return g.last_dim(cur) == rotary_dim
        if g.is_op(cur, aten.cos, aten.sin, aten.neg):
            cur = cur.args[0]
            continue
        if g.scalar_mul(cur) is not None:
            cur = g.scalar_mul(cur)[0]
            continue
        if g.is_op(cur, *stop_ops):
            return False
        if g.is_op(cur, aten.slice) or g.slice_of(cur) is not None:
            s = g.slice_of(cur)
            if s is None or s.dim == g.rank(s.source) - 1:
                return False
            cur = s.source
            continue
        if g.is_op(cur, *(g.CAST_OPS + g.VIEW_OPS + (aten.index, aten.gather, aten.index_select))):
            src = cur.args[0]
            if g.last_dim(src) != g.last_dim(cur):
                return False
            cur = src
            continue
        return False
    return False


def _seq_axis(app: FxRopeApplication) -> int | None:
    """Axis of x holding the sequence (1 or 2) given the broadcast shape of cos; None if per-head cos."""
    xs, cs = g.shape(app.rotated), g.shape(app.cos)
    if xs is None or cs is None or len(xs) != 4 or len(cs) > 4:
        return None
    cs = (1,) * (4 - len(cs)) + tuple(cs)
    one1, one2 = cs[1] == 1, cs[2] == 1
    if one1 and not one2:
        return 2
    if one2 and not one1:
        return 1
    if one1 and one2:
        # Both broadcast (one token, or one head): read the unsqueeze that made the heads axis.
        _, path = g.through(app.cos, g.CAST_OPS + (aten.expand, aten.slice, aten.repeat_interleave))
        node = path[-1].args[0] if path else app.cos
        if g.is_op(node, aten.unsqueeze):
            d = g.normalise_dim(node.args[1], g.rank(node))
            if d in (1, 2):
                return 3 - d
        return 2
    return None


def site_not_fusable(site: FxRopeSite) -> str | None:
    """Why no application of ``site`` can become the fused op (its contract: one angle per token, pairs rotated in
    place, rotate-half or interleaved, no magnitude), None when that is not ruled out."""
    if site.angles == AngleSource.GRID:
        return "2-D RoPE over a patch grid: the fused op reads one position per token"  # (FuseRope skips these)
    if site.layout not in (Layout.ROTATE_HALF, Layout.INTERLEAVED):
        return (f"its {site.layout.value} pairing is not one the fused op computes (rotate-half or interleaved "
                "in place)")
    if site.encoding.decay is not None:
        return "the fused op has no xPos decay"
    return None


def fusable(app: FxRopeApplication) -> tuple[int | None, str]:
    """(seq_axis, "") when ``app`` can be fused, else (None, reason)."""
    if app.heads_in_last_axis > 1:
        return None, (f"x holds {app.heads_in_last_axis} heads on its last axis ([.., H·D]; the fused op takes "
                      "[batch, heads, seq, head_dim] q/k)")
    if g.rank(app.x) != 4:
        return None, f"x has rank {g.rank(app.x)} (the fused op takes 4-D q/k)"
    seq_axis = _seq_axis(app)
    if seq_axis is None:
        return None, "cos/sin vary per head or do not broadcast like [batch, 1, seq, d]"
    for t in (app.cos, app.sin):
        if g.last_dim(t) != app.rotary_dim:
            return None, f"{t.name} is not {app.rotary_dim} wide"
        if not _duplicated(t, app.layout, app.rotary_dim):
            return None, f"cannot show that {t.name} repeats each angle for both members of a pair"
    return seq_axis, ""


def _half(w: GraphWriter, table: Node, layout: Layout, rotary_dim: int, cache: dict) -> Node:
    key = (table, layout, rotary_dim)
    if key not in cache:
        r = g.rank(table)
        if layout == Layout.ROTATE_HALF:
            cache[key] = w.call(aten.slice.Tensor, (table, r - 1, 0, rotary_dim // 2))
        else:
            cache[key] = w.call(aten.slice.Tensor, (table, r - 1, 0, rotary_dim, 2))
    return cache[key]


@dataclasses.dataclass
class _Item:
    app: FxRopeApplication
    seq_axis: int
    kernel_angles: tuple | None = None  # (positions, inv_freq, attention factor) for the *_freqs ops


ANGLE_MODES = ("tables", "inv_freq")


def _kernel_angles(site: FxRopeSite, app: FxRopeApplication, seq_axis: int) -> tuple[Node, Node, float] | None:
    """(positions, inv_freq, attention factor) when the op may compute this application's angles itself:
    computed angles from constant inv_freq and [batch, seq] positions, and only broadcasts, casts,
    duplications and the attention factor between cos(angles) and the multiplication."""
    if not isinstance(site.handles, FxComputedHandles):
        return None
    src = site.handles
    ps, xs = g.shape(src.positions), g.shape(app.x)
    if ps is None or xs is None or len(ps) != 2 or g.dtype(src.positions) not in (torch.int64, torch.int32):
        return None
    if not (ps[1] is xs[seq_axis] or ps[1] == xs[seq_axis]):
        return None
    allowed = g.CAST_OPS + (aten.unsqueeze, aten.expand, aten.repeat_interleave, aten.cat, aten.mul)
    for table, fn in ((app.cos, src.cos_node), (app.sin, src.sin_node)):
        found, path = _walk_up(table, lambda n, fn=fn: n is fn)
        if found is None:
            return None
        for n in path:
            if g.is_op(n, aten.slice):  # a prefix of the channels (GLM: cos[..., :r/2] of cat(f, f))
                sl = g.slice_of(n)
                if sl is None or sl.dim != g.rank(n) - 1 or sl.start != 0 or sl.step != 1:
                    return None
            elif not g.is_op(n, *allowed):
                return None
    if g.shape(src.inv_freq_node) != (app.rotary_dim // 2,):
        return None
    return src.positions, src.inv_freq_node, float(site.source.attention_factor)


def fuse_sites(ep: ExportedProgram, sites: list[FxRopeSite], *, angles: str = "tables") -> tuple[list[str], list[str]]:
    """Replace every fusable application by the custom op; returns (done lines, refusal lines).

    ``angles``: "tables" (the op reads half-form cos/sin made by the graph) or "inv_freq" (the op computes
    cos/sin from positions and inv_freq in float32 where the site allows it, else tables)."""
    if angles not in ANGLE_MODES:
        raise ValueError(f"angles must be one of {', '.join(ANGLE_MODES)}, not {angles!r}")
    w = GraphWriter(ep)
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    done: list[str] = []
    refused: list[str] = []
    groups: dict[tuple, list[_Item]] = {}
    for site in sites:
        why = site_not_fusable(site)
        if why is not None:
            refused.extend(f"{app.output.name}: {why}" for app in site.applications)
            continue
        for app in site.applications:
            seq_axis, why = fusable(app)
            if seq_axis is None:
                refused.append(f"{app.output.name}: {why}")
                continue
            kernel = _kernel_angles(site, app, seq_axis) if angles == "inv_freq" else None
            key = (_structure(app.cos), _structure(app.sin), app.layout, app.rotary_dim, seq_axis)
            groups.setdefault(key, []).append(_Item(app, seq_axis, kernel))
    for (_, _, layout, rotary_dim, seq_axis), items in groups.items():
        items.sort(key=lambda it: order[it.app.output])
        i = 0
        while i < len(items):
            pair = items[i:i + 2]
            if len(pair) == 2 and not _pairable(pair[0].app, pair[1].app, order):
                pair = pair[:1]
            _fuse(w, pair, layout, rotary_dim, seq_axis)
            done.append(" + ".join(it.app.describe() for it in pair))
            i += len(pair)
    w.graph.eliminate_dead_code()
    return done, refused


def _structure(node: object, depth: int = 8) -> object:
    """A hashable description of how ``node`` is computed from non-view nodes: two nodes with the same
    structure hold the same values (e.g. the per-layer ``repeat_interleave(cos)`` copies GPT-J makes)."""
    if isinstance(node, (list, tuple)):
        return tuple(_structure(a, depth) for a in node)
    if not isinstance(node, Node):
        return node if isinstance(node, (int, float, bool, str, type(None), torch.dtype, torch.device)) else repr(node)
    if node.op != "call_function" or depth == 0 or not g.is_op(
            node, *(g.CAST_OPS + g.VIEW_OPS + (aten.slice, aten.repeat_interleave, aten.cat))):
        if node.target is operator.getitem:
            return ("getitem", _structure(node.args[0], depth - 1), node.args[1])
        return node
    return (node.target, _structure(node.args, depth - 1),
            tuple(sorted((k, _structure(v, depth - 1)) for k, v in node.kwargs.items())))


def _inputs(app: FxRopeApplication) -> list[Node]:
    return [app.x, app.cos, app.sin]


def _pairable(a: FxRopeApplication, b: FxRopeApplication, order: dict) -> bool:
    """The fused op goes right after the last of its inputs; that must precede every user of both outputs."""
    at = max(order[n] for n in _inputs(a) + _inputs(b))
    users = list(a.output.users) + list(b.output.users)
    return all(order.get(u, at + 1) > at for u in users) and g.dtype(a.x) == g.dtype(b.x)


def _fuse(w: GraphWriter, items: list[_Item], layout: Layout, rotary_dim: int, seq_axis: int) -> None:
    order = {n: i for i, n in enumerate(w.graph.nodes)}
    last = max((n for it in items for n in _inputs(it.app)), key=order.__getitem__)
    anchor = last.next
    # cos/sin of any member (equal by construction of the group): take those defined first
    cos = min((it.app.cos for it in items), key=order.__getitem__)
    sin = min((it.app.sin for it in items), key=order.__getitem__)
    cache: dict = {}
    interleaved = layout == Layout.INTERLEAVED
    kernel = items[0].kernel_angles
    if kernel is not None and all(it.kernel_angles is not None and it.kernel_angles[:2] == kernel[:2] and
                                  it.kernel_angles[2] == kernel[2] for it in items):
        positions, inv_freq, factor = kernel
        with w.graph.inserting_before(anchor):
            if len(items) == 2:
                fused = w.call(torch.ops.posrewrite.rope_qk_freqs.default,
                               (items[0].app.x, items[1].app.x, positions, inv_freq, factor, interleaved, seq_axis))
                outs = [w.call(operator.getitem, (fused, 0)), w.call(operator.getitem, (fused, 1))]
            else:
                outs = [w.call(torch.ops.posrewrite.rope_freqs.default,
                               (items[0].app.x, positions, inv_freq, factor, interleaved, seq_axis))]
        _redirect(w, items, outs)
        return
    with w.graph.inserting_before(anchor):
        c = _half(w, cos, layout, rotary_dim, cache)
        s = _half(w, sin, layout, rotary_dim, cache)
        if len(items) == 2:
            q, k = items[0].app, items[1].app
            fused = w.call(torch.ops.posrewrite.rope_qk.default, (q.x, k.x, c, s, interleaved, rotary_dim, seq_axis))
            outs = [w.call(operator.getitem, (fused, 0)), w.call(operator.getitem, (fused, 1))]
        else:
            fused = w.call(torch.ops.posrewrite.rope.default, (items[0].app.x, c, s, interleaved, rotary_dim, seq_axis))
            outs = [fused]
    _redirect(w, items, outs)


def _redirect(w: GraphWriter, items: list[_Item], outs: list[Node]) -> None:
    """Readers of each application's output read the fused op's output (cast back if the dtype differs)."""
    for it, out in zip(items, outs, strict=True):
        old = it.app.output
        want = g.dtype(old)
        if want is not None and g.dtype(out) != want:
            with w.graph.inserting_after(out):
                out = w.call(aten._to_copy.default, (out,), {"dtype": want})
        old.replace_all_uses_with(out)
