"""RoPE rotations identified by what they compute, not by how a library spells them.

A RoPE application is y = a(p)·x + b(p)·P(x) on some channels of an activation x: P pairs channels with a sign,
a and b come from cos/sin of angles that depend on the positions. Structure only finds *candidates*:

1. seeds: the outputs of Cos / Sin nodes (and, given by the caller, rows of cos/sin tables);
2. the cos/sin family: every value computed from the seeds together with constants and position inputs only
   (broadcasts, slices, casts, scalar or position-dependent factors such as xPos' scale);
3. the terms: Muls where a family value meets an activation (a value depending on hidden states);
4. x: the nearest common ancestor of the terms of one rotation, walking up through data movement
   (Slice / Split / Gather / Squeeze / Reshape / Transpose / Neg / Concat / ... whatever the library wrote);
   y: the first value that depends on every term, followed through reshapes back to x's shape.

The cone from x (and the position inputs) to y is then *evaluated* on probe inputs (unit vectors of x at a few
positions; no weight is read: x is an input of the cut-out subgraph). The matrices M(p) with y = M(p)·x give the
channel pairing and signs, the rotated range (pass-through channels), whether the rotation is per head, the
angle of every pair at every probed position, and the magnitude |a|² + |b|² (xPos when it depends on position).
A library's new spelling of the same arithmetic needs no new code here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from posrewrite.math.precision import machine_epsilon
from posrewrite.passes.onnx._build import EXTEND_NODE_PREFIX
from posrewrite.passes.onnx._graph import call_input, const_tensor, dtype_name, numpy_dtype
from posrewrite.passes.rotation_reading import NotARotation, identify_matrix, read_matrices
from posrewrite.sites.rope import Layout, PositionDecay

#: ops that only move, select, negate or retype activation elements (a rotation's plumbing)
_MOVE_OPS = frozenset({
    "Slice", "Split", "Gather", "GatherElements", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Neg",
    "Concat", "Cast", "Identity", "Flatten", "Expand", "Tile",
})
#: ops followed from y0 back to x's shape (stack + flatten, view_as_real + flatten)
_RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity", "Transpose"})
_PROBE_POSITIONS = 16  # positions 0..15 in every probe (low frequencies turn by 15·f: seen in any dtype)
_MAX_PROBE_CHANNELS = 4096
_MAX_GRID_PROBE_CHANNELS = 512  # one probe run per channel on a grid (batch fixed to one)
_MAX_CONE_NODES = 400
_MAX_CONE_ELEMENTS = 1 << 23  # constants a rotation's cone may read (cos/sin tables of 64k x 128 fit)


@dataclasses.dataclass(frozen=True)
class ProbedRotation:
    """One rotation identified by probing. `layout` None: a pairing no rewrite supports (`pairs` says which)."""

    x: ir.Value
    output: ir.Value
    cos: ir.Value  # the family value multiplied with x itself (the cos term)
    sin: ir.Value  # the family value multiplied with the partner channels (the sin term)
    layout: Layout | None
    rotary_dim: int  # channels of one head that rotate (the first rotary_dim of the head)
    head_dim: int  # channels of one head (x's last axis, or its block when x is [.., H·D])
    heads_in_last_axis: int  # 1, or H when x holds H heads of head_dim channels on its last axis
    pairs: tuple[tuple[int, int], ...]  # (first, second) channel pairs of one head: y_f = x_f cos - x_s sin
    angles: np.ndarray  # [positions, rotary_dim/2] probed angle of each pair (pairs' order), positions 0..15
    magnitude: np.ndarray  # [positions, rotary_dim/2] probed |a|² + |b|² (cos²+sin² times any factor²)
    decay: PositionDecay | None
    nodes: tuple[ir.Node, ...]


class StaticLength(Exception):
    """A rotation identified on an export whose sequence length is fixed (a static export): it cannot run past
    that many positions, so no rescale or extension can help; the message says so and what to do."""


# -- structure: candidates ------------------------------------------------------------------------------------


def _is_position_input(v: ir.Value) -> bool:
    name = (v.name or "").lower()
    if v.dtype is not None and v.dtype.is_floating_point():
        return False
    return "pos" in name or "mask" in name


_MAX_ANGLE_TENSORS = 8  # distinct angle tensors probed for position inputs whose names say nothing


def trig_position_inputs(model: ir.Model, seeds: list[ir.Value]) -> dict[str, str]:
    """Integer graph inputs the angles of Cos/Sin seeds read as data, by name, with the feed under which those
    angles are positions 0..S-1 times a step (`position_feed`): positions made from a mask's cumulative sum or a
    start added to the index, whatever the exporter named the input. Inputs whose names already say (`pos`,
    `mask`) are left to `call_input`."""
    from posrewrite.passes.onnx.rope.position_feed import position_feeds
    from posrewrite.passes.onnx.rope.probe import cone_inputs

    angles: dict[int, ir.Value] = {}
    for s in seeds:
        node = s.producer()
        if node is not None and node.op_type in ("Cos", "Sin") and node.inputs and node.inputs[0] is not None:
            angles.setdefault(id(node.inputs[0]), node.inputs[0])
    found: dict[str, str] = {}
    for a in list(angles.values())[:_MAX_ANGLE_TENSORS]:
        data = cone_inputs(model, [a]).data
        unnamed = [v for v in data if v.dtype is not None and not v.dtype.is_floating_point()
                   and not _is_position_input(v) and v.name not in found]
        if not unnamed:
            continue
        try:
            found.update(position_feeds(model, a, None))
        except Exception:  # noqa: BLE001 - an angle cone that cannot be evaluated leaves the names to decide
            continue
    return found


class _Hidden:
    """Whether a value depends on hidden states (a float graph input, or token ids read other than through
    Shape): memoised backward walk. Initializers, constants and position inputs are not hidden."""

    def __init__(self, graph: ir.Graph, positions: dict[str, str] | None = None) -> None:
        self._inputs = {id(v): v for v in graph.inputs}
        self._positions = positions or {}
        self._memo: dict[int, bool] = {}

    def __call__(self, value: ir.Value | None) -> bool:
        if value is None:
            return False
        stack = [value]
        while stack:
            v = stack[-1]
            if id(v) in self._memo:
                stack.pop()
                continue
            if id(v) in self._inputs:
                self._memo[id(v)] = not _is_position_input(v) and v.name not in self._positions
                stack.pop()
                continue
            node = v.producer()
            if node is None or node.op_type in ("Shape", "Size"):
                self._memo[id(v)] = False
                stack.pop()
                continue
            pending = [i for i in node.inputs if i is not None and id(i) not in self._memo]
            if pending:
                stack.extend(pending)
                continue
            self._memo[id(v)] = any(self._memo[id(i)] for i in node.inputs if i is not None)
            stack.pop()
        return self._memo[id(value)]


def _family(seeds: Iterable[ir.Value], hidden: _Hidden, limit: int = 4000) -> set[int]:
    """Values computed from the seeds with constants and positions only (no hidden state)."""
    family: set[int] = set()
    stack = list(seeds)
    while stack and len(family) < limit:
        v = stack.pop()
        if id(v) in family:
            continue
        family.add(id(v))
        for use in v.uses():
            node = use.node
            if node.op_type in ("Shape", "Size"):
                continue
            if any(i is not None and id(i) not in family and i is not v and hidden(i) for i in node.inputs):
                continue
            stack.extend(node.outputs)
    return family


@dataclasses.dataclass
class _Term:
    mul: ir.Node
    activation: ir.Value
    factor: ir.Value  # the family operand


#: where a cos/sin family value meets an activation: elementwise (a term of a·x + b·P(x)) or a matrix product
#: (2x2 rotation matrices applied by MatMul / Einsum: the whole rotation in one term)
_TERM_OPS = frozenset({"Mul", "MatMul", "Einsum"})


def _terms(graph: ir.Graph, family: set[int], hidden: _Hidden) -> list[_Term]:
    terms = []
    for node in graph:
        if node.op_type not in _TERM_OPS or len(node.inputs) != 2 or node.domain not in ("", "ai.onnx"):
            continue
        if (node.name or "").startswith(EXTEND_NODE_PREFIX):  # an attention extension's own rotation
            continue
        a, b = node.inputs
        if a is None or b is None:
            continue
        if id(a) in family and id(b) not in family and hidden(b):
            terms.append(_Term(node, b, a))
        elif id(b) in family and id(a) not in family and hidden(a):
            terms.append(_Term(node, a, b))
    return terms


def _ancestors(value: ir.Value, limit: int = 64) -> dict[int, ir.Value]:
    """`value` and the values above it through data-movement ops (every data input of a Concat)."""
    found: dict[int, ir.Value] = {}
    stack = [value]
    while stack and len(found) < limit:
        v = stack.pop()
        if id(v) in found:
            continue
        found[id(v)] = v
        node = v.producer()
        if node is None or node.op_type not in _MOVE_OPS:
            continue
        data = list(node.inputs) if node.op_type == "Concat" else node.inputs[:1]
        stack.extend(i for i in data if i is not None)
    return found


def candidates(model: ir.Model, seeds: list[ir.Value], positions: dict[str, str] | None = None
               ) -> list[tuple[list[ir.Value], list[_Term]]]:
    """([x, ...], terms) for every group of cos/sin terms that share an activation ancestor: the common
    ancestors nearest first (x may be a view made for the rotation, e.g. [.., H, D/2, 2] pairs of [.., H·D]).
    `positions`: integer inputs that are positions whatever their names (`trig_position_inputs`)."""
    graph = model.graph
    hidden = _Hidden(graph, positions)
    family = _family([s for s in seeds if not hidden(s)], hidden)
    terms = _terms(graph, family, hidden)
    order = {id(n): k for k, n in enumerate(graph)}

    def position(v: ir.Value) -> int:
        p = v.producer()
        return -1 if p is None else order.get(id(p), -1)

    groups: list[tuple[dict[int, ir.Value], list[_Term]]] = []
    for term in terms:
        anc = _ancestors(term.activation)
        for g in groups:
            if set(g[0]) & set(anc):
                common = {k: v for k, v in g[0].items() if k in anc}
                g[0].clear()
                g[0].update(common)
                g[1].append(term)
                break
        else:
            groups.append((anc, [term]))
    found = []
    for anc, members in groups:
        if len(members) < 2 and members[0].mul.op_type == "Mul":  # one elementwise product mixes no channels
            continue
        xs = sorted(anc.values(), key=position, reverse=True)[:4]
        found.append((xs, members))
    return found


def _output(x: ir.Value, terms: list[_Term], graph: ir.Graph) -> ir.Value | None:
    """The first value depending on every term's Mul, followed through reshapes to x's rank and width."""
    need = {id(t.mul.outputs[0]): k for k, t in enumerate(terms)}
    full = (1 << len(terms)) - 1
    deps: dict[int, int] = {}
    start = min((k for k, n in enumerate(graph) if any(n is t.mul for t in terms)), default=0)
    y0 = None
    for k, node in enumerate(graph):
        if k < start:
            continue
        mask = 0
        for i in node.inputs:
            if i is not None:
                mask |= deps.get(id(i), 0)
        for o in node.outputs:
            m = mask | (1 << need[id(o)] if id(o) in need else 0)
            if m:
                deps[id(o)] = m
            if m == full and y0 is None:
                y0 = o
        if y0 is not None:
            break
    if y0 is None:
        return None
    y = y0
    rows = None  # the first value holding x's elements per position in another shape (a view of the result)
    for _ in range(6):
        if _same_layout(x, y):
            return y
        if rows is None and _same_rows(x, y):
            rows = y
        uses = [u.node for u in y.uses()]
        if len(uses) != 1 or uses[0].op_type not in _RESHAPE_OPS:
            return rows or y
        y = uses[0].outputs[0]
    return rows or y


def _position_prefix(shape: ir.Shape) -> int | None:
    """The number of leading axes up to and including the last symbolic one (batch and positions)."""
    symbolic = [k for k, d in enumerate(shape.dims) if not isinstance(d, int)]
    return symbolic[-1] + 1 if symbolic else None


def _same_rows(x: ir.Value, y: ir.Value) -> bool:
    """y holds x's channels per position in another static shape: the same axes up to the last symbolic one, and
    the same number of elements after it ([B, S, H·D] rotated as [B, S, H, D/2, 2])."""
    if x.shape is None or y.shape is None:
        return False
    k = _position_prefix(x.shape)
    if k is None or _position_prefix(y.shape) != k:
        return False
    xd, yd = list(x.shape.dims), list(y.shape.dims)
    if [str(d) for d in xd[:k]] != [str(d) for d in yd[:k]]:
        return False
    rest_x, rest_y = xd[k:], yd[k:]
    return (all(isinstance(d, int) for d in rest_x + rest_y) and len(rest_x) > 0
            and math.prod(rest_x) == math.prod(rest_y))


def _merged_view(x: ir.Value, y: ir.Value, limit: int = 4) -> tuple[ir.Value, ir.Value] | None:
    """(v, merged) when x is a pairs view of v made for the rotation — a Reshape that only splits v's last axis
    (.., W) into (.., W/2, 2) or (.., 2, W/2) — and y, of x's shape, is merged back to v's shape by reshapes
    (torch's `flatten(-2)`, a view): the rotation is then read on the W channels of v, not on the 2 of x's last
    axis. None otherwise."""
    prod = x.producer()
    if prod is None or prod.op_type != "Reshape" or not prod.inputs or prod.inputs[0] is None:
        return None
    v = prod.inputs[0]
    if v.shape is None or x.shape is None or y.shape is None:
        return None
    vd, xd = list(v.shape.dims), list(x.shape.dims)
    width = vd[-1] if vd else None
    if (len(xd) != len(vd) + 1 or not isinstance(width, int) or not all(isinstance(d, int) for d in xd[-2:])
            or xd[-2] * xd[-1] != width or 2 not in (xd[-2], xd[-1]) or width < 4
            or [str(d) for d in xd[:-2]] != [str(d) for d in vd[:-1]]
            or [str(d) for d in y.shape.dims] != [str(d) for d in xd]):
        return None
    merged = y
    for _ in range(limit):
        uses = [u.node for u in merged.uses()]
        if len(uses) != 1 or uses[0].op_type not in ("Reshape", "Flatten", "Identity", "Cast"):
            return None
        merged = uses[0].outputs[0]
        if merged.shape is not None and [str(d) for d in merged.shape.dims] == [str(d) for d in vd]:
            return v, merged
    return None


def _same_layout(x: ir.Value, y: ir.Value) -> bool:
    if x.shape is None or y.shape is None or len(x.shape) != len(y.shape):
        return False
    return x.shape[-1] == y.shape[-1]


def _nodes_between(x: ir.Value, y: ir.Value) -> list[ir.Node]:
    """Nodes on some path from x to y, in graph order."""
    back: dict[int, ir.Node] = {}
    stack = [y]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if v is x or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or id(node) in back:
            continue
        back[id(node)] = node
        if len(back) > _MAX_CONE_NODES:
            raise NotARotation("the cone from x to the rotated value is too large")
        stack.extend(i for i in node.inputs if i is not None)
    fwd: set[int] = set()
    stack = [x]
    while stack:
        v = stack.pop()
        for use in v.uses():
            n = use.node
            if id(n) in back and id(n) not in fwd:
                fwd.add(id(n))
                stack.extend(n.outputs)
    return [n for n in back.values() if id(n) in fwd]


# -- identity: probing ----------------------------------------------------------------------------------------


def _cone_inputs(graph: ir.Graph, y: ir.Value, x: ir.Value) -> list[ir.Value]:
    inputs = {id(v): v for v in graph.inputs}
    found: dict[int, ir.Value] = {}
    stack, seen = [y], set()
    while stack:
        v = stack.pop()
        if v is None or v is x or id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in inputs:
            found[id(v)] = v
            continue
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
    return [v for v in graph.inputs if id(v) in found]


def _reads_values(inp: ir.Value, y: ir.Value, x: ir.Value) -> bool:
    """Whether `y` reads the graph input `inp`'s values (not only its shape) other than through x."""
    stack, seen = [y], set()
    while stack:
        v = stack.pop()
        if v is None or v is x or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or node.op_type in ("Shape", "Size"):
            continue
        if any(i is inp for i in node.inputs):
            return True
        stack.extend(node.inputs)
    return False


def _session(model: ir.Model, inputs: list[ir.Value], y: ir.Value):
    """An onnxruntime session of the cone from `inputs` to `y`, cut out of `model`; NotARotation when it cannot be
    cut out or loaded (a malformed graph is never identified, and never an internal error)."""
    try:
        return _cone_session(model, inputs, y)
    except NotARotation:
        raise
    except Exception as exc:  # noqa: BLE001 - onnx_ir, onnx and onnxruntime raise many types on malformed cones
        raise NotARotation(f"the rotation's cone cannot be run: {str(exc).splitlines()[0][:160]}") from exc


def _cone_session(model: ir.Model, inputs: list[ir.Value], y: ir.Value):
    import onnxruntime as ort

    sub = ir.convenience.extract(model.graph, [v.name for v in inputs], [y.name])
    elements = sum(math.prod(init.shape.dims) for init in sub.initializers.values()
                   if init.shape is not None and init.shape.is_static())
    if elements > _MAX_CONE_ELEMENTS:  # a rotation's cone holds frequencies and tables, never weights
        raise NotARotation(f"the cut-out rotation reads {elements} constant elements (weights?)")
    for init in list(sub.initializers.values()):
        if isinstance(init.const_value, ir.ExternalTensor):
            init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    sub.opset_imports.update(model.graph.opset_imports)
    proto = ir.to_proto(ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values())))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


