"""Reading the angle computation `positions x inv_freq` behind a Cos/Sin: the product, the inv_freq operand
(a constant, constant ops folded at detection, a posrewrite run-time formula, or HF's LongRoPE `Where`
selection), the positions and their dtypes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import ConstantEvaluator, const_tensor, dtype_name, trace_through
from posrewrite.passes.onnx.rope.markers import node_record, runtime_marker
from posrewrite.passes.onnx.rope.tables import NotUnderstood
from posrewrite.sites.rope import InvFreqOrigin, LengthSelection, RescaleRecord, RuntimeInvFreq

#: ops between the angle product and Cos/Sin that only reshape or widen the angles
_ANGLE_VIEW_OPS = ("Transpose", "Reshape", "Unsqueeze", "Expand", "Tile", "Squeeze", "Cast", "Identity")
#: ops an inv_freq operand is broadcast or cast through before the product
_FREQ_VIEW_OPS = ("Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Transpose")
#: ops positions are broadcast or cast through before the product
_POSITION_VIEW_OPS = ("Cast", "Unsqueeze", "Reshape", "Expand", "Transpose", "Squeeze")


@dataclasses.dataclass(frozen=True)
class AngleReading:
    """What the angle computation of one computed site is made of."""

    product: ir.Node
    inv_freq: np.ndarray  # float32 [rotary_dim / 2]
    origin: InvFreqOrigin
    inv_freq_root: ir.Value  # the value holding inv_freq as consumed
    inv_freq_consumer: ir.Node  # the node reading `inv_freq_root`
    positions: ir.Value  # the positions operand of the product
    position_source: ir.Value  # positions before casts and broadcasts
    position_dtype: str
    angle_dtype: str
    duplicated: str | None
    runtime: RuntimeInvFreq | None = None
    selection: LengthSelection | None = None
    rescaled: RescaleRecord | None = None


@dataclasses.dataclass(frozen=True)
class _Operand:
    root: ir.Value
    consumer: ir.Node | None  # the broadcasting op reading `root`, None when the product reads it directly
    inv_freq: np.ndarray
    origin: InvFreqOrigin
    runtime: RuntimeInvFreq | None = None
    selection: LengthSelection | None = None


def read_angles(angles: ir.Value, fold: ConstantEvaluator) -> AngleReading:
    """inv_freq, positions and dtypes of the angles a Cos/Sin takes; raises NotUnderstood."""
    product, duplicated = _angle_product(angles)
    operands = list(product.inputs) if product.op_type == "Einsum" else list(product.inputs[:2])
    found = [_constant_operand(o, fold) for o in operands]
    if not any(found):
        found = [None] * len(operands)
        for k, operand in enumerate(operands):
            found[k] = _runtime_operand(operand)
            if found[k] is not None:
                break
    if not any(found):
        found = [None] * len(operands)
        for k, operand in enumerate(operands):
            found[k] = _length_selected(operand, fold)
            if found[k] is not None:
                break
    consts = [k for k, f in enumerate(found) if f is not None]
    if len(consts) != 1:
        raise NotUnderstood(
            f"angle product {product.name}: expected exactly one constant operand (inv_freq), found {len(consts)}"
        )
    k = consts[0]
    freq = found[k]
    positions = operands[1 - k]
    pos_root, _ = trace_through(positions, _POSITION_VIEW_OPS, limit=16)
    consumer = freq.consumer if freq.consumer is not None else product
    return AngleReading(
        product=product,
        inv_freq=np.asarray(freq.inv_freq, dtype=np.float64).reshape(-1).astype(np.float32),
        origin=freq.origin,
        inv_freq_root=freq.root,
        inv_freq_consumer=consumer,
        positions=positions,
        position_source=pos_root,
        position_dtype=dtype_name(positions),
        angle_dtype=dtype_name(product.outputs[0]),
        duplicated=duplicated,
        runtime=freq.runtime,
        selection=freq.selection,
        rescaled=node_record(consumer),
    )


def _angle_product(angles: ir.Value) -> tuple[ir.Node, str | None]:
    """The Mul / MatMul / Einsum making the angles, and how they are widened to rotary_dim after it."""
    v = angles
    duplicated = None
    for _ in range(16):
        node = v.producer()
        if node is None:
            raise NotUnderstood("angles are a graph input")
        if node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
            duplicated = "concat"
            v = node.inputs[0]
            continue
        if node.op_type in _ANGLE_VIEW_OPS:
            if node.op_type in ("Reshape", "Expand", "Tile"):
                duplicated = duplicated or "repeat"
            v = node.inputs[0]
            continue
        if node.op_type in ("Mul", "MatMul", "Einsum"):
            return node, duplicated
        raise NotUnderstood(f"angles produced by {node.op_type} ({node.name}), expected positions x inv_freq")
    raise NotUnderstood("angle computation too deep")


def _constant_operand(value: ir.Value, fold: ConstantEvaluator) -> _Operand | None:
    """The first constant-evaluable value walking up through broadcasting ops, None when the operand depends
    on run-time data."""
    root, path = trace_through(value, _FREQ_VIEW_OPS, limit=16, until=lambda v: fold(v) is not None)
    arr = fold(root)
    if arr is None:
        return None
    origin = InvFreqOrigin.CONSTANT if const_tensor(root) is not None else InvFreqOrigin.FOLDED
    return _Operand(root, path[-1] if path else None, np.asarray(arr), origin)


def _runtime_operand(value: ir.Value) -> _Operand | None:
    """inv_freq computed at run time by a posrewrite dynamic / longrope rewrite (its parameters recorded)."""
    marked = runtime_marker(value)
    if marked is None:
        return None
    root, runtime = marked
    return _Operand(root, None, runtime.inv_freq, InvFreqOrigin.RUNTIME, runtime=runtime)


def _length_selected(value: ir.Value, fold: ConstantEvaluator) -> _Operand | None:
    """HF's LongRoPE export: inv_freq = Where(max(position)+1 > L, long, short) with constant branches."""
    v, path = trace_through(value, _FREQ_VIEW_OPS, limit=16)
    node = v.producer()
    if node is None or node.op_type != "Where":
        return None
    cond, long_v, short_v = node.inputs
    compare = cond.producer() if cond is not None else None
    if compare is None or compare.op_type not in ("Greater", "Less"):
        return None
    a, b = (fold(x) for x in compare.inputs)
    threshold = b if compare.op_type == "Greater" else a
    if threshold is None or (a is None) == (b is None) or np.asarray(threshold).size != 1:
        return None
    long_f, short_f = fold(long_v), fold(short_v)
    if long_f is None or short_f is None or np.asarray(long_f).size != np.asarray(short_f).size:
        return None
    selection = LengthSelection(
        threshold=int(np.asarray(threshold).reshape(-1)[0]),
        short=np.asarray(short_f, np.float32).reshape(-1),
        long=np.asarray(long_f, np.float32).reshape(-1),
    )
    return _Operand(v, path[-1] if path else None, selection.short, InvFreqOrigin.LENGTH_SELECTED, selection=selection)
