"""Whether a KV-cache attention's bias masks every key after the query's position, read by evaluating the
bias's own cone of the graph in onnxruntime for several past / sequence lengths and attention masks
(`bias_is_at_least_causal`); layers that compute the same mask share one (`same_computation`)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from posrewrite.passes.onnx._graph import concrete_dims, const_tensor
from posrewrite.passes.onnx.attention.cache_match import MASKED


def bias_is_at_least_causal(model: ir.Model, bias: ir.Value) -> str | None:
    """None when, evaluated for several (past, seq) and attention masks, the bias [B|1, 1|H, S, P+S] masks
    every key j > P + i for query i; else why not."""
    graph = model.graph
    inputs = set(graph.inputs)
    cone: list[ir.Node] = []
    needed: list[ir.Value] = []
    shape_only: list[ir.Value] = []  # read only through Shape: fed as zeros of their shape, never computed
    seen: set[int] = set()
    stack = [bias]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None:
            if v in inputs and v not in needed:
                needed.append(v)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        cone.append(node)
        if node.domain not in ("", "ai.onnx") or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
        ):
            return f"computed by {node.domain}::{node.op_type}"
        if node.op_type == "Shape" and node.inputs[0] not in inputs:
            if node.inputs[0] not in shape_only:
                shape_only.append(node.inputs[0])
            continue
        stack.extend(i for i in node.inputs if i is not None)
        if len(cone) > 5000:
            return "its computation is too large to check"
    # a value also computed in the cone (read by something other than a Shape) is computed, not fed
    shape_only = [v for v in shape_only if v.producer() is None or id(v.producer()) not in seen]
    if any(not v.name for v in shape_only):
        return "reads the shape of an unnamed value"
    dims = _dims_of_inputs(graph)
    needed.extend(shape_only)
    order = {id(n): k for k, n in enumerate(graph)}
    cone.sort(key=lambda n: order.get(id(n), 0))
    try:
        session = _session(model, cone, needed, bias)
    except Exception as exc:  # noqa: BLE001
        return f"could not be evaluated ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    for past, seq in ((0, 5), (4, 3), (7, 1)):
        total = past + seq
        for padded in (False, True):
            mask = np.ones((2, total), np.int64)
            if padded:
                mask[0, : min(2, total - 1)] = 0
            feeds = {}
            sizes = {k: {"batch": 2, "seq": seq, "past": past, "total": total}[role] for k, role in dims.items()}
            for v in needed:
                feed = _zeros_of_shape(v, sizes) if v in shape_only else _feed(v, past, seq, mask)
                if feed is None:
                    return (f"depends on the shape of {v.name} {v.shape}, not tied to the inputs' dimensions"
                            if v in shape_only else f"depends on input {v.name}, which this check cannot feed")
                feeds[v.name] = feed
            try:
                value = np.asarray(session.run(None, feeds)[0], dtype=np.float32)
            except Exception as exc:  # noqa: BLE001
                return f"could not be evaluated ({type(exc).__name__})"
            if value.ndim != 4 or value.shape[2] != seq or value.shape[3] != total or value.shape[0] not in (1, 2):
                return f"has shape {value.shape} for {seq} new and {total} total tokens (want [B, 1|H, S, T])"
            i, j = np.indices((seq, total))
            future = j > past + i
            if not np.all(value[:, :, future] <= MASKED):
                return f"does not mask future keys (past {past}, {seq} new tokens): not causal"
    return None


def _dims_of_inputs(graph: ir.Graph) -> dict[str, str]:
    """Symbolic dimension name -> role (batch, seq, past, total), from the inputs of Optimum's layout."""
    roles: dict[str, str] = {}
    for v in graph.inputs:
        name, shape = (v.name or "").lower(), v.shape
        if shape is None:
            continue
        dims = [str(d) if not isinstance(d, int) else None for d in shape]
        if name in ("input_ids", "position_ids") and len(dims) == 2:
            pairs = zip(dims, ("batch", "seq"), strict=True)
        elif name == "attention_mask" and len(dims) == 2:
            pairs = zip(dims, ("batch", "total"), strict=True)
        elif "past" in name and len(dims) == 4:
            pairs = ((dims[0], "batch"), (dims[2], "past"))
        else:
            continue
        for d, role in pairs:
            if d is not None:
                roles.setdefault(d, role)
    return roles


