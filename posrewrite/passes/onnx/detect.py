"""Every positional encoding the detectors know, in one call: RoPE (`rope.detect`), then ALiBi, learned /
sinusoidal tables and T5 biases (`detect_other`), with what looked like an encoding but was not understood.

This is the aggregator above the per-kind detectors; the pass infrastructure (`_infra`) and the API call it."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from posrewrite.passes.onnx.absolute.detect import detect_computed_sinusoids, detect_position_tables
from posrewrite.passes.onnx.alibi.detect import alibi_site
from posrewrite.passes.onnx.bias.detect import score_bias_sites
from posrewrite.passes.onnx.detect_other import DetectionContext, score_biases
from posrewrite.passes.onnx.rope.detect import detect_rope
from posrewrite.passes.onnx.t5.detect import t5_site
from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.rope import RopeSite

__all__ = ["Detection", "detect", "detect_other_encodings"]


@dataclasses.dataclass
class Detection:
    sites: list[EncodingSite]
    refusals: list[Refusal]

    @property
    def rope_sites(self) -> list[RopeSite]:
        return [s for s in self.sites if isinstance(s, RopeSite)]


def detect(model: ir.Model) -> Detection:
    """Every positional encoding the detectors know, and what looked like one but was not understood."""
    sites: list[EncodingSite] = []
    refusals: list[Refusal] = []
    rope_sites, rope_refusals = detect_rope(model)
    sites.extend(rope_sites)
    other_nodes: set[int] = set()
    other_sites, other_refusals = detect_other_encodings(model)
    # cos/sin caches are RoPE tables, not learned or sinusoidal position tables
    rope_tables = {id(v) for s in rope_sites for v in (s.cos_cache, s.sin_cache) if v is not None}
    other_sites = [s for s in other_sites if id(getattr(s, "table", None)) not in rope_tables]
    sites.extend(other_sites)
    refusals.extend(other_refusals)
    for s in other_sites:
        for attr in ("nodes", "source_nodes"):
            for n in getattr(s, attr, ()) or ():
                other_nodes.add(id(n))
    # a Cos claimed by another encoding (sinusoidal tables) is not an unrecognised RoPE
    by_name = {n.name: n for n in model.graph}
    for r in rope_refusals:
        node = by_name.get(r.where)
        if r.kind == "rope?" and node is not None and id(node) in other_nodes:
            continue
        if r.kind == "rope?" and other_nodes and _feeds_other(node, other_nodes):
            continue
        refusals.append(r)
    return Detection(sites, refusals)


def _feeds_other(node: ir.Node | None, other_nodes: set[int]) -> bool:
    if node is None:
        return False
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen or len(seen) > 64:
            continue
        seen.add(id(n))
        if id(n) in other_nodes:
            return True
        for out in n.outputs:
            stack.extend(u.node for u in out.uses())
    return False


def detect_other_encodings(model: ir.Model) -> tuple[list[EncodingSite], list[Refusal]]:
    """Every ALiBi, learned absolute, sinusoidal and T5 relative-bias encoding in `model`'s main graph, and
    the candidates that were not understood: position tables, then computed sinusoids, then score biases."""
    ctx = DetectionContext(model)
    sites: list[EncodingSite] = []
    refusals: list[Refusal] = []
    claimed: list[ir.Node] = []
    refused_adds: dict[int, Refusal] = {}
    for found, refused in (
        detect_position_tables(ctx),
        detect_computed_sinusoids(ctx),
        score_biases(ctx, alibi=alibi_site, t5=t5_site, claimed=claimed, refused=refused_adds),
    ):
        sites.extend(found)
        refusals.extend(refused)
    # the Adds no reader explained, read by value: a site found there replaces the reader's refusal, and so
    # does a refusal (it says what the values are, the reader only what their syntax is not)
    by_value, by_value_refused = score_bias_sites(ctx, claimed)
    replaced = {id(refused_adds[id(a)]) for s in by_value for a in s.add_nodes if id(a) in refused_adds}
    replaced |= {id(refused_adds[id(a)]) for _, adds in by_value_refused for a in adds if id(a) in refused_adds}
    refusals = [r for r in refusals if id(r) not in replaced] + [r for r, _ in by_value_refused]
    sites.extend(by_value)
    return sites, refusals
