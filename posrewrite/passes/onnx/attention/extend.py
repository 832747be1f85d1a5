"""SelfExtend, ReRoPE / Leaky ReRoPE, Dual Chunk Attention and log-n scaling as rewrites of each attention's score
computation (and, for run-time RoPE methods, re-rotation of cached keys: ``RerotatePastKeysPass``).

For every pair of q and k rotations that meet in a score ``MatMul`` (q on the left, k on the right, through
scaling by constants, transposes, reshapes and GQA's repeat_kv expands), the rewrite takes the method's branches
(``AttentionExtension.branches()`` in ``posrewrite.math.positions``: a query position map, a key position map and
the region of (i, j) where the branch's scores are used; one branch for SelfExtend / ReRoPE, two for Dual Chunk)
and for each

1. clones the model's own cos/sin computation (``positions -> ... -> Cos/Sin``, or the Gather of a cached table)
   at the branch's positions (the maps' steps written as ONNX ops: floor division, mod, mul, add, min);
2. clones the rotation of q and of k and their path to the score MatMul with those cos/sin, and a second MatMul;
3. merges it into the scores, ``Where(region(i, j), branch, scores)`` (distance for SelfExtend / ReRoPE, chunk
   distance for Dual Chunk), before the scale, mask and softmax that follow (they are linear or elementwise per
   score, so merging at the MatMul is the same as merging just before the softmax, as the papers do). Only on
   the box that holds the regions (``Region.box``: query rows from a start, key columns before an end, read from
   the position values at run time): the score MatMul is split into products of sliced q and k (columns before
   and from the end; rows before and from the start), the branches' products and merges are made on the box's
   block only, and the model's tail (mask, softmax, torch's guard, product with the values: ``_tail_steps``) runs
   per band of rows, so the blocks are never concatenated back into [.., S, T] (``_tail_by_bands``; any other tail:
   they are, and the tail is the model's). On a packed KV cache whose key path is GQA's repeat_kv
   (``_grouped_key_path``), the products read the cached keys [B, Hkv, c, D] with the queries viewed as
   [B, Hkv, G, S, D] (no repeat_kv copies; the key path's constant scale moves to the queries), and the
   probabilities meet the values the same way (``_grouped_value_product``: [B, Hkv, G, S, T] times the values as
   cached, [B, Hkv, 1, T, D]; repeat_kv's copy of the whole value cache was the largest of a decode step);
4. log-n: multiplies the scores of the query at position p by ``max(1, log(p+1)/log(L))`` (the same as scaling q;
   with --fuse and no extension, q itself is scaled before its fused rotation, so attention can still be fused).

Fused RotaryEmbedding nodes (``--fuse`` runs first): each node is one rotation, and its second position system is
the node cloned with its ``position_ids`` replaced by the mapped positions (integer maps only, checked to stay
inside the node's caches).

The model's own cos/sin arithmetic is reused, so layouts (rotate-half, interleaved), partial rotary, attention
factors and earlier rescales carry over unchanged. Positions are read where the graph made them (an [S, 1] column
reshaped for an outer product is the [S] range above it). Only nodes of the model's opset (>= 14) are written.

KV-cache exports (``past_key_values.*`` in, ``present.*`` out): every key position of the methods is fixed once
the key exists, so each new key is rotated once per position system and the cache keeps them all, packed on the
heads axis (``cached_keys_packed``: ``present.*.key`` = [B, (1 + m) H, T, D]; docs/long-context.md states the
contract). Exports whose key cache is not a plain ``Concat(past, new)`` of a [B, H, T, D] graph input/output pair
(and ``--runtime-decode rerotate``) fall back to caching keys before rotation and rotating all of them at every
step (``cached_keys``). Key positions are their indices in the cache shifted by each batch row's offset
(``_key_positions_like``): left-padded rows are exact. A cache written by the original model cannot be continued
by the rewritten one (and vice versa). log-n only touches queries and leaves the cache as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.math.positions import AttentionExtension, PositionMap, Region
from posrewrite.passes.onnx._build import EXTEND_NODE_PREFIX, NodeWriter, unique_name
from posrewrite.passes.onnx._graph import VIEW_OPS, ConstantEvaluator, has_past_inputs, rank
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.sites.rope import AngleSource, RopeApplication, RopeSite

__all__ = ["REROTATE_CHANGE", "AttentionExtendError", "AttentionExtendPass", "RerotatePastKeysPass",
           "ScorePair", "extend_attention", "find_score_pairs"]

#: the start of the change line of --runtime-decode rerotate (the validation step reads it as a claim)
REROTATE_CHANGE = "past keys re-rotated at every step"

_PATH_OPS = VIEW_OPS | {"Mul", "Div"}
#: fused attention ops (onnxruntime contrib ops and ONNX opset 23): no score MatMul to merge into
_FUSED_ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedAttention",
                                  "PackedMultiHeadAttention", "SparseAttention"})
EXTENDED_KEY = "posrewrite.attention_extension"


class AttentionExtendError(ValueError):
    """The graph cannot take the requested attention rewrite (the message says why)."""


class ScorePair:
    """One attention: the score MatMul, the q and k rotations feeding it and the nodes between them."""

    def __init__(self, matmul: ir.Node, q: tuple[RopeSite, RopeApplication, list[ir.Node]],
                 k: tuple[RopeSite, RopeApplication, list[ir.Node]], cached_keys: bool) -> None:
        self.matmul = matmul
        self.q_site, self.q_app, self.q_path = q
        self.k_site, self.k_app, self.k_path = k
        self.cached_keys = cached_keys


def _walk_to_matmul(app: RopeApplication, fold: ConstantEvaluator) -> list[tuple[ir.Node, int, list[ir.Node], bool]]:
    """From a rotation's output forward to the MatMul(s) it feeds: (matmul, input index, path, via Concat)."""
    found = []
    stack: list[tuple[ir.Value, list[ir.Node], bool]] = [(app.output, [], False)]
    seen: set[int] = set()
    while stack:
        value, path, concat = stack.pop()
        for node, idx in list(value.uses()):
            if id(node) in seen and node.op_type != "MatMul":
                continue
            seen.add(id(node))
            op = node.op_type
            if op == "MatMul" and idx in (0, 1):
                found.append((node, idx, path, concat))
                continue
            if len(path) > 24:
                continue
            if op in _PATH_OPS:
                if op in ("Mul", "Div"):
                    other = node.inputs[1 - idx] if idx in (0, 1) else None
                    c = fold(other)
                    if c is None or c.size != 1:
                        continue
                elif idx != 0:
                    continue
                stack.append((node.outputs[0], [*path, node], concat))
            elif op == "Concat":  # keys appended to a cache (KV-cache exports)
                stack.append((node.outputs[0], [*path, node], True))
    return found


def find_score_pairs(model: ir.Model, sites: list[RopeSite]) -> list[ScorePair]:
    """Every attention whose score MatMul takes a rotated q on the left and a rotated k on the right."""
    fold = ConstantEvaluator(model.opset_imports.get("", 18))
    left: dict[int, tuple] = {}
    right: dict[int, tuple] = {}
    matmuls: dict[int, ir.Node] = {}
    for site in sites:
        for app in site.applications:
            for mm, idx, path, concat in _walk_to_matmul(app, fold):
                matmuls[id(mm)] = mm
                (left if idx == 0 else right)[id(mm)] = (site, app, path, concat)
    pairs = []
    for key, mm in matmuls.items():
        if key in left and key in right:
            qs, qa, qp, _ = left[key]
            ks, ka, kp, concat = right[key]
            pairs.append(ScorePair(mm, (qs, qa, qp), (ks, ka, kp), concat))
    order = {id(n): i for i, n in enumerate(model.graph)}
    pairs.sort(key=lambda p: order.get(id(p.matmul), 0))
    return pairs


def _ancestors_until(targets: list[ir.Value], stops: set[int], limit: int = 4000) -> set[int]:
    """Ids of the nodes above ``targets``, not going past the values in ``stops``."""
    found: set[int] = set()
    stack = [t for t in targets if t is not None]
    while stack and len(found) < limit:
        v = stack.pop()
        if id(v) in stops:
            continue
        node = v.producer()
        if node is None or id(node) in found:
            continue
        found.add(id(node))
        stack.extend(i for i in node.inputs if i is not None)
    return found


def _rotation_nodes(app: RopeApplication) -> set[int]:
    """The rotation between (x, cos, sin) and its output, and the broadcasting of cos/sin up to the site values."""
    return _ancestors_until([app.output], {id(app.input), id(app.cos), id(app.sin)}, limit=200)


def _broadcast_nodes(app_value: ir.Value | None, site_value: ir.Value) -> set[int]:
    nodes: set[int] = set()
    v = app_value
    for _ in range(16):
        if v is None or v is site_value:
            return nodes
        node = v.producer()
        if node is None or node.op_type not in VIEW_OPS | {"Mul", "Concat"}:
            return nodes if v is site_value else set()
        nodes.add(id(node))
        v = node.inputs[0]
    return set()