_STATIC_HINT = ("re-export with a dynamic sequence axis (torch.onnx.export dynamic_shapes / dynamic_axes) and "
                "rewrite that; torch.export fixes a size that reaches a Python int (len(t), a shape used in "
                "arithmetic outside tensors) or torch.linspace's number of steps; torch.export.export(..., "
                "strict=True) keeps len(t) symbolic: pass its program to torch.onnx.export")


def _identify_static_batch_one(model: ir.Model, x: ir.Value, y: ir.Value, dims: list) -> None:
    """x of a fully static shape with a batch of one: one run per channel (its unit vector at every position);
    a rotation read over the axes between batch and channels raises StaticLength."""
    width = int(dims[-1])
    positions = math.prod(int(d) for d in dims[1:-1])
    if width > _MAX_GRID_PROBE_CHANNELS or width < 2 or positions * width > _MAX_CONE_ELEMENTS:
        return
    others = _cone_inputs(model.graph, y, x)
    if any(_reads_values(v, y, x) for v in others) or any(
            v.shape is None or v.dtype is None or not v.shape.is_static() for v in others):
        return
    if any(math.prod(v.shape.dims) > _MAX_CONE_ELEMENTS for v in others):
        return
    feeds = {v.name: np.zeros(list(v.shape.dims), numpy_dtype(v.dtype)) for v in others}
    try:
        session = _session(model, [x, *others], y)
    except NotARotation:
        return
    keep = min(positions, 64)
    runs = []
    for j in range(width):
        probe = np.zeros([int(d) for d in dims], dtype=numpy_dtype(x.dtype))
        probe[..., j] = 1
        try:
            (out,) = session.run(None, {**feeds, x.name: probe})
        except Exception:  # noqa: BLE001 - a cone that does not run on the probe is not a rotation
            return
        if out.shape != probe.shape:
            return
        runs.append(np.asarray(out, np.float64).reshape(positions, width)[:keep])  # [P, i]
    m = np.transpose(np.stack(runs), (1, 2, 0))  # [P, i, j]
    found = identify_matrix(m)
    if found is not None and found[0]:
        size = "x".join(str(d) for d in dims[1:-1])
        raise StaticLength(f"RoPE rotation of {x.name} exported at a fixed size of {size} positions (a static "
                           f"export: the graph cannot run at any other size); {_STATIC_HINT}")


