"""What RoPE detection found but could not account for, as refusals: multiplications by a site's cos/sin that
no rotation pattern explains, and Cos nodes that belong to no site."""

from __future__ import annotations

import onnx_ir as ir

from posrewrite.passes.onnx._build import EXTEND_NODE_PREFIX
from posrewrite.passes.onnx._graph import VIEW_OPS, ConstantEvaluator, last_dim, rank
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import AngleSource, RopeSite


def _scalar(fold: ConstantEvaluator, v: ir.Value | None) -> bool:
    arr = fold(v) if v is not None else None
    return arr is not None and arr.size == 1


def unmatched_uses(site: RopeSite, fold: ConstantEvaluator) -> list[Refusal]:
    """Multiplications by this site's cos/sin that no rotation pattern accounts for (a layer exported
    differently): rewriting the site would change them without the tool understanding them."""
    if site.angles == AngleSource.FUSED_OP:
        return []
    refusals = []
    claimed = {id(n) for app in site.applications for n in app.nodes}
    claimed.update(id(n) for n in site.source_nodes if n is not None)
    for root in (site.cos, site.sin):
        stack, seen = [root], set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for use in v.uses():
                node = use.node
                if id(node) in claimed or node.op_type in ("Shape", "Size"):
                    continue  # reading only the shape is not a use of the values
                if (
                    node.op_type in VIEW_OPS
                    or node.op_type in ("Slice", "Split", "Gather", "GatherElements", "GatherND")
                    or (node.op_type == "Mul" and any(_scalar(fold, i) for i in node.inputs if i is not v))
                ):
                    stack.extend(node.outputs)
                    continue
                if node.op_type == "Concat" and (all(i is v for i in node.inputs) or _stack(node)):
                    stack.extend(node.outputs)
                    continue
                refusals.append(
                    Refusal(
                        "rope",
                        node.name or "?",
                        f"{node.op_type} uses the RoPE {'cos' if root is site.cos else 'sin'} of a site but is "
                        "not part of a recognised q/k rotation",
                    )
                )
    return refusals


def _stack(node: ir.Node) -> bool:
    """Concat of parts one element wide on its last axis (stack((cos, sin), -1): real pairs of a complex
    rotation, whose elements the rotation picks again)."""
    r = rank(node.outputs[0])
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    return r is not None and axis in (-1, r - 1) and all(last_dim(i) == 1 for i in node.inputs)


def unclaimed_cos(model: ir.Model, sites: list[RopeSite], closest_failure: str | None) -> list[Refusal]:
    """Cos nodes that belong to no site, with the reason the closest rotation pattern failed (if any)."""
    claimed = {id(n) for s in sites for n in s.source_nodes if n is not None}
    return [
        Refusal("rope?", node.name or node.outputs[0].name or "?",
                "Cos node not part of any recognised q/k rotation"
                + (f" (closest pattern failed: {closest_failure})" if closest_failure else ""))
        for node in model.graph
        if node.op_type == "Cos" and id(node) not in claimed
        and not (node.name or "").startswith(EXTEND_NODE_PREFIX)  # an attention extension's own angles
    ]
