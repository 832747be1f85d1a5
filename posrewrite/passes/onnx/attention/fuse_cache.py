"""Decode-style attention (Optimum / HF exports with a KV cache) -> com.microsoft.GroupQueryAttention.

The graph this recognises, per layer, after posrewrite fused RoPE into com.microsoft.RotaryEmbedding nodes::

    q = RotaryEmbedding(q_heads [B, H, S, D], position_ids, cos, sin)
    k_all = Concat(past_key [B, Hkv, P, D], RotaryEmbedding(k_heads, ...), axis=2)      -> present.{i}.key
    v_all = Concat(past_value, v_heads, axis=2)                                       -> present.{i}.value
    scores = (q * a) @ Transpose(repeat_kv(k_all) * b)   (or (q @ k^T) * s, or / s)   scale = a*b, s, 1/s
    p = Softmax(scores + bias)                (optionally Where(IsNaN(p), 0, p): torch's SDPA export)
    out = p @ repeat_kv(v_all)                                                         [B, H, S, D]

GroupQueryAttention(q, k, v [B, S, *], past_key, past_value, seqlens_k, total_sequence_length,
attention_bias=bias, scale=..) computes the same thing when its own causal mask adds nothing to the bias:
GroupQueryAttention masks key j for query i when j > P + i (P = seqlens_k + 1 - S, the past length given
seqlens_k = P + S - 1 for every batch entry) and adds the bias elsewhere. So the bias is *evaluated* (onnxruntime,
on its own cone of the graph) for several past/sequence lengths, with an all-ones and a left-padded
attention_mask, and must mask every key after the query's position (at or below -1e4: exp underflows to zero).
Layers that compute the same mask (torch writes Where(mask, 0, -inf) once per layer) share one, checked once.

RoPE goes inside (do_rotary=1, the RotaryEmbedding's cos/sin caches, and its positions -- the graph's own
position_ids, whatever they are -- as GroupQueryAttention's position_ids input) when the two RotaryEmbedding
nodes share positions and caches, rotate whole heads, and a probe of the installed onnxruntime (GroupQueryAttention
rotating by position_ids against RotaryEmbedding + GroupQueryAttention without rotation, random positions)
agrees; otherwise the RotaryEmbedding nodes stay before it, on the [B, S, N*D] view. q, k, v are read as the
projections computed them ([B, S, N*D]) and the graph's [B, S, H*D] attention output is GroupQueryAttention's,
where the reshapes between are proven views (`_Dims`: their shape tensors read as dimensions of known values);
otherwise reshapes to and from [B, S, N*D] are written. Kv heads are not expanded any more
(GroupQueryAttention reads head h from kv head h // (H / Hkv), as HF's repeat_kv does).

One difference is allowed and stated: a query row whose keys are all masked (a left-padding position) gives
NaN in the original before its Where(IsNaN) turns it to zero; the bias is clamped to the dtype's lowest finite
value so that GroupQueryAttention gives a finite average there instead. Such rows are padding: no real
position reads them (their keys are masked by the same attention_mask at every later step).
"""

from __future__ import annotations

import onnx_ir as ir

from posrewrite.graph_check import check_graph
from posrewrite.passes.onnx._build import remove_made_dead, unread_nodes
from posrewrite.passes.onnx.attention import cache_rewrite
from posrewrite.passes.onnx.attention.cache_bias import bias_is_at_least_causal, same_computation
from posrewrite.passes.onnx.attention.cache_match import Attention, NotFused, match_attention

__all__ = ["NotFused", "fuse_cache_attention"]


def fuse_cache_attention(model: ir.Model) -> tuple[int, list[str], str]:
    """Rewrites every recognised attention with a KV cache into GroupQueryAttention. Returns (count, reasons
    for the attentions left as they are, what the fused attentions hold: where their rotation is)."""
    graph = model.graph
    found: list[Attention] = []
    reasons: list[str] = []
    for node in [n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
        try:
            found.append(match_attention(graph, node))
        except NotFused as exc:
            reasons.append(f"{node.name or 'Softmax'}: {exc}")
    if not found:
        return 0, reasons, ""
    biases: list[ir.Value] = []  # one mask for every layer that computes the same one (checked and clamped once)
    for att in found:
        if att.bias is not None:
            att.bias = next((b for b in biases if same_computation(b, att.bias)), att.bias)
            if not any(b is att.bias for b in biases):
                biases.append(att.bias)
    verdicts: dict[int, str | None] = {}
    kept = []
    for att in found:
        if att.bias is not None:
            key = id(att.bias)
            if key not in verdicts:
                verdicts[key] = bias_is_at_least_causal(model, att.bias)
            if verdicts[key] is not None:
                reasons.append(f"{att.softmax.name or 'Softmax'}: attention bias {att.bias.name}: {verdicts[key]}")
                continue
        kept.append(att)
    dead_before = unread_nodes(graph)  # the caller's dead code stays theirs to clean
    shared: dict = {}
    heads_views = [v for att in kept for v in (att.q_rot.inputs[0], att.k_rot.inputs[0], att.v_new)]
    outside: dict[str, int] = {}
    copies = 0
    for att in kept:
        why, views = cache_rewrite.rewrite_attention(model, att, shared)
        if why is not None:
            outside[why] = outside.get(why, 0) + 1
        copies += not views
    if kept:
        # the replaced attention goes now, not at the caller's cleanup: what reads the cache concatenation, the
        # rotations and the head transposes only for their shapes is found by what is left reading them
        remove_made_dead(graph, dead_before)
        cache_rewrite.shape_without_concat(graph)
        cache_rewrite.shape_before_rotation(graph)
        remove_made_dead(graph, dead_before)  # the rotations read only for their shapes: gone, so are their uses
        for v in heads_views:  # [B, H, S, D] transposes now read only for their shapes: read the shape before them
            if v is not None and v.producer() is not None and v.producer().graph is graph:
                cache_rewrite.shape_through_transpose(graph, v)
        remove_made_dead(graph, dead_before)
        check_graph(model, "the KV-cache GroupQueryAttention rewrite (fuse_cache_attention)")
        # nodes before GroupQueryAttention now read its present keys: the shape inference that follows needs order
        graph.sort()
    inside = len(kept) - sum(outside.values())
    parts = [f"RoPE inside {inside} (do_rotary=1, cos/sin caches and the graph's position_ids)"] if inside else []
    parts += [f"RotaryEmbedding before {n}: {why}" for why, n in outside.items()]
    if copies:
        parts.append(f"head reshapes/transposes kept around {copies} (not proven views of the projections)")
    return len(kept), reasons, "; ".join(parts)