def _identify_static(model: ir.Model, x: ir.Value, y: ir.Value, dims: list) -> None:
    """x has no symbolic position axis: try each static axis before the channels as positions; a rotation read
    there raises StaticLength (else returns: not identified)."""
    if dims and dims[0] == 1 and all(isinstance(d, int) for d in dims):
        _identify_static_batch_one(model, x, y, dims)
        return
    for axis in range(len(dims) - 2, 0, -1):
        n = dims[axis]
        if not isinstance(n, int) or n < 2:
            continue
        try:
            m = probe_matrices(model, x, y, static_axis=axis)
        except NotARotation:
            continue
        pairs = identify_matrix(m[0, :, : m.shape[-1], : m.shape[-1]])
        if pairs is not None and pairs[0]:
            raise StaticLength(
                f"RoPE rotation of {x.name} exported at a fixed length of {n} positions (a static export: the "
                f"graph cannot run past {n}); {_STATIC_HINT}")
    return


def probe_matrices(model: ir.Model, x: ir.Value, y: ir.Value, static_axis: int | None = None,
                   positions: dict[str, str] | None = None) -> np.ndarray:
    """M [heads, positions, W, W] with y[.., p, i] = sum_j M[h, p, i, j] x[.., p, j] (W: x's last axis), from
    one run of the cut-out cone on unit vectors of x placed on its batch axis."""
    if x.shape is None or x.dtype is None or not x.dtype.is_floating_point():
        raise NotARotation("the rotated value has no known float shape")
    dims = list(x.shape.dims)
    width = dims[-1]
    if not isinstance(width, int):
        raise NotARotation("the rotated width is not static")
    if width > _MAX_PROBE_CHANNELS:
        raise NotARotation(f"{width} channels is more than a probe handles")
    symbolic = [k for k, d in enumerate(dims[:-1]) if not isinstance(d, int)]
    if len(symbolic) <= 1 and len(dims) >= 3 and not static_axis:
        _identify_static(model, x, y, dims)
    if static_axis:
        seq_axis, length = static_axis, int(dims[static_axis])
        if any(not isinstance(d, int) for d in dims[1:]):
            raise NotARotation(f"cannot tell batch and position axes of {x.shape}")
        dims = ["batch", *dims[1:]]
    elif symbolic and symbolic[0] != 0 and dims[0] == 1 and len(dims) - 1 not in symbolic:
        # a static batch of one: one run per channel over the symbolic position axes (one axis: 1-D RoPE,
        # positions 0..15; several: a patch grid)
        return _probe_grid(model, x, y, dims, symbolic, positions)
    elif len(symbolic) != 2 or symbolic[0] != 0:
        raise NotARotation(f"cannot tell batch and position axes of {x.shape}")
    else:
        seq_axis = symbolic[1]
        length = _PROBE_POSITIONS
    shape = [width if k == 0 else (length if k == seq_axis else d) for k, d in enumerate(dims)]
    probe = np.zeros(shape, dtype=numpy_dtype(x.dtype))
    eye = np.eye(width, dtype=probe.dtype)
    moved = np.moveaxis(probe, 0, -2)  # [.., W(batch), W]
    moved[...] = eye
    graph = model.graph
    others = _cone_inputs(graph, y, x)
    positions = positions or {}
    hidden = [v.name for v in others if not _is_position_input(v) and v.name not in positions
              and _reads_values(v, y, x)]
    if hidden:
        raise NotARotation(f"the rotated value depends on {hidden[0]} other than through {x.name}")
    feeds = {v.name: _position_feed(v, positions, width, length) for v in others}
    feeds[x.name] = probe
    try:
        (out,) = _session(model, [x, *others], y).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - a cone that does not run on the probe is not a rotation
        raise NotARotation(f"probe run failed: {str(exc).splitlines()[0][:160]}") from exc
    out = _lined_up(out, probe.shape, x, y)
    out = np.asarray(out, np.float64)
    # out[b, .., p, .., i] = M[.., p][i, b]
    out = np.moveaxis(out, seq_axis, 1)  # [W(b), P, rest.., W(i)]
    out = out.reshape(width, length, -1, width)  # [b, P, heads, i]
    return np.transpose(out, (2, 1, 3, 0))  # [heads, P, i, j]