def _fused_rotation_sites(site: RopeSite) -> list[RopeSite]:
    """A site of fused RotaryEmbedding nodes (com.microsoft or ai.onnx opset 23, as ``--fuse`` writes them) as one
    site per position input, each node one application (its x in, its rotated x out, its caches as cos/sin): the
    second position system is then the node cloned with its position ids replaced (``trig_at``). Other sites (an
    attention op rotating inside, written-out rotations) are returned as they are."""
    if site.angles != AngleSource.FUSED_OP or site.applications or not site.fused_nodes or \
            any(n.op_type != "RotaryEmbedding" for n in site.fused_nodes):
        return [site]
    groups: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for node in site.fused_nodes:
        contrib = node.domain == "com.microsoft"
        positions = node.inputs[1] if contrib else (node.inputs[3] if len(node.inputs) > 3 else None)
        if positions is None:
            return [site]  # refused by _check_site: the caches are already gathered per token
        groups.setdefault(id(positions), (positions, []))[1].append(node)
    out = []
    for positions, nodes in groups.values():
        apps = tuple(RopeApplication(input=n.inputs[0], output=n.outputs[0], layout=site.layout,
                                     rotary_dim=site.rotary_dim, head_dim=site.head_dim, num_heads=None, nodes=(n,),
                                     cos=site.cos, sin=site.sin) for n in nodes)
        out.append(dataclasses.replace(site, positions=positions, applications=apps, fused_nodes=tuple(nodes)))
    return out


def _check_site(site: RopeSite, ext: AttentionExtension | None) -> None:
    if site.angles == AngleSource.FUSED_OP and not site.applications:
        raise AttentionExtendError("RoPE inside fused attention ops (or RotaryEmbedding nodes without position "
                                   "ids): apply --extend to the unfused model")
    if site.angles == AngleSource.FUSED_OP:
        _check_fused_site(site, ext)
    if site.positions is None:
        raise AttentionExtendError("the positions feeding RoPE were not found (a table sliced by length?): "
                                   "--extend needs position-indexed angles")
    if ext is not None and not ext.integer_positions and site.angles != AngleSource.COMPUTED:
        raise AttentionExtendError("leaky ReRoPE needs fractional positions, which a cached cos/sin table cannot "
                                   "index: this model gathers cos/sin rows")
    if _squeeze_axis(_position_source(site.positions)) == "bad":
        raise AttentionExtendError(f"positions of shape {site.positions.shape} (expected [seq], [batch, seq], "
                                   "[batch, seq, 1] or [batch, 1, seq])")


def _check_fused_site(site: RopeSite, ext: AttentionExtension | None) -> None:
    """Fused RotaryEmbedding nodes: [batch, seq] integer position ids, and every mapped position inside the caches
    wherever the model's own positions are (checked with the maps over every row of the caches, not assumed)."""
    if site.positions is None or rank(site.positions) != 2:
        shape = None if site.positions is None else site.positions.shape
        raise AttentionExtendError(f"fused RotaryEmbedding with position ids of shape {shape} (expected [batch, "
                                   "seq]): apply --extend to the unfused model")
    if ext is None:
        return
    if not ext.integer_positions:
        raise AttentionExtendError("leaky ReRoPE needs fractional positions, which cannot index the cos/sin caches "
                                   "of fused RotaryEmbedding nodes: apply it without --fuse")
    rows = site.max_positions
    if rows is None:
        raise AttentionExtendError("fused RotaryEmbedding whose caches are computed at run time: the positions "
                                   f"{ext.describe()} maps to cannot be checked against them")
    p = np.arange(int(rows), dtype=np.float64)
    for branch in ext.branches():
        for side, pmap in (("query", branch.query), ("key", branch.key)):
            mapped = pmap(p)
            if mapped.min() < 0 or mapped.max() > rows - 1:
                raise AttentionExtendError(
                    f"{ext.describe()} maps {side} positions up to {int(mapped.max())}, past the {rows} rows of the "
                    "fused RotaryEmbedding caches: size them with --max-positions N (N > "
                    f"{int(mapped.max())})")


def _ambiguous(positions: ir.Value) -> bool:
    """True when the positions' rank and shape do not say which axis is the sequence: a static 1 where a
    [batch, seq] reading would put the sequence ([S, 1] is an outer-product column, not one position of S
    sequences), or a rank other than 1, 2 and 3."""
    r = rank(positions)
    if r is None:
        return True
    dims = list(positions.shape)
    if r == 2:
        return dims[1] == 1
    if r == 3:
        return not (dims[2] == 1 or dims[1] == 1) or dims[0] != 1 and dims[1] == 1 and dims[2] == 1
    return r != 1


def _position_source(positions: ir.Value) -> ir.Value:
    """The positions as the graph made them before reshaping them for the angle product: from the value the
    angles read, up through view ops, to the first value whose shape says where the sequence is ([S], [B, S],
    [B, S, 1] or [B, 1, S]). ``Reshape(arange(S), [-1, 1])`` of an outer-product form gives the [S] range."""
    v = positions
    for _ in range(8):
        if not _ambiguous(v):
            return v
        node = v.producer()
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast") or \
                not node.inputs or node.inputs[0] is None:
            return positions
        v = node.inputs[0]
    return positions


def _squeeze_axis(positions: ir.Value) -> int | None | str:
    """The axis to squeeze to get [batch, seq] (None: nothing to squeeze), or "bad"."""
    r = rank(positions)
    if r in (1, 2):
        return None
    if r == 3:
        dims = list(positions.shape)
        if dims[2] == 1:
            return 2
        if dims[1] == 1:
            return 1
    return "bad"


def _as_rows(b: NodeWriter, positions: ir.Value) -> ir.Value:
    """positions as [batch or 1, seq]."""
    if rank(positions) == 1:
        return b.op("Unsqueeze", positions, b.const(np.array([0], np.int64)))
    axis = _squeeze_axis(positions)
    if axis is not None:
        return b.op("Squeeze", positions, b.const(np.array([axis], np.int64)))
    return positions


def _map_positions(b: NodeWriter, positions: ir.Value, pmap: PositionMap) -> ir.Value:
    """The steps of ``pmap`` in the graph, in the positions' dtype when the result is integer (integer Div
    floors non-negative positions), else in float32."""
    p = positions
    is_int = positions.dtype is not None and not positions.dtype.is_floating_point()
    dtype = positions.dtype if positions.dtype is not None else ir.DataType.INT64
    if is_int and not pmap.integer:
        p = b.op("Cast", p, to=ir.DataType.FLOAT)
        dtype, is_int = ir.DataType.FLOAT, False

    def const(c: float) -> ir.Value:
        return b.const(np.array(int(c) if is_int else c), dtype)

    for op, c in pmap.steps:
        if op == "floordiv":
            p = b.op("Div", p, const(c))
            if not is_int:
                p = b.op("Floor", p)
        elif op == "mod":
            whole = b.op("Div", p, const(c))
            if not is_int:
                whole = b.op("Floor", whole)
            p = b.op("Sub", p, b.op("Mul", whole, const(c)))
        elif op == "mul":
            p = b.op("Mul", p, const(c))
        elif op == "add":
            p = b.op("Add", p, const(c))
        elif op == "min":
            p = b.op("Min", p, const(c))
        else:  # pragma: no cover - PositionMap validates its steps when evaluated
            raise AttentionExtendError(f"position map step {op!r} has no graph form")
    return p


def _region(b: NodeWriter, rows: ir.Value, key_rows: ir.Value, region: Region,
            memo: dict[tuple, ir.Value], heads_axis: bool = True) -> ir.Value:
    """Boolean [B or 1, 1, S, T] (without the heads axis: [B or 1, S, T]): ``region(i, j)`` for the query rows
    [B or 1, S] and the key rows [B or 1, T]."""
    key = (id(rows), id(key_rows), region, heads_axis)
    if key in memo:
        return memo[key]
    cq = _coordinate(b, rows, region)
    ck = _coordinate(b, key_rows, region)
    d = b.op("Sub", b.op("Unsqueeze", cq, b.const(np.array([-1], np.int64))),
             b.op("Unsqueeze", ck, b.const(np.array([-2], np.int64))))
    if heads_axis:
        d = b.op("Unsqueeze", d, b.const(np.array([1], np.int64)))
    reach = b.const(np.array(float(region.reach), np.float32))
    out = b.op("Equal" if region.kind == "chunk_eq" else "GreaterOrEqual", d, reach)
    memo[key] = out
    return out


def _coordinate(b: NodeWriter, rows: ir.Value, region: Region) -> ir.Value:
    """``region.coordinate`` of the positions in ``rows``, float32: the position, or its chunk."""
    p = b.op("Cast", rows, to=ir.DataType.FLOAT)
    if region.kind == "distance_ge":
        return p
    return b.op("Floor", b.op("Div", p, b.const(np.array(float(region.n), np.float32))))


def _reduce_axis0(b: NodeWriter, op: str, x: ir.Value) -> ir.Value:
    """``op`` (ReduceMax, ...) over axis 0, dropped (axes an attribute before opset 18, an input from 18)."""
    if b._opset() >= 18:
        return b.op(op, x, b.const(np.array([0], np.int64)), keepdims=0)
    return b.op(op, x, axes=[0], keepdims=0)


def _box(b: NodeWriter, rows: ir.Value, key_rows: ir.Value, region: Region) -> tuple[ir.Value, ir.Value]:
    """(row start, column end), int64 [1]: every query row before the start and every key column from the end
    on is outside ``region`` (``Region.box`` from the smallest key and the largest query position). The start
    is the first row whose position is in the box's rows in any batch row (the number of rows when none is),
    the end one past the last key in the box's columns (0 when none is): positions need not be ordered."""
    qc, kc = _coordinate(b, rows, region), _coordinate(b, key_rows, region)
    reach = b.const(np.array(float(region.reach), np.float32))
    first_q = b.op("Add", b.op("ReduceMin", kc, keepdims=0), reach)
    last_k = b.op("Sub", b.op("ReduceMax", qc, keepdims=0), reach)
    one = b.const(np.array([1.0], np.float32))
    in_rows = _reduce_axis0(b, "ReduceMax", b.op("Cast", b.op("GreaterOrEqual", qc, first_q), to=ir.DataType.FLOAT))
    start = b.op("ArgMax", b.op("Concat", in_rows, one, axis=0), axis=0, keepdims=1)  # the first 1
    in_cols = _reduce_axis0(b, "ReduceMax", b.op("Cast", b.op("LessOrEqual", kc, last_k), to=ir.DataType.FLOAT))
    end = b.op("ArgMax", b.op("Concat", one, in_cols, axis=0), axis=0, keepdims=1, select_last_index=1)
    start.dtype = end.dtype = ir.DataType.INT64
    return start, end


