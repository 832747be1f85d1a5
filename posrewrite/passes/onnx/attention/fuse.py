"""Fuses the decomposed attention around fused RotaryEmbedding nodes (`--fuse ort`, `--fuse onnx`).

Once RoPE is a com.microsoft.RotaryEmbedding node, onnxscript's onnxruntime fusions recognise the attention
around it: `fuse_sdpa` (MatMul/scale/mask/Softmax/MatMul -> an SDPA function), then `fuse_gqa`
(SDPA + RotaryEmbedding + repeat_kv -> GroupQueryAttention with do_rotary and the cos/sin caches), or
`fuse_mha*` / `replace_sdpa_by_mha` (-> MultiHeadAttention after the RotaryEmbedding nodes, the mask kept as
an attention bias). This pass uses them (after the RMSNorm / skip-normalisation fusions the GQA rule expects)
and adds the checks they leave out:

- GroupQueryAttention is always causal and rotates by its own positions (past length + 0..S-1); onnxscript's
  GQA rule drops the attention mask without looking at it, takes the sequence length from max(position_ids)+1
  and drops a non-default attention scale. So the GQA rule only runs when every attention mask is verified
  to be exactly causal (evaluated on the graph for several lengths, from input shapes alone), every
  RotaryEmbedding's positions are Range(0, S) and every scale is 1/sqrt(head_size). Otherwise (sliding
  windows, padding masks, position_ids given as an input, custom scales) attention goes to
  MultiHeadAttention, which keeps the mask and the RotaryEmbedding nodes: exact, a little slower.
- `--fuse onnx`: the SDPA found by `fuse_sdpa` becomes ai.onnx Attention-23 (is_causal=1 where the mask is
  verified causal, the mask kept otherwise; repeat_kv undone, Attention-23 takes fewer kv heads).
- onnxscript writes RMSNorm as SimplifiedLayerNormalization in the ONNX domain, which only onnxruntime knows
  (onnx.checker rejects it): those are written back as standard ops (onnxruntime fuses them again on load).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.passes.onnx._build import NodeWriter, remove_made_dead, unread_nodes
from posrewrite.passes.onnx._graph import concrete_dims, const_tensor
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass

if TYPE_CHECKING:
    from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass

_FUSION_DOMAIN = "ai.onnxruntime._fusion"
_MASKED = -1.0e4  # additive mask values at or below this are "masked" (exp underflows to 0 in fp32/fp16)
_MAX_PROBE = 4200  # longest sequence a mask is evaluated at


def _pre_optimize(model: ir.Model) -> None:
    """What onnxscript's `fuse_xformers` runs before its attention rules (ort_fusions._core._pre_optimize in
    onnxscript 0.7), written with public calls: shape inference, optimisation, the shape rules, optimisation."""
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import shape_optimization

    ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)


class FuseAttentionPass(ReportingPass):
    """Attention (and its normalisations) into onnxruntime / ONNX attention ops, after RotaryEmbedding fusion.

    ``target``: "ort" (GroupQueryAttention / MultiHeadAttention) or "onnx" (Attention-23).
    ``after``: the `FuseRotaryPass` run before this one; attention is then fused only when that pass wrote
    RotaryEmbedding nodes in its last call (a model whose rotations it refused keeps its attention as it is).
    None: the model is taken as it is (its RotaryEmbedding nodes, if any, written by anyone). The graph must be
    free of the nodes the rotary fusion replaced (run the cleanup passes in between: `cleanup_passes`)."""

    def __init__(
        self, *, target: str = "ort", allow_gqa: bool = True, probe_lengths: Sequence[int] = (3, 7, 12),
        after: FuseRotaryPass | None = None, context: PipelineContext | None = None, preface: Sequence[str] = (),
    ) -> None:
        super().__init__(context=context, preface=preface)
        if target not in ("ort", "onnx"):
            raise UsageError(f"--fuse must be 'ort' or 'onnx', not {target!r}")
        self.target = target
        self.allow_gqa = allow_gqa
        self.probe_lengths = tuple(int(n) for n in probe_lengths)
        if not self.probe_lengths or min(self.probe_lengths) < 2:
            raise ValueError("probe_lengths must be lengths of at least 2 tokens")
        self.after = after
        self.counts: dict[str, int] = {}
        self._att23_detail = ""

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        if self.after is not None and not self.after.fused_nodes:
            return ir.passes.PassResult(model, False)
        try:
            from onnxscript.optimizer import optimize
            from onnxscript.rewriter.ort_fusions.gqa import fuse_gqa
            from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
            from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
            from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
            from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
            from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
            from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
            from onnxscript.rewriter.ort_fusions.skip_normalization import (
                fuse_skip_layer_normalization,
                fuse_skip_rms_normalization,
            )
        except ImportError as exc:  # pragma: no cover - onnxscript is a dependency
            self.notes.append(f"attention not fused: onnxscript's onnxruntime fusions are unavailable ({exc})")
            return ir.passes.PassResult(model, False)
        before = _count_ops(model)
        rotary_attrs = _rotary_attributes(model)
        cache_gqa, cache_reasons, cache_detail = 0, [], ""
        if self.target == "ort" and self.allow_gqa:
            # attention with a KV cache (Optimum / HF decode exports): GroupQueryAttention, checked here
            from onnx_ir.passes.common import ShapeInferencePass

            from posrewrite.passes.onnx.attention.fuse_cache import fuse_cache_attention

            try:  # shapes first: later rules (skip normalisation) check the shapes of what this writes
                ShapeInferencePass()(model)
            except Exception:  # noqa: BLE001 - shapes help, they are not required
                pass
            cache_gqa, cache_reasons, cache_detail = fuse_cache_attention(model)
        # every attention became GroupQueryAttention: onnxscript's attention rules have nothing left to do, and
        # their pre-optimisation (folding, shape rules: most of the time on a 32-layer model) is skipped
        light = bool(cache_gqa) and not any(n.op_type == "Softmax" for n in model.graph)
        try:
            if not light:
                _pre_optimize(model)
            counts: dict[str, int] = {}
            if self.target == "ort":
                # normalisations first: the GQA rule expects q/k RMSNorm (Qwen3, OLMo2) as SimplifiedLayerNormalization
                counts["rms_normalization"] = _fuse_rms_norm_other_forms(model) + fuse_rms_normalization(model)
                _uniform_norm_inputs(model)
                counts["skip_layer_normalization"] = fuse_skip_layer_normalization(model)
                counts["skip_rms_normalization"] = fuse_skip_rms_normalization(model)
            counts["sdpa"] = 0 if light else fuse_sdpa(model, apply_shape_inference=True)
            sdpa = [n for n in model.graph if n.op_type == "SDPA" and n.domain == _FUSION_DOMAIN]
            if light:
                why = None
            elif self.target == "onnx":
                counts["attention23"] = self._sdpa_to_onnx_attention(model, sdpa)
                why = None
            else:
                gqa_ok, why = self._gqa_is_exact(model, sdpa) if sdpa else (False, "no attention recognised")
                if gqa_ok:
                    counts["gqa"] = fuse_gqa(model)
                for name, fn in (("mha1", fuse_mha1), ("mha2", fuse_mha2), ("mha_scale", fuse_mha_scale)):
                    counts[name] = fn(model)
                if counts["mha1"] or counts["mha2"]:
                    counts["mha_bias"] = fuse_mha_bias(model)
                counts["sdpa_via_mha"] = replace_sdpa_by_mha(model)
            if not light:
                optimize(model)
            # onnxscript writes SimplifiedLayerNormalization into the ONNX domain, where only onnxruntime knows it
            # (onnx.checker rejects it): write it back as standard ops; onnxruntime fuses them again at load time
            counts["rms_unfused"] = _decompose_simplified_layer_norm(model)
            counts["rotary_attributes_restored"] = _restore_rotary_attributes(model, rotary_attrs)
        except Exception as exc:  # noqa: BLE001 - RoPE fusion stands on its own; say why attention did not follow
            optimize(model)  # inlines any SDPA left as a function call, so the model stays runnable
            if any(n.domain == _FUSION_DOMAIN for n in model.graph):
                raise
            message = str(exc).splitlines()[0][:160] if str(exc) else ""
            self.notes.append(f"attention fusion stopped: {type(exc).__name__}: {message}")
            return ir.passes.PassResult(model, True)
        self.counts = counts
        after = _count_ops(model)
        gqa = after.get("GroupQueryAttention", 0) - before.get("GroupQueryAttention", 0)
        att23 = counts.get("attention23", 0)
        mha = after.get("MultiHeadAttention", 0) - before.get("MultiHeadAttention", 0)
        left = after.get("Softmax", 0)
        if att23:
            self.changes.append(
                f"fused attention: {att23} into Attention-23 after RotaryEmbedding-23 ({self._att23_detail})"
            )
        gqa -= cache_gqa
        if cache_gqa:
            self.changes.append(
                f"fused attention: {cache_gqa} with a KV cache into com.microsoft.GroupQueryAttention (attention "
                f"bias kept, verified to mask every future key; {cache_detail}; kv heads not expanded)"
            )
        has_cache = any("past" in (v.name or "") for v in model.graph.inputs)
        if cache_reasons and (cache_gqa or has_cache):
            more = f" (and {len(cache_reasons) - 3} more)" if len(cache_reasons) > 3 else ""
            self.notes.append(
                f"{len(cache_reasons)} attention(s) with a KV cache not fused into GroupQueryAttention: "
                + "; ".join(cache_reasons[:3]) + more
            )
        if gqa or mha:
            parts = []
            if gqa:
                parts.append(f"{gqa} into com.microsoft.GroupQueryAttention (RoPE inside, do_rotary=1)")
            if mha:
                parts.append(f"{mha} into com.microsoft.MultiHeadAttention after RotaryEmbedding")
            self.changes.append(
                "fused attention: " + ", ".join(parts) + " (onnxscript ort_fusions, checked by posrewrite)"
            )
        if self.target == "ort" and not gqa and not cache_gqa and (mha or counts.get("sdpa")):
            why = why or "onnxscript's GQA rule did not match"
            self.notes.append(f"GroupQueryAttention not used: {why}")
        norms = sum(
            after.get(k, 0) - before.get(k, 0) for k in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
        )
        if norms:
            self.changes.append(
                f"fused {norms} residual Add + normalisation pair(s) into com.microsoft.Skip*Normalization"
            )
        if left:
            self.notes.append(f"{left} attention(s) not fused (Softmax left in the graph)")
        return ir.passes.PassResult(model, bool(gqa or cache_gqa or mha or norms or att23))

    # -----------------------------------------------------------------------------------------------
    def _sdpa_to_onnx_attention(self, model: ir.Model, sdpa_nodes: list[ir.Node]) -> int:
        """SDPA (onnxscript's intermediate op) -> ai.onnx Attention-23: causal masks (verified) become
        is_causal=1, other masks stay as attn_mask; repeat_kv is undone (Attention-23 takes fewer kv heads)."""
        graph = model.graph
        verdicts: dict[int, str] = {}
        causal = grouped = 0
        for node in sdpa_nodes:
            q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            scale = node.attributes.get("scale")
            key_format = node.attributes.get_string("key_format", "BHSd")
            new_nodes = []
            if key_format == "BSHd":
                t = ir.node("Transpose", [k], {"perm": [0, 2, 1, 3]})
                new_nodes.append(t)
                k = t.outputs[0]
            k0, v0 = _unrepeat_kv(k), _unrepeat_kv(v)
            if k0 is not None and v0 is not None and k0.shape is not None and v0.shape is not None:
                if k0.shape[1] == v0.shape[1]:
                    k, v = k0, v0
                    grouped += 1
            attrs: dict = {}
            if scale is not None and scale.value is not None:
                attrs["scale"] = float(scale.value)
            inputs = [q, k, v]
            if mask is not None:
                if id(mask) not in verdicts:
                    verdicts[id(mask)] = _mask_kind(model, mask, self.probe_lengths)
                if verdicts[id(mask)] == "causal":
                    attrs["is_causal"] = 1
                    causal += 1
                else:
                    inputs.append(mask)
            att = ir.node("Attention", inputs, attrs, name=(node.name or "sdpa") + "_attention23")
            att.outputs[0].name = node.outputs[0].name
            att.outputs[0].dtype, att.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
            new_nodes.append(att)
            graph.insert_before(node, new_nodes)
            old = node.outputs[0]
            old.name = None
            ir.convenience.replace_all_uses_with(old, att.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
        self._att23_detail = f"{causal} with is_causal=1 (mask verified), {grouped} with grouped kv heads"
        return len(sdpa_nodes)

    def _gqa_is_exact(self, model: ir.Model, sdpa_nodes: list[ir.Node]) -> tuple[bool, str | None]:
        if not self.allow_gqa:
            return False, "disabled"
        rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft"]
        for node in rotary:
            if not _positions_are_arange(node.inputs[1]):
                return False, (
                    "positions are not 0..S-1 (position_ids is a model input): GroupQueryAttention "
                    "would rotate by its own positions"
                )
        for node in sdpa_nodes:
            scale = node.attributes.get("scale")
            if scale is not None and scale.value is not None:
                # onnxscript's GQA rule does not carry the scale over (it would use 1/sqrt(head_size))
                return False, f"attention scale {float(scale.value):.6g} is not 1/sqrt(head_size)"
        masks = {}
        for node in sdpa_nodes:
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            if mask is None:
                return False, "an attention without a mask is not causal"
            masks[id(mask)] = mask
        for mask in masks.values():
            verdict = _mask_kind(model, mask, self.probe_lengths)
            if verdict != "causal":
                return False, f"attention mask {mask.name}: {verdict}"
        return True, None


_ROTARY_LAYOUT_ATTRS = ("interleaved", "rotary_embedding_dim")


def _rotary_attributes(model: ir.Model) -> dict[tuple[str, str], dict[str, int]]:
    """Layout attributes of the com.microsoft.RotaryEmbedding nodes, by the names of their cos/sin caches."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for node in model.graph:
        if node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft" and len(node.inputs) >= 4:
            cos, sin = node.inputs[2], node.inputs[3]
            if cos is None or sin is None:
                continue
            attrs = {k: int(node.attributes[k].as_int()) for k in _ROTARY_LAYOUT_ATTRS if k in node.attributes}
            found[(cos.name, sin.name)] = attrs
    return found


def _restore_rotary_attributes(model: ir.Model, recorded: dict[tuple[str, str], dict[str, int]]) -> int:
    """onnxscript's MultiHeadAttention rules re-create the RotaryEmbedding nodes they match without their
    attributes ("TODO: forward other attributes" in onnxscript's mha.py): an interleaved rotation silently becomes
    a rotate-half one. Writes `interleaved` / `rotary_embedding_dim` back from the nodes posrewrite wrote (same
    caches), with `num_heads` from the attention node reading the output where a partial rotary needs it."""
    restored = 0
    for node in model.graph:
        if node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" or len(node.inputs) < 4:
            continue
        cos, sin = node.inputs[2], node.inputs[3]
        attrs = recorded.get((cos.name if cos is not None else "", sin.name if sin is not None else ""))
        if not attrs:
            continue
        changed = False
        for key, value in attrs.items():
            current = node.attributes[key].as_int() if key in node.attributes else 0
            if current != value:
                node.attributes[key] = ir.AttrInt64(key, value)
                changed = True
        if attrs.get("rotary_embedding_dim") and "num_heads" not in node.attributes:
            heads = None
            for user, _ in node.outputs[0].uses():
                if "num_heads" in user.attributes:
                    heads = user.attributes["num_heads"].as_int()
                    break
            if heads is None:
                raise ValueError(f"partial RotaryEmbedding {node.name} re-created without num_heads")
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
            changed = True
        restored += int(changed)
    return restored


def _const_scalar(v: ir.Value | None) -> float | None:
    t = const_tensor(v) if v is not None else None
    if t is None or t.size != 1:
        return None
    return float(np.asarray(t.numpy(), dtype=np.float64).reshape(-1)[0])


def _only(v: ir.Value, op_type: str) -> ir.Node | None:
    users = [u.node for u in v.uses()]
    if len(users) != 1 or users[0].op_type != op_type or users[0].domain not in ("", "ai.onnx") or v.is_graph_output():
        return None
    return users[0]


def _fuse_rms_norm_other_forms(model: ir.Model) -> int:
    """RMSNorm as the torchscript exporter writes it at opset < 18 (Optimum's exports), which onnxscript's rule
    (ReduceMean axes as an input, Reciprocal) does not match: x32 = Cast(x) or x;
    y = Mul(scale, Cast(Mul(x32, Div(1, Sqrt(Add(ReduceMean(Pow(x32, 2), axes=[-1]), eps)))))) ->
    SimplifiedLayerNormalization(x, scale, epsilon=eps, stash_type=1) (computed in fp32 as well)."""
    graph = model.graph
    done = 0
    dead_before = unread_nodes(graph)
    for r in [n for n in graph if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")]:
        axes = r.attributes.get_ints("axes") if len(r.inputs) < 2 else None
        if axes is None and len(r.inputs) > 1:
            t = const_tensor(r.inputs[1])
            axes = [int(a) for a in t.numpy().reshape(-1)] if t is not None else None
        pw = r.inputs[0].producer()
        if axes is None or list(axes) != [-1] or r.attributes.get_int("keepdims", 1) != 1 or pw is None:
            continue
        if pw.op_type != "Pow" or _const_scalar(pw.inputs[1]) != 2.0:
            continue
        xc = pw.inputs[0]
        add = _only(r.outputs[0], "Add")
        eps = _const_scalar(add.inputs[1]) if add is not None else None
        sqrt = _only(add.outputs[0], "Sqrt") if add is not None else None
        inv_node = None
        if sqrt is not None:
            users = [u.node for u in sqrt.outputs[0].uses()]
            if len(users) == 1 and users[0].op_type == "Reciprocal":
                inv_node = users[0]
            elif len(users) == 1 and users[0].op_type == "Div" and users[0].inputs[1] is sqrt.outputs[0] and \
                    _const_scalar(users[0].inputs[0]) == 1.0:
                inv_node = users[0]
        if eps is None or inv_node is None:
            continue
        mul1 = _only(inv_node.outputs[0], "Mul")
        if mul1 is None or xc not in mul1.inputs:
            continue
        normed = mul1.outputs[0]
        cast = _only(normed, "Cast")
        if cast is not None:
            normed = cast.outputs[0]
        mul2 = _only(normed, "Mul")
        if mul2 is None:
            continue
        scale = mul2.inputs[1] if mul2.inputs[0] is normed else mul2.inputs[0]
        ident = scale.producer()
        if ident is not None and ident.op_type == "Identity":  # the torchscript exporter's deduplicated weights
            scale = ident.inputs[0]
        if scale.const_value is None or scale.shape is None or len(scale.shape) != 1:
            continue  # shape and type only: the weight itself is never read
        src = xc.producer()
        x = src.inputs[0] if src is not None and src.op_type == "Cast" else xc
        out = mul2.outputs[0]
        compute = ir.DataType(src.attributes.get_int("to")) if x is not xc else xc.dtype
        target = ir.DataType(cast.attributes.get_int("to")) if cast is not None else compute
        if compute != ir.DataType.FLOAT or scale.dtype != target:
            continue
        node = ir.node("SimplifiedLayerNormalization", [x, scale],
                       {"axis": -1, "epsilon": float(eps), "stash_type": 1}, name=(r.name or "rms") + "_fused")
        y = node.outputs[0]
        y.dtype, y.shape = target, out.shape
        graph.insert_before(mul2, node)
        name = out.name
        out.name = None
        y.name = name
        ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
        done += 1
    if done:  # the replaced forms go now: the onnxscript rules that follow match on uses, dead readers count
        remove_made_dead(graph, dead_before)
    return done


def _uniform_norm_inputs(model: ir.Model) -> None:
    """onnxscript fuses a mixed-precision RMSNorm (fp16 x normalised in fp32 with an fp32 weight, OLMo's q/k
    norms) into SimplifiedLayerNormalization(x: fp16, scale: fp32); its skip rule would then build a
    SkipSimplifiedLayerNormalization whose inputs disagree in type, which onnxruntime refuses. Casting x to
    the scale's type first changes nothing numerically (the norm is computed in fp32) and keeps the types
    of any later fusion consistent."""
    graph = model.graph
    for node in [n for n in graph if n.op_type == "SimplifiedLayerNormalization"]:
        x, scale = node.inputs[0], node.inputs[1]
        if x is None or scale is None or x.dtype is None or scale.dtype is None or x.dtype == scale.dtype:
            continue
        cast = ir.node("Cast", [x], attributes={"to": scale.dtype})
        cast.outputs[0].dtype = scale.dtype
        cast.outputs[0].shape = x.shape
        graph.insert_before(node, cast)
        node.replace_input_with(0, cast.outputs[0])


def _decompose_simplified_layer_norm(model: ir.Model) -> int:
    """SimplifiedLayerNormalization(X, scale) -> X * 1/sqrt(mean(X^2) + eps) * scale, in standard ops."""
    graph = model.graph
    done = 0
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
    for node in [n for n in graph if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        x, scale = node.inputs[0], node.inputs[1]
        axis = node.attributes.get_int("axis", -1)
        eps = node.attributes.get_float("epsilon", 1e-5)
        stash = node.attributes.get_int("stash_type", 1)
        dtype = x.dtype or ir.DataType.FLOAT
        w = NodeWriter(graph, node)  # unnamed nodes and Constant nodes, as onnxscript's rewrites write them
        op, const = w.op, w.const

        compute = ir.DataType.FLOAT if stash == 1 else dtype
        xc = op("Cast", x, to=compute) if compute != dtype else x
        if opset >= 18:
            mean = op("ReduceMean", op("Mul", xc, xc), const(np.array([axis], np.int64)), keepdims=1)
        else:  # axes are an attribute before opset 18
            mean = op("ReduceMean", op("Mul", xc, xc), axes=[axis], keepdims=1)
        eps_c = const(np.array(eps, dtype=compute.numpy()))
        y = op("Mul", xc, op("Reciprocal", op("Sqrt", op("Add", mean, eps_c))))
        # onnxruntime's SimplifiedLayerNormalization takes X: T and scale: V (mixed precision, OLMo's fp16 q/k
        # norms with fp32 weights) and returns V
        target = node.outputs[0].dtype or scale.dtype or dtype
        if compute != target:
            y = op("Cast", y, to=target)
        if scale.dtype is not None and scale.dtype != target:
            scale = op("Cast", scale, to=target)
        y = op("Mul", y, scale)
        out = node.outputs[0]
        y.name = out.name
        if out.dtype is not None:
            y.dtype = out.dtype
        if out.shape is not None:
            y.shape = out.shape
        out.name = None
        w.commit()
        ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        done += 1
    return done


def _unrepeat_kv(value: ir.Value) -> ir.Value | None:
    """k0 [B, Hkv, S, D] when value = Reshape(Expand(Unsqueeze(k0, [2]), [B, Hkv, G, S, D]), [B, Hkv*G, S, D])
    (HF's repeat_kv: head h reads kv head h // G, as Attention-23 and GroupQueryAttention do)."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = expand.inputs[0].producer()
    if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.inputs) < 2:
        return None
    axes = const_tensor(unsq.inputs[1])
    if axes is None or [int(a) for a in axes.numpy().reshape(-1)] != [2]:
        return None
    k0 = unsq.inputs[0]
    shp, out = k0.shape, value.shape
    if shp is None or out is None or len(shp) != 4 or len(out) != 4:
        return None
    hkv, h = shp[1], out[1]
    if not (isinstance(hkv, int) and isinstance(h, int) and h % hkv == 0) or shp[3] != out[3]:
        return None
    return k0


def _count_ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _positions_are_arange(value: ir.Value | None) -> bool:
    """position_ids built as Expand(Unsqueeze(Range(0, n, 1))) (casts and reshapes allowed)."""
    v = value
    for _ in range(12):
        if v is None:
            return False
        node = v.producer()
        if node is None:
            return False
        if node.op_type == "Range":
            start = const_tensor(node.inputs[0])
            delta = const_tensor(node.inputs[2])
            return (
                start is not None
                and delta is not None
                and int(start.numpy().reshape(-1)[0]) == 0
                and int(delta.numpy().reshape(-1)[0]) == 1
            )
        if node.op_type not in ("Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Squeeze"):
            return False
        v = node.inputs[0]
    return False


# ---------------------------------------------------------------------------------------------------
# what an attention mask is, found by evaluating it
# ---------------------------------------------------------------------------------------------------


def _mask_kind(model: ir.Model, mask: ir.Value, lengths) -> str:
    """ "causal" when the additive mask is 0 on and below the diagonal and masked above it for every probed
    length (computed from the input shapes alone); otherwise why not."""
    graph = model.graph
    inputs = set(graph.inputs)
    nodes: list[ir.Node] = []
    seen: set[int] = set()
    stack = [mask]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None:
            if v in inputs:
                return f"depends on the values of input {v.name} (not only on shapes)"
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        if node.op_type == "Shape":
            continue
        if node.domain not in ("", "ai.onnx") or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
        ):
            return f"computed by {node.domain}::{node.op_type}"
        stack.extend(i for i in node.inputs if i is not None)
    if len(nodes) > 2000:
        return "mask computation too large to check"
    # a window (sliding attention) appears as an integer constant in the mask's computation: probe past it
    lengths = list(lengths)
    for c in _integer_constants(nodes):
        if 4 <= c < 1 << 40:
            if c + 2 > _MAX_PROBE:
                return f"its computation holds the constant {c} (a window?), past the {_MAX_PROBE} tokens checked"
            lengths.append(c + 2)
    order = {id(n): k for k, n in enumerate(graph)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    for n in lengths:
        sizes = {}
        for i in graph.inputs:
            if i.shape is None or len(i.shape) < 2:
                continue
            b, s = i.shape[0], i.shape[1]
            if not isinstance(b, int):
                sizes[str(b)] = 2
            if not isinstance(s, int):
                sizes[str(s)] = n
        try:
            value = _evaluate(model, nodes, mask, sizes)
        except _Unresolvable as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001
            return f"could not be evaluated ({type(exc).__name__})"
        value = np.asarray(value, dtype=np.float32)
        if value.ndim < 2 or value.shape[-1] != n or value.shape[-2] not in (1, n):
            return f"has shape {value.shape} at {n} tokens"
        full = np.broadcast_to(value, value.shape[:-2] + (n, n)).reshape(-1, n, n)
        lower = np.tril(np.ones((n, n), dtype=bool))
        if not (np.all(full[:, lower] == 0) and np.all(full[:, ~lower] <= _MASKED)):
            window = _sliding_window(full, n)
            return f"sliding window of {window} tokens" if window else "not a causal mask"
    return "causal"


def _integer_constants(nodes: list[ir.Node]) -> set[int]:
    found: set[int] = set()
    for node in nodes:
        values = list(node.inputs)
        if node.op_type == "Constant":
            values = list(node.outputs)
        for v in values:
            t = const_tensor(v) if v is not None else None
            if t is None:
                continue
            arr = t.numpy()
            if arr.size <= 8 and np.issubdtype(arr.dtype, np.integer):
                found.update(int(x) for x in arr.reshape(-1))
    return found


def _sliding_window(full: np.ndarray, n: int) -> int | None:
    """w when token i sees exactly tokens i-w+1 .. i (HF's sliding_window), else None."""
    row = full[0, n - 1]
    seen = np.flatnonzero(row == 0)
    if seen.size == 0 or seen[-1] != n - 1 or np.any(np.diff(seen) != 1):
        return None
    w = int(seen.size)
    i, j = np.indices((n, n))
    keep = (j <= i) & (i - j < w)
    if np.all(full[:, keep] == 0) and np.all(full[:, ~keep] <= _MASKED):
        return w
    return None


class _Unresolvable(Exception):
    pass


def _evaluate(model: ir.Model, nodes: list[ir.Node], target: ir.Value, sizes: dict[str, int]) -> np.ndarray:
    """Runs `nodes` (the cone of `target`) in onnxruntime with Shape nodes replaced by the shapes that the
    symbolic dims take for `sizes`."""
    import onnxruntime as ort

    protos = []
    initializers = []
    names: dict[int, str] = {}

    def name_of(v: ir.Value | None) -> str:
        if v is None:
            return ""
        if id(v) not in names:
            names[id(v)] = f"v{len(names)}"
            t = const_tensor(v) if v.producer() is None else None
            if t is not None:
                arr = t.numpy()
                if arr.size > 1 << 20:
                    raise _Unresolvable("mask computation reads a large tensor")
                initializers.append(onnx.numpy_helper.from_array(np.asarray(arr), names[id(v)]))
        return names[id(v)]

    for node in nodes:
        if node.op_type == "Shape":
            x = node.inputs[0]
            if x.shape is None:
                raise _Unresolvable(f"shape of {x.name} unknown")
            dims = concrete_dims(x.shape, sizes)
            if dims is None:
                d = next(d for d in x.shape if not isinstance(d, int) and str(d) not in sizes)
                raise _Unresolvable(f"dimension {d} of {x.name} is not tied to an input's shape")
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            arr = np.array(dims[slice(start, end)], dtype=np.int64)
            protos.append(
                onnx.helper.make_node(
                    "Constant", [], [name_of(node.outputs[0])], value=onnx.numpy_helper.from_array(arr)
                )
            )
            continue
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend(name_of(i) for i in node.inputs)
        del proto.output[:]
        proto.output.extend(name_of(o) for o in node.outputs)
        proto.name = f"n{len(protos)}"
        protos.append(proto)
    out = onnx.helper.make_empty_tensor_value_info(name_of(target))
    graph = onnx.helper.make_graph(protos, "mask", [], [out], initializer=initializers)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = model.ir_version or 10
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]
