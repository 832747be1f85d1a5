"""The bounded cut of a model that validation runs instead of the whole model (see docs/validation.md).

The cut is chosen on the ORIGINAL model and applied, by value names, to the original and to the rewritten
model: the outputs of the cut are values both models hold (a rewrite keeps the names of what it does not
replace), taken after the first attention that reads each RoPE site's first-layer rotations (and after the
model's first attention, for every other encoding), never reaching a later attention:

- the first such value (the attention's own result where the rewritten model still has it), and
- the last one (the inputs of the second layer: the whole first layer, MLP and norms included).

Each cut is extracted with onnx_ir; external tensors stay external (onnxruntime maps them from their file), so
a cut holds one layer's weights (and the embedding rows it reads), whatever the model's size. Feeding a cut:
`cut_feeds` puts a KV-cache model's positions far past the old length with a short call (a random past of the
first layer only), or feeds `position_ids` directly; only a model whose positions come from its sequence
length alone needs a long call.
"""

from __future__ import annotations

__all__ = ["ATTENTION_OPS", "ModelCut", "find_cut", "cut_feeds", "extracted_session", "onnxruntime_load_error"]

import dataclasses
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite import memory

#: Ops where the scores meet the values: their result (or what follows) depends on the positions of q, k and v.
ATTENTION_OPS = frozenset({"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                           "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention"})
#: New tokens of a short call (decode-style with a past, or with position_ids far past the old length).
SHORT_CALL = 16
#: Longest call made token by token without a past (below it a model with position_ids is fed all positions).
PREFILL_LIMIT = 256


def _order(graph: ir.Graph) -> dict[int, int]:
    return {id(n): k for k, n in enumerate(graph)}


def _descendants(graph: ir.Graph, seeds: set[int]) -> set[int]:
    """ids of values depending on any value in `seeds` (ids), in one pass over the (topologically sorted) graph."""
    reached = set(seeds)
    for node in graph:
        if any(v is not None and id(v) in reached for v in node.inputs):
            reached.update(id(o) for o in node.outputs)
    return reached


@dataclasses.dataclass
class ModelCut:
    """Names of the values compared, and what they were chosen after."""

    outputs: list[str]
    reason: str


def find_cut(original: ir.Model, rewritten: ir.Model, seed_groups: list[list[str]]) -> ModelCut | None:
    """The cut's outputs (value names) for each group of seed value names (a RoPE site's first-layer rotation
    outputs; an empty group stands for the model's first attention). None when no value qualifies."""
    graph = original.graph
    order = _order(graph)
    by_name = {o.name: o for n in graph for o in n.outputs if o.name}
    attention = [n for n in graph if n.op_type in ATTENTION_OPS]
    if not attention:
        return None
    new_names: dict[str, ir.Value] = {o.name: o for n in rewritten.graph for o in n.outputs if o.name}
    chosen: list[str] = []
    why: list[str] = []
    for group in seed_groups or [[]]:
        seeds = {id(by_name[s]) for s in group if s in by_name}
        if group and not seeds:
            continue
        if seeds:
            after = _descendants(graph, seeds)
            first = next((n for n in attention if any(id(o) in after for o in n.outputs)), None)
        else:
            first = attention[0]
        if first is None:
            continue
        at = order[id(first)]
        reach = _descendants(graph, {id(o) for o in first.outputs})
        later = _descendants(graph, {id(o) for n in attention if order[id(n)] > at for o in n.outputs})
        candidates = []
        for node in graph:
            if order[id(node)] < at:
                continue
            for o in node.outputs:
                if id(o) not in reach or id(o) in later or o.name not in new_names:
                    continue
                dtypes = {t for t in (o.dtype, new_names[o.name].dtype) if t is not None}
                if len(dtypes) <= 1 and all(t.is_floating_point() for t in dtypes):  # untyped: checked when run
                    candidates.append(o.name)
        if not candidates:
            continue
        for name in (candidates[0], candidates[-1]):
            if name not in chosen:
                chosen.append(name)
        where = f"after {first.op_type} {first.name or '?'}"
        if where not in why:
            why.append(where)
    if not chosen:
        return None
    return ModelCut(chosen, "; ".join(why))


def sub_model(model: ir.Model, outputs: list[str]) -> ir.Model:
    """The part of `model` that computes `outputs` from the graph inputs (external tensors left external)."""
    values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
    outs = [values[name] for name in outputs]
    sub = ir.convenience.extract(model.graph, graph_inputs_for(model.graph, outs), outs)
    sub.opset_imports.update(model.graph.opset_imports)
    return ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values()))


def graph_inputs_for(graph: ir.Graph, outputs: list[ir.Value], stop: list[ir.Value] = ()) -> list[ir.Value]:
    """Graph inputs that `outputs` depend on other than through the values in `stop` (values read by subgraphs
    of If / Loop / Scan from the enclosing graph included), in the graph's input order."""
    graph_inputs = {id(v) for v in graph.inputs}
    stops = {id(v) for v in stop}
    seen: set[int] = set()
    found: set[int] = set()
    stack = list(outputs)
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or id(v) in stops:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            found.add(id(v))
            continue
        node = v.producer()
        if node is not None:
            stack.extend(node.inputs)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    stack.extend(_outer(attr.value))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        stack.extend(_outer(g))
    return [v for v in graph.inputs if id(v) in found]


def _outer(sub: ir.Graph) -> list[ir.Value]:
    inner = {id(v) for v in sub.inputs}
    for node in sub:
        inner.update(id(o) for o in node.outputs)
    return [v for node in sub for v in node.inputs if v is not None and id(v) not in inner]


