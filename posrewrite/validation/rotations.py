"""The rotation oracle: every q/k rotation of a rewritten model, run on its own subgraph with random pre-rotation q/k
(no weights read) or captured from the model's prefix, against `numpy_rotation` of the same q/k with the
frequencies and attention factor `posrewrite.math.rope` gives for the request (`RopeReference`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.cut import graph_inputs_for
from posrewrite.math import precision
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._graph import call_input, const_tensor, numpy_dtype
from posrewrite.sites.rope import Layout, RopeSite
from posrewrite.validation.report import Check, RotationCheck, RotationCount, worse
from posrewrite.validation.runs import MAX_VALIDATION_LENGTH, dtype_eps, session_from_bytes, token_ids

__all__ = ["CAPTURE_CHUNK", "RopeReference", "check_gqa_rotation", "check_rotations", "find_rotations",
           "numpy_rotation"]

#: Positions per run when the rotation oracle captures a model's own q/k through position_ids.
CAPTURE_CHUNK = 1024


def _rotation_tolerance(xs: np.ndarray, rotary_dim: int, inv: np.ndarray, factor: float, length: int,
                        dtype: str) -> tuple[float, str]:
    """(bound, how) on |rotated - numpy rotation| of q/k `xs`: 4 ulp of the activation dtype (float32 at least)
    plus the float32 round-off of angles up to length x max(inv_freq), relative to 2 max|x| max(1, factor)."""
    scale = float(np.max(np.abs(xs[..., :rotary_dim]))) * 2.0 * max(1.0, abs(factor))
    eps = max(dtype_eps(dtype), dtype_eps("float32"))
    rel = 4 * eps + 8 * float(length) * float(np.max(inv)) * precision.unit_roundoff("float32") + 1e-6
    return rel * scale, f"{rel:.3g} x 2 max|x| x max(1, factor): 4 {dtype} ulp + fp32 angle round-off"


@dataclasses.dataclass
class RopeReference:
    """What the rotations of one RoPE site of the ORIGINAL model must compute in the rewritten one: the site
    (layout, rotary_dim, frequencies as found) and, for a rescale, the plan whose parameters give the new
    frequencies and attention factor (`posrewrite.math.rope`); None keeps the site's own numbers."""

    site: RopeSite
    plan: Any = None

    def frequencies(self, length: int) -> tuple[np.ndarray, float]:
        """inv_freq [rotary_dim/2] and attention factor at a call over positions 0..length-1."""
        site, plan = self.site, self.plan
        keeps = plan is None or (plan.params.rope_type == "default" and plan.params.rope_theta is None)
        switch = site.encoding.selection
        if keeps and switch is not None:  # LongRoPE export: short frequencies up to L, long ones past it
            if length <= switch.threshold:
                return np.asarray(switch.short, np.float64), float(site.attention_factor)
            inv = plan.inv_freq if plan is not None and plan.inv_freq is not None else switch.long
            factor = switch.long_factor
            if factor is None:
                factor = plan.attention_factor if plan is not None else site.attention_factor
            return np.asarray(inv, np.float64), float(factor)
        if plan is None:
            return np.asarray(site.inv_freq, np.float64), float(site.attention_factor)
        if keeps:  # an extension: same numbers
            inv = plan.inv_freq if plan.inv_freq is not None else site.inv_freq
            return np.asarray(inv, np.float64), float(plan.attention_factor)
        inv, factor = rope_math.scaled_inv_freq(plan.params, inv_freq=site.inv_freq, base=site.base,
                                                dim=site.rotary_dim, seq_len=length)
        return np.asarray(inv, np.float64), float(factor)


