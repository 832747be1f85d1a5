"""The marks a posrewrite rewrite leaves in a graph so that a later inspect / rescale of its output knows what
it started from: the rescale of a constant inv_freq or of fused caches, and the parameters of a run-time inv_freq.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from posrewrite.passes.onnx._graph import trace_through
from posrewrite.sites.rope import RescaleRecord, RuntimeInvFreq

RUNTIME_INV_FREQ_KEY = "posrewrite.runtime_inv_freq"
#: on the node that consumes a rescaled inv_freq constant: what the rescale did (JSON)
RESCALED_KEY = "posrewrite.rescaled_rope"

_MARKER_PATH_OPS = ("Cast", "Reshape", "Unsqueeze", "Expand", "Identity", "Transpose")


def mark_rescaled_cache(graph: ir.Graph, cache: ir.Value, what: dict) -> None:
    """Records on the graph (metadata_props, keyed by the cos cache's name, which survives attention fusion and
    saving) the rescale a fused cache was computed with, so that inspect / a later rescale start from its base."""
    if cache.name and what.get("base") is not None:
        graph.metadata_props[f"{RESCALED_KEY}:{cache.name}"] = json.dumps(what)


def _parse(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def cache_record(graph: ir.Graph, cache: ir.Value) -> RescaleRecord | None:
    """The rescale record of fused caches (by the cos cache's name), or None."""
    data = _parse(graph.metadata_props.get(f"{RESCALED_KEY}:{cache.name}") if cache.name else None)
    return RescaleRecord.from_json(data) if data else None


def node_record(node: ir.Node) -> RescaleRecord | None:
    """The rescale record on the node consuming a rescaled inv_freq constant, or None."""
    data = _parse(node.metadata_props.get(RESCALED_KEY))
    return RescaleRecord.from_json(data) if data else None


def runtime_marker(value: ir.Value) -> tuple[ir.Value, RuntimeInvFreq] | None:
    """(the run-time inv_freq value, the parameters posrewrite recorded on it) for a dynamic / longrope
    rewrite of posrewrite's, walking up from an operand of the angle product."""
    def _marked(v: ir.Value) -> bool:
        node = v.producer()
        return node is not None and RUNTIME_INV_FREQ_KEY in node.metadata_props

    v, _ = trace_through(value, _MARKER_PATH_OPS, limit=8, until=_marked)
    node = v.producer()
    data = _parse(node.metadata_props.get(RUNTIME_INV_FREQ_KEY)) if node is not None else None
    return (v, RuntimeInvFreq.from_json(data)) if data else None