def _between(source: ir.Value, target: ir.Value, stop: ir.Node,
             limit: int = 2000) -> tuple[set[int], set[int]] | None:
    """Ids of the nodes computing ``target`` from ``source``, shapes included (the descendants of ``source``, not
    past ``stop``, that ``target`` depends on), and of those the values themselves go through (not their shapes);
    or None when ``target``'s data path takes a value that is neither a constant nor computed from ``source`` (a
    length read elsewhere: then ``source`` cannot be cut shorter)."""
    below: set[int] = set()
    stack = [source]
    while stack:
        for node, _ in stack.pop().uses():
            if node is stop or id(node) in below:
                continue
            below.add(id(node))
            if len(below) > limit:
                return None
            stack.extend(node.outputs)
    between: set[int] = set()
    data: set[int] = set()  # the nodes the values themselves go through (not their shapes)
    todo = [(target, "data")]  # "data", "arg" (another input of a data node), "shape" (inside a shape's computation)
    while todo:
        value, kind = todo.pop()
        node = value.producer()
        if value is source:
            continue
        if node is None or id(node) not in below:
            if kind != "shape" and value.const_value is None and (node is None or node.op_type != "Constant"):
                return None
            continue
        on_data = kind == "data"
        if id(node) in between and (not on_data or id(node) in data):
            continue
        between.add(id(node))
        if on_data:
            data.add(id(node))
        for i, v in enumerate(node.inputs):
            if v is not None:
                data_input = on_data and (i == 0 or node.op_type in ("Mul", "Div", "Concat"))
                todo.append((v, "data" if data_input else "arg" if on_data else "shape"))
    return between, data


def _literal_zero_reshapes(graph: ir.Graph, between: set[int]) -> None:
    """Sets ``allowzero`` on the Reshapes among ``between`` whose target is computed from the keys' shape (a
    Shape, or a Concat of such dims and constants without a 0): a part of the keys cut to 0 keys then reshapes
    to 0 keys instead of reading the 0 as "the input's size" (opset 14)."""
    for node in graph:
        if id(node) not in between or node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        target = node.inputs[1].producer()
        if target is None or id(target) not in between:
            continue
        if target.op_type == "Concat":
            parts = [v.const_value for v in target.inputs if v is not None and
                     (v.producer() is None or id(v.producer()) not in between)]
            if any(c is None or 0 in c.numpy().ravel() for c in parts):
                continue
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)


def _grouped_key_path(keys: ir.Value, target: ir.Value, data: set[int], graph: ir.Graph,
                      fold: ConstantEvaluator) -> list[tuple[str, ir.Value]] | None:
    """The key path from ``keys`` [B, Hkv, T, D] to the score MatMul's right operand ``target``, when it is
    the model's GQA repeat_kv or nothing (``Unsqueeze`` at axis 2, ``Expand``, ``Reshape``: head h reads kv head
    h // G, the order of ``[B, Hkv, G, T, D]`` merged), one transpose of the last two axes, and scaling by
    constants of one element: the scalings ``[(Mul or Div, constant)]`` (which hold for the queries as well), or
    None for any other path. The data path (``data``: node ids, from ``_between``) must be that chain."""
    scales: list[tuple[str, ir.Value]] = []
    repeat: list[str] = []
    transposed = False
    value = keys
    nodes = {id(n): n for n in graph if id(n) in data}
    for _ in range(len(nodes) + 1):
        if value is target:
            return scales if transposed and repeat in ([], ["Unsqueeze", "Expand", "Reshape"]) else None
        users = [(n, i) for n, i in value.uses() if id(n) in nodes]
        if len(users) != 1:
            return None
        node, idx = users[0]
        op = node.op_type
        if repeat and repeat[-1] != "Reshape" and op != {"Unsqueeze": "Expand", "Expand": "Reshape"}[repeat[-1]]:
            return None  # repeat_kv's three ops, consecutive
        if op == "Unsqueeze" and idx == 0 and not repeat:
            axes = fold(node.inputs[1]) if len(node.inputs) > 1 else (
                np.array(node.attributes["axes"].value) if "axes" in node.attributes else None)
            if axes is None or np.asarray(axes).ravel().tolist() not in ([2], [-3]):
                return None
            repeat.append(op)
        elif op in ("Expand", "Reshape") and idx == 0 and repeat and repeat[-1] != "Reshape":
            repeat.append(op)
        elif op == "Transpose" and not transposed and \
                tuple(node.attributes["perm"].value if "perm" in node.attributes else ()) == (0, 1, 3, 2):
            transposed = True
        elif op in ("Mul", "Div") and idx in (0, 1) and (op == "Mul" or idx == 0):
            other = node.inputs[1 - idx]
            c = fold(other)
            if c is None or c.size != 1 or c.ndim > 4 or c.dtype.kind != "f":
                return None
            scales.append((op, other))
        else:
            return None
        value = node.outputs[0]
    return None


def _value_product(scores: ir.Value) -> ir.Node | None:
    """The MatMul of the probabilities with the values downstream of ``scores`` (`_tail_steps`), or None."""
    tail = _tail_steps(scores)
    return tail[1] if tail is not None else None


def _repeated_values(value: ir.Value, fold: ConstantEvaluator) -> ir.Value | None:
    """v0 [B, Hkv, T, D] when ``value`` is GQA's repeat_kv of it: Reshape(Expand(Unsqueeze(v0, axis 2), [.., 5
    dims]), 4 dims) (head h reads kv head h // G), as `_grouped_key_path` reads the keys."""
    reshape = value.producer()
    expand = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    unsq = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    axes = fold(unsq.inputs[1]) if len(unsq.inputs) > 1 else (
        np.array(unsq.attributes["axes"].value) if "axes" in unsq.attributes else None)
    if axes is None or np.asarray(axes).ravel().tolist() not in ([2], [-3]):
        return None
    target, dims5 = reshape.inputs[1].shape, expand.inputs[1].shape
    if (target is not None and list(target) != [4]) or (dims5 is not None and list(dims5) != [5]):
        return None
    return unsq.inputs[0]


def _grouped_value_product(b: NodeWriter, scores: ir.Value, fold: ConstantEvaluator) -> bool:
    """The probabilities times the values as GQA computes it, without repeat_kv's copies of the values
    (`_grouped_product`): the decode step's largest copy (the whole value cache, G times, per layer). False when the
    tail is not the model's repeat_kv."""
    product = _value_product(scores)
    values = _repeated_values(product.inputs[1], fold) if product is not None else None
    if values is None:
        return False
    out = _grouped_product(b, product.inputs[0], values, scores)
    out.dtype = product.outputs[0].dtype
    product.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    _redirect_repeated_shape(b, product.inputs[1], values, scores)
    return True


def _tail_steps(scores: ir.Value) -> tuple[list[tuple[str, ir.Node, int]], ir.Node] | None:
    """What the model does from the score MatMul's output to the product with the values: ([(kind, node, index of
    the chain's operand)], that product). Kinds: "binary" (Add / Sub / Mul / Div: the mask, a scale, whatever the
    other operand), "unary" (Cast, the Softmax over the last axis), "guard" (torch's ``Where(IsNaN(p), 0, p)``: the
    node is the Where). None for any other tail (a second reader, another op, the scores as a graph output)."""
    steps: list[tuple[str, ir.Node, int]] = []
    value = scores
    for _ in range(12):
        uses = list(value.uses())
        if value.is_graph_output() or not uses:
            return None
        if len(uses) == 2 and {n.op_type for n, _ in uses} == {"IsNaN", "Where"}:
            where, idx = next((n, i) for n, i in uses if n.op_type == "Where")
            isnan = next(n for n, _ in uses if n.op_type == "IsNaN")
            if idx != 2 or where.inputs[0] is not isnan.outputs[0] or len(list(isnan.outputs[0].uses())) != 1:
                return None
            steps.append(("guard", where, 2))
            value = where.outputs[0]
            continue
        if len(uses) != 1:
            return None
        node, idx = uses[0]
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul":
            return (steps, node) if idx == 0 else None
        if node.op_type in ("Add", "Sub", "Mul", "Div") and idx in (0, 1):
            steps.append(("binary", node, idx))
        elif node.op_type == "Cast" or (node.op_type == "Softmax" and node.attributes.get_int("axis", -1) == -1):
            steps.append(("unary", node, 0))
        else:
            return None
        value = node.outputs[0]
    return None


def _rows_of(b: NodeWriter, x: ir.Value, first: ir.Value, stop: ir.Value, memo: dict) -> ir.Value:
    """Rows first..stop-1 of ``x`` as it broadcasts against [.., S, T] scores: its axis -2 sliced when it has more
    than one row; a rank below 2 or one row broadcasts over every row and is kept (read at run time)."""
    if x.shape is not None and (len(x.shape) < 2 or x.shape[-2] == 1):
        return x  # one row or none: it broadcasts over every band as it is
    key = (id(x), id(first), id(stop))
    if key not in memo:
        shape = b.op("Shape", x)
        short = b.op("Max", b.op("Sub", b.const(np.array([2], np.int64)), b.op("Size", shape)),
                     b.const(np.array([0], np.int64)))
        padded = b.op("Concat", b.op("ConstantOfShape", short, value=ir.tensor(np.array([1], np.int64))), shape,
                      axis=0)
        x2 = b.op("Reshape", x, padded, allowzero=1)
        rows = b.op("Slice", padded, b.const(np.array([-2], np.int64)), b.const(np.array([-1], np.int64)))
        many = b.op("Greater", rows, b.const(np.array([1], np.int64)))
        start = b.op("Where", many, first, b.const(np.array([0], np.int64)))
        end = b.op("Where", many, stop, b.const(np.array([1], np.int64)))
        x2.dtype = x.dtype
        memo[key] = b.op("Slice", x2, start, end, b.const(np.array([-2], np.int64)))
        memo[key].dtype = x.dtype
    return memo[key]


