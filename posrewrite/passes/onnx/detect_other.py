"""Finds ALiBi, learned absolute, sinusoidal and T5 relative-bias encodings in an ONNX graph.

Where a candidate is found is structural (onnxscript patterns, match only):
- `_TableGather`  Gather(table, indices) of a constant 2-D table   -> learned / sinusoidal / T5 table
- `_TableSlice`   Slice(table, ...) of a constant table             -> learned / sinusoidal read by length
- `_ScoresBias`   Add(scores, bias) where scores come from a MatMul -> ALiBi (computed or baked) / T5 bias
- `_SinCosConcat`, `_SinCosStack`  [sin(x) | cos(x)] or interleaved  -> computed sinusoidal
What a candidate is comes from its values: the position computation is evaluated on a probe input (a short
all-ones attention mask, token ids that are not padding), which gives offsets (OPT's +2, RoBERTa's
padding_idx + 1) and the form of ALiBi distances without knowing how an exporter spelled them; tables are
fitted (sinusoid formula, per-head linear bias, T5 buckets). Anything that looks like an encoding but
does not fit becomes a `Refusal` with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
from onnxscript.rewriter._rewrite_rule import PatternBase

from posrewrite.limits import fits_budget
from posrewrite.math.absolute import fit_frequencies, fit_sinusoidal, fit_t5_buckets
from posrewrite.math.alibi import fit_linear_bias, is_standard_slopes
from posrewrite.passes.onnx._graph import VIEW_OPS, ConstantEvaluator, dtype_name, numpy_dtype
from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.other import AlibiSite, LearnedAbsoluteSite, SinusoidalSite, T5BiasSite

__all__ = ["detect_other_encodings", "PROBE_LENGTH"]

PROBE_LENGTH = 6  # sequence length of the probe input that position computations are evaluated on
T5_PROBE_LENGTH = 512  # long enough to see T5 buckets saturate (max_distance 128 by default)
_MAX_CONE = 400  # nodes evaluated per probe value; bigger cones are not position computations
_SCALE_OPS = frozenset({"Mul", "Div"})


# ---------------------------------------------------------------------------------------------- patterns


class _TableGather(PatternBase):
    def pattern(self, op, table, indices):
        return op.Gather(table, indices)


class _TableSlice(PatternBase):
    def pattern(self, op, table, starts, ends):
        return op.Slice(table, starts, ends, _allow_other_inputs=True)


class _ScoresBias(PatternBase):
    def pattern(self, op, scores, bias):
        return op.Add(scores, bias)


class _SinCosConcat(PatternBase):
    def pattern(self, op, x):
        return op.Concat(op.Sin(x), op.Cos(x))


class _SinCosStack(PatternBase):
    def pattern(self, op, x, axes1, axes2, shape):
        return op.Reshape(op.Concat(op.Unsqueeze(op.Sin(x), axes1), op.Unsqueeze(op.Cos(x), axes2)), shape)


def _matches(pattern: PatternBase, model: ir.Model) -> Iterable[tuple[ir.Node, dict]]:
    for node in list(model.graph):
        match = pattern.match(model, model.graph, node, check_nodes_are_removable=False)
        if match:
            yield node, dict(match.bindings)


# ------------------------------------------------------------------------------------------------ probe


_PROBE_BUDGET_BYTES = 64 << 20  # a probe input: a short sequence, never a declared static length of 2^28


def _probe_feed(value: ir.Value, length: int) -> np.ndarray | None:
    if value.shape is None or value.dtype is None:
        return None
    dims = []
    for k, d in enumerate(value.shape):
        if isinstance(d, int):
            dims.append(d)
        else:  # symbolic: batch (axis 0 of a rank >= 2 input) is 1, every other dim is the probe length
            dims.append(1 if k == 0 and len(value.shape) >= 2 else length)
    name = (value.name or "").lower()
    dt = numpy_dtype(value.dtype)
    if not fits_budget(dims, dt.itemsize, budget=_PROBE_BUDGET_BYTES):
        return None  # a declared static length too big to feed (the probe says nothing then)
    if value.dtype == ir.DataType.BOOL:
        return np.ones(dims, dtype=bool)
    if value.dtype.is_floating_point():
        return np.zeros(dims, dtype=dt)
    if "mask" in name:
        return np.ones(dims, dtype=dt)
    if "position" in name and dims:
        return np.broadcast_to(np.arange(dims[-1], dtype=dt), dims).copy()
    return np.full(dims, 5, dtype=dt)  # token ids: any id that is not padding


class _Probe:
    """Evaluates values of the graph on a probe input (see module doc), node by node with onnx's reference
    implementation; constant cones are folded on the way."""

    def __init__(self, model: ir.Model, length: int) -> None:
        self.length = length
        self._opset = model.opset_imports.get("", 18)
        self._cache: dict[int, np.ndarray | None] = {}
        self._inputs = {id(v): v for v in model.graph.inputs}

    def __call__(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        self._budget = _MAX_CONE
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._eval(value)
        except Exception:  # noqa: BLE001 - an op the reference runtime cannot run: not evaluable
            return None

    def _eval(self, value: ir.Value) -> np.ndarray | None:
        key = id(value)
        if key in self._cache:
            return self._cache[key]
        self._cache[key] = None
        result = self._compute(value)
        self._cache[key] = result
        return result

    def _compute(self, value: ir.Value) -> np.ndarray | None:
        if key_input := self._inputs.get(id(value)):
            return _probe_feed(key_input, self.length)
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            if tensor.size > (1 << 22):
                return None
            return tensor.numpy()
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        self._budget -= 1
        if self._budget < 0:
            return None
        inputs = []
        for inp in node.inputs:
            if inp is None:
                inputs.append(None)
                continue
            arr = self._eval(inp)
            if arr is None:
                return None
            inputs.append(arr)
        outputs = _run_node(node, inputs, self._opset)
        return outputs[list(node.outputs).index(value)]


def _run_node(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"o{k}" for k in range(len(proto.output))]
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto],
        "probe",
        [
            onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in zip(names, inputs, strict=False)
            if a is not None
        ],
        [onnx.helper.make_empty_tensor_value_info(n) for n in outs],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", max(opset, 18))])
    feeds = {n: a for n, a in zip(names, inputs, strict=False) if a is not None}
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)


# -------------------------------------------------------------------------------------------- helpers


def _cone_ops(value: ir.Value, limit: int = 200) -> tuple[set[str], list[ir.Node], list[ir.Value]]:
    """Op types, nodes and graph inputs/initializers upstream of `value` (bounded walk)."""
    ops: set[str] = set()
    nodes: list[ir.Node] = []
    leaves: list[ir.Value] = []
    seen: set[int] = set()
    stack = [value]
    while stack and len(nodes) < limit:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            leaves.append(v)
            continue
        ops.add(node.op_type)
        nodes.append(node)
        stack.extend(i for i in node.inputs if i is not None)
    return ops, nodes, leaves


def _position_source(value: ir.Value) -> tuple[str, ir.Value | None]:
    """How positions are formed: "mask_cumsum", "range", "constant" (a sliced arange buffer) or "input"."""
    ops, nodes, leaves = _cone_ops(value)
    if "CumSum" in ops:
        return "mask_cumsum", None
    for node in nodes:
        if node.op_type == "Slice" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            data = node.inputs[0]
            if data.dtype is not None and not data.dtype.is_floating_point():
                return "constant", data
    if "Range" in ops:
        return "range", None
    if any(v.const_value is None and v.producer() is None for v in leaves):
        return "input", None
    return "constant", None


def _unit_progression(idx: np.ndarray | None) -> int | None:
    """Offset c when every row of idx (last axis) is c, c+1, c+2, ...; None otherwise."""
    if idx is None or idx.ndim == 0 or idx.shape[-1] < 3 or not np.issubdtype(idx.dtype, np.integer):
        return None
    rows = idx.reshape(-1, idx.shape[-1])
    c = int(rows[0, 0])
    expected = c + np.arange(rows.shape[1])
    return c if np.all(rows == expected[None, :]) else None


def _through(value: ir.Value, ops: Iterable[str]) -> tuple[ir.Value, list[ir.Node]]:
    ops = frozenset(ops)
    path = []
    while (node := value.producer()) is not None and node.op_type in ops and node.inputs and node.inputs[0] is not None:
        path.append(node)
        value = node.inputs[0]
    return value, path


def _is_scores(value: ir.Value) -> bool:
    """True when value is q @ k^T, possibly scaled by a constant and reshaped."""
    v, _ = _through(value, VIEW_OPS)
    node = v.producer()
    if node is not None and node.op_type in _SCALE_OPS:
        for k in (0, 1):
            other = node.inputs[1 - k]
            if other is not None and other.const_value is not None and other.const_value.size == 1:
                v, _ = _through(node.inputs[k], VIEW_OPS)
                break
    node = v.producer()
    if node is None or node.op_type != "MatMul":
        return False
    return all(i is not None and i.const_value is None for i in node.inputs)


def _reaches_add(value: ir.Value, depth: int = 4) -> bool:
    """True when value (through view ops and slices, never a product) is added to a non-constant tensor:
    an additive position encoding, not a weight, and not a RoPE cos/sin cache (those multiply q and k)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Add":
                    other = node.inputs[1 - use.idx] if len(node.inputs) == 2 else None
                    if other is not None and other.const_value is None:
                        return True
                if node.op_type in VIEW_OPS or node.op_type in ("Slice", "Gather"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


# ------------------------------------------------------------------------------------------- detector


class _Detector:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.probe = _Probe(model, PROBE_LENGTH)
        self.const = ConstantEvaluator(model.opset_imports.get("", 18))
        self.sites: list[EncodingSite] = []
        self.refusals: list[Refusal] = []
        self._tables: dict[int, dict] = {}  # id(table) -> reads of a position table

    # -- tables read by position (Gather / Slice) ------------------------------------------------
    def tables(self) -> None:
        for node, b in _matches(_TableGather(), self.model):
            table, indices = b["table"], b["indices"]
            if not self._is_table(table) or (node.attributes.get("axis") and node.attributes["axis"].value != 0):
                continue
            if len(table.shape) != 2:
                continue
            ops, _, _ = _cone_ops(indices)
            if "Log" in ops and table.shape[1] <= 256 and table.shape[0] <= 4096:
                continue  # a bucketed relative bias; found from the scores side (T5)
            if not _reaches_add(node.outputs[0]):
                continue  # not an additive encoding (RoPE cos/sin caches are multiplied with q and k)
            idx = self.probe(indices)
            offset = _unit_progression(idx)
            if offset is None:
                varies = idx is not None and np.ndim(idx) and idx.size > 1 and np.unique(idx).size > 1
                if {"Range", "CumSum"} & ops and varies and idx.shape[-1] >= 3:  # else token (type) ids
                    self.refusals.append(
                        Refusal(
                            "learned_absolute",
                            node.name or table.name,
                            f"table {table.name} is read by positions that are not consecutive "
                            f"({idx.reshape(-1)[:6].tolist()}...)",
                        )
                    )
                continue  # token / token-type embeddings
            source, buffer = _position_source(indices)
            self._add_read(table, node, indices, offset, source, buffer)
        for node, b in _matches(_TableSlice(), self.model):
            table = b["table"]
            if not self._is_table(table) or len(table.shape) < 2 or not _reaches_add(node.outputs[0]):
                continue
            axis = self._sliced_axis(node)
            if axis is None or table.shape[axis] < 8:
                continue
            dims = [d for k, d in enumerate(table.shape) if k != axis and d != 1]
            if len(dims) != 1:
                continue
            starts, ends = self.probe(node.inputs[1]), self.probe(node.inputs[2])
            if starts is None or ends is None or int(np.reshape(starts, -1)[0]) != 0:
                continue
            if int(np.reshape(ends, -1)[0]) != PROBE_LENGTH:
                continue  # not cut to the runtime length
            self._add_read(table, node, None, 0, "range", None, axis=axis)
        for _key, info in self._tables.items():
            self._classify_table(info)

    def _is_table(self, table: ir.Value) -> bool:
        return (
            table is not None
            and table.const_value is not None
            and table.dtype is not None
            and table.dtype.is_floating_point()
            and table.shape is not None
        )

    def _sliced_axis(self, node: ir.Node) -> int | None:
        rank = len(node.inputs[0].shape)
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = self.const(node.inputs[3])
            if axes is None or axes.size != 1:
                return None
            return int(axes.reshape(-1)[0]) % rank
        starts = node.inputs[1].shape
        return 0 if starts is not None and starts[0] == 1 else None

    def _add_read(self, table, node, indices, offset, source, buffer, axis: int = 0) -> None:
        info = self._tables.setdefault(
            id(table),
            {
                "table": table,
                "reads": [],
                "indices": [],
                "offsets": set(),
                "source": source,
                "buffer": buffer,
                "axis": axis,
            },
        )
        info["reads"].append(node)
        if indices is not None:
            info["indices"].append(indices)
        info["offsets"].add(offset)

    def _classify_table(self, info: dict) -> None:
        table: ir.Value = info["table"]
        if len(info["offsets"]) != 1:
            self.refusals.append(
                Refusal("learned_absolute", table.name, f"read with different offsets {sorted(info['offsets'])}")
            )
            return
        offset = info["offsets"].pop()
        arr = np.moveaxis(table.const_value.numpy(), info["axis"], 0)
        arr2 = arr.reshape(arr.shape[0], -1)
        rows, dim = arr2.shape
        common = dict(
            offset=offset,
            positions=info["source"],
            dtype=dtype_name(table),
            table=table,
            reads=tuple(info["reads"]),
            position_buffer=info["buffer"],
        )
        fit = fit_sinusoidal(arr2.astype(np.float64), atol=_sin_tolerance(table))
        if fit is not None:
            self.sites.append(
                SinusoidalSite(
                    max_positions=rows - offset,
                    dim=dim,
                    base=fit["base"],
                    layout=fit["layout"],
                    frequency_rule=fit["rule"],
                    frequencies=fit["frequencies"],
                    source="constant",
                    **common,
                )
            )
            return
        if offset >= rows:
            self.refusals.append(Refusal("learned_absolute", table.name, f"offset {offset} past the {rows} rows"))
            return
        self.sites.append(LearnedAbsoluteSite(rows=rows, dim=dim, indices=tuple(info["indices"]), **common))

    # -- computed sinusoidal ----------------------------------------------------------------------
    def computed_sinusoids(self) -> None:
        for pattern, layout in ((_SinCosStack(), "interleaved"), (_SinCosConcat(), "concat")):
            for node, b in _matches(pattern, self.model):
                concat = node if node.op_type == "Concat" else node.inputs[0].producer()
                axis = concat.attributes["axis"].value if "axis" in concat.attributes else None
                rank = len(concat.outputs[0].shape) if concat.outputs[0].shape is not None else None
                if axis is None or rank is None or axis % rank != rank - 1:
                    continue
                out = node.outputs[0]
                if not _reaches_add(out) or any(
                    isinstance(s, SinusoidalSite) and s.sin is not None and s.sin is b["x"] for s in self.sites
                ):
                    continue
                self._computed_sinusoid(node, b["x"], layout)

    def _computed_sinusoid(self, node: ir.Node, x: ir.Value, layout: str) -> None:
        prod = x.producer()
        where = node.name or x.name
        if prod is None or prod.op_type not in ("Mul", "Div", "MatMul"):
            self.refusals.append(Refusal("sinusoidal", where, "sin/cos argument is not positions x frequencies"))
            return
        freqs = positions = None
        for k in (0, 1):
            f = self.const(prod.inputs[1 - k])
            if f is not None and self.const(prod.inputs[k]) is None:
                freqs = f.astype(np.float64).reshape(-1)
                if prod.op_type == "Div":
                    freqs = 1.0 / freqs
                positions = prod.inputs[k]
                break
        if freqs is None:
            self.refusals.append(Refusal("sinusoidal", where, "frequencies are not constant"))
            return
        pos_vals = self.probe(positions)
        offset = None
        if pos_vals is not None:
            flat = np.asarray(pos_vals)
            flat = flat.reshape(-1, flat.shape[-1]) if flat.shape[-1] > 1 else flat.reshape(1, -1)
            if np.allclose(flat, np.round(flat)):
                offset = _unit_progression(np.round(flat).astype(np.int64))
        dim = 2 * freqs.size
        base, rule = fit_frequencies(freqs, dim) or (None, "custom")
        source, _ = _position_source(positions)
        sin = next((u.node.outputs[0] for u in x.uses() if u.node.op_type == "Sin"), None)
        cos = next((u.node.outputs[0] for u in x.uses() if u.node.op_type == "Cos"), None)
        notes = () if offset is not None else ("positions are not consecutive integers on the probe input",)
        self.sites.append(
            SinusoidalSite(
                max_positions=None,
                dim=dim,
                base=base,
                layout=layout,
                frequency_rule=rule,
                frequencies=freqs,
                offset=offset or 0,
                source="computed",
                positions=source,
                dtype=dtype_name(node.outputs[0]),
                reads=(node,),
                positions_value=positions,
                sin=sin,
                cos=cos,
                notes=notes,
            )
        )

    # -- biases added to attention scores (ALiBi, T5) ---------------------------------------------
    def score_biases(self) -> None:
        alibi: dict[int, dict] = {}
        t5: dict[int, dict] = {}
        for node, b in _matches(_ScoresBias(), self.model):
            for scores, bias in ((b["scores"], b["bias"]), (b["bias"], b["scores"])):
                if scores is None or bias is None or not _is_scores(scores) or _is_scores(bias):
                    continue
                for leaf, kind, slices in self._bias_leaves(bias):
                    group = (t5 if kind == "t5" else alibi).setdefault(
                        id(leaf), {"leaf": leaf, "kind": kind, "adds": [], "scores": [], "biases": [], "slices": []}
                    )
                    group["adds"].append(node)
                    group["scores"].append(scores)
                    group["biases"].append(bias)
                    group["slices"].extend(s for s in slices if s not in group["slices"])
                break
        for group in alibi.values():
            site = self._alibi(group)
            if isinstance(site, Refusal):
                self.refusals.append(site)
            elif site is not None:
                self.sites.append(site)
        for group in t5.values():
            site = self._t5(group)
            if isinstance(site, Refusal):
                self.refusals.append(site)
            elif site is not None:
                self.sites.append(site)

    def _bias_leaves(self, bias: ir.Value, depth: int = 12) -> list[tuple[object, str, list[ir.Node]]]:
        """Walks up from a bias added to scores to what builds it: a slopes x distances product, a constant
        table, or a Gather from a bucket table. Adds (a mask added to the bias) are followed on both sides."""
        out = []
        stack = [(bias, depth, [])]
        while stack:
            v, d, slices = stack.pop()
            if d <= 0:
                continue
            if v.const_value is not None or (v.producer() is None):
                if (
                    v.const_value is not None
                    and v.dtype is not None
                    and v.dtype.is_floating_point()
                    and v.const_value.size > 1
                ):
                    out.append((v, "constant", slices))
                continue
            node = v.producer()
            if node.op_type in VIEW_OPS or node.op_type == "Slice":
                stack.append((node.inputs[0], d - 1, slices + ([node] if node.op_type == "Slice" else [])))
            elif node.op_type == "Mul" and self._slopes_side(node) is not None:
                out.append((node, "product", slices))
            elif node.op_type == "Neg":
                stack.append((node.inputs[0], d - 1, slices))
            elif (
                node.op_type in _SCALE_OPS
                and node.inputs[1] is not None
                and node.inputs[1].const_value is not None
                and node.inputs[1].const_value.size == 1
            ):
                stack.append((node.inputs[0], d - 1, slices))  # bias scaled by a constant (Falcon: 1/sqrt(d))
            elif (
                node.op_type == "Gather"
                and node.inputs[0] is not None
                and node.inputs[0].const_value is not None
                and len(node.inputs[0].shape) == 2
            ):
                out.append((node, "t5", slices))
            elif node.op_type in ("Add", "Where"):
                for inp in node.inputs:
                    if inp is not None:
                        stack.append((inp, d - 1, slices))
        return out

    def _slopes_side(self, mul: ir.Node) -> int | None:
        for k in (0, 1):
            a, other = mul.inputs[k], mul.inputs[1 - k]
            if a is None or other is None:
                continue
            s = self.const(a)
            if s is None or s.size < 2 or self.const(other) is not None:
                continue
            if sum(1 for d in s.shape if d != 1) != 1:
                continue
            vals = s.astype(np.float64).reshape(-1)
            if np.all(vals > 0) and np.all(vals <= 1):
                return k
        return None

    def _alibi(self, g: dict) -> AlibiSite | Refusal | None:
        leaf = g["leaf"]
        bias_dtype = dtype_name(g["biases"][0])
        common = dict(add_nodes=tuple(g["adds"]), scores=tuple(g["scores"]), bias=g["biases"][0], dtype=bias_dtype)
        if g["kind"] == "product":
            mul: ir.Node = leaf
            k = self._slopes_side(mul)
            slopes_value, dist_in = mul.inputs[k], mul.inputs[1 - k]
            slopes = self.const(slopes_value).astype(np.float64).reshape(-1)
            dist, _ = _through(dist_in, ("Cast",))
            vals = self.probe(dist)
            form, distances = _distance_form(vals), _position_source(dist)[0]
            if form is None:
                return Refusal(
                    "alibi",
                    mul.name or dist.name,
                    "slopes multiply a tensor that is neither key positions nor j - i on the probe input",
                )
            notes = [
                "distances are formed from the runtime sequence: ALiBi extrapolates past the training length as is"
            ]
            if dtype_name(mul.outputs[0]) in ("bfloat16", "float16"):
                notes.append(
                    f"distances and bias computed in {dtype_name(mul.outputs[0])}: see check / --fp32-positions"
                )
            return AlibiSite(
                num_heads=slopes.size,
                slopes=slopes,
                source="computed",
                distances=distances,
                form=form,
                position_dtype=dtype_name(dist_in),
                compute_dtype=dtype_name(mul.outputs[0]),
                standard_slopes=is_standard_slopes(slopes),
                max_positions=None,
                slopes_value=slopes_value,
                distances_value=dist,
                product=mul,
                notes=tuple(notes),
                **common,
            )
        table: ir.Value = leaf
        arr = table.const_value.numpy().astype(np.float64)
        if arr.ndim < 2 or arr.shape[-1] < 2:
            return None
        heads = int(np.prod(arr.shape[:-1]))
        if sum(1 for d in arr.shape[:-1] if d != 1) > 1 or heads < 2:
            return Refusal("alibi", table.name, f"constant bias {list(arr.shape)} is not [heads, ..., keys]")
        fit = fit_linear_bias(arr.reshape(heads, arr.shape[-1]))
        if fit is None:
            return Refusal("alibi", table.name, "constant bias added to scores is not linear along the keys")
        slopes, intercepts = fit
        if not np.all(slopes > 0):
            return Refusal("alibi", table.name, "constant bias does not decrease with distance")
        last = intercepts + slopes * (arr.shape[-1] - 1)
        if np.allclose(last, 0, atol=1e-6):
            form = "anchored"
        elif np.allclose(intercepts, 0, atol=1e-6):
            form = "absolute"
        else:
            return Refusal("alibi", table.name, "constant bias is neither 0 at the last key nor at the first")
        L = int(arr.shape[-1])
        notes = [f"bias baked as a constant of {L} keys: fails past {L} tokens; --max-positions regenerates it"]
        return AlibiSite(
            num_heads=heads,
            slopes=slopes,
            source="constant",
            distances="table",
            form=form,
            position_dtype="int64",
            compute_dtype=dtype_name(table),
            standard_slopes=is_standard_slopes(slopes, rtol=1e-4),
            max_positions=L,
            table=table,
            table_axis=len(arr.shape) - 1,
            slices=tuple(g["slices"]),
            notes=tuple(notes),
            **common,
        )

    def _t5(self, g: dict) -> T5BiasSite | Refusal | None:
        gather: ir.Node = g["leaf"]
        table, buckets = gather.inputs[0], gather.inputs[1]
        ops, _, _ = _cone_ops(buckets)
        if "Log" not in ops:
            return None
        nb, heads = (int(d) for d in table.shape)
        vals = _Probe(self.model, T5_PROBE_LENGTH)(buckets)
        if vals is None or vals.ndim < 2 or vals.shape[-1] != vals.shape[-2]:
            return Refusal("t5_relative_bias", gather.name or table.name, "bucket computation could not be evaluated")
        n = vals.shape[-1]
        rel = np.arange(n)[None, :] - np.arange(n)[:, None]
        fit = fit_t5_buckets(rel, vals.reshape(-1, n, n)[0], nb)
        if fit is None:
            return Refusal("t5_relative_bias", gather.name or table.name, "buckets do not follow T5's rule")
        notes = ["distances past max_distance share the last bucket: runs at any length"]
        if not fit["saturated"]:
            notes.append(f"max_distance is at least {fit['max_distance']} (not reached on a {n}-token probe)")
        return T5BiasSite(
            num_buckets=nb,
            max_distance=fit["max_distance"],
            bidirectional=fit["bidirectional"],
            num_heads=heads,
            dtype=dtype_name(table),
            table=table,
            gather=gather,
            buckets=buckets,
            notes=tuple(notes),
        )


def _sin_tolerance(table: ir.Value) -> float:
    return {"float16": 2e-3, "bfloat16": 1e-2}.get(dtype_name(table), 1e-4)


def _distance_form(vals: np.ndarray | None) -> str | None:
    """ "absolute" when the last axis holds key positions 0, 1, 2...; "relative" when [.., i, j] holds
    j - i (or -|i - j|)."""
    if vals is None or vals.ndim == 0:
        return None
    v = np.asarray(vals, dtype=np.float64)
    n = v.shape[-1]
    if n < 3:
        return None
    j = np.arange(n, dtype=np.float64)
    rows = v.reshape(-1, n)
    if np.all(rows == j[None, :]):
        return "absolute"
    if v.ndim >= 2 and v.shape[-2] == n:
        mats = v.reshape(-1, n, n)
        rel = j[None, :] - j[:, None]
        if np.all(mats == rel) or np.all(mats == -np.abs(rel)) or np.all(mats == -rel):
            return "relative"
    return None


def detect_other_encodings(model: ir.Model) -> tuple[list[EncodingSite], list[Refusal]]:
    """Every ALiBi, learned absolute, sinusoidal and T5 relative-bias encoding in `model`'s main graph, and
    the candidates that were not understood."""
    detector = _Detector(model)
    detector.tables()
    detector.computed_sinusoids()
    detector.score_biases()
    return detector.sites, detector.refusals
