"""ONNX translations of the `posrewrite::rope*` ops for ``torch.onnx.export(dynamo=True)``.

Two targets, picked with ``translation_table(target)``:

- ``"com.microsoft"``: ``com.microsoft.RotaryEmbedding`` (ONNX Runtime contrib op, any opset). It reads
  angles from a cache indexed by ``position_ids``; our angles are per (batch, token), so the cache is the
  flattened ``[batch * seq, r/2]`` table and ``position_ids[b, s] = b * seq + s``, which is exact for any
  positions (no table of maximum length is baked in).
- ``"onnx"``: the standard ``RotaryEmbedding`` of opset 23, fed ``[batch, seq, r/2]`` cos/sin directly
  (no position_ids). The export must use ``opset_version >= 23``.

Inputs laid out ``[batch, seq, heads, head_dim]`` (``seq_axis == 1``) are transposed to the
``[batch, heads, seq, head_dim]`` form both ops take and back. The ``*_freqs`` ops compute their half-form
cos/sin in float32 with Mul/Cos/Sin first.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18, opset23

import posrewrite.ops.rope  # noqa: F401  (registers torch.ops.posrewrite.*)

__all__ = ["TARGETS", "translation_table", "onnx_opset_for"]

TARGETS = ("com.microsoft", "onnx")
MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _msft_rotary_schema() -> onnx.defs.OpSchema:
    """Schema of com.microsoft.RotaryEmbedding (an ONNX Runtime contrib op: not in onnx's registry)."""
    S = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return S(
        "RotaryEmbedding",
        "com.microsoft",
        1,
        inputs=[
            S.FormalParameter("input", "T"),
            S.FormalParameter("position_ids", "M"),
            S.FormalParameter("cos_cache", "T"),
            S.FormalParameter("sin_cache", "T"),
        ],
        outputs=[S.FormalParameter("output", "T")],
        type_constraints=[("T", floats, "float tensors"), ("M", ["tensor(int64)"], "position ids")],
        attributes=[
            S.Attribute("interleaved", S.AttrType.INT, "rotate pairs (2i, 2i+1)", required=False),
            S.Attribute("num_heads", S.AttrType.INT, "heads (3-D input or partial rotary)", required=False),
            S.Attribute("rotary_embedding_dim", S.AttrType.INT, "rotated channels per head", required=False),
            S.Attribute("scale", S.AttrType.FLOAT, "position scale", required=False),
            S.Attribute("is_packed_batching", S.AttrType.INT, "packed batching", required=False),
        ],
    )


_MSFT_ROTARY = onnxscript.values.Op(MSFT, "RotaryEmbedding", _msft_rotary_schema())
_ONNX_ROPE_OPSET = 23


def onnx_opset_for(target: str) -> int | None:
    """The smallest default-domain opset the target needs (None: any)."""
    _check_target(target)
    return _ONNX_ROPE_OPSET if target == "onnx" else None


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown ONNX RoPE target {target!r} (choose from {', '.join(TARGETS)})")


def _const_i64(op, values: list[int]):
    return op.Constant(value=ir.tensor(values, dtype=ir.DataType.INT64))


def _half_tables(op, x, cos, sin, seq_axis: int, half: int, dtype):
    """cos/sin broadcast to ``[batch, seq, half]`` and cast to ``dtype`` (x given as logical BHSD)."""
    shape = op.Shape(x)
    batch = op.Slice(shape, _const_i64(op, [0]), _const_i64(op, [1]))
    seq = op.Slice(shape, _const_i64(op, [2]), _const_i64(op, [3]))
    one = _const_i64(op, [1])
    tail = _const_i64(op, [half])
    # x is [B, H, S, D] here; the table is laid out like the op's input ([B,1,S,r/2] or [B,S,1,r/2]).
    target = op.Concat(batch, one, seq, tail, axis=0) if seq_axis == 2 else op.Concat(batch, seq, one, tail, axis=0)
    heads_axis = _const_i64(op, [3 - seq_axis])
    out = []
    for t in (cos, sin):
        t = op.Squeeze(op.Expand(t, target), heads_axis)
        out.append(op.Cast(t, to=dtype))
    return out[0], out[1], batch, seq


def _to_bhsd(op, x, seq_axis: int):
    return x if seq_axis == 2 else op.Transpose(x, perm=[0, 2, 1, 3])


def _num_heads(x) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        return None
    dim = shape[1]
    return dim if isinstance(dim, int) else None


def _rotate(op, target: str, x, cos, sin, interleaved: bool, rotary_dim: int, seq_axis: int, out_dtype):
    xb = _to_bhsd(op, x, seq_axis)
    if x.dtype != out_dtype:
        xb = op.Cast(xb, to=out_dtype)
    half = rotary_dim // 2
    c, s, batch, seq = _half_tables(op, xb, cos, sin, seq_axis, half, out_dtype)
    attrs: dict = {"interleaved": int(bool(interleaved))}
    head_dim = x.shape[-1] if x.shape is not None else None
    if not (isinstance(head_dim, int) and head_dim == rotary_dim):
        attrs["rotary_embedding_dim"] = int(rotary_dim)
        heads = _num_heads(xb) if seq_axis == 2 else (x.shape[2] if isinstance(x.shape[2], int) else None)
        if heads is not None:
            attrs["num_heads"] = int(heads)
    if target == "onnx":
        y = op.RotaryEmbedding(xb, c, s, **attrs)
    else:
        tokens = op.Mul(batch, seq)
        flat = op.Concat(_const_i64(op, [-1]), _const_i64(op, [half]), axis=0)
        position_ids = op.Reshape(
            op.Range(op.Constant(value_int=0), op.Squeeze(tokens), op.Constant(value_int=1)),
            op.Concat(batch, seq, axis=0),
        )
        y = _MSFT_ROTARY(xb, position_ids, op.Reshape(c, flat), op.Reshape(s, flat), **attrs)
    return _to_bhsd(op, y, seq_axis)  # the transpose is its own inverse


def _freq_tables(op, positions, inv_freq, attention_factor: float, seq_axis: int):
    """Half-form float32 cos/sin [B, 1, S, r/2] / [B, S, 1, r/2] from positions and inv_freq."""
    pos = op.Unsqueeze(op.Cast(positions, to=ir.DataType.FLOAT), _const_i64(op, [-1]))
    angles = op.Mul(pos, op.Cast(inv_freq, to=ir.DataType.FLOAT))
    cos, sin = op.Cos(angles), op.Sin(angles)
    if attention_factor != 1.0:
        factor = op.Constant(value_float=float(attention_factor))
        cos, sin = op.Mul(cos, factor), op.Mul(sin, factor)
    axis = _const_i64(op, [3 - seq_axis])
    return op.Unsqueeze(cos, axis), op.Unsqueeze(sin, axis)


def _promoted(x, cos):
    """ONNX dtype of promote_types(x, cos) for the float dtypes the op sees."""
    order = [ir.DataType.BFLOAT16, ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE]
    a, b = x.dtype, cos.dtype
    if a == b or b is None:
        return a
    if {a, b} == {ir.DataType.BFLOAT16, ir.DataType.FLOAT16}:
        return ir.DataType.FLOAT
    return max(a, b, key=lambda d: order.index(d) if d in order else -1)


def _make_table(target: str) -> dict[Callable, Callable]:
    _check_target(target)
    op = opset23 if target == "onnx" else opset18

    def rope(x, cos, sin, interleaved: bool, rotary_dim: int, seq_axis: int):
        return _rotate(op, target, x, cos, sin, interleaved, rotary_dim, seq_axis, _promoted(x, cos))

    def rope_qk(q, k, cos, sin, interleaved: bool, rotary_dim: int, seq_axis: int):
        return (
            _rotate(op, target, q, cos, sin, interleaved, rotary_dim, seq_axis, _promoted(q, cos)),
            _rotate(op, target, k, cos, sin, interleaved, rotary_dim, seq_axis, _promoted(k, cos)),
        )

    def rope_freqs(x, positions, inv_freq, attention_factor: float, interleaved: bool, seq_axis: int):
        rotary_dim = 2 * inv_freq.shape[-1]
        cos, sin = _freq_tables(op, positions, inv_freq, attention_factor, seq_axis)
        return _rotate(op, target, x, cos, sin, interleaved, rotary_dim, seq_axis, x.dtype)

    def rope_qk_freqs(q, k, positions, inv_freq, attention_factor: float, interleaved: bool, seq_axis: int):
        rotary_dim = 2 * inv_freq.shape[-1]
        cos, sin = _freq_tables(op, positions, inv_freq, attention_factor, seq_axis)
        return (
            _rotate(op, target, q, cos, sin, interleaved, rotary_dim, seq_axis, q.dtype),
            _rotate(op, target, k, cos, sin, interleaved, rotary_dim, seq_axis, k.dtype),
        )

    ops = torch.ops.posrewrite
    return {
        ops.rope.default: rope,
        ops.rope_qk.default: rope_qk,
        ops.rope_freqs.default: rope_freqs,
        ops.rope_qk_freqs.default: rope_qk_freqs,
    }


def translation_table(target: str = "com.microsoft") -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export`` mapping every posrewrite rope op to
    ``target`` ("com.microsoft" or "onnx"; the latter needs ``opset_version=23``)."""
    return _make_table(target)
