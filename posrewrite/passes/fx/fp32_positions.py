"""Making RoPE angles fp32-safe in an fx graph.

Positions cast to fp16/bf16 lose integers above 2048/256, and angles ``position x inv_freq`` in half
precision carry errors of whole radians at long lengths. For every computed site whose positions or
angles are not float32 the pass casts positions to float32, gives inv_freq float32 values (rebuilt from
the fitted base when there is one), lets the angle arithmetic and cos/sin run in float32 and casts only
cos and sin back to the dtype the rest of the graph had.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math import rope as rope_math
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.fx._graph import GraphWriter, aten
from posrewrite.passes.fx.sites import FxComputedHandles, FxRopeSite
from posrewrite.sites.rope import ComputedAngles

__all__ = ["needs_fp32", "make_fp32"]


def needs_fp32(site: FxRopeSite) -> bool:
    src = site.source
    return isinstance(src, ComputedAngles) and isinstance(site.handles, FxComputedHandles) and (
        src.angle_dtype != "float32" or src.position_dtype not in ("float32", "int64", "int32")
    )


def _between(start: set[Node], stop: set[Node]) -> list[Node]:
    """Nodes reachable downward from ``start`` up to and including ``stop`` (not past them)."""
    seen: set[Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        todo.extend(n.users)
    return list(seen)


def make_fp32(ep: ExportedProgram, sites: list[FxRopeSite]) -> list[str]:
    w = GraphWriter(ep)
    done: list[str] = []
    for site in sites:
        if not needs_fp32(site):
            continue
        src = site.computed_handles()
        changed: set[Node] = set()
        # positions -> float32
        cast = src.position_cast
        if cast is not None and g.cast_dtype(cast) is not None:
            g.set_cast_dtype(cast, torch.float32)
            changed.add(cast)
        else:
            pos = src.positions
            with w.graph.inserting_after(pos):
                new = w.call(aten._to_copy.default, (pos,), {"dtype": torch.float32})
            for u in list(pos.users):
                if u is not new and _on_path(u, src.angles):
                    u.replace_input_with(pos, new)
            changed.add(new)
        # inv_freq -> float32 values, and no narrowing cast on its way to the product
        cur = src.inv_freq_operand
        while cur is not None and cur is not src.inv_freq_node:
            if g.cast_dtype(cur) in (torch.float16, torch.bfloat16):
                g.set_cast_dtype(cur, torch.float32)
                changed.add(cur)
            cur = cur.args[0]
        inv_node = src.inv_freq_node
        if g.dtype(inv_node) != torch.float32:
            values = rope_math.default_inv_freq(site.base, site.rotary_dim) if site.base else site.inv_freq
            const = w.add_constant("posrewrite_inv_freq_fp32", torch.from_numpy(np.asarray(values, np.float32))
                                   .reshape(g.shape(inv_node)))
            for u in list(inv_node.users):
                if _on_path(u, src.angles):
                    u.replace_input_with(inv_node, const)
                    changed.add(u)
        # casts between the inputs and cos/sin that would narrow the angles again -> float32
        region = _between(changed, {src.cos_node, src.sin_node})
        for n in region:
            if g.cast_dtype(n) in (torch.float16, torch.bfloat16):
                g.set_cast_dtype(n, torch.float32)
        old = {n: g.dtype(n) for n in (src.cos_node, src.sin_node)}
        w.refresh(region)
        for n, dt in old.items():
            if dt is not None and dt != torch.float32:
                users = list(n.users)
                with w.graph.inserting_after(n):
                    back = w.call(aten._to_copy.default, (n,), {"dtype": dt})
                for u in users:
                    u.replace_input_with(n, back)
        done.append(f"rope ({site.rotations} q/k rotations): positions {site.source.position_dtype}, "
                     f"angles {site.source.angle_dtype} "
                     f"-> float32 (cos/sin cast after)")
    w.graph.eliminate_dead_code()
    return done


def _on_path(node: Node, target: Node, depth: int = 12) -> bool:
    """Whether ``target`` is reachable from ``node`` going down at most ``depth`` steps."""
    frontier = {node}
    for _ in range(depth):
        if target in frontier:
            return True
        frontier = {u for n in frontier for u in n.users}
        if not frontier:
            return False
    return target in frontier