def _grouped_product(b: NodeWriter, p: ir.Value, values: ir.Value, shape_of: ir.Value) -> ir.Value:
    """p [B, H, s, T] times values [B, Hkv, T, D] as GQA reads them (head h from kv head h // G), without
    repeat_kv's copies: p viewed as [B, Hkv, G, s, T] times the values [B, Hkv, 1, T, D], viewed back as [B, H, s,
    D]. Every dimension is read from the tensors (``allowzero``: s may be 0); p's from ``shape_of`` (the scores p
    was computed from, elementwise: so that the softmax guard keeps p as its only reader's input)."""
    p_shape, v_shape = b.op("Shape", shape_of), b.op("Shape", values)

    def dim(shape: ir.Value, *axes: int) -> ir.Value:
        return b.op("Gather", shape, b.const(np.array(list(axes), np.int64)), axis=0)

    heads, kv_heads = dim(p_shape, 1), dim(v_shape, 1)
    grouped = b.op("Reshape", p, b.op("Concat", dim(p_shape, 0), kv_heads, b.op("Div", heads, kv_heads),
                                       dim(p_shape, 2, 3), axis=0), allowzero=1)
    out5 = b.op("MatMul", grouped, b.op("Unsqueeze", values, b.const(np.array([2], np.int64))))
    return b.op("Reshape", out5, b.op("Concat", dim(p_shape, 0, 1, 2), dim(v_shape, 3), axis=0), allowzero=1)


def _redirect_repeated_shape(b: NodeWriter, repeated: ir.Value, values: ir.Value, heads_of: ir.Value) -> None:
    """Readers of repeat_kv's output shape (the model's reshape after attention) read [B, H, T, D] from the values
    and ``heads_of`` (a [B, H, ..] tensor) instead, so that nothing reads the copies any more."""
    v_shape = b.op("Shape", values)
    shape = b.op("Concat", b.op("Gather", v_shape, b.const(np.array([0], np.int64)), axis=0),
                 b.op("Gather", b.op("Shape", heads_of), b.const(np.array([1], np.int64)), axis=0),
                 b.op("Slice", v_shape, b.const(np.array([2], np.int64)), b.const(np.array([4], np.int64))), axis=0)
    shape.dtype = ir.DataType.INT64
    for node, _ in list(repeated.uses()):
        if node.op_type == "Shape" and not node.attributes:
            for user, idx in list(node.outputs[0].uses()):
                user.replace_input_with(idx, shape)


def _tail_by_bands(b: NodeWriter, bands: list[tuple[ir.Value, ir.Value, ir.Value]],
                   steps: list[tuple[str, ir.Node, int]], product: ir.Node, values: ir.Value | None) -> ir.Value:
    """The model's tail (``_tail_steps``: mask, scale, softmax, guard) and product with the values, run on each
    band of query rows (first, stop, its scores [.., rows, T]); the outputs concatenated back on the rows. The
    softmax is per row, so this is the model's computation; what it saves is putting the score blocks back
    together into one [.., S, T] matrix. ``values``: [B, Hkv, T, D] to read without repeat_kv's copies, or None
    (the product's own right operand)."""
    memo: dict = {}
    outs = []
    for first, stop, x in bands:
        band_scores = x
        for kind, node, idx in steps:
            if kind == "binary":
                other = _rows_of(b, node.inputs[1 - idx], first, stop, memo)
                x = b.op(node.op_type, *((x, other) if idx == 0 else (other, x)))
            elif kind == "unary":
                x = b.op(node.op_type, x, **dict(node.attributes))
            else:
                x = b.op("Where", b.op("IsNaN", x), node.inputs[1], x)
            x.dtype = node.outputs[0].dtype
        outs.append(b.op("MatMul", x, product.inputs[1]) if values is None else
                    _grouped_product(b, x, values, band_scores))
    return b.op("Concat", *outs, axis=-2)


def _check_cache_path(pair: ScorePair) -> None:
    """KV-cache pairs: exactly one Concat (past keys, new keys) on the key path, the new keys reaching it from the
    rotation through view ops only, and the cache axis readable."""
    concats = [n for n in pair.k_path if n.op_type == "Concat"]
    if len(concats) != 1:
        raise AttentionExtendError(f"{len(concats)} Concat nodes on the key path of {pair.matmul.name}: the cache "
                                   "layout is not understood")
    concat = concats[0]
    if "axis" not in concat.attributes or len(concat.inputs) != 2:
        raise AttentionExtendError(f"key cache Concat {concat.name} not understood")
    before = pair.k_path[:pair.k_path.index(concat)]
    if any(n.op_type not in VIEW_OPS for n in before):
        raise AttentionExtendError(f"keys are scaled before they are cached ({concat.name}): not supported")