def _position_feed(v: ir.Value, positions: dict[str, str], batch: int, length: int) -> np.ndarray:
    """A graph input for a probe over positions 0..length-1: the feed `positions` names, else `call_input`'s."""
    from posrewrite.passes.onnx.rope.position_feed import feed_array

    arr = feed_array(v, positions[v.name], batch, length) if v.name in positions else None
    return arr if arr is not None else call_input(v, batch, length)


def _probe_grid(model: ir.Model, x: ir.Value, y: ir.Value, dims: list, grid_axes: list[int],
                positions: dict[str, str] | None = None) -> np.ndarray:
    """`probe_matrices` for a batch of one (static) over several position axes (a patch grid, rotary-embedding-
    torch's axial frequencies): one run per input channel, each with that unit vector at every grid point; the
    grid points, row-major, are the positions (point (0, .., 0) first: angle 0). One position axis: positions
    0..15 of a 1-D sequence, read as any other 1-D probe."""
    width = int(dims[-1])
    if width > _MAX_GRID_PROBE_CHANNELS:
        raise NotARotation(f"{width} channels on a grid is more than a probe handles")
    side = max(2, round(_PROBE_POSITIONS ** (1 / len(grid_axes))))
    shape = [side if k in grid_axes else d for k, d in enumerate(dims)]
    others = _cone_inputs(model.graph, y, x)
    symbols = {str(dims[k]) for k in grid_axes}
    feeds = {}
    for v in others:  # read for their shape only (the grid size), fed with the probe's grid
        if len(grid_axes) == 1 and (_is_position_input(v) or v.name in (positions or {})):
            feeds[v.name] = _position_feed(v, positions or {}, 1, side)  # 1-D: ids 0..side-1, a mask of ones
            continue
        if _reads_values(v, y, x) or v.shape is None or v.dtype is None:
            raise NotARotation(f"the rotation over a grid reads {v.name} besides {x.name}")
        if any(not isinstance(d, int) and str(d) not in symbols for d in v.shape.dims):
            raise NotARotation(f"cannot tell the grid axes of {v.name} {v.shape}")
        feeds[v.name] = np.zeros([d if isinstance(d, int) else side for d in v.shape.dims], numpy_dtype(v.dtype))
    session = _session(model, [x, *others], y)
    runs = []
    for j in range(width):
        probe = np.zeros(shape, dtype=numpy_dtype(x.dtype))
        probe[..., j] = 1
        try:
            (out,) = session.run(None, {**feeds, x.name: probe})
        except Exception as exc:  # noqa: BLE001 - a cone that does not run on the probe is not a rotation
            raise NotARotation(f"probe run failed: {str(exc).splitlines()[0][:160]}") from exc
        out = _lined_up(out, probe.shape, x, y)
        out = np.moveaxis(np.asarray(out, np.float64)[0], [a - 1 for a in grid_axes], range(len(grid_axes)))
        runs.append(out.reshape(side ** len(grid_axes), -1, width))  # [P, heads, i]
    return np.transpose(np.stack(runs), (2, 1, 3, 0))  # [heads, P, i, j]


