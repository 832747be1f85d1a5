"""How a RoPE rotation of q or k looks in an ONNX graph, as onnxscript rewriter patterns.

Each layout is one small pattern class: the rotation `out = x*cos + rotate(x)*sin` with `rotate` written
as the ops it is exported to. Operand orders of Mul/Add are not separate rules: every pattern is
expanded into its commuted variants. Axes, slice bounds and head sizes are pattern variables checked in
`check()`, never literals in the pattern, so a refusal always comes with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from posrewrite.passes.onnx._build import EXTEND_NODE_PREFIX
from posrewrite.passes.onnx._graph import ConstantEvaluator, int_attr, normalise_axis, rank
from posrewrite.sites.rope import Layout

INT64_MAX = np.iinfo(np.int64).max


def _no_replacement(op, **_) -> None:
    """Replacement of the match-only rules: never called (returning None would mean 'no rewrite')."""
    return None


@dataclasses.dataclass
class SliceSpec:
    start: int
    end: int
    axis: int | None  # negative when known
    step: int


def read_slice(node: ir.Node, fold: ConstantEvaluator) -> SliceSpec | None:
    """Bounds of a Slice (opset >= 10 inputs, or opset 1 attributes) when they are constants."""
    if node.op_type != "Slice":
        return None
    if len(node.inputs) >= 3:
        starts, ends = fold(node.inputs[1]), fold(node.inputs[2])
        axes = fold(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = fold(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    else:
        get = lambda n: None if node.attributes.get(n) is None else np.array(node.attributes[n].value)  # noqa: E731
        starts, ends, axes, steps = get("starts"), get("ends"), get("axes"), None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    data_rank = rank(node.inputs[0])
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    step = int(steps.reshape(-1)[0]) if steps is not None else 1
    return SliceSpec(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), normalise_axis(axis, data_rank), step)


def _is_last_axis(axis: int | None) -> bool:
    return axis == -1


def _concat_axis_is_last(node: ir.Node) -> bool:
    axis = int_attr(node, "axis", 0)
    return normalise_axis(axis, rank(node.outputs[0]) or rank(node.inputs[0])) == -1


class _ApplicationPattern(orp.PatternBase):
    """Base of the rotation patterns: subclasses give the pattern and derive rotary_dim in `check`."""

    layout: Layout

    def __init__(self, fold: ConstantEvaluator) -> None:
        super().__init__()
        self.fold = fold
        self.rotary_dim: int | None = None
        self.heads: int | None = None  # heads merged on x's last axis ([B, S, H·D] rotations)

    def combine(self, op, x, rotated, cos, sin):
        """x*cos + rotate(x)*sin, the sum every rotate-and-add pattern ends in."""
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def variants(self) -> list[orp.Pattern]:
        """The pattern with every operand order of its commutative ops.

        onnxscript's public way to commute a pattern is `RewriteRule.commute()`: the rule's replacement is
        never called here (only `match` is used), so it is a function that builds nothing.
        """
        rule = orp.RewriteRule(self.pattern, _no_replacement, self.check, name=self.name)
        variants = list(rule.commute())
        for k, variant in enumerate(variants):
            variant.name = f"{self.name}[{k}]"
        return variants


class RotateHalfPattern(_ApplicationPattern):
    """x*cos + concat(-x[..., h:], x[..., :h])*sin (Llama, NeoX and most HF models)."""

    layout = Layout.ROTATE_HALF

    def pattern(self, op, x, cos, sin):
        x1 = op.Slice(x, _allow_other_inputs=True, _outputs=["x1"])
        x2 = op.Slice(x, _allow_other_inputs=True, _outputs=["x2"])
        rotated = op.Concat(op.Neg(x2), x1, _outputs=["rotated"])
        return self.combine(op, x, rotated, cos, sin)

    def check(self, context, x, cos, sin, x1, x2, rotated, **_):
        result = orp.MatchResult()
        first = read_slice(x1.producer(), self.fold)
        second = read_slice(x2.producer(), self.fold)
        if first is None or second is None:
            return result.fail("slice bounds of rotate_half are not constant", x)
        if not (_is_last_axis(first.axis) and _is_last_axis(second.axis)):
            return result.fail("rotate_half slices are not on the last axis", x)
        if first.step != 1 or second.step != 1:
            return result.fail("rotate_half slices have a step other than 1", x)
        if not _concat_axis_is_last(rotated.producer()):
            return result.fail("rotate_half Concat is not on the last axis", rotated)
        half = first.end
        if first.start != 0 or second.start != half or half <= 0:
            return result.fail(f"x is not split into halves (slices [{first.start}:{first.end}], "
                               f"[{second.start}:{second.end}])", x)
        width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        if second.end < INT64_MAX // 2 and second.end != 2 * half:
            return result.fail(f"second half ends at {second.end}, expected {2 * half}", x)
        if width is not None and width != 2 * half:
            return result.fail(f"rotated width {width} is not twice the half {half}", x)
        self.rotary_dim = 2 * half
        return result


class InterleavedStackPattern(_ApplicationPattern):
    """x*cos + flatten(stack(-x[..., 1::2], x[..., ::2]))*sin (GPT-J's rotate_every_two)."""

    layout = Layout.INTERLEAVED

    def pattern(self, op, x, cos, sin, shape):
        even = op.Slice(x, _allow_other_inputs=True, _outputs=["even"])
        odd = op.Slice(x, _allow_other_inputs=True, _outputs=["odd"])
        stacked = op.Concat(
            op.Unsqueeze(op.Neg(odd), _allow_other_inputs=True),
            op.Unsqueeze(even, _allow_other_inputs=True),
            _outputs=["stacked"],
        )
        rotated = op.Reshape(stacked, shape, _allow_other_attributes=True)
        return self.combine(op, x, rotated, cos, sin)

    def check(self, context, x, cos, sin, even, odd, stacked, **_):
        result = orp.MatchResult()
        a = read_slice(even.producer(), self.fold)
        b = read_slice(odd.producer(), self.fold)
        if a is None or b is None:
            return result.fail("interleaved slice bounds are not constant", x)
        if not (_is_last_axis(a.axis) and _is_last_axis(b.axis)) or a.step != 2 or b.step != 2:
            return result.fail("interleaved slices are not x[..., ::2] and x[..., 1::2]", x)
        if a.start != 0 or b.start != 1:
            return result.fail("interleaved slices do not start at 0 and 1", x)
        if not _concat_axis_is_last(stacked.producer()):
            return result.fail("interleaved stack is not on the last axis", stacked)
        width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        if width is None:
            return result.fail("rotated width unknown (no static last dimension)", x)
        self.rotary_dim = width
        return result


class InterleavedPairsPattern(_ApplicationPattern):
    """Pairs as a trailing axis of 2 (Meta's complex multiplication written with reals):
    xr = x.reshape(..., d/2, 2); out = stack(x0*cos - x1*sin, x0*sin + x1*cos).flatten(-2)."""

    layout = Layout.INTERLEAVED

    def pattern(self, op, x, cos, sin, pairs_shape, i0, i1, out_shape):
        pairs = op.Reshape(x, pairs_shape, _allow_other_attributes=True, _outputs=["pairs"])
        x0 = op.Gather(pairs, i0, _allow_other_attributes=True, _outputs=["x0"])
        x1 = op.Gather(pairs, i1, _allow_other_attributes=True, _outputs=["x1"])
        real = op.Sub(op.Mul(x0, cos), op.Mul(x1, sin))
        imag = op.Add(op.Mul(x0, sin), op.Mul(x1, cos))
        stacked = op.Concat(
            op.Unsqueeze(real, _allow_other_inputs=True),
            op.Unsqueeze(imag, _allow_other_inputs=True),
            _outputs=["stacked"],
        )
        return op.Reshape(stacked, out_shape, _allow_other_attributes=True)

    def check(self, context, x, cos, sin, pairs, x0, x1, i0, i1, stacked, **_):
        result = orp.MatchResult()
        a, b = self.fold(i0), self.fold(i1)
        if a is None or b is None or a.size != 1 or b.size != 1 or int(a) != 0 or int(b) != 1:
            return result.fail("pair elements are not selected as [..., 0] and [..., 1]", pairs)
        for g in (x0.producer(), x1.producer()):
            axis = int_attr(g, "axis", 0)
            if normalise_axis(axis, rank(pairs)) != -1:
                return result.fail("pair elements are not taken from the last axis", pairs)
        if pairs.shape is None or pairs.shape[-1] != 2:
            return result.fail("x is not reshaped to pairs [..., d/2, 2]", pairs)
        if not _concat_axis_is_last(stacked.producer()):
            return result.fail("rotated pairs are not stacked on the last axis", stacked)
        half = pairs.shape[-2] if isinstance(pairs.shape[-2], int) else None
        if half is None:
            return result.fail("number of pairs unknown (no static shape)", pairs)
        self.rotary_dim = 2 * half
        # [.., H·D] viewed as [.., H, D/2, 2]: the heads were merged on x's last axis
        r_x, r_p = rank(x), rank(pairs)
        if r_x is not None and r_p == r_x + 2:
            heads = pairs.shape[-3]
            if not isinstance(heads, int):
                return result.fail("heads merged on the last axis but their number is not static", pairs)
            self.heads = heads if heads > 1 else None
        return result


class _CastOperands:
    """Mixin: Cast(x)*cos + Cast(rotate(x))*sin, both casts to one dtype. A half-precision q meets float32
    cos/sin through torch's type promotion (OLMo 2/3 in fp16/bf16, ``.float()`` in Ernie 4.5 / GLM). The
    rotation is exact in either dtype, so the application's x is the cast value."""

    x_binding = "x_cast"

    def combine(self, op, x, rotated, cos, sin):
        x_cast = op.Cast(x, _allow_other_attributes=True, _outputs=["x_cast"])
        rot_cast = op.Cast(rotated, _allow_other_attributes=True, _outputs=["rot_cast"])
        return op.Add(op.Mul(x_cast, cos), op.Mul(rot_cast, sin))

    def check(self, context, x_cast, rot_cast, **bindings):
        result = super().check(context, **bindings)
        to = [int_attr(v.producer(), "to", -1) for v in (x_cast, rot_cast)]
        if result and (to[0] != to[1] or to[0] < 0):
            return result.fail("x and rotate(x) are cast to different dtypes", x_cast)
        return result


class RotateHalfCastPattern(_CastOperands, RotateHalfPattern):
    """Cast(x)*cos + Cast(rotate_half(x))*sin."""


class InterleavedStackCastPattern(_CastOperands, InterleavedStackPattern):
    """Cast(x)*cos + Cast(rotate_every_two(x))*sin."""


APPLICATION_PATTERNS: Sequence[type[_ApplicationPattern]] = (
    RotateHalfPattern, InterleavedStackPattern, InterleavedPairsPattern, RotateHalfCastPattern,
    InterleavedStackCastPattern,
)


@dataclasses.dataclass
class ApplicationMatch:
    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    output: ir.Value
    layout: Layout
    rotary_dim: int
    nodes: tuple[ir.Node, ...]
    head_dim: int | None = None  # set when identified by probing (per head, also for [.., H·D] rotations)
    num_heads: int | None = None  # heads on x's last axis ([B, S, H·D] rotations), by probing
    decay: object | None = None  # sites.rope.PositionDecay of an xPos rotation, by probing
    probed: bool = False
    # by probing: per pair (pairs' order), the signed angle the rotation turns by from the first probed position
    # to the next, modulo 2π in (-π, π] (its sign against the angles' frequencies: a rotation by -θ)
    steps: np.ndarray | None = None


def find_applications(
    model: ir.Model, fold: ConstantEvaluator, tracer: orp.MatchingTracer | None = None
) -> list[ApplicationMatch]:
    """Every q/k rotation in the main graph, each node taken at most once."""
    matchers = []
    for cls in APPLICATION_PATTERNS:
        owner = cls(fold)
        matchers.extend((owner, p) for p in owner.variants())
    found: list[ApplicationMatch] = []
    for node in list(model.graph):
        if node.op_type not in ("Add", "Sub", "Concat", "Reshape"):
            continue
        if (node.name or "").startswith(EXTEND_NODE_PREFIX):  # an attention extension's own rotation
            continue
        for owner, compiled in matchers:
            owner.heads = None
            match = compiled.match(model, model.graph, node, check_nodes_are_removable=False, tracer=tracer)
            if not match:
                continue
            b = match.bindings
            x = b[getattr(owner, "x_binding", "x")]
            # the cast of x (cast patterns) stays: it is x's producer, not part of the rotation
            nodes = tuple(n for n in match.nodes if n is not x.producer())
            found.append(
                ApplicationMatch(
                    x=x, cos=b["cos"], sin=b["sin"], output=node.outputs[0], layout=owner.layout,
                    rotary_dim=owner.rotary_dim, nodes=nodes, num_heads=owner.heads,
                    head_dim=owner.rotary_dim if owner.heads else None,
                )
            )
            break
    return found