def extracted_session(model: ir.Model, *, quiet: bool = False):
    """An onnxruntime CPU session of `model` whose external tensors are read by onnxruntime from their file
    (mapped, not copied by posrewrite): all of them must live in one folder, else the others are read here."""
    import onnxruntime as ort

    folders: dict[str, int] = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            folders[os.path.abspath(str(t.base_dir))] = folders.get(os.path.abspath(str(t.base_dir)), 0) + 1
    folder = max(folders, key=folders.get) if folders else None
    restore = []
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and os.path.abspath(str(t.base_dir)) != folder:
            restore.append((v, t))
            v.const_value = ir.tensor(t.numpy(), name=t.name)
    try:
        proto = ir.to_proto(model)
    finally:
        for v, t in restore:
            v.const_value = t
    if any(not o.type.HasField("tensor_type") for o in proto.graph.output):  # untyped outputs: ONNX's inference
        import onnx

        inferred = onnx.shape_inference.infer_shapes(proto)
        types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]
                 if v.type.HasField("tensor_type")}
        for o in proto.graph.output:
            if not o.type.HasField("tensor_type") and o.name in types:
                o.type.CopyFrom(types[o.name])
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    options.enable_cpu_mem_arena = False  # what a run allocates is given back when it ends
    options.add_session_config_entry("session.disable_prepacking", "1")
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _is_cache(v: ir.Value) -> bool:
    name = (v.name or "").lower()
    return ("past" in name or "cache" in name) and v.shape is not None and len(v.shape.dims) >= 3 and (
        v.dtype is not None and v.dtype.is_floating_point())


def call_shape(inputs: list[ir.Value], length: int) -> tuple[int, int, str]:
    """(past, new tokens, how) of the call that reaches position `length - 1`: a KV-cache model gets a short
    call after a random past, a model with position_ids a short call at the last positions, others all
    `length` tokens."""
    if any(_is_cache(v) for v in inputs):
        new = min(max(1, length // 2), SHORT_CALL)
        return length - new, new, f"{new} new tokens after a random past of {length - new}"
    if length > PREFILL_LIMIT and any("position" in (v.name or "").lower() for v in inputs):
        new = SHORT_CALL
        return 0, new, f"{new} tokens at positions {length - new}..{length - 1} (position_ids)"
    return 0, length, f"{length} tokens"


def cut_feeds(inputs: list[ir.Value], length: int, vocab: dict[str, int] | None, token_ids,
              seed: int = 0) -> tuple[dict[str, np.ndarray], str] | str:
    """Inputs of a call reaching position `length - 1` (see `call_shape`), or a string saying why the cut
    cannot be fed. `token_ids(count, vocab)` gives the ids."""
    from posrewrite.passes.onnx._graph import numpy_dtype

    past, new, how = call_shape(inputs, length)
    far = past == 0 and new < length  # position_ids at the last positions
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in inputs:
        name = (v.name or "").lower()
        if v.shape is None or v.dtype is None:
            return f"input {v.name} has no declared shape or type"
        dims = list(v.shape.dims)
        dtype = numpy_dtype(v.dtype)
        if _is_cache(v):
            symbolic = [k for k, d in enumerate(dims) if not isinstance(d, int) and k != 0]
            if len(symbolic) != 1:
                return f"cache input {v.name} has no single length axis ({dims})"
            shape = [1 if k == 0 and not isinstance(d, int) else (past if k == symbolic[0] else d)
                     for k, d in enumerate(dims)]
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
            continue
        if not np.issubdtype(dtype, np.integer):
            return f"input {v.name} is {v.dtype}"
        n = past + new if "mask" in name else new
        shape = [d if isinstance(d, int) else (1 if k == 0 and len(dims) > 1 else n) for k, d in enumerate(dims)]
        if "position" in name:
            start = length - new if far else past
            feeds[v.name] = np.broadcast_to(np.arange(start, start + shape[-1] if shape else 1, dtype=dtype),
                                            shape).copy()
        elif "mask" in name:
            feeds[v.name] = np.ones(shape, dtype=dtype)
        else:
            ids = token_ids(shape[-1] if shape else 1, (vocab or {}).get(v.name)).astype(dtype)
            feeds[v.name] = np.broadcast_to(ids, shape).copy()
    return feeds, how


def estimate(model: ir.Model, length: int) -> dict[str, Any]:
    """`memory.session_estimate` of a call reaching position `length - 1` of `model` (see `call_shape`)."""
    past, new, _ = call_shape(list(model.graph.inputs), length)
    return memory.session_estimate(model, new, past + new)


def onnxruntime_load_error(model: ir.Model) -> str | None:
    """Why onnxruntime's CPU provider refuses to load `model` (None when it loads), checked without a byte of
    weights: every initializer of the main graph of 1 KiB or more (or stored outside) becomes a graph input of
    the same type and shape, so the session resolves every op, type and kernel of the whole graph while holding
    no weight."""
    import onnxruntime as ort

    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    moved = []
    try:
        for v in values:
            t = v.const_value
            try:
                big = int(t.nbytes) >= 1024 or isinstance(t, ir.ExternalTensor)
            except Exception:  # noqa: BLE001
                big = False
            if not big:
                continue
            moved.append((v, t, v.type, v.shape))
            model.graph.initializers.pop(v.name)
            v.const_value = None
            v.type = ir.TensorType(t.dtype)
            v.shape = ir.Shape(t.shape.dims)
            model.graph.inputs.append(v)
        proto = ir.to_proto(model)
    finally:
        for v, t, typ, shape in moved:
            model.graph.inputs.remove(v)
            v.const_value, v.type, v.shape = t, typ, shape
            model.graph.register_initializer(v)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        return " ".join(str(exc).split())[:300]
    return None