def numpy_rotation(x: np.ndarray, inv_freq: np.ndarray, factor: float, positions: np.ndarray, layout: str,
                   rotary_dim: int, offset: np.ndarray | None = None, sign: int = 1) -> np.ndarray:
    """RoPE by the paper's definition, in float64: x [..., S, D] rotated on its first `rotary_dim` channels by
    angles positions × inv_freq, times `factor`; `layout` "rotate_half" pairs channel i with i + rotary_dim/2,
    "interleaved" pairs 2i with 2i+1. The remaining channels pass through. `offset` [rotary_dim/2]: the positions
    of frequency c are positions + offset[c] (a model whose positions start elsewhere than 0). `sign` -1: a rotation
    by -θ (`RopeEncoding.angle_sign`)."""
    x = np.asarray(x, np.float64)
    pos = np.asarray(positions, np.float64)[:, None]
    if offset is not None:
        pos = pos + np.asarray(offset, np.float64)[None, :]
    angles = float(sign) * pos * np.asarray(inv_freq, np.float64)[None, :]
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor
    xr, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    if layout == Layout.INTERLEAVED_TO_HALF.value:  # pairs (2i, 2i+1) rotated, written firsts then seconds
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    elif layout == Layout.INTERLEAVED.value:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = np.empty_like(xr)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
    else:
        a, b = xr[..., :half], xr[..., half:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return np.concatenate([out, rest], axis=-1)


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {}
    for v in graph.inputs:
        found[v.name] = v
    for name, v in graph.initializers.items():
        found[name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                found[v.name] = v
    return found


def _extracted_session(model: ir.Model, inputs: list[ir.Value], outputs: list[ir.Value]):
    """A session of the part of `model` between `inputs` and `outputs`; external weights stay in their files
    (onnxruntime maps them: nothing is read here)."""
    from posrewrite.cut import extracted_session

    sub = ir.convenience.extract(model.graph, [v.name for v in inputs], [v.name for v in outputs])
    sub.opset_imports.update(model.graph.opset_imports)
    return extracted_session(ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values())))