def _lined_up(out: np.ndarray, shape: tuple[int, ...], x: ir.Value, y: ir.Value) -> np.ndarray:
    """The probe's output in its input's shape: as is, or reshaped when y is a view of x's rows (`_same_rows`)."""
    if out.shape != tuple(shape) and _same_rows(x, y) and out.size == math.prod(shape):
        out = out.reshape(shape)
    if out.shape != tuple(shape):
        raise NotARotation(f"rotated value {out.shape} does not line up with its input {tuple(shape)}")
    return out


def _tolerance(x: ir.Value) -> float:
    """Relative agreement expected between probed coefficients that are equal in exact arithmetic: a few
    round-offs of x's dtype (cos/sin and their products are rounded to it), 1e-5 at least."""
    name = dtype_name(x)
    return max(1e-5, 8 * machine_epsilon(name if name in ("float16", "bfloat16") else "float32"))


def identify(model: ir.Model, x: ir.Value, y: ir.Value, terms: list[_Term],
             positions: dict[str, str] | None = None) -> ProbedRotation:
    """The rotation y = M(p)·x read from probes; NotARotation with the reason when it is not one."""
    r = read_matrices(probe_matrices(model, x, y, positions=positions), _tolerance(x))
    return ProbedRotation(
        x=x, output=y, cos=_cos_operand(terms, x), sin=_sin_operand(terms, x), layout=r.layout,
        rotary_dim=r.rotary_dim, head_dim=r.head_dim, heads_in_last_axis=r.heads_in_last_axis, pairs=r.pairs,
        angles=r.angles, magnitude=r.magnitude, decay=r.decay, nodes=tuple(_nodes_between(x, y)),
    )


