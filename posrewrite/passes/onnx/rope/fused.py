"""RoPE already fused into one op: RotaryEmbedding nodes (ONNX 23 or com.microsoft) and attention ops that
rotate q/k themselves (com.microsoft.GroupQueryAttention do_rotary=1), including onnxruntime-genai's LongRoPE
form where an If chooses long or short caches by length."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.math import rope as rope_math
from posrewrite.math import rope_fit
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, int_attr, last_dim, rank
from posrewrite.passes.onnx.rope.base import table_base
from posrewrite.passes.onnx.rope.markers import cache_record
from posrewrite.passes.onnx.rope.tables import NotUnderstood, fit_tables, table_eps
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import (
    AttentionRotary,
    FusedCaches,
    Layout,
    LengthSelection,
    OnnxSwitchedCaches,
    RescaleRecord,
    RopeEncoding,
    RopeSite,
)

_FUSED_DOMAINS = {"com.microsoft": "contrib", "": "onnx", "ai.onnx": "onnx"}

#: attention ops that rotate q/k themselves: op_type -> (cos_cache input index, sin_cache input index)
ROTARY_ATTENTION_CACHES = {"GroupQueryAttention": (7, 8)}


def is_rotary_attention(node: ir.Node) -> bool:
    return (node.domain == "com.microsoft" and node.op_type in ROTARY_ATTENTION_CACHES
            and int_attr(node, "do_rotary", 0) == 1)


def attention_caches(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    ci, si = ROTARY_ATTENTION_CACHES[node.op_type]
    inputs = list(node.inputs)
    return (inputs[ci] if len(inputs) > ci else None), (inputs[si] if len(inputs) > si else None)


def fused_cache_indices(node: ir.Node) -> tuple[int, int]:
    """Input indices of the cos and sin caches of a fused RoPE node (RotaryEmbedding or a rotary attention op)."""
    if is_rotary_attention(node):
        return ROTARY_ATTENTION_CACHES[node.op_type]
    return (2, 3) if node.domain == "com.microsoft" else (1, 2)


def attention_head_size(node: ir.Node) -> int | None:
    """Head size of GroupQueryAttention: query [B, S, N*H] with separate k/v, or packed [B, S, (N + 2 Nkv)*H]."""
    width = last_dim(node.inputs[0])
    heads = int_attr(node, "num_heads", 0)
    kv = int_attr(node, "kv_num_heads", 0)
    if width is None or not heads:
        return None
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    div = heads + 2 * kv if packed else heads
    return width // div if div and width % div == 0 else None


def _rewritten(record: RescaleRecord | None, prior: rope_math.PriorScaling | None) -> RescaleRecord | None:
    """The rescale record a fused site keeps: only when its base came from it."""
    return record if prior is not None and prior.kind == "rewritten" else None


class FusedRopeDetector:
    """Describes every fused RoPE op of a graph; what it cannot describe goes to `refusals`."""

    def __init__(self, model: ir.Model, fold: ConstantEvaluator) -> None:
        self.model = model
        self.fold = fold
        self.refusals: list[Refusal] = []

    def detect(self) -> list[RopeSite]:
        sites = []
        by_cache: dict[tuple[int, int], list[ir.Node]] = {}
        for node in self.model.graph:
            if is_rotary_attention(node):
                cos_v, sin_v = attention_caches(node)
                if cos_v is None or sin_v is None:
                    self.refusals.append(Refusal("rope", node.name or "?", "GroupQueryAttention with do_rotary=1 "
                                                 "but no cos_cache/sin_cache inputs"))
                    continue
                by_cache.setdefault((id(cos_v), id(sin_v)), []).append(node)
                continue
            if node.op_type != "RotaryEmbedding" or node.domain not in _FUSED_DOMAINS:
                continue
            contrib = node.domain == "com.microsoft"
            if len(node.inputs) < (4 if contrib else 3):  # a malformed node: cos/sin caches missing
                continue
            cos_v, sin_v = (node.inputs[2], node.inputs[3]) if contrib else (node.inputs[1], node.inputs[2])
            by_cache.setdefault((id(cos_v), id(sin_v)), []).append(node)
        for nodes in by_cache.values():
            node = nodes[0]
            try:
                site = self._attention_site(nodes) if is_rotary_attention(node) else self._rotary_site(nodes)
            except NotUnderstood as refused:
                self.refusals.append(Refusal("rope", node.name or "?", str(refused)))
                continue
            sites.append(site)
        return sites

    def _rotary_site(self, nodes: list[ir.Node]) -> RopeSite:
        node = nodes[0]
        contrib = node.domain == "com.microsoft"
        cos_v, sin_v = (node.inputs[2], node.inputs[3]) if contrib else (node.inputs[1], node.inputs[2])
        positions = node.inputs[1] if contrib else (node.inputs[3] if len(node.inputs) > 3 else None)
        cos_t, sin_t = self.fold(cos_v), self.fold(sin_v)
        interleaved = bool(int_attr(node, "interleaved", 0))
        layout = Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF
        if cos_t is None or sin_t is None:
            raise NotUnderstood("fused RotaryEmbedding whose caches are computed at run time")
        inv_freq, factor = fit_tables(np.asarray(cos_t, np.float64), np.asarray(sin_t, np.float64), "half",
                                      table_eps(cos_v))
        rotary_dim = int_attr(node, "rotary_embedding_dim", 0) or 2 * inv_freq.size
        head_dim = last_dim(node.inputs[0])
        num_heads = int_attr(node, "num_heads", 0) or None
        if head_dim is not None and rank(node.inputs[0]) == 3 and num_heads:
            head_dim //= num_heads
        elif head_dim is not None and rank(node.inputs[0]) == 3 and contrib:
            # com.microsoft's contract for [B, S, hidden] without num_heads: heads as wide as the caches say
            # (2 * their width), every one rotated whole (what the genai builder's fp16 CPU model writes)
            head_dim = 2 * int(cos_t.shape[1])
        notes = [f"fused {_FUSED_DOMAINS[node.domain]} RotaryEmbedding"]
        record = cache_record(self.model.graph, cos_v)
        base, prior = table_base(inv_freq, record, notes)
        source = FusedCaches(
            op=("com.microsoft." if contrib else "") + "RotaryEmbedding",
            rows=int(cos_t.shape[0]),
            dtype=dtype_name(cos_v),
            position_dtype=dtype_name(positions) if positions is not None else "int64",
            attention_factor=factor,
            rescaled=_rewritten(record, prior),
        )
        encoding = RopeEncoding(layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, source=source, base=base,
                                inv_freq=inv_freq, prior_scaling=prior, notes=tuple(notes))
        return RopeSite(encoding=encoding, cos=cos_v, sin=sin_v, positions=positions, cos_cache=cos_v,
                        sin_cache=sin_v, fused_nodes=tuple(nodes))

    def _attention_site(self, nodes: list[ir.Node]) -> RopeSite:
        """RoPE applied inside com.microsoft.GroupQueryAttention (do_rotary=1): its caches [rows, rotary_dim/2]
        are the site's tables; positions are the op's own (past length + 0..S-1)."""
        node = nodes[0]
        cos_v, sin_v = attention_caches(node)
        producer = cos_v.producer()
        if producer is not None and producer.op_type == "If":
            return self._switched_attention_site(nodes, producer)
        cos_t, sin_t = self.fold(cos_v), self.fold(sin_v)
        if cos_t is None or sin_t is None:
            raise NotUnderstood(f"{node.op_type} whose cos/sin caches are computed at run time")
        cos_t, sin_t = np.asarray(cos_t, np.float64), np.asarray(sin_t, np.float64)
        if cos_t.ndim != 2 or cos_t.shape != sin_t.shape:
            raise NotUnderstood(f"{node.op_type} caches of shapes {cos_t.shape} and {sin_t.shape}, expected two "
                                "[rows, rotary_dim/2]")
        inv_freq, factor = fit_tables(cos_t, sin_t, "half", table_eps(cos_v))
        interleaved = bool(int_attr(node, "rotary_interleaved", 0))
        rotary_dim = 2 * inv_freq.size
        head_dim = attention_head_size(node)
        if head_dim is not None and rotary_dim > head_dim:
            raise NotUnderstood(f"{node.op_type} caches rotate {rotary_dim} channels but heads have {head_dim}")
        notes = [f"rotary inside com.microsoft.{node.op_type} (do_rotary=1, rotary_interleaved={int(interleaved)}): "
                 f"{len(nodes)} node(s) share caches {cos_v.name}/{sin_v.name} [{cos_t.shape[0]}, {cos_t.shape[1]}]; "
                 "positions are the op's own (past length + 0..S-1)"]
        if head_dim is not None and rotary_dim < head_dim:
            notes.append(f"partial rotary: {rotary_dim} of {head_dim} channels")
        record = cache_record(self.model.graph, cos_v)
        base, prior = table_base(inv_freq, record, notes)
        source = AttentionRotary(op=f"com.microsoft.{node.op_type}", rows=int(cos_t.shape[0]),
                                 dtype=dtype_name(cos_v), interleaved=interleaved, attention_factor=factor,
                                 rescaled=_rewritten(record, prior))
        encoding = RopeEncoding(layout=Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF, head_dim=head_dim,
                                rotary_dim=rotary_dim, source=source, base=base, inv_freq=inv_freq,
                                prior_scaling=prior, notes=tuple(notes))
        return RopeSite(encoding=encoding, cos=cos_v, sin=sin_v, cos_cache=cos_v, sin_cache=sin_v,
                        fused_nodes=tuple(nodes))

    def _switched_attention_site(self, nodes: list[ir.Node], if_node: ir.Node) -> RopeSite:
        """onnxruntime-genai's LongRoPE form (Phi-3/3.5 128k): If(length > L) selects constant long caches [N, d/2]
        (then) or short caches [L, d/2] (else), fed to GroupQueryAttention."""
        node = nodes[0]
        cos_v, sin_v = attention_caches(node)
        why = f"{node.op_type} caches chosen at run time by If ({if_node.name})"
        if sin_v.producer() is not if_node:
            raise NotUnderstood(f"{why}, but its sin cache comes from elsewhere")
        compare = if_node.inputs[0].producer() if if_node.inputs and if_node.inputs[0] is not None else None
        threshold = self.fold(compare.inputs[1]) if compare is not None and compare.op_type == "Greater" else None
        if threshold is None or np.asarray(threshold).size != 1:
            raise NotUnderstood(f"{why}: the condition is not Greater(length, constant)")
        L = int(np.asarray(threshold).reshape(-1)[0])
        outputs = list(if_node.outputs)
        ci, si = outputs.index(cos_v), outputs.index(sin_v)
        branches = {}
        for name in ("then_branch", "else_branch"):
            attr = if_node.attributes.get(name)
            graph = attr.value if attr is not None else None
            consts = []
            for k in (ci, si):
                value = graph.outputs[k] if graph is not None and len(graph.outputs) > max(ci, si) else None
                producer = value.producer() if value is not None else None
                is_const = producer is not None and producer.op_type == "Constant"
                tensor = producer.attributes.get("value") if is_const else None
                if tensor is None:
                    raise NotUnderstood(f"{why}: its {name} does not output constant caches")
                consts.append((producer, np.asarray(tensor.value.numpy(), np.float64)))
            try:
                fitted = fit_tables(consts[0][1], consts[1][1], "half", table_eps(cos_v))
            except NotUnderstood as refused:
                raise NotUnderstood(f"{why}, {name}: {refused}") from None
            branches[name] = (consts, fitted)
        (long_consts, (long_inv, long_factor)) = branches["then_branch"]
        (short_consts, (short_inv, short_factor)) = branches["else_branch"]
        rows = int(long_consts[0][1].shape[0])
        if short_inv.size != long_inv.size:
            raise NotUnderstood(f"{why}: short and long caches differ in width")
        ratio = short_inv.astype(np.float64) / long_inv.astype(np.float64)
        notes = [f"rotary inside com.microsoft.{node.op_type} (do_rotary=1), {len(nodes)} node(s); LongRoPE caches "
                 f"switched by {if_node.name}: short [{short_consts[0][1].shape[0]}, {short_inv.size}] up to {L} "
                 f"tokens (attention factor {short_factor:.6g}), long [{rows}, {long_inv.size}] beyond (up to "
                 f"{np.max(ratio):.4g}x slower, attention factor {long_factor:.6g}); inv_freq shown is the short one"]
        base, prior = rope_fit.fit_base(short_inv), rope_math.PriorScaling("by_length", float(np.max(ratio)), 0)
        if base is None:
            notes.append("the base is not recoverable from LongRoPE frequencies: a rescale needs --rope-base "
                         "(the model's rope_theta)")
        interleaved = bool(int_attr(node, "rotary_interleaved", 0))
        selection = LengthSelection(threshold=L, short=short_inv, long=long_inv, long_factor=float(long_factor))
        source = AttentionRotary(op=f"com.microsoft.{node.op_type}", rows=rows, dtype=dtype_name(cos_v),
                                 interleaved=interleaved, attention_factor=short_factor, selection=selection)
        encoding = RopeEncoding(layout=Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF,
                                head_dim=attention_head_size(node), rotary_dim=2 * short_inv.size, source=source,
                                base=base, inv_freq=short_inv, prior_scaling=prior, notes=tuple(notes))
        return RopeSite(encoding=encoding, cos=cos_v, sin=sin_v, cos_cache=cos_v, sin_cache=sin_v,
                        fused_nodes=tuple(nodes),
                        handles=OnnxSwitchedCaches(if_node, long_consts[0][0], long_consts[1][0]))