def _input_feeds(inputs: list[ir.Value], length: int, vocab: dict[str, int] | None = None,
                 positions: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Graph inputs for a call over positions 0..length-1 with no past: ids from the middle of the vocabulary,
    masks ones, positions 0..length-1, KV-cache inputs with 0 past positions (`_graph.call_input`); `positions`:
    the feed kind of the inputs a site's positions read (`RopeSite.position_feeds`, found by probing)."""
    from posrewrite.passes.onnx.rope.position_feed import feed_array

    feeds = {}
    for v in inputs:
        kind = (positions or {}).get(v.name)
        arr = feed_array(v, kind, 1, length) if kind is not None else None
        feeds[v.name] = arr if arr is not None else call_input(
            v, 1, length, ids=lambda n, v=v: token_ids(n, (vocab or {}).get(v.name)))
    return feeds


def _random_input(value: ir.Value, length: int, rng: np.random.Generator) -> tuple[np.ndarray, int] | None:
    """Random data of `value`'s shape with every symbolic dimension but the first at `length`; the axis that
    holds the positions (the last symbolic one). None when the shape does not say."""
    if value.shape is None or value.dtype is None:
        return None
    dims = list(value.shape.dims)
    symbolic = [k for k, d in enumerate(dims) if not isinstance(d, int)]
    others = [k for k in symbolic if k != 0]
    if len(others) != 1 or len(dims) < 3:
        return None  # no length axis, or more than one candidate (heads not static): capture the model's own
    seq_axis = others[0]
    shape = [d if isinstance(d, int) else (length if k == seq_axis else 1) for k, d in enumerate(dims)]
    return rng.standard_normal(shape).astype(numpy_dtype(value.dtype)), seq_axis


def _heads_last(a: np.ndarray, seq_axis: int, head_dim: int) -> np.ndarray:
    """[..., S, D]: q/k as [B,H,S,D], [B,S,H,D] or [B,S,H*D], the positions on axis -2, one head per row."""
    a = np.asarray(a, np.float64)
    seq_axis = seq_axis % a.ndim
    if a.ndim == 3 and a.shape[-1] != head_dim and a.shape[-1] % head_dim == 0:  # [B,S,H*D] only
        a = a.reshape(*a.shape[:-1], a.shape[-1] // head_dim, head_dim)
    return np.moveaxis(a, seq_axis, -2)


@dataclasses.dataclass
class _Rotation:
    label: str
    pre: ir.Value
    post: ir.Value
    reference: RopeReference
    head_dim: int
    layout: str
    rotary_dim: int
    fused: bool = False
    decay: Any = None  # xPos: the original rotation's PositionDecay (sites.rope)


def find_rotations(model: ir.Model, references: list[RopeReference]) -> tuple[list[_Rotation], list[ir.Node], int]:
    """The q/k rotations of the rewritten `model` belonging to the original sites in `references`, found by
    the names of the values the original rotations read and wrote: rotations still written out (x·cos +
    rotate(x)·sin), RotaryEmbedding nodes (either domain) and GroupQueryAttention nodes rotating inside.
    Returns (rotations, GroupQueryAttention nodes with do_rotary, rotations the original sites have)."""
    by_name = _values_by_name(model.graph)
    rotations: list[_Rotation] = []
    expected = 0
    claimed: set[int] = set()
    for k, ref in enumerate(references):
        site = ref.site
        expected += site.rotations
        for app in site.applications:
            post = by_name.get(app.output.name)
            pre = by_name.get(app.input.name)
            if post is None or pre is None or post.producer() is None:
                continue
            if post.producer().op_type == "RotaryEmbedding":
                continue  # counted with the fused nodes below
            head_dim = app.head_dim or site.head_dim or app.rotary_dim
            rotations.append(_Rotation(f"{k}: {app.output.name}", pre, post, ref, head_dim, app.layout.value,
                                       app.rotary_dim, decay=app.decay))
            claimed.add(id(post))
    fused = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention" and "do_rotary" in n.attributes
           and n.attributes["do_rotary"].as_int()]
    for node in fused:
        ref = _reference_for(node, references, by_name)
        if ref is None:
            continue
        site = ref.site
        apps = [a for a in site.applications if a.head_dim] or list(site.applications)
        head_dim = site.head_dim or (apps[0].head_dim if apps else None) or site.rotary_dim
        rotations.append(_Rotation(f"{references.index(ref)}: {node.name}", node.inputs[0], node.outputs[0], ref,
                                   head_dim, site.layout.value, site.rotary_dim, fused=True))
    return rotations, gqa, expected


def _reference_for(node: ir.Node, references: list[RopeReference], by_name: dict) -> RopeReference | None:
    """The original site a fused node belongs to: the one whose rotations read its input (by name), else the
    only site."""
    x = node.inputs[0]
    reads = set() if x is None else {x.name}
    if x is not None and x.producer() is not None and x.producer().op_type == "Reshape":
        reads.add(x.producer().inputs[0].name)  # [B,S,H,D] rotations are fused on a [B,S,H*D] view
    for ref in references:
        names = {a.input.name for a in ref.site.applications}
        names |= {n.inputs[0].name for n in ref.site.fused_nodes if n.inputs and n.inputs[0] is not None}
        if reads & names:
            return ref
    if len(references) == 1:
        return references[0]
    return _reference_by_caches(node, references)


def _reference_by_caches(node: ir.Node, references: list[RopeReference]) -> RopeReference | None:
    """A fused node whose input no longer carries an original rotation's name (onnxscript's attention rules
    re-create RotaryEmbedding nodes on the projection's output): the site whose own frequencies and attention
    factor give the first rows of the node's constant cos cache, when exactly one does."""
    k = 2 if node.domain == "com.microsoft" else 1  # contrib: (x, position_ids, cos, sin); opset 23: (x, cos, sin, ..)
    cos_v = node.inputs[k] if len(node.inputs) > k else None
    tensor = const_tensor(cos_v) if cos_v is not None else None
    if tensor is None:
        return None
    cos = np.asarray(tensor.numpy(), np.float64)
    if cos.ndim != 2 or cos.shape[0] < 2:
        return None
    rows = np.arange(min(cos.shape[0], 16), dtype=np.float64)
    matches = []
    for ref in references:
        inv, factor = ref.frequencies(2)
        if inv.size != cos.shape[1]:
            continue
        expected = factor * np.cos(rows[:, None] * inv[None, :])
        if np.max(np.abs(cos[: rows.size] - expected)) <= 1e-3 * max(1.0, abs(factor)):
            matches.append(ref)
    return matches[0] if len(matches) == 1 else None


def _compare_rotation(rot: _Rotation, x: np.ndarray, y: np.ndarray, seq_axis: int | None, length: int,
                      source: str, start: int = 0) -> RotationCheck:
    """One row: the rotated q/k `y` against `numpy_rotation` of the pre-rotation `x`: positions start..start+n-1 (n
    rows), one call of a check over positions 0..length-1, computed with the frequencies of a call whose largest
    position is start+n-1 (what a run-time length sees: the whole check when start is 0)."""
    row = RotationCheck(site=rot.label.split(":")[0], rotation=rot.label.split(": ", 1)[-1], length=length, ok=False)
    if seq_axis is not None and np.shape(y) != np.shape(x) and _same_rows(np.shape(x), np.shape(y), seq_axis):
        y = np.reshape(y, np.shape(x))  # [B,S,H,D] written as [B,S,H·D] (or back): the same rows
    if seq_axis is None or np.shape(y) != np.shape(x):
        return dataclasses.replace(row, message=f"cannot line up pre-rotation {np.shape(x)} with rotated "
                                                f"{np.shape(y)} at {length} positions")
    xs, ys = _heads_last(x, seq_axis, rot.head_dim), _heads_last(y, seq_axis, rot.head_dim)
    # the frequencies of THIS call: a run-time method (dynamic, longrope) takes its length from the call's own
    # positions (HF: max(position_ids) + 1), which for a chunk start..start+n-1 of a capture is start + n
    inv, factor = rot.reference.frequencies(start + xs.shape[-2])
    encoding = rot.reference.site.encoding
    expected = numpy_rotation(xs, inv, factor, start + np.arange(xs.shape[-2]), rot.layout, rot.rotary_dim,
                              encoding.position_offset, encoding.angle_sign)
    if rot.decay is not None:  # xPos: the paper's decay at these positions (its exponent as the plan says)
        from posrewrite.passes.onnx.rope.xpos import decay_magnitude

        ratio = getattr(rot.reference.plan, "decay_ratio", 1.0) if rot.reference.plan is not None else 1.0
        mag = decay_magnitude(rot.decay, start + xs.shape[-2], ratio)[start:]
        expected[..., : rot.rotary_dim] *= np.concatenate([mag, mag], axis=-1) if rot.layout != "interleaved" \
            else np.repeat(mag, 2, axis=-1)
    tol, how = _rotation_tolerance(xs, rot.rotary_dim, inv, factor, length, str(np.asarray(x).dtype))
    err = float(np.max(np.abs(ys - expected))) if ys.size else 0.0
    return dataclasses.replace(
        row, max_abs_error=err, tolerance=tol, ok=bool(np.isfinite(err) and err <= tol),
        compared=f"rotated q/k vs numpy {rot.layout} rotation{' by -theta' if encoding.angle_sign < 0 else ''} "
                 f"(rotary_dim {rot.rotary_dim}, factor "
                 f"{factor:.6g}) of {source}, positions 0..{length - 1}",
        tolerance_from=how)


def _same_rows(a: tuple, b: tuple, seq_axis: int) -> bool:
    """Shapes that agree up to the position axis and hold the same elements per position (heads merged into or
    split from the last axis)."""
    k = seq_axis % len(a) + 1
    return tuple(a[:k]) == tuple(b[:k]) and math.prod(a[k:]) == math.prod(b[k:])


def _chunks(fed: list, max_length: int) -> list[list]:
    """`fed` rotations in groups whose inputs, outputs and temporaries at `max_length` positions (8 arrays of the
    input's size) stay within a quarter of the memory available (at most 1 GiB)."""
    from posrewrite import memory

    avail, _ = memory.available_bytes()
    budget = min(1 << 30, (avail or 1 << 32) // 4)
    chunks: list[list] = [[]]
    used = 0
    for rot, feed_at in fed:
        dims = [d if isinstance(d, int) else 1 for d in feed_at.shape.dims]
        size = 8 * max(4, feed_at.dtype.itemsize) * int(np.prod(dims)) * max_length
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append((rot, feed_at))
        used += size
    return chunks


class _RotationRunner:
    """Runs the rotations of a rewritten model at given lengths. A rotation whose rotated q/k depends on the
    hidden states only through its pre-rotation q/k is run on its own subgraph with random q/k (no weights
    read); the others are captured together from one run of the model's prefix that computes them."""

    def __init__(self, model: ir.Model, rotations: list[_Rotation], vocab: dict[str, int] | None,
                 max_length: int = MAX_VALIDATION_LENGTH, bounded: bool = False) -> None:
        self.model, self.vocab = model, vocab
        self.positions = {n: k for rot in rotations for n, k in rot.reference.site.position_feeds}
        self.alone: list[tuple[_Rotation, ir.Value, Any, list[ir.Value]]] = []
        self.captured: list[_Rotation] = []
        self.errors: dict[int, str] = {}
        self.skipped = 0
        fed: list[tuple[_Rotation, ir.Value]] = []
        for rot in rotations:
            feed_at = _feed_point(rot.pre, rot.post)
            if feed_at is None or _random_input(feed_at, 2, np.random.default_rng(0)) is None:
                self.captured.append(rot)
            else:
                fed.append((rot, feed_at))
        if bounded and len(self.captured) > 1:  # the model's own q/k: only the first layer's (a bounded prefix)
            posts = [r.post for r in self.captured]
            from posrewrite.cut import _descendants

            after = _descendants(model.graph, {id(v) for v in posts}) - {id(v) for v in posts}
            first = [r for r in self.captured if id(r.pre) not in after]
            self.skipped = len(self.captured) - len(first)
            self.captured = first
        self.together: list[tuple[list, Any, list[ir.Value]]] = []
        if len({id(f) for _, f in fed}) == len(fed) > 1:  # few sessions for all of them (each its own input)
            try:
                for chunk in _chunks(fed, max_length):
                    feeds_at = [f for _, f in chunk]
                    others = graph_inputs_for(model.graph, [r.post for r, _ in chunk], feeds_at)
                    session = _extracted_session(model, [*feeds_at, *others], [r.post for r, _ in chunk])
                    self.together.append((chunk, session, others))
                fed = []
            except Exception:  # noqa: BLE001 - one session per rotation then
                self.together = []
        for rot, feed_at in fed:
            try:
                others = graph_inputs_for(model.graph, [rot.post], [feed_at])
                session = _extracted_session(model, [feed_at, *others], [rot.post])
            except Exception as exc:  # noqa: BLE001 - reported as a failed row
                self.errors[id(rot)] = f"cannot extract the rotation: {str(exc).splitlines()[0][:200]}"
                continue
            self.alone.append((rot, feed_at, session, others))
        self.prefix = None
        if self.captured:
            outputs = [v for rot in self.captured for v in (rot.pre, rot.post)]
            try:
                self.prefix_inputs = graph_inputs_for(model.graph, outputs, [])
                self.prefix = _extracted_session(model, self.prefix_inputs, outputs)
            except Exception as exc:  # noqa: BLE001
                for rot in self.captured:
                    self.errors[id(rot)] = f"cannot extract the rotations: {str(exc).splitlines()[0][:200]}"

    def rows(self, rotations: list[_Rotation], length: int, seed: int = 0) -> list[RotationCheck]:
        rows: list[RotationCheck] = []
        for rot in rotations:
            if id(rot) in self.errors:
                rows.append(self._failed(rot, length, self.errors[id(rot)]))
        rng = np.random.default_rng(seed + length)
        for fed, session, others in self.together:
            feeds = _input_feeds(others, length, self.vocab, self.positions)
            xs = [_random_input(f, length, rng) for _, f in fed]
            for (_, f), (x, _) in zip(fed, xs, strict=True):
                feeds[f.name] = x
            try:
                ys = session.run(None, feeds)
            except Exception as exc:  # noqa: BLE001 - rotations that cannot run at this length fail
                message = f"rotations do not run at {length} positions: {str(exc).splitlines()[0][:200]}"
                rows.extend(self._failed(rot, length, message) for rot, _ in fed)
            else:
                for (rot, _), (x, seq_axis), y in zip(fed, xs, ys, strict=True):
                    rows.append(_compare_rotation(rot, x, y, seq_axis, length, "random pre-rotation values"))
        for rot, feed_at, session, others in self.alone:
            x, seq_axis = _random_input(feed_at, length, rng)
            feeds = _input_feeds(others, length, self.vocab, self.positions)
            feeds[feed_at.name] = x
            try:
                (y,) = session.run(None, feeds)
            except Exception as exc:  # noqa: BLE001 - a rotation that cannot run at this length fails
                rows.append(self._failed(rot, length, f"rotation does not run at {length} positions: "
                                                      f"{str(exc).splitlines()[0][:200]}"))
                continue
            rows.append(_compare_rotation(rot, x, y, seq_axis, length, "random pre-rotation values"))
        if self.prefix is not None:
            # a model fed position_ids: its own q/k computed CAPTURE_CHUNK positions at a time (memory of one chunk)
            positions = [v for v in self.prefix_inputs if "position" in (v.name or "").lower()]
            step = CAPTURE_CHUNK if positions and length > CAPTURE_CHUNK else length
            worst: dict[int, RotationCheck] = {}
            for start in range(0, length, step):
                n = min(step, length - start)
                feeds = _input_feeds(self.prefix_inputs, n, self.vocab, self.positions)
                for v in positions:
                    feeds[v.name] = feeds[v.name] + np.asarray(start, feeds[v.name].dtype)
                try:
                    values = self.prefix.run(None, feeds)
                except Exception as exc:  # noqa: BLE001
                    message = f"rotations do not run at {length} positions: {str(exc).splitlines()[0][:200]}"
                    rows.extend(self._failed(rot, length, message) for rot in self.captured)
                    return rows
                for k, rot in enumerate(self.captured):
                    x, y = values[2 * k], values[2 * k + 1]
                    row = _compare_rotation(rot, x, y, _seq_axis(np.shape(x), n), length,
                                            "the model's pre-rotation values", start)
                    if k not in worst or worse(row, worst[k]):
                        worst[k] = row
                del values
            rows.extend(worst[k] for k in sorted(worst))
        return rows

    @staticmethod
    def _failed(rot: _Rotation, length: int, message: str) -> RotationCheck:
        return RotationCheck(site=rot.label.split(":")[0], rotation=rot.label.split(": ", 1)[-1], length=length,
                             ok=False, message=message)


_PASS_THROUGH = ("Cast", "Identity")
_WEIGHTED = ("MatMul", "Gemm", "MatMulNBits", "Conv", "Attention", "GroupQueryAttention",
             "MultiHeadAttention", "LayerNormalization", "SimplifiedLayerNormalization")


def _feed_point(pre: ir.Value, post: ir.Value) -> ir.Value | None:
    """The value to feed random q/k at: `pre`, or the value it was cast from when the rotation also reads that
    one (torch's type promotion casts q and rotate_half(q) separately). None when the rotated value depends on
    the hidden states other than through it (then the model's own q/k are captured instead)."""
    chain = [pre]
    while len(chain) < 4:
        node = chain[-1].producer()
        if node is None or node.op_type not in _PASS_THROUGH or not node.inputs or node.inputs[0] is None:
            break
        chain.append(node.inputs[0])
    for k, c in enumerate(chain):
        nodes = _nodes_between(post, c)
        if nodes is None:
            return None
        seen = {id(v) for n in nodes for v in n.inputs if v is not None}
        if any(id(a) in seen for a in chain[k + 1:]):
            continue  # the rotation reads an ancestor of c directly: feed further up
        if any(n.op_type in _WEIGHTED for n in nodes):
            return None
        return c
    return None


def _nodes_between(post: ir.Value, stop: ir.Value, limit: int = 2000) -> list[ir.Node] | None:
    """Nodes `post` depends on, not looking past `stop` (None past `limit` nodes)."""
    seen_nodes: dict[int, ir.Node] = {}
    stack, seen = [post], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or v is stop:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes[id(node)] = node
        if len(seen_nodes) > limit:
            return None
        stack.extend(node.inputs)
    return list(seen_nodes.values())


def _seq_axis(shape, length: int) -> int | None:
    axes = [k for k, d in enumerate(shape[:-1]) if d == length]
    if not axes:
        return None
    return len(shape) - 2 if (len(shape) - 2) in axes else axes[-1]


def check_gqa_rotation(model: ir.Model, node: ir.Node, ref: RopeReference, length: int,
                       vocab: dict[str, int] | None = None) -> RotationCheck:
    """A GroupQueryAttention node rotating q/k inside: its q/k are not exposed, so its cos/sin caches (as the
    graph computes them at this length) and its `rotary_interleaved` flag drive a lone com.microsoft.RotaryEmbedding
    on random q, compared with the numpy rotation."""
    import onnx

    row = RotationCheck(site=str(0), rotation=node.name, length=length, ok=False)
    try:
        cos_v, sin_v = node.inputs[7], node.inputs[8]
        others = graph_inputs_for(model.graph, [cos_v, sin_v], [])
        cos, sin = _extracted_session(model, others, [cos_v, sin_v]).run(None, _input_feeds(others, length, vocab))
        heads = node.attributes["num_heads"].as_int()
        interleaved = node.attributes["rotary_interleaved"].as_int() if "rotary_interleaved" in node.attributes else 0
        head_dim = ref.site.head_dim or ref.site.rotary_dim
        rd = 2 * cos.shape[-1]
        elem = onnx.helper.np_dtype_to_tensor_dtype(cos.dtype)
        attrs = {"interleaved": interleaved, "num_heads": heads}
        if rd < head_dim:
            attrs["rotary_embedding_dim"] = rd
        g = onnx.helper.make_graph(
            [onnx.helper.make_node("RotaryEmbedding", ["x", "p", "c", "s"], ["y"], domain="com.microsoft", **attrs)],
            "gqa_rotation",
            [onnx.helper.make_tensor_value_info("x", elem, [1, length, heads * head_dim]),
             onnx.helper.make_tensor_value_info("p", onnx.TensorProto.INT64, [1, length]),
             onnx.helper.make_tensor_value_info("c", elem, list(cos.shape)),
             onnx.helper.make_tensor_value_info("s", elem, list(sin.shape))],
            [onnx.helper.make_tensor_value_info("y", elem, None)])
        proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
        x = np.random.default_rng(length).standard_normal((1, length, heads * head_dim)).astype(cos.dtype)
        (y,) = session_from_bytes(proto.SerializeToString()).run(None, {"x": x, "p": np.arange(length)[None], "c": cos,
                                                              "s": sin})
    except Exception as exc:  # noqa: BLE001
        return dataclasses.replace(row, message=f"GroupQueryAttention rotation does not run at {length} positions: "
                                                f"{str(exc).splitlines()[0][:200]}")
    xs, ys = _heads_last(x, 1, head_dim), _heads_last(y, 1, head_dim)
    inv, factor = ref.frequencies(length)
    expected = numpy_rotation(xs, inv, factor, np.arange(length), ref.site.layout.value, ref.site.rotary_dim)
    tol, how = _rotation_tolerance(xs, ref.site.rotary_dim, inv, factor, length, str(cos.dtype))
    err = float(np.max(np.abs(ys - expected)))
    return dataclasses.replace(
        row, max_abs_error=err, tolerance=tol, ok=bool(np.isfinite(err) and err <= tol),
        compared=f"RotaryEmbedding with this GroupQueryAttention's caches and rotary_interleaved on random q "
                 f"vs numpy {ref.site.layout.value} rotation, positions 0..{length - 1}",
        tolerance_from=how)


def check_rotations(model: ir.Model, references: list[RopeReference], lengths: list[int],
                    vocab: dict[str, int] | None = None, *, keys_rotated_after_cache: bool = False,
                    bounded: bool = False) -> list[Check]:
    """Rows of the rotation oracle: every rotation of every site at every length (the rotation subgraphs only,
    no weights), plus a row saying whether every rotation of the original sites was found.
    ``keys_rotated_after_cache``: key rotations moved behind the cache (exact decode) are not expected by name;
    the query rotations, which read the same cos/sin, are checked."""
    rotations, gqa, expected = find_rotations(model, references)
    if keys_rotated_after_cache:
        by_name = _values_by_name(model.graph)
        expected -= sum(1 for ref in references for app in ref.site.applications
                        if by_name.get(app.output.name) is None and by_name.get(app.input.name) is not None)
    found = len(rotations) + 2 * len(gqa)
    runner = _RotationRunner(model, rotations, vocab, max(lengths, default=MAX_VALIDATION_LENGTH), bounded)
    rows: list[Check] = [RotationCount(
        site="rotations", length=None, ok=found >= expected,
        compared=f"q/k rotations found in the rewritten model ({found}) vs in the original model ({expected})",
        message=(f"{runner.skipped} rotation(s) of later layers read the model's own q/k: checked with --validate "
                 "full only") if runner.skipped else None)]
    for n in lengths:
        worst: dict[str, RotationCheck] = {}
        counts: dict[str, int] = {}
        for row in runner.rows(rotations, n):
            key = row.site
            counts[key] = counts.get(key, 0) + 1
            if key not in worst or worse(row, worst[key]):
                worst[key] = row
        for node, same in _distinct_gqa(gqa):
            ref = references[0] if len(references) == 1 else None
            if ref is None:
                continue
            row = check_gqa_rotation(model, node, ref, n, vocab)
            counts["gqa"] = counts.get("gqa", 0) + same
            if "gqa" not in worst or worse(row, worst["gqa"]):
                worst["gqa"] = row
        # each row shows the worst of the rotations it counts
        rows.extend(dataclasses.replace(row, rotations_checked=counts[key]) for key, row in worst.items())
    return rows


def _distinct_gqa(nodes: list[ir.Node]) -> list[tuple[ir.Node, int]]:
    """GroupQueryAttention nodes with distinct rotations, each with how many nodes share it: the check of one
    (`check_gqa_rotation`) reads only its cos/sin caches, rotary_interleaved and num_heads, so nodes that read the
    same cache values with the same attributes rotate alike (layers of one model share their caches)."""
    groups: dict[tuple, list[ir.Node]] = {}
    for node in nodes:
        attrs = node.attributes
        key = (id(node.inputs[7]) if len(node.inputs) > 7 else None, id(node.inputs[8]) if len(node.inputs) > 8
               else None, attrs["rotary_interleaved"].as_int() if "rotary_interleaved" in attrs else 0,
               attrs["num_heads"].as_int() if "num_heads" in attrs else None)
        groups.setdefault(key, []).append(node)
    return [(group[0], len(group)) for group in groups.values()]