def _zeros_of_shape(v: ir.Value, sizes: dict[str, int]) -> np.ndarray | None:
    if v.shape is None or v.dtype is None:
        return None
    dims = concrete_dims(v.shape, sizes)
    return None if dims is None else np.zeros(dims, dtype=v.dtype.numpy())


def _feed(v: ir.Value, past: int, seq: int, mask: np.ndarray) -> np.ndarray | None:
    name = (v.name or "").lower()
    dtype = v.dtype.numpy() if v.dtype is not None else np.float32
    if name == "attention_mask":
        return mask.astype(dtype)
    if name == "input_ids":
        return np.ones((2, seq), dtype)
    if name == "position_ids":
        return np.broadcast_to(np.arange(past, past + seq), (2, seq)).astype(dtype)
    if "past" in name and v.shape is not None and len(v.shape) == 4:
        dims = [d if isinstance(d, int) else 0 for d in v.shape]
        return np.zeros((2, dims[1], past, dims[3]), dtype)
    return None


def _session(model: ir.Model, cone: list[ir.Node], needed: list[ir.Value], target: ir.Value):
    import onnxruntime as ort

    names: dict[int, str] = {}
    initializers = []

    def name_of(v: ir.Value | None) -> str:
        if v is None:
            return ""
        if id(v) not in names:
            names[id(v)] = v.name if v in needed else f"v{len(names)}"
            if v.producer() is None and v not in needed:
                t = const_tensor(v)
                if t is None:
                    raise ValueError(f"{v.name} has no value")
                if t.size > 1 << 20:
                    raise ValueError("reads a large tensor")
                initializers.append(onnx.numpy_helper.from_array(np.asarray(t.numpy()), names[id(v)]))
        return names[id(v)]

    protos = []
    for node in cone:
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend(name_of(i) for i in node.inputs)
        del proto.output[:]
        proto.output.extend(name_of(o) for o in node.outputs)
        proto.name = f"n{len(protos)}"
        protos.append(proto)
    ins = [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in needed]
    out = onnx.helper.make_empty_tensor_value_info(name_of(target))
    g = onnx.helper.make_graph(protos, "bias", ins, [out], initializer=initializers)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(g, opset_imports=opsets)
    proto.ir_version = model.ir_version or 10
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])



def same_computation(a: ir.Value, b: ir.Value) -> bool:
    """a and b are computed by the same op from the same values (or equal small constants): every layer's
    copy of the mask (torch's export writes Where(mask, 0, -inf) once per layer)."""
    if a is b:
        return True
    na, nb = a.producer(), b.producer()
    if na is None or na.op_type.startswith(("Random", "Multinomial", "Bernoulli", "Dropout")):
        return False  # not a function of its inputs
    if nb is None or (na.op_type, na.domain, len(na.inputs), len(na.outputs)) != (
            nb.op_type, nb.domain, len(nb.inputs), len(nb.outputs)) or na.outputs.index(a) != nb.outputs.index(b):
        return False
    if {k: v.value for k, v in na.attributes.items() if v.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        } != {k: v.value for k, v in nb.attributes.items()} or any(
            v.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for v in na.attributes.values()):
        return False
    for x, y in zip(na.inputs, nb.inputs, strict=True):
        if x is y:
            continue
        tx = const_tensor(x) if x is not None else None
        ty = const_tensor(y) if y is not None else None
        if tx is None or ty is None or tx.size > 64 or ty.size > 64 or tx.dtype != ty.dtype:
            return False
        ax, ay = np.asarray(tx.numpy()), np.asarray(ty.numpy())
        if ax.shape != ay.shape or not np.array_equal(ax, ay, equal_nan=True):
            return False
    return True

