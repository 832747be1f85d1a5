"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE whose rotation is also scaled by
ζ_c^((p - p0)/γ) on q and by its inverse on k. A rescale changes the angles like any RoPE; what happens to the
decay is a convention, and libraries disagree:

- ``angles`` (x-transformers' ``rotary_interpolation_factor``): only the angles are interpolated, the decay
  keeps reading the original positions;
- ``scaled`` (rotary-embedding-torch's ``interpolate_factor``): the positions are divided before both, so the
  decay's exponent is divided by the factor too: ζ^((p - p0)/(γ·s)) = (ζ^((p - p0)/γ))^(1/s).

`scale_decay` writes the second one: every position-dependent factor a rotation multiplies its cos/sin terms
with (the decay, found as the operand of the rotation's Muls that does not depend on x) is raised to 1/s.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._build import NodeWriter
from posrewrite.sites.rope import PositionDecay, RopeSite

#: the conventions for the decay of a rescaled xPos rotation (see the module docstring)
XPOS_DECAY_CONVENTIONS = ("angles", "scaled")


def _downstream(x: ir.Value, nodes: set[int]) -> set[int]:
    reached: set[int] = {id(x)}
    stack = [x]
    while stack:
        v = stack.pop()
        for use in v.uses():
            n = use.node
            if id(n) not in nodes:
                continue
            for o in n.outputs:
                if id(o) not in reached:
                    reached.add(id(o))
                    stack.append(o)
    return reached


def decay_operands(site: RopeSite) -> list[tuple[ir.Node, int]]:
    """(Mul, input index) of every decay factor the site's rotations multiply with: operands of Muls inside a
    rotation that do not depend on x and are not the site's cos/sin terms."""
    found = []
    for app in site.applications:
        if app.decay is None:
            continue
        nodes = {id(n) for n in app.nodes}
        from_x = _downstream(app.input, nodes)
        for node in app.nodes:
            if node.op_type != "Mul" or len(node.inputs) != 2:
                continue
            flags = [i is not None and id(i) in from_x for i in node.inputs]
            if flags.count(True) != 1:
                continue
            k = flags.index(False)
            other = node.inputs[k]
            if other is app.cos or other is app.sin:
                continue
            found.append((node, k))
    return found


def scale_decay(graph: ir.Graph, site: RopeSite, ratio: float) -> list[str]:
    """Raises every decay factor of `site` to `ratio` (1/s: the decay of positions divided by s)."""
    operands = decay_operands(site)
    if not operands:
        raise ValueError("no decay factor found in the xPos rotations")
    done: dict[int, ir.Value] = {}
    for node, k in operands:
        value = node.inputs[k]
        if id(value) not in done:
            w = NodeWriter(graph, node, "xpos_decay")
            exponent = w.const(np.array(ratio, dtype=np.float32 if value.dtype != ir.DataType.FLOAT16 else np.float16))
            done[id(value)] = w.op("Pow", value, exponent)
            w.commit()
        node.replace_input_with(k, done[id(value)])
    return [f"xPos decay exponent x{ratio:.6g} on {len(done)} factor(s) ({len(operands)} use(s))"]


def decay_magnitude(decay: PositionDecay, length: int, ratio: float = 1.0) -> np.ndarray:
    """[length, pairs] the decay of `decay` at positions 0..length-1 (the exponent times `ratio`), by the paper's
    formula: exp(log_rate_c · (p - p0) · ratio), p0 = length // 2 for a length-centred decay."""
    p0 = length // 2 if decay.length_centred else decay.zero_position
    pos = np.arange(length, dtype=np.float64) - p0
    return np.exp(np.outer(pos, np.asarray(decay.log_rate, np.float64)) * ratio)


def fp16_overflow_position(decay: PositionDecay) -> float:
    """Distance |p - p0| past which the decay (or its inverse on k) exceeds float16's largest value 65504."""
    rate = float(np.max(np.abs(decay.log_rate)))
    return float("inf") if rate == 0 else float(np.log(65504.0) / rate)


def decay_precision(site: RopeSite, n: int) -> tuple[list[str], bool]:
    """(notes, safe) of an xPos site's decay over `n` positions: ζ^((p - p0)/γ) on k (its inverse on q) grows
    past float16's largest value at |p - p0| = ln(65504) / max|log ζ_c / γ|; q and k rotated in half precision
    (or a decay computed in it) overflow there."""
    decay = site.encoding.decay
    if decay is None:
        return [], True
    reach = n / 2 if decay.length_centred else max(n - 1 - decay.zero_position, decay.zero_position)
    limit = fp16_overflow_position(decay)
    span = 2 * limit if decay.length_centred else limit
    half = [a for a in site.applications if a.output.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)]
    half += [a for a in site.applications for node, k in decay_operands(site)
             if node.inputs[k].dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)][:1]
    if reach <= limit:
        return [f"xPos decay stays within float16 up to {n} positions (overflows past about {span:.0f})"], True
    where = "this model computes it in half precision: unsafe" if half else "safe here (float32)"
    return [f"xPos decay zeta^((p - p0)/gamma) exceeds float16's range past about {span:.0f} positions "
            f"(here up to {n}): {where}"], not half
