"""SelfExtend, ReRoPE / Leaky ReRoPE and log-n scaling as rewrites of each attention's score computation.

For every pair of q and k rotations that meet in a score ``MatMul`` (q on the left, k on the right, through
scaling by constants, transposes, reshapes and GQA's repeat_kv expands), the rewrite

1. clones the model's own cos/sin computation (``positions -> ... -> Cos/Sin``, or the Gather of a cached table)
   with the second positions of the method (``posrewrite.math.positions``): grouped positions for SelfExtend,
   the window / 0 (or ``p/k + W(1-1/k)`` / ``p/k``) for ReRoPE;
2. clones the rotation of q and of k and their path to the score MatMul with those cos/sin, and a second MatMul;
3. merges the two score matrices by distance, ``Where(use_second(i, j), second, first)``, before the scale, mask
   and softmax that follow (they are linear or elementwise per score, so merging at the MatMul is the same as
   merging just before the softmax, as the papers do);
4. log-n: multiplies the scores of the query at position p by ``max(1, log(p+1)/log(L))`` (the same as scaling q).

The model's own cos/sin arithmetic is reused, so layouts (rotate-half, interleaved), partial rotary, attention
factors and earlier rescales carry over unchanged.

KV-cache exports (``past_key_values.*`` in, ``present.*`` out): keys are cached after rotation, and a second
rotation of a rotated key cannot be formed, so SelfExtend / ReRoPE change what the cache holds: ``present.*.key``
becomes the keys *before* rotation, and every step rotates all keys (past and new) at their positions 0..T-1
(T = the cache length), once with the model's cos/sin and once at the second positions.  Key positions are
their indices in the cache (no left padding).  A cache written by the original model cannot be continued by the
rewritten one (and vice versa); prefill and decode must both run the rewritten model.  log-n only touches
queries and leaves the cache as it is.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.math.positions import AttentionExtension
from posrewrite.passes.onnx._build import add_initializer, unique_name
from posrewrite.passes.onnx._graph import VIEW_OPS, ConstantEvaluator, rank
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.sites.rope import AngleSource, RopeApplication, RopeSite

__all__ = ["AttentionExtendError", "AttentionExtendPass", "ScorePair", "extend_attention", "find_score_pairs"]

_PATH_OPS = VIEW_OPS | {"Mul", "Div"}
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


class _Builder:
    """New nodes appended to the graph (sorted topologically at the end of the pass)."""

    def __init__(self, graph: ir.Graph, stem: str) -> None:
        self.graph = graph
        self.stem = stem
        self.nodes: list[ir.Node] = []

    def const(self, array, dtype: ir.DataType | None = None) -> ir.Value:
        return add_initializer(self.graph, np.asarray(array), f"{self.stem}_c", dtype)

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        name = unique_name(self.graph, f"{self.stem}_{op_type}")
        node = ir.node(op_type, list(inputs), attributes or None, name=name)
        node.outputs[0].name = node.name + "_out"
        self.nodes.append(node)
        return node.outputs[0]

    def clone(self, target: ir.Value, subs: dict[int, ir.Value], allowed: set[int] | None,
              memo: dict[int, ir.Value]) -> ir.Value:
        """``target`` recomputed with the values in ``subs`` (by id) replaced; only nodes in ``allowed`` (all when
        None) are cloned, the rest are kept as they are. Iterative, in dependency order."""
        order: list[ir.Node] = []
        state: dict[int, int] = {}
        stack: list[tuple[ir.Node, bool]] = []

        def visit(value: ir.Value | None) -> None:
            if value is None or id(value) in subs or id(value) in memo:
                return
            node = value.producer()
            if node is None or (allowed is not None and id(node) not in allowed) or id(node) in state:
                return
            stack.append((node, False))

        visit(target)
        while stack:
            node, done = stack.pop()
            if done:
                state[id(node)] = 2
                order.append(node)
                continue
            if id(node) in state:
                continue
            state[id(node)] = 1
            stack.append((node, True))
            for inp in node.inputs:
                visit(inp)

        def mapped(value: ir.Value | None) -> ir.Value | None:
            if value is None:
                return None
            if id(value) in subs:
                return subs[id(value)]
            return memo.get(id(value), value)

        for node in order:
            inputs = [mapped(v) for v in node.inputs]
            if all(a is b for a, b in zip(inputs, node.inputs, strict=True)):
                for out in node.outputs:
                    memo[id(out)] = out
                continue
            attrs = list(node.attributes.values())
            new = ir.Node(node.domain, node.op_type, inputs, attributes=attrs, num_outputs=len(node.outputs),
                          name=unique_name(self.graph, f"{self.stem}_{node.op_type}"), version=node.version)
            for old_out, new_out in zip(node.outputs, new.outputs, strict=True):
                new_out.name = new.name + f"_out{old_out.index()}"
                new_out.dtype = old_out.dtype
                new_out.shape = None  # a clone may run on other lengths (all keys of a cache)
                memo[id(old_out)] = new_out
            self.nodes.append(new)
        return mapped(target)

    def commit(self) -> None:
        for node in self.nodes:
            self.graph.append(node)
        self.nodes = []


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


def _check_site(site: RopeSite, ext: AttentionExtension | None) -> None:
    if site.angles == AngleSource.FUSED_OP:
        raise AttentionExtendError("RoPE inside fused RotaryEmbedding nodes: apply --extend to the unfused model")
    if site.positions is None:
        raise AttentionExtendError("the positions feeding RoPE were not found (a table sliced by length?): "
                                   "--extend needs position-indexed angles")
    if ext is not None and not ext.integer_positions and site.angles != AngleSource.COMPUTED:
        raise AttentionExtendError("leaky ReRoPE needs fractional positions, which a cached cos/sin table cannot "
                                   "index: this model gathers cos/sin rows")
    if _squeeze_axis(site.positions) == "bad":
        raise AttentionExtendError(f"positions of shape {site.positions.shape} (expected [seq], [batch, seq], "
                                   "[batch, seq, 1] or [batch, 1, seq])")


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


def _as_rows(b: _Builder, positions: ir.Value) -> ir.Value:
    """positions as [batch or 1, seq]."""
    if rank(positions) == 1:
        return b.op("Unsqueeze", positions, b.const(np.array([0], np.int64)))
    axis = _squeeze_axis(positions)
    if axis is not None:
        return b.op("Squeeze", positions, b.const(np.array([axis], np.int64)))
    return positions


def _map_positions(b: _Builder, positions: ir.Value, affine: tuple[float, float, int], integer: bool) -> ir.Value:
    """``(p // divisor) * a + c`` in the graph, in the positions' dtype when the result is integer."""
    a, c, div = affine
    p = positions
    is_int = positions.dtype is not None and not positions.dtype.is_floating_point()
    dtype = positions.dtype if positions.dtype is not None else ir.DataType.INT64
    if integer:
        if div != 1:
            p = b.op("Div", p, b.const(np.array(div), dtype))
            if not is_int:
                p = b.op("Floor", p)
        if a != 1.0:
            p = b.op("Mul", p, b.const(np.array(int(a) if is_int else a), dtype))
        if c != 0.0:
            p = b.op("Add", p, b.const(np.array(int(c) if is_int else c), dtype))
        return p
    if is_int:
        p = b.op("Cast", p, to=ir.DataType.FLOAT)
        dtype = ir.DataType.FLOAT
    return b.op("Add", b.op("Mul", p, b.const(np.array(a), dtype)), b.const(np.array(c), dtype))


def _distance(b: _Builder, rows: ir.Value, key_rows: ir.Value | None = None) -> ir.Value:
    """[B or 1, 1, S, T] float32: p_q - p_k (keys at the query positions unless ``key_rows`` are given)."""
    p = b.op("Cast", rows, to=ir.DataType.FLOAT)
    pk = p if key_rows is None else b.op("Cast", key_rows, to=ir.DataType.FLOAT)
    d = b.op("Sub", b.op("Unsqueeze", p, b.const(np.array([-1], np.int64))),
             b.op("Unsqueeze", pk, b.const(np.array([-2], np.int64))))
    return b.op("Unsqueeze", d, b.const(np.array([1], np.int64)))


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


def _key_positions_like(b: _Builder, positions: ir.Value, keys: ir.Value, axis: int) -> tuple[ir.Value, ir.Value]:
    """Positions 0..T-1 of the keys (T = keys' length on the cache axis), in the shape and dtype of ``positions``
    ([T], [1, T], [1, T, 1] or [1, 1, T]), and as rows [1, T] int64."""
    end = {"end": axis + 1} if axis != -1 else {}
    t = b.op("Squeeze", b.op("Shape", keys, start=axis, **end), b.const(np.array([0], np.int64)))
    r0 = b.op("Range", b.const(np.array(0, np.int64)), t, b.const(np.array(1, np.int64)))
    r0.dtype = ir.DataType.INT64
    rows = b.op("Unsqueeze", r0, b.const(np.array([0], np.int64)))
    rows.dtype = ir.DataType.INT64
    r = r0
    axes = {None: [0], 2: [0, 2], 1: [0, 1]}.get(_squeeze_axis(positions)) if rank(positions) != 1 else None
    if axes is not None:
        r = b.op("Unsqueeze", r0, b.const(np.array(axes, np.int64)))
    r.dtype = ir.DataType.INT64
    if positions.dtype is not None and positions.dtype != ir.DataType.INT64:
        r = b.op("Cast", r, to=positions.dtype)
        r.dtype = positions.dtype
    return r, rows


class AttentionExtendPass(ReportingPass):
    """--extend / --logn-scaling (`extend_attention`) on the RoPE sites of the model as the pass finds it (the
    pipeline's detection, after any earlier rewrite); its changes are claimed as the attention extension. A
    request the model cannot take is a usage error (exit 2)."""

    def __init__(self, extension: AttentionExtension | None, logn_length: int | None,
                 context: PipelineContext | None = None) -> None:
        super().__init__(context)
        self.extension = extension
        self.logn_length = logn_length

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.context.detection(model).rope_sites
        try:
            self.changes.extend(extend_attention(model, sites, self.extension, self.logn_length))
        except AttentionExtendError as exc:
            raise UsageError(str(exc)) from None
        self.context.report.attention_changes.extend(self.changes)
        return ir.passes.PassResult(model, bool(self.changes))


def extend_attention(model: ir.Model, sites: list[RopeSite], extension: AttentionExtension | None,
                     logn_length: int | None) -> list[str]:
    """Rewrites every attention of ``model`` (in place); returns one change line per kind of rewrite."""
    if extension is None and logn_length is None:
        return []
    done = next((n.metadata_props[EXTENDED_KEY] for n in model.graph if EXTENDED_KEY in n.metadata_props), None)
    if done is not None:
        raise AttentionExtendError(f"this model's attention was already rewritten by posrewrite ({done.strip()}): "
                                   "apply --extend / --logn-scaling to the original model")
    if not sites:
        raise AttentionExtendError("no RoPE found: the attention-level methods rewrite RoPE attention")
    if extension is not None and extension.method == "self-extend" and int(extension.group_size) == 1:
        extension = None  # group size 1: grouped positions are the positions; the model's own attention
        if logn_length is None:
            return []
    for site in sites:
        _check_site(site, extension)
    pairs = find_score_pairs(model, sites)
    apps = sum(len(s.applications) for s in sites)
    if not pairs:
        raise AttentionExtendError("no attention score MatMul(q, k^T) found after the RoPE rotations (fused "
                                   "attention ops, or a layout not recognised)")
    if 2 * len(pairs) < apps:
        raise AttentionExtendError(f"only {len(pairs)} attention score MatMuls found for {apps} q/k rotations: "
                                   "refusing to rewrite some attentions and not others")
    if extension is not None:
        for p in pairs:
            if p.cached_keys:
                _check_cache_path(p)
    graph = model.graph
    b = _Builder(graph, "posrewrite_extend")
    rows_memo: dict[int, ir.Value] = {}
    dist_memo: dict[int, ir.Value] = {}
    logn_memo: dict[tuple[int, ir.DataType], ir.Value] = {}
    trig_memo: dict[tuple[int, str], dict[int, ir.Value]] = {}
    posmap_memo: dict[tuple[int, str], ir.Value] = {}

    def trig_at(site: RopeSite, positions: ir.Value) -> dict[int, ir.Value]:
        """{id(site.cos): cos', id(site.sin): sin'}: the model's cos/sin computation at other positions."""
        key = (id(site), id(positions))
        if key in trig_memo:
            return trig_memo[key]
        subs = {id(site.positions): positions}
        allowed = _ancestors_until([site.cos, site.sin], {id(site.positions)})
        memo: dict[int, ir.Value] = {}
        cos2 = b.clone(site.cos, subs, allowed, memo)
        sin2 = b.clone(site.sin, subs, allowed, memo)
        if cos2 is site.cos or sin2 is site.sin:
            raise AttentionExtendError("cos/sin do not depend on the positions found; cannot re-rotate")
        trig_memo[key] = {id(site.cos): cos2, id(site.sin): sin2}
        return trig_memo[key]

    def mapped_positions(positions: ir.Value, side: str) -> ir.Value:
        pkey = (id(positions), side)
        if pkey not in posmap_memo:
            affine = extension.query_affine() if side == "q" else extension.key_affine()
            posmap_memo[pkey] = _map_positions(b, positions, affine, extension.integer_positions)
        return posmap_memo[pkey]

    def second_trig(site: RopeSite, side: str) -> dict[int, ir.Value]:
        """{id(site.cos): cos2, id(site.sin): sin2} for the second positions of one side."""
        return trig_at(site, mapped_positions(site.positions, side))

    def rotation_allowed(site: RopeSite, app: RopeApplication) -> set[int]:
        return _rotation_nodes(app) | _broadcast_nodes(app.cos, site.cos) | _broadcast_nodes(app.sin, site.sin)

    def cached_keys(pair: ScorePair) -> tuple[ir.Value, ir.Value, ir.Value]:
        """KV-cache attention: the cache is made to hold keys before rotation, and every step rotates all keys
        (past and new) at their positions 0..T-1, once normally and once at the second positions. Returns
        (the key rows [1, T], the rotated keys, the second-rotation operand of the score MatMul)."""
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
        kpos, key_rows = _key_positions_like(b, site.positions, unrot_all, axis)
        allowed = rotation_allowed(site, app)
        subs = {id(app.input): unrot_all, **trig_at(site, kpos)}
        k_all = b.clone(app.output, subs, allowed, {})
        subs2 = {id(app.input): unrot_all, **trig_at(site, mapped_positions(kpos, "k"))}
        k2_all = b.clone(app.output, subs2, allowed, {})
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
        k2 = b.clone(pair.matmul.inputs[1], {id(k_all): k2_all}, after_ids, {})
        return key_rows, k_all, k2

    def second_operand(site: RopeSite, app: RopeApplication, path: list[ir.Node], side: str,
                       operand: ir.Value) -> ir.Value:
        subs = dict(second_trig(site, side))
        subs[id(app.input)] = app.input
        allowed = _rotation_nodes(app) | {id(n) for n in path}
        allowed |= _broadcast_nodes(app.cos, site.cos) | _broadcast_nodes(app.sin, site.sin)
        new = b.clone(operand, subs, allowed, {})
        if new is operand:
            raise AttentionExtendError(f"could not re-rotate {side} of {app.output.name}")
        return new

    for pair in pairs:
        mm = pair.matmul
        scores = mm.outputs[0]
        uses = list(scores.uses())
        rows = rows_memo.get(id(pair.q_site.positions))
        if rows is None:
            rows = rows_memo[id(pair.q_site.positions)] = _as_rows(b, pair.q_site.positions)
        merged = scores
        if extension is not None:
            q2 = second_operand(pair.q_site, pair.q_app, pair.q_path, "q", mm.inputs[0])
            if pair.cached_keys:
                key_rows, _, k2 = cached_keys(pair)
                dist = _distance(b, rows, key_rows)
            else:
                k2 = second_operand(pair.k_site, pair.k_app, pair.k_path, "k", mm.inputs[1])
                dist = dist_memo.get(id(rows))
                if dist is None:
                    dist = dist_memo[id(rows)] = _distance(b, rows)
            scores2 = b.op("MatMul", q2, k2)
            if extension.method == "rerope":
                dist = b.op("Abs", dist)
            far = b.op("GreaterOrEqual", dist, b.const(np.array(float(extension.window), np.float32)))
            merged = b.op("Where", far, scores2, scores)
        if logn_length is not None:
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
        mm.metadata_props[EXTENDED_KEY] = (extension.describe() if extension else "") + (
            f" log-n L={logn_length}" if logn_length else "")
    b.commit()
    graph.sort()
    changes = []
    if extension is not None:
        changes.append(f"attention: {extension.describe()} in {len(pairs)} attention layers (second score matrix "
                       f"from {'grouped' if extension.method == 'self-extend' else 'clipped'} positions, merged by "
                       "distance before the softmax)")
    if logn_length is not None:
        changes.append(f"attention: log-n scaling in {len(pairs)} attention layers (scores of the query at position "
                       f"p times max(1, log(p+1)/log({logn_length})))")
    return changes