def _key_positions_like(b: NodeWriter, positions: ir.Value, keys: ir.Value, axis: int,
                        query_rows: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """Positions of the keys (T = keys' length on the cache axis), in the shape and dtype of ``positions`` (the
    site's positions as the angles read them: its source [T], [B, T], [B, T, 1] or [B, 1, T] reshaped as the graph
    reshapes it), and as rows [B or 1, T] int64. Key j of a batch row is at ``j + offset``, the offset being that
    row's last query position minus its index T - 1 (``query_rows``: the queries' positions as rows [B or 1, S];
    without them the offset is 0): a left-padded row (Optimum's positions ``cumsum(mask) - 1``) puts its first
    real key at 0, as its queries are."""
    source = _position_source(positions)
    if source is not positions:
        src_pos, rows = _key_positions_like(b, source, keys, axis, query_rows)
        between = _ancestors_until([positions], {id(source)}, limit=16)
        return b.clone(positions, {id(source): src_pos}, between, {}), rows
    # Shape then Gather (not Shape's start/end attributes, which need opset 15)
    t = b.op("Gather", b.op("Shape", keys), b.const(np.array(axis, np.int64)), axis=0)
    r0 = b.op("Range", b.const(np.array(0, np.int64)), t, b.const(np.array(1, np.int64)))
    r0.dtype = ir.DataType.INT64
    rows = b.op("Unsqueeze", r0, b.const(np.array([0], np.int64)))
    rows.dtype = ir.DataType.INT64
    offset = None
    if query_rows is not None:  # [B or 1, 1]: the last query's position minus its index T - 1
        last = b.op("Slice", query_rows, b.const(np.array([-1], np.int64)),
                    b.const(np.array([np.iinfo(np.int64).max], np.int64)), b.const(np.array([1], np.int64)))
        if query_rows.dtype != ir.DataType.INT64:
            last = b.op("Cast", last, to=ir.DataType.INT64)
        offset = b.op("Sub", last, b.op("Sub", t, b.const(np.array(1, np.int64))))
        offset.dtype = ir.DataType.INT64
        rows = b.op("Add", rows, offset)
        rows.dtype = ir.DataType.INT64
    r = r0
    squeeze = _squeeze_axis(positions) if rank(positions) != 1 else "flat"
    axes = {None: [0], 2: [0, 2], 1: [0, 1]}.get(squeeze)
    if axes is not None:
        r = b.op("Unsqueeze", r0, b.const(np.array(axes, np.int64)))
    if offset is not None:  # the offset in the positions' shape ([B, 1], [B, 1, 1]; [1] for shared positions)
        shaped = {None: offset, 2: b.op("Unsqueeze", offset, b.const(np.array([2], np.int64))),
                  1: b.op("Unsqueeze", offset, b.const(np.array([1], np.int64)))}.get(squeeze)
        if shaped is None:
            shaped = b.op("Reshape", offset, b.const(np.array([-1], np.int64)))
        r = b.op("Add", r, shaped)
    r.dtype = ir.DataType.INT64
    if positions.dtype is not None and positions.dtype != ir.DataType.INT64:
        r = b.op("Cast", r, to=positions.dtype)
        r.dtype = positions.dtype
    return r, rows


def _query_before_views(x: ir.Value, seq_axis: int) -> tuple[ir.Value, int, set[int]]:
    """The highest tensor above ``x`` (the input of a fused q rotation) reached through views that keep the batch
    axis first and the sequence axis readable (Transpose; Reshape whose dims up to the sequence axis are the
    same), read by nothing but that chain and Shape nodes: (the tensor, its sequence axis, the ids of the views
    between). Scaling it scales exactly the rotated queries."""
    v, axis, chain = x, seq_axis, set()
    for _ in range(8):
        node = v.producer()
        if node is None or not node.inputs or node.inputs[0] is None:
            break
        u = node.inputs[0]
        if any(n is not node and n.op_type != "Shape" for n, _ in u.uses()):
            break
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            perm = list(perm.value) if perm is not None else None
            if perm is None or perm[0] != 0 or axis >= len(perm):
                break
            axis = int(perm[axis])
        elif node.op_type == "Reshape":
            si, so = u.shape, v.shape
            target = _reshape_target(node)
            copied = target is not None and target.size > axis and not np.any(target[:axis + 1]) and \
                rank(u) is not None and rank(u) > axis  # 0 = copy the input's dim (allowzero unset)
            if not copied and (si is None or so is None or len(si) <= axis or len(so) <= axis or
                               not all(_same_dim(a, c) for a, c in zip(si[:axis + 1], so[:axis + 1], strict=True))):
                break
        elif node.op_type not in ("Identity", "Cast"):
            break
        chain.add(id(node))
        v = u
    return v, axis, chain


def _reshape_target(node: ir.Node) -> np.ndarray | None:
    """The constant shape a Reshape reshapes to (None when computed, or when 0 does not mean "copy")."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None or \
            (node.attributes.get("allowzero") is not None and node.attributes["allowzero"].value):
        return None
    return np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)


def _same_dim(a: int | ir.SymbolicDim, c: int | ir.SymbolicDim) -> bool:
    """Two dimensions known to be equal: the same int, or the same named symbol."""
    if isinstance(a, int) or isinstance(c, int):
        return a == c
    return a.value is not None and a.value == c.value


def _scale_query(b: NodeWriter, pair: ScorePair, logn_length: int, memo: dict[tuple, ir.Value]) -> bool:
    """log-n on the query of a fused q rotation: its input (or the projection above its views) times
    max(1, log(p+1)/log(L)) per token. False where the rotation is not a fused node, the sequence axis is not
    known or the positions are computed from the query itself (the caller scales the scores instead)."""
    node = pair.q_app.output.producer()
    x = pair.q_app.input
    x_rank = rank(x)
    if x_rank is None and x.producer() is not None and x.producer().op_type == "Reshape":
        target = _reshape_target(x.producer())
        x_rank = None if target is None else target.size
    if node is None or node.op_type != "RotaryEmbedding" or x_rank not in (3, 4):
        return False
    v, axis, chain = _query_before_views(x, 1 if x_rank == 3 else 2)
    r = x_rank if v is x else rank(v)
    dtype = v.dtype or x.dtype or node.outputs[0].dtype
    if r is None or axis < 1 or dtype is None or v.is_graph_output():
        return False
    positions = pair.q_site.positions
    while positions.producer() is not None and positions.producer().op_type == "Expand":  # --fuse's [B, 1] expand
        positions = positions.producer().inputs[0]  # (of the query's batch: a cycle once the query is scaled)
    above = _ancestors_until([positions], set())
    if chain & above or (x.producer() is not None and id(x.producer()) in above) or rank(pair.q_site.positions) != 2:
        return False
    key = (id(positions), dtype, r, axis)
    if key not in memo:
        # [batch, seq] again, the batch read from the query before scaling (positions are [batch, seq], so what
        # the Expand read has rank 1 or 2)
        batch = b.op("Gather", b.op("Shape", v), b.const(np.array([0], np.int64)), axis=0)
        rows = b.op("Expand", positions, b.op("Concat", batch, b.const(np.array([1], np.int64)), axis=0))
        p = b.op("Cast", rows, to=ir.DataType.FLOAT)
        f = b.op("Mul", b.op("Log", b.op("Add", p, b.const(np.array(1.0, np.float32)))),
                 b.const(np.array(1.0 / math.log(logn_length), np.float32)))
        f = b.op("Max", f, b.const(np.array(1.0, np.float32)))
        axes = [i for i in range(r) if i not in (0, axis)]
        if axes:
            f = b.op("Unsqueeze", f, b.const(np.array(axes, np.int64)))
        if dtype != ir.DataType.FLOAT:
            f = b.op("Cast", f, to=dtype)
        memo[key] = f
    uses = [(n, i) for n, i in v.uses() if n.op_type != "Shape"]
    scaled = b.op("Mul", v, memo[key])
    scaled.dtype, scaled.shape = dtype, v.shape
    scaled.producer().metadata_props[EXTENDED_KEY] = f" log-n L={logn_length}"
    for n, i in uses:
        n.replace_input_with(i, scaled)
    return True


class AttentionExtendPass(ReportingPass):
    """--extend / --logn-scaling (`extend_attention`) on the RoPE sites of the model as the pass finds it (the
    pipeline's detection, after any earlier rewrite); its changes are claimed as the attention extension. A
    request the model cannot take is a usage error (exit 2)."""

    def __init__(self, *, extension: AttentionExtension | None = None, logn_length: int | None = None,
                 logn_on_queries: bool = False, context: PipelineContext | None = None,
                 preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.logn_on_queries = logn_on_queries
        if extension is None and logn_length is None:
            raise ValueError("AttentionExtendPass needs an extension, a log-n length (logn_length) or both")
        if logn_length is not None and logn_length < 1:
            raise ValueError("logn_length must be positive")
        self.extension = extension
        self.logn_length = logn_length

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.context.detection(model).rope_sites
        try:
            self.changes.extend(extend_attention(model, sites, self.extension, self.logn_length,
                                                 logn_on_queries=self.logn_on_queries))
        except AttentionExtendError as exc:
            raise UsageError(str(exc)) from None
        self.context.report.attention_changes.extend(self.changes)
        return ir.passes.PassResult(model, bool(self.changes))


class RerotatePastKeysPass(ReportingPass):
    """``--runtime-decode rerotate`` for run-time RoPE methods (dynamic, longrope) on KV-cache exports: the cache
    holds keys before rotation and every step rotates all keys, past and new, with the frequencies of the current
    total length. Every score then uses one set of frequencies, as the whole sequence at once does; the past keys'
    own values still come from hidden states computed under the frequencies of their step, so beyond the first
    layer this is closer to the whole sequence at once than HF's cached behaviour, not equal to it (exactness
    needs a new prefill whenever the frequencies change: docs/long-context.md). Runs after the rescale."""

    def __init__(self, *, method: str, required: bool = False, context: PipelineContext | None = None,
                 preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.method = method
        self.required = required  # asked for by name: a model that cannot take it is a usage error

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        if not has_past_inputs(model):
            if self.required:
                raise UsageError("--runtime-decode rerotate applies to KV-cache exports (past_key_values inputs); "
                                 "this model computes every position at once already")
            return ir.passes.PassResult(model, False)
        sites = self.context.detection(model).rope_sites
        try:
            self.changes.extend(extend_attention(model, sites, None, None, unrotated_cache=self.method))
        except AttentionExtendError as exc:
            if self.required:
                raise UsageError(f"--runtime-decode rerotate: {exc} (--runtime-decode hf keeps HF's cached "
                                 "behaviour)") from None
            self.notes.append(f"decode keeps HF's cached behaviour (past keys keep the frequencies of their own "
                              f"step): re-rotation cannot be written here: {exc}")
            return ir.passes.PassResult(model, False)
        self.context.report.attention_changes.extend(self.changes)
        return ir.passes.PassResult(model, bool(self.changes))


def extend_attention(model: ir.Model, sites: list[RopeSite], extension: AttentionExtension | None,
                     logn_length: int | None, *, unrotated_cache: str | None = None,
                     packed_cache: bool = True, logn_on_queries: bool = False) -> list[str]:
    """Rewrites every attention of ``model`` (in place); returns one change line per kind of rewrite.
    ``unrotated_cache`` (the run-time method's name): KV-cache attention is made to cache keys before rotation and
    to rotate every key with the current cos/sin at each step (with or without an extension).
    ``logn_on_queries``: log-n scales the queries that fused RotaryEmbedding nodes rotate (the [B, S, ..] tensor
    the projection writes, before the views to heads) instead of the scores, so that attention can still be fused
    afterwards; an attention whose query cannot be read that way gets its scores scaled."""
    if extension is None and logn_length is None and unrotated_cache is None:
        return []
    done = next((n.metadata_props[EXTENDED_KEY] for n in model.graph if EXTENDED_KEY in n.metadata_props), None)
    if done is not None:
        raise AttentionExtendError(f"this model's attention was already rewritten by posrewrite ({done.strip()}): "
                                   "apply --extend / --logn-scaling to the original model")
    if not sites:
        raise AttentionExtendError("no RoPE found: the attention-level methods rewrite RoPE attention")
    if extension is not None and extension.method == "self-extend" and int(extension.group_size) == 1:
        extension = None  # group size 1: grouped positions are the positions; the model's own attention
        if logn_length is None and unrotated_cache is None:
            return []
    sites = [part for site in sites for part in _fused_rotation_sites(site)]
    for site in sites:
        _check_site(site, extension)
    pairs = find_score_pairs(model, sites)
    apps = sum(len(s.applications) for s in sites)
    if not pairs:
        fused = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in _FUSED_ATTENTION_OPS})
        raise AttentionExtendError("no attention score MatMul(q, k^T) found after the RoPE rotations: " + (
            f"attention is fused ({', '.join(fused)}), and --extend merges score matrices: apply --extend to the "
            "unfused model" if fused else "a layout not recognised"))
    if 2 * len(pairs) < apps:
        raise AttentionExtendError(f"only {len(pairs)} attention score MatMuls found for {apps} q/k rotations: "
                                   "refusing to rewrite some attentions and not others")
    if extension is not None or unrotated_cache is not None:
        for p in pairs:
            if p.cached_keys:
                _check_cache_path(p)
    if unrotated_cache is not None and not all(p.cached_keys for p in pairs):
        raise AttentionExtendError("not a KV-cache export (keys are not appended to a past): nothing to re-rotate")
    graph = model.graph
    b = NodeWriter(graph, None, EXTEND_NODE_PREFIX)  # appended: the pass sorts the graph
    rows_memo: dict[int, ir.Value] = {}
    logn_memo: dict[tuple[int, ir.DataType], ir.Value] = {}
    trig_memo: dict[tuple[int, str], dict[int, ir.Value]] = {}
    posmap_memo: dict[tuple[int, PositionMap], ir.Value] = {}
    region_memo: dict[tuple, ir.Value] = {}
    box_memo: dict[tuple[int, int], tuple[list[tuple[ir.Value, tuple[int, ...]]], ir.Value]] = {}
    fold = ConstantEvaluator(model.opset_imports.get("", 18))
    key_rows_memo: dict[tuple[str, int], ir.Value] = {}
    slice_memo: dict[tuple[int, int, int | None], ir.Value] = {}
    zero_cols = b.const(np.array([0], np.int64))

    def cut(x: ir.Value, first: ir.Value, stop: ir.Value | None) -> ir.Value:
        """Columns first..stop-1 (stop None: to the end) of rows [B or 1, N], made once for the layers that
        share them."""
        key = (id(x), id(first), None if stop is None else id(stop))
        if key not in slice_memo:
            end = stop if stop is not None else b.const(np.array([np.iinfo(np.int64).max], np.int64))
            slice_memo[key] = b.op("Slice", x, first, end, b.const(np.array([-1], np.int64)))
        return slice_memo[key]

    def trig_at(site: RopeSite, positions: ir.Value) -> dict[int, ir.Value]:
        """{id(site.cos): cos', id(site.sin): sin'}: the model's cos/sin computation at other positions."""
        key = (id(site), id(positions))
        if key in trig_memo:
            return trig_memo[key]
        subs = {id(site.positions): positions}
        if site.angles == AngleSource.FUSED_OP:
            # a fused RotaryEmbedding: the node itself, cloned with other position ids ([batch, seq]: key rows
            # [1, T] are expanded to the batch of the model's own position ids)
            batch = b.op("Gather", b.op("Shape", site.positions), b.const(np.array([0], np.int64)), axis=0)
            expanded = b.op("Expand", positions, b.op("Concat", batch, b.const(np.array([1], np.int64)), axis=0))
            expanded.dtype = site.positions.dtype
            trig_memo[key] = {id(site.positions): expanded}
            return trig_memo[key]
        allowed = _ancestors_until([site.cos, site.sin], {id(site.positions)})
        memo: dict[int, ir.Value] = {}
        cos2 = b.clone(site.cos, subs, allowed, memo)
        sin2 = b.clone(site.sin, subs, allowed, memo)
        if cos2 is site.cos or sin2 is site.sin:
            raise AttentionExtendError("cos/sin do not depend on the positions found; cannot re-rotate")
        trig_memo[key] = {id(site.cos): cos2, id(site.sin): sin2}
        return trig_memo[key]

    def mapped_positions(positions: ir.Value, pmap: PositionMap) -> ir.Value:
        pkey = (id(positions), pmap)
        if pkey not in posmap_memo:
            posmap_memo[pkey] = _map_positions(b, positions, pmap)
        return posmap_memo[pkey]

    def second_trig(site: RopeSite, pmap: PositionMap) -> dict[int, ir.Value]:
        """{id(site.cos): cos2, id(site.sin): sin2} at the positions ``pmap`` gives."""
        return trig_at(site, mapped_positions(site.positions, pmap))

    def rotation_allowed(site: RopeSite, app: RopeApplication) -> set[int]:
        return _rotation_nodes(app) | _broadcast_nodes(app.cos, site.cos) | _broadcast_nodes(app.sin, site.sin)

    def cached_keys(pair: ScorePair, query_rows: ir.Value) -> tuple[ir.Value, ir.Value, object]:
        """KV-cache attention: the cache is made to hold keys before rotation, and every step rotates all keys
        (past and new) at their positions 0..T-1, once normally and once per key map of the method. Returns
        (the key rows [1, T], the rotated keys, a function giving the score MatMul's right operand for a key
        map)."""
        site, app = pair.k_site, pair.k_app
        concat = next(n for n in pair.k_path if n.op_type == "Concat")
        pos_in_path = pair.k_path.index(concat)
        before, after = pair.k_path[:pos_in_path], pair.k_path[pos_in_path + 1:]
        idx_new = next(i for i, v in enumerate(concat.inputs) if v is app.output or
                       (v is not None and v.producer() is not None and v.producer() in before))
        new_in = concat.inputs[idx_new]
        unrot_new = b.clone(new_in, {id(app.output): app.input}, {id(n) for n in before}, {})
        axis = int(concat.attributes["axis"].value)
        inputs = list(concat.inputs)
        inputs[idx_new] = unrot_new
        unrot_all = b.op("Concat", *inputs, axis=axis)
        unrot_all.dtype, unrot_all.shape = concat.outputs[0].dtype, concat.outputs[0].shape
        kpos, key_rows = _key_positions_like(b, site.positions, unrot_all, axis, query_rows)
        allowed = rotation_allowed(site, app)
        subs = {id(app.input): unrot_all, **trig_at(site, kpos)}
        k_all = b.clone(app.output, subs, allowed, {})
        old = concat.outputs[0]
        after_ids = {id(n) for n in after}
        for node, idx in list(old.uses()):
            node.replace_input_with(idx, k_all if id(node) in after_ids else unrot_all)
        for i, out in enumerate(graph.outputs):
            if out is old:
                name = old.name
                old.name = unique_name(graph, f"{name}_rotated")
                unrot_all.name = name
                graph.outputs[i] = unrot_all
        k2_memo: dict[PositionMap, ir.Value] = {}

        def k2_for(pmap: PositionMap) -> ir.Value:
            if pmap not in k2_memo:
                subs2 = {id(app.input): unrot_all, **trig_at(site, mapped_positions(kpos, pmap))}
                k2_all = b.clone(app.output, subs2, allowed, {})
                k2_memo[pmap] = b.clone(pair.matmul.inputs[1], {id(k_all): k2_all}, after_ids, {})
            return k2_memo[pmap]

        return key_rows, k_all, k2_for

    def cache_input(value: ir.Value | None) -> ir.Value | None:
        """The graph input a past value is (through Identity and one-input Concat nodes), or None."""
        for _ in range(4):
            if value is None:
                return None
            node = value.producer()
            if node is None:
                return value if value in graph.inputs else None
            if node.op_type not in ("Identity", "Concat") or len(node.inputs) != 1:
                return None
            value = node.inputs[0]
        return None

    def packable(pair: ScorePair) -> bool:
        """The packed cache contract applies: the keys [B, H, T, D] appended on axis 2 to a past that is a graph
        input, and the Concat's output is the graph's present."""
        concat = next(n for n in pair.k_path if n.op_type == "Concat")
        out = concat.outputs[0]
        pasts = [cache_input(v) for v in concat.inputs if v is not None and v is not pair.k_app.output
                 and (v.producer() is None or v.producer() not in pair.k_path)]
        axis = int(concat.attributes["axis"].value)
        return (rank(out) == 4 and axis in (2, -2) and len(concat.inputs) == 2 and len(pasts) == 1
                and pasts[0] is not None and rank(pasts[0]) == 4 and out in graph.outputs)

    def cached_keys_packed(pair: ScorePair, key_maps: list[PositionMap],
                           query_rows: ir.Value) -> tuple[ir.Value, object, object]:
        """KV-cache attention without re-rotating the past: every key is rotated once per position system when it
        is new (at its own position, and at each key map of it), and the cache holds them all, packed on the
        heads axis: ``present.key`` = [B, (1 + m) H, T, D] (heads 0..H-1 the keys as the model rotates them,
        then H heads per key map). A past of H heads and length 0 (the empty past a generation loop starts with,
        sized from the model's config) reads as an empty cache of every system; a past of H heads and some length
        (the original model's cache) fails in a Reshape. The step writes the present in one Concat (the past, then
        the new keys of every system) and slices the model's keys out of it; the keys of a system ``m`` are sliced
        to the columns its box needs before the path to the score MatMul (repeat_kv's Expand then copies only
        those), when that path's shapes all come from the keys. Returns (the key rows [1, T], a function giving
        the score MatMul's right operand for a key map, restricted to the key columns before an end, and
        ``grouped`` for ``merge_branches``: (kv heads, the key path's scalings) when that path is repeat_kv and
        constant scalings (``_grouped_key_path``; the function then gives the keys as cached, [B, Hkv, c, D]), else
        None)."""
        site, app = pair.k_site, pair.k_app
        concat = next(n for n in pair.k_path if n.op_type == "Concat")
        pos_in_path = pair.k_path.index(concat)
        before, after = pair.k_path[:pos_in_path], pair.k_path[pos_in_path + 1:]
        before_ids, after_ids = {id(n) for n in before}, {id(n) for n in after}
        idx_new = next(i for i, v in enumerate(concat.inputs) if v is app.output or
                       (v is not None and v.producer() is not None and v.producer() in before))
        idx_past = 1 - idx_new
        new_in, past = concat.inputs[idx_new], concat.inputs[idx_past]
        i64 = ir.DataType.INT64
        systems = 1 + len(key_maps)

        def dims(value: ir.Value, *axes: int) -> ir.Value:
            shape = b.op("Shape", value)
            return b.op("Gather", shape, b.const(np.array(list(axes), np.int64)), axis=0)

        heads = dims(new_in, 1)
        allowed = rotation_allowed(site, app)
        news = [new_in]
        for pmap in key_maps:
            subs = {id(app.input): app.input, **trig_at(site, mapped_positions(site.positions, pmap))}
            new_rot = b.clone(app.output, subs, allowed, {})
            news.append(b.clone(new_in, {id(app.output): new_rot}, before_ids, {}) if new_in is not app.output
                        else new_rot)
        new_packed = b.op("Concat", *news, axis=1)
        # the past as [B, (1 + m) H, -1, D]: a packed past as it is, an empty past of H heads as an empty cache of
        # every system; a past of H heads and some length gets the length 0, which its size contradicts
        past_heads, past_len = dims(past, 1), dims(past, 2)
        packed_heads = b.op("Mul", heads, b.const(np.array([systems], np.int64)))
        ok = b.op("Or", b.op("Equal", past_heads, packed_heads), b.op("Equal", past_len,
                                                                        b.const(np.array([0], np.int64))))
        length = b.op("Where", ok, b.const(np.array([-1], np.int64)), b.const(np.array([0], np.int64)))
        target = b.op("Concat", dims(new_in, 0), packed_heads, length, dims(new_in, 3), axis=0)
        target.dtype = i64
        inputs = list(concat.inputs)
        inputs[idx_past], inputs[idx_new] = b.op("Reshape", past, target), new_packed
        present = b.op("Concat", *inputs, axis=int(concat.attributes["axis"].value))
        present.dtype = concat.outputs[0].dtype
        zero = b.const(np.array([0], np.int64))
        k_all = b.op("Slice", present, zero, heads, b.const(np.array([1], np.int64)))
        k_all.dtype = concat.outputs[0].dtype
        old = concat.outputs[0]
        # the key rows (and with them the box and the region masks) are shared by the layers whose presents the
        # model declares with the same symbolic length
        length = old.shape[2] if old.shape is not None and len(old.shape) == 4 else None
        # (and with the same query positions, which give each row's key offset)
        shared = (str(length.value), id(query_rows)) if isinstance(length, ir.SymbolicDim) and length.value \
            else None
        if shared is None or shared not in key_rows_memo:
            _, key_rows = _key_positions_like(b, site.positions, present, 2, query_rows)
            if shared is not None:
                key_rows_memo[shared] = key_rows
        key_rows = key_rows_memo[shared] if shared is not None else key_rows
        for node, idx in list(old.uses()):  # the score path, and any other reader (shapes of the cache)
            node.replace_input_with(idx, k_all)
        for i, out in enumerate(graph.outputs):
            if out is old:
                name = old.name
                old.name = unique_name(graph, f"{name}_unpacked")
                present.name = name
                if old.shape is not None:
                    present.shape = ir.Shape([old.shape[0], f"{name}_heads", *list(old.shape)[2:]])
                graph.outputs[i] = present
        declared = cache_input(past)
        if declared is not None and declared.shape is not None:  # H heads (an empty past) or (1 + m) H (packed)
            declared.shape = ir.Shape([declared.shape[0], f"{declared.name}_heads", *list(declared.shape)[2:]])
            for node, _ in declared.uses():  # the one-input Concat / Identity between: their outputs too
                if node.op_type in ("Identity", "Concat") and len(node.inputs) == 1:
                    node.outputs[0].shape = None
        found = _between(k_all, pair.matmul.inputs[1], pair.matmul)
        between, data = found if found is not None else (None, set())
        if between is not None and b._opset() >= 14:
            _literal_zero_reshapes(graph, between)
        data_values = {id(o) for n in graph if id(n) in data for o in n.outputs}
        # GQA's repeat_kv (or no repeat) and scaling by constants: the branch products read the keys as they are
        # cached, [B, Hkv, T, D], with the queries grouped by kv head (merge_branches), instead of copying the
        # keys G times through the Expand
        scales = _grouped_key_path(k_all, pair.matmul.inputs[1], data, graph, fold) \
            if between is not None else None
        grouped = None if scales is None else (heads, scales)
        shape_memo: dict[tuple[int, int], dict[int, ir.Value]] = {}
        memo: dict[tuple[int, int, int], ir.Value] = {}
        head_range: dict[int, tuple[ir.Value, ir.Value]] = {}
        cols_axis = b.const(np.array([-1], np.int64))

        def k_cols(pmap: PositionMap | None, first: ir.Value, end: ir.Value) -> ir.Value:
            """The score MatMul's right operand for keys first..end-1 of the model's system (``pmap`` None) or of
            a key map's."""
            k = 0 if pmap is None else 1 + key_maps.index(pmap)
            key = (k, id(first), id(end))
            if key not in memo:
                if k not in head_range:  # system k's heads: k H .. (k + 1) H - 1
                    first_head = b.op("Mul", heads, b.const(np.array([k], np.int64)))
                    head_range[k] = (first_head, b.op("Add", first_head, heads))
                start, stop = head_range[k]
                if between is not None:  # system k's heads and keys, then the model's path (shapes from these keys)
                    keys = b.op("Slice", present, b.op("Concat", start, first, axis=0),
                                b.op("Concat", stop, end, axis=0), b.const(np.array([1, 2], np.int64)))
                    if grouped is not None:  # [B, Hkv, c, D] as cached: merge_branches groups the queries
                        memo[key] = keys
                        return keys
                    # the same keys of another system have the same shape: their path's shape computations are
                    # shared (each slice's would be some dozens of small nodes per layer and step)
                    shared = shape_memo.get((id(first), id(end)))
                    clone_memo = dict(shared) if shared is not None else {}
                    memo[key] = b.clone(pair.matmul.inputs[1], {id(k_all): keys}, between, clone_memo)
                    if shared is None:
                        shape_memo[(id(first), id(end))] = {v: c for v, c in clone_memo.items()
                                                            if v not in data_values}
                else:
                    keys = k_all if k == 0 else b.op("Slice", present, start, stop, b.const(np.array([1], np.int64)))
                    whole = pair.matmul.inputs[1] if k == 0 else \
                        b.clone(pair.matmul.inputs[1], {id(k_all): keys}, after_ids, {})
                    memo[key] = b.op("Slice", whole, first, end, cols_axis)
            return memo[key]

        if between is not None:  # readers of the keys' shape read it from the present (the keys need not exist)
            shape_all = b.op("Concat", dims(present, 0), heads, dims(present, 2, 3), axis=0)
            shape_all.dtype = i64
            for node, _ in list(k_all.uses()):
                if node.op_type == "Shape" and not node.attributes:
                    for user, idx in list(node.outputs[0].uses()):
                        if id(user) not in between:  # the key path's own shapes are cloned with its keys
                            user.replace_input_with(idx, shape_all)
        return key_rows, k_cols, grouped

    def second_operand(site: RopeSite, app: RopeApplication, path: list[ir.Node], side: str,
                       operand: ir.Value, pmap: PositionMap) -> ir.Value:
        subs = dict(second_trig(site, pmap))
        subs[id(app.input)] = app.input
        allowed = _rotation_nodes(app) | {id(n) for n in path}
        allowed |= _broadcast_nodes(app.cos, site.cos) | _broadcast_nodes(app.sin, site.sin)
        new = b.clone(operand, subs, allowed, {})
        if new is operand:
            raise AttentionExtendError(f"could not re-rotate {side} of {app.output.name}")
        return new

    logn_done: set[int] = set()
    if logn_length is not None and logn_on_queries:
        for pair in pairs:
            if _scale_query(b, pair, int(logn_length), logn_memo):
                logn_done.add(id(pair))

    def box(rows: ir.Value, key_rows: ir.Value) -> tuple[list[tuple[ir.Value, tuple[int, ...]]], ir.Value]:
        """The query rows and key columns the branches are computed on: ([(row start, branches from that row
        on)], column end). The end is the largest of the branches' box ends (``_box``), at least 1. Branches whose
        regions compare the same coordinate have row starts in the order of their reach (a larger reach starts
        no earlier), so each computes from its own start (Dual Chunk: the inter-chunk matrix from two chunks
        after the first key's on); otherwise all from the first start."""
        key = (id(rows), id(key_rows))
        if key not in box_memo:
            branches = extension.branches()
            starts, ends = zip(*(_box(b, rows, key_rows, br.region) for br in branches), strict=True)
            # at least one column: a key path cut to 0 keys would meet Reshape's 0 (copy the input's size)
            end = b.op("Max", *ends, b.const(np.array([1], np.int64)))
            coordinate = {(br.region.kind == "distance_ge", br.region.n if br.region.kind != "distance_ge" else 0)
                          for br in branches}
            if len(coordinate) == 1:
                order = sorted(range(len(branches)), key=lambda i: branches[i].region.reach)
                segments = [(starts[i], tuple(sorted(order[:n + 1]))) for n, i in enumerate(order)]
            else:
                segments = [(starts[0] if len(starts) == 1 else b.op("Min", *starts), tuple(range(len(branches))))]
            box_memo[key] = (segments, end)
        return box_memo[key]

    def merge_branches(pair: ScorePair, rows: ir.Value, key_rows: ir.Value, k_cols,
                       grouped: tuple[ir.Value, list[tuple[str, ir.Value]]] | None = None,
                       bands_out: list[tuple[ir.Value, ir.Value, ir.Value]] | None = None) -> ir.Value | None:
        """The scores with every branch merged where its region holds, computed by blocks: the keys before the
        box's end give the left columns (the model's own product for the rows before the box's first start; from
        each start on, the model's product, the products of the branches that start there or before and their
        ``Where`` merges); the keys from the end on give the right columns, the model's own product for every row.
        ``k_cols(pmap or None, first, end)`` is the right operand over keys first..end-1 (of the model's system,
        or of a key map's). The blocks are concatenated back into [.., S, T].

        ``grouped`` (kv heads Hkv, the key path's constant scalings): ``k_cols`` gives the keys as cached, [B, Hkv,
        c, D], and every product is GQA's without the copies of repeat_kv: the queries [B, H, S, D] (scaled as
        the key path scales the keys) viewed as [B, Hkv, G, S, D] (head h = kv head h // G, repeat_kv's order),
        times the keys [B, Hkv, 1, D, c]; the blocks are [B, Hkv, G, .., ..] and the result is viewed back as
        [B, H, S, T].

        ``bands_out`` (a list): nothing is concatenated on the rows; the bands of rows are appended to it instead,
        (first row, stop, scores [.., rows, T]): the rows before the box's first start (the model's product over
        every key), then each segment's rows (its merged left block and its right block, side by side), for the
        caller to run the rest of attention per band (`_tail_by_bands`). Returns None then."""
        mm = pair.matmul
        q = mm.inputs[0]
        if grouped is not None:
            kv_heads, scales = grouped
            q_shape = b.op("Shape", q)
            seq_dim = b.op("Slice", q_shape, b.const(np.array([2], np.int64)), b.const(np.array([4], np.int64)))
            grouped_shape = b.op("Concat", b.const(np.array([0], np.int64)), kv_heads,
                                 b.const(np.array([-1], np.int64)), seq_dim, axis=0)
            scores_shape = b.op("Concat", b.const(np.array([0], np.int64)),
                                b.op("Slice", q_shape, b.const(np.array([1], np.int64)),
                                     b.const(np.array([3], np.int64))), b.const(np.array([-1], np.int64)), axis=0)

            def view(x: ir.Value) -> ir.Value:
                for op, c in scales:
                    x = b.op(op, x, c)
                return b.op("Reshape", x, grouped_shape)

            def product(qb: ir.Value, kc: ir.Value) -> ir.Value:
                kt = b.op("Transpose", b.op("Unsqueeze", kc, b.const(np.array([2], np.int64))), perm=[0, 1, 2, 4, 3])
                return b.op("MatMul", qb, kt)

            def region_mask(m: ir.Value) -> ir.Value:
                return b.op("Unsqueeze", m, b.const(np.array([1], np.int64)))
        else:
            def view(x: ir.Value) -> ir.Value:
                return x

            def product(qb: ir.Value, kc: ir.Value) -> ir.Value:
                return b.op("MatMul", qb, kc)

            def region_mask(m: ir.Value) -> ir.Value:
                return m
        segments, end = box(rows, key_rows)
        zero, last = b.const(np.array([0], np.int64)), b.const(np.array([np.iinfo(np.int64).max], np.int64))
        rows_axis = b.const(np.array([-2], np.int64))
        k_left = k_cols(None, zero, end)
        keys_in = cut(key_rows, zero_cols, end)
        branches = extension.branches()
        q2s = {i: view(second_operand(pair.q_site, pair.q_app, pair.q_path, "q", q, br.query))
               for i, br in enumerate(branches)}
        q_model = q
        q = view(q)
        if bands_out is not None:
            q_heads = b.op("Gather", b.op("Shape", q_model), b.const(np.array([1], np.int64)), axis=0) \
                if grouped is not None else None

            def as_scores(x: ir.Value) -> ir.Value:  # grouped [B, Hkv, G, s, T] -> [B, H, s, T] (s may be 0)
                if q_heads is None:
                    return x
                xs = b.op("Shape", x)
                target = b.op("Concat", b.op("Gather", xs, b.const(np.array([0], np.int64)), axis=0), q_heads,
                              b.op("Gather", xs, b.const(np.array([3, 4], np.int64)), axis=0), axis=0)
                return b.op("Reshape", x, target, allowzero=1)

            bands_out.append((zero, segments[0][0], as_scores(
                product(b.op("Slice", q, zero, segments[0][0], rows_axis), k_cols(None, zero, last)))))
        blocks = [product(b.op("Slice", q, zero, segments[0][0], rows_axis), k_left)] if bands_out is None else []
        for n, (first, active) in enumerate(segments):
            stop = segments[n + 1][0] if n + 1 < len(segments) else last
            block = product(b.op("Slice", q, first, stop, rows_axis), k_left)
            rows_in = cut(rows, first, segments[n + 1][0] if n + 1 < len(segments) else None)
            for i in active:
                q2 = b.op("Slice", q2s[i], first, stop, rows_axis)
                scores2 = product(q2, k_cols(branches[i].key, zero, end))
                where = _region(b, rows_in, keys_in, branches[i].region, region_memo,
                                grouped is not None or rank(mm.outputs[0]) != 3)
                block = b.op("Where", region_mask(where), scores2, block)
            if bands_out is not None:
                right_rows = product(b.op("Slice", q, first, stop, rows_axis), k_cols(None, end, last))
                bands_out.append((first, stop, as_scores(b.op("Concat", block, right_rows, axis=-1))))
            blocks.append(block)
        if bands_out is not None:
            return None
        right = product(q, k_cols(None, end, last))
        out = b.op("Concat", b.op("Concat", *blocks, axis=-2), right, axis=-1)
        if grouped is not None:
            out = b.op("Reshape", out, scores_shape)
        out.dtype = mm.outputs[0].dtype
        return out

    def operand_cols(pair: ScorePair, k2_whole=None):
        """``k_cols`` for attention whose keys are not a packed cache: the right operands sliced."""
        done: dict[PositionMap | None, ir.Value] = {None: pair.matmul.inputs[1]}

        def k_cols(pmap: PositionMap | None, first: ir.Value, end: ir.Value) -> ir.Value:
            if pmap not in done:
                done[pmap] = k2_whole(pmap) if k2_whole is not None else second_operand(
                    pair.k_site, pair.k_app, pair.k_path, "k", pair.matmul.inputs[1], pmap)
            return b.op("Slice", done[pmap], first, end, b.const(np.array([-1], np.int64)))

        return k_cols

    for pair in pairs:
        mm = pair.matmul
        scores = mm.outputs[0]
        uses = list(scores.uses())
        rows = rows_memo.get(id(pair.q_site.positions))
        if rows is None:
            rows = rows_memo[id(pair.q_site.positions)] = _as_rows(b, _position_source(pair.q_site.positions))
        merged = scores
        key_rows = k_cols = grouped = None
        if pair.cached_keys and unrotated_cache is None and extension is not None and packed_cache and \
                packable(pair):
            key_maps = list(dict.fromkeys(br.key for br in extension.branches()))
            key_rows, k_cols, grouped = cached_keys_packed(pair, key_maps, rows)
        elif pair.cached_keys and (extension is not None or unrotated_cache is not None):
            key_rows, _, k2_whole = cached_keys(pair, rows)
            k_cols = operand_cols(pair, k2_whole)
        tail = _tail_steps(scores) if extension is not None and (logn_length is None or id(pair) in logn_done) \
            else None
        if tail is not None:
            # the rest of attention per band of rows: the score blocks are never put back together
            steps, value_product = tail
            values = _repeated_values(value_product.inputs[1], fold) if grouped is not None else None
            bands: list[tuple[ir.Value, ir.Value, ir.Value]] = []
            merge_branches(pair, rows, rows if key_rows is None else key_rows,
                           k_cols if k_cols is not None else operand_cols(pair), grouped, bands)
            out = _tail_by_bands(b, bands, steps, value_product, values)
            out.dtype = value_product.outputs[0].dtype
            value_product.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
            if values is not None:
                _redirect_repeated_shape(b, value_product.inputs[1], values, mm.inputs[0])  # q: [B, H, S, D]
            out.producer().metadata_props[EXTENDED_KEY] = extension.describe() + (
                f" log-n L={logn_length}" if logn_length else "")
            continue
        if extension is not None:
            merged = merge_branches(pair, rows, rows if key_rows is None else key_rows,
                                    k_cols if k_cols is not None else operand_cols(pair), grouped)
        if logn_length is not None and id(pair) not in logn_done:
            dtype = scores.dtype or ir.DataType.FLOAT
            key = (id(rows), dtype)
            if key not in logn_memo:
                p = b.op("Cast", rows, to=ir.DataType.FLOAT)
                f = b.op("Mul", b.op("Log", b.op("Add", p, b.const(np.array(1.0, np.float32)))),
                         b.const(np.array(1.0 / math.log(int(logn_length)), np.float32)))
                f = b.op("Max", f, b.const(np.array(1.0, np.float32)))
                f = b.op("Unsqueeze", f, b.const(np.array([1, 3], np.int64)))  # [B, 1, S, 1]
                if dtype != ir.DataType.FLOAT:
                    f = b.op("Cast", f, to=dtype)
                logn_memo[key] = f
            merged = b.op("Mul", merged, logn_memo[key])
        for node, idx in uses:
            node.replace_input_with(idx, merged)
        for out_index, out in enumerate(graph.outputs):
            if out is scores:
                graph.outputs[out_index] = merged
        if grouped is not None:  # the keys are read without repeat_kv's copies: the values as well
            _grouped_value_product(b, merged, fold)
        mark = merged.producer() if merged is not scores else mm
        mark.metadata_props[EXTENDED_KEY] = (extension.describe() if extension else "") + (
            f" log-n L={logn_length}" if logn_length else "") + (
            f" {unrotated_cache} past keys re-rotated" if unrotated_cache else "")
    b.commit()
    graph.sort()
    changes = []
    if unrotated_cache is not None:
        changes.append(f"{REROTATE_CHANGE} ({unrotated_cache}) in {len(pairs)} attention layers: present.*.key "
                       "holds keys before rotation; every step rotates all cached keys with the frequencies of the "
                       "current total length (one rotation of T keys per layer and step)")
    if extension is not None:
        what = {"self-extend": "second score matrix from grouped positions, merged by distance",
                "rerope": "second score matrix from clipped positions, merged by distance",
                "dual-chunk": "successive-chunk and inter-chunk score matrices from chunk positions, merged by "
                              "chunk distance"}[extension.method]
        changes.append(f"attention: {extension.describe()} in {len(pairs)} attention layers ({what} before the "
                       "softmax)")
    if logn_length is not None and len(logn_done) < len(pairs):
        changes.append(f"attention: log-n scaling in {len(pairs) - len(logn_done)} attention layers (scores of the "
                       f"query at position p times max(1, log(p+1)/log({logn_length})))")
    if logn_done:
        changes.append(f"attention: log-n scaling in {len(logn_done)} attention layers (the query at position p "
                       f"times max(1, log(p+1)/log({logn_length})) before its fused rotation, which is linear: the "
                       "same scores, and attention can still be fused)")
    return changes