def _trig_kind(value: ir.Value, limit: int = 32) -> str | None:
    """"Cos" or "Sin": the trig node a family value is computed from (nearest first), None for tables."""
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        v = stack.pop(0)
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            continue
        if node.op_type in ("Cos", "Sin"):
            return node.op_type
        stack.extend(node.inputs)
    return None


def _cos_operand(terms: list[_Term], x: ir.Value) -> ir.Value:
    for t in terms:
        if _trig_kind(t.factor) == "Cos":
            return t.factor
    for t in terms:
        if t.activation is x:
            return t.factor
    return terms[0].factor


def _sin_operand(terms: list[_Term], x: ir.Value) -> ir.Value:
    cos = _cos_operand(terms, x)
    for t in terms:
        if _trig_kind(t.factor) == "Sin" and t.factor is not cos:
            return t.factor
    for t in terms:
        if t.factor is not cos:
            return t.factor
    return terms[-1].factor


def find_probed(model: ir.Model, seeds: list[ir.Value], claimed: set[int]
                ) -> tuple[list[ProbedRotation], list[tuple[ir.Value, str]], list[tuple[ir.Value, str]]]:
    """Rotations fed by `seeds` (cos/sin values) that no pattern claimed (`claimed`: ids of claimed outputs).
    Returns (rotations, [(where, why it is a rotation that cannot be rewritten)], [(where, why not a rotation)])."""
    found, refused, failed = [], [], []
    positions = trig_position_inputs(model, seeds)
    for xs, terms in candidates(model, seeds, positions):
        if any(id(t.mul.outputs[0]) in claimed for t in terms):
            continue
        first_failure = None
        for x in xs:  # the nearest common ancestor first, then the values it was viewed from
            y = _output(x, terms, model.graph)
            if y is None:
                first_failure = first_failure or (x, "no value combines the cos and sin terms")
                continue
            x, y = _merged_view(x, y) or (x, y)
            try:
                found.append(identify(model, x, y, terms, positions))
            except StaticLength as why:
                refused.append((y, str(why)))
            except NotARotation as why:
                first_failure = first_failure or (y, str(why))
                continue
            except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
                # a malformed graph (shapes that contradict each other...): not identified, never a crash
                first_failure = first_failure or (y, f"probe not possible: {type(exc).__name__}: {exc}"[:200])
                continue
            first_failure = None
            break
        if first_failure is not None:
            failed.append(first_failure)
    return found, refused, failed


def rotation_seeds(model: ir.Model) -> list[ir.Value]:
    """Where cos/sin come from: Cos / Sin outputs, rows of constant float tables (2-D or more) selected by
    Gather / Slice (hidden-state lookups, embeddings, are dropped by `candidates`), and such tables multiplied
    directly (a static export bakes cos/sin of its fixed positions as constants)."""
    seeds = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if (tensor is not None and tensor.dtype.is_floating_point() and tensor.shape is not None
                and len(tensor.shape) >= 2 and any(u.node.op_type == "Mul" for u in value.uses())):
            seeds.append(value)
    for node in model.graph:
        if node.op_type in ("Cos", "Sin"):
            seeds.append(node.outputs[0])
        elif node.op_type in ("Gather", "Slice") and node.inputs and node.inputs[0] is not None:
            table = node.inputs[0]
            tensor = const_tensor(table)
            if (tensor is not None and tensor.dtype.is_floating_point() and tensor.shape is not None
                    and len(tensor.shape) >= 2):
                seeds.append(node.outputs[0])
    return seeds


def describe_pairs(pairs: tuple[tuple[int, int], ...], limit: int = 4) -> str:
    shown = ", ".join(f"({a},{b})" for a, b in pairs[:limit])
    return shown + (f", ... ({len(pairs)} pairs)" if len(pairs) > limit else "")
