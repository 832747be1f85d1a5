"""Small read-only helpers over onnx_ir graphs shared by the detectors and rewrites."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

# Ops that only move, broadcast or retype data without mixing positions and channels.
VIEW_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Expand", "Identity", "Transpose", "Cast", "Tile", "Flatten"})

_MAX_FOLD_ELEMENTS = 1 << 22  # never fold tensors bigger than this (weights): they stay lazy


def dtype_name(value: ir.Value | None) -> str:
    if value is None or value.dtype is None:
        return "unknown"
    return _DTYPE_NAMES.get(value.dtype, str(value.dtype).lower())


_DTYPE_NAMES = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64",
    ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32",
}


def numpy_dtype(dtype: ir.DataType) -> np.dtype:
    if dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype.numpy())


def call_input(v: ir.Value, batch: int, length: int,
               ids: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """A graph input for a call over positions 0..length-1 with no past: KV-cache inputs (``past``/``cache`` in the
    name, rank >= 3) with 0 past positions, positions 0..length-1, masks of ones, integer ids from
    ``ids(length)`` (zeros without it), zeros otherwise; symbolic dimensions: the first is ``batch``, the others
    ``length``. Shared by the rotation probe and the validation's oracle."""
    name = (v.name or "").lower()
    dims = list(v.shape.dims) if v.shape is not None else [batch, length]
    cache = ("past" in name or "cache" in name) and len(dims) >= 3
    shape, first = [], True
    for d in dims:
        if isinstance(d, int):
            shape.append(d)
        elif cache:
            shape.append(batch if first else 0)
        else:
            shape.append(batch if first and len(dims) > 1 else length)
        first = False
    dtype = numpy_dtype(v.dtype) if v.dtype is not None else np.dtype(np.int64)
    if "position" in name and not cache:
        return np.broadcast_to(np.arange(length).astype(dtype), shape).copy()
    if "mask" in name:
        return np.ones(shape, dtype=dtype)
    if ids is not None and np.issubdtype(dtype, np.integer) and not cache:
        return np.broadcast_to(ids(shape[-1] if shape else 1).astype(dtype), shape).copy()
    return np.zeros(shape, dtype=dtype)


def _tensor_size(tensor: ir.TensorProtocol) -> int:
    return int(np.prod([d for d in tensor.shape.dims])) if tensor.shape is not None else 0


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant tensor of `value` (an initializer, or a Constant node's output), like onnx_ir's
    `get_const_tensor`, without its side effect: that one renames a Constant node's `value` tensor to the output's
    name, which changes the bytes of every model written after a mere look at it."""
    node = value.producer() if value.const_value is None else None
    if (node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            and len(node.attributes) == 1 and "value" in node.attributes and len(node.outputs) == 1):
        attr = node.attributes["value"]
        return None if attr.is_ref() else attr.as_tensor()
    return ir.convenience.get_const_tensor(value)


class ConstantEvaluator:
    """Evaluates values whose whole cone of inputs is known: constants (inv_freq built from a base with Pow, ...)
    and, when `feed` is given, graph inputs fed with probe values (position computations evaluated on a short
    probe sequence, see detect_other).

    Each node is run with onnx's reference implementation (`onnx.reference.ReferenceEvaluator`) at the model's
    own opset, so no op semantics are written here and an opset-11 ``Unsqueeze(axes=)`` means what it says. The
    walk itself is ours: onnxscript's and onnx_ir's constant folding rewrite the graph (they replace values by
    initializers), while detection must only read it, and probing needs values of graph inputs that are not in
    the graph. Tensors over a size limit (weights) are never read, which keeps external data lazy; `Shape` is
    answered from static shapes when they are known.
    """

    def __init__(
        self,
        opset: int | None = None,
        *,
        feed: Callable[[ir.Value], np.ndarray | None] | None = None,
        inputs: Iterable[ir.Value] = (),
        max_nodes: int | None = None,
        shape_of: Callable[[ir.Value], list[int] | None] | None = None,
    ) -> None:
        """`opset`: default-domain opset the nodes are run at (None: the opset of the node's graph, else 18).
        `feed`: the value of each graph input in `inputs` (None: that input is unknown). `max_nodes`: nodes
        evaluated per call at most (a bigger cone is reported as unknown). `shape_of`: the concrete shape of a
        value whose declared shape is symbolic (the probe's binding of symbolic dims), so that `Shape` of an
        activation is answered without computing the activation (and reading the weights that make it)."""
        self._cache: dict[int, np.ndarray | None] = {}
        self._opset = opset
        self._feed = feed
        self._inputs = {id(v): v for v in inputs}
        self._max_nodes = max_nodes
        self._shape_of = shape_of
        self._budget: int | None = None

    @classmethod
    def for_model(cls, model: ir.Model) -> ConstantEvaluator:
        """The constant folder of `model`'s main graph, at the model's opset."""
        return cls(model_opset(model))

    def __call__(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        if self._feed is None:
            return self._eval(value)
        # probing: values of arbitrary subgraphs on made-up inputs; numpy warnings and failures mean "unknown"
        self._budget = self._max_nodes
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._eval(value)
        except Exception:  # noqa: BLE001 - includes RecursionError on a very deep cone: not evaluable
            return None

    def _eval(self, value: ir.Value) -> np.ndarray | None:
        key = id(value)
        if key not in self._cache:
            self._cache[key] = None  # guards cycles
            try:
                self._cache[key] = self._evaluate(value)
            except RecursionError:
                raise
            except Exception:  # noqa: BLE001 - a malformed node (bad index, wrong type): not a known constant
                self._cache[key] = None
        return self._cache[key]

    def _evaluate(self, value: ir.Value) -> np.ndarray | None:
        if self._feed is not None and id(value) in self._inputs:
            return self._feed(value)
        tensor = const_tensor(value)
        if tensor is not None:
            if _tensor_size(tensor) > _MAX_FOLD_ELEMENTS:
                return None
            return tensor.numpy()
        node = value.producer()
        if node is None or node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
            return None
        if node.domain not in ("", "ai.onnx") or any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
        ):
            return None
        if node.op_type == "Shape":
            static = _static_shape_slice(node)
            if static is None and self._shape_of is not None and node.inputs[0] is not None:
                static = _bound_shape_slice(node, self._shape_of(node.inputs[0]))
            if static is not None or self._feed is None:
                return static
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "Shape":
            # x.shape[k] where dimension k is static although others are not (head_dim in TorchScript exports)
            picked = self._static_dims_picked(node)
            if picked is not None or self._feed is None:
                return picked
        if _declared_elements(value) > _MAX_FOLD_ELEMENTS:
            return None  # a static shape too big to materialise (a model may declare any length)
        if self._budget is not None:
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
        if _predicted_elements(node, inputs) > _MAX_FOLD_ELEMENTS:
            return None
        return run_node(node, inputs, self._node_opset(node))[list(node.outputs).index(value)]

    def _static_dims_picked(self, node: ir.Node) -> np.ndarray | None:
        dims = _shape_dims(node.inputs[0].producer())
        index = self._eval(node.inputs[1])
        if dims is None or index is None:
            return None
        picked = np.take(np.array(dims, dtype=object), index.astype(np.int64))
        if any(not isinstance(d, (int, np.integer)) for d in np.atleast_1d(picked)):
            return None
        return np.asarray(picked, dtype=np.int64)

    def _node_opset(self, node: ir.Node) -> int:
        if self._opset is not None:
            return self._opset
        graph = node.graph
        opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx")) if graph is not None else None
        return opset if opset is not None else 18


def model_opset(model: ir.Model) -> int:
    """The default-domain opset of `model` (18 when it imports none)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    return opset if opset is not None else 18


def _declared_elements(value: ir.Value) -> int:
    """Elements of ``value`` by its declared shape (0 when unknown or symbolic)."""
    shape = value.shape
    if shape is None or not shape.is_static():
        return 0
    return math.prod(int(d) for d in shape.dims)


def _predicted_elements(node: ir.Node, inputs: list[np.ndarray | None]) -> int:
    """Elements the ops that create tensors from values (Range, ConstantOfShape, Expand, Tile) would produce; 0
    for the others (their outputs are no bigger than their inputs times a small factor)."""
    try:
        if node.op_type == "Range" and len(inputs) == 3 and all(a is not None and a.size == 1 for a in inputs):
            start, limit, delta = (float(a.reshape(-1)[0]) for a in inputs)
            if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
                return 1 << 62
            return max(0, math.ceil((limit - start) / delta))
        if node.op_type == "ConstantOfShape" and inputs and inputs[0] is not None:
            return math.prod(max(0, int(d)) for d in inputs[0].reshape(-1))
        if node.op_type == "Expand" and len(inputs) == 2 and inputs[0] is not None and inputs[1] is not None:
            dims = [int(d) for d in inputs[1].reshape(-1)]
            data = list(inputs[0].shape)
            rank = max(len(dims), len(data))
            dims = [1] * (rank - len(dims)) + dims
            data = [1] * (rank - len(data)) + data
            return math.prod(max(a, b) for a, b in zip(dims, data, strict=True))
        if node.op_type == "Tile" and len(inputs) == 2 and inputs[0] is not None and inputs[1] is not None:
            return inputs[0].size * math.prod(max(0, int(r)) for r in inputs[1].reshape(-1))
    except (ValueError, OverflowError, TypeError):
        return 1 << 62
    return 0


def _shape_dims(shape_node: ir.Node) -> list | None:
    """The dims a Shape node returns (ints where static, others as given), honouring start/end."""
    value = shape_node.inputs[0]
    if value is None or value.shape is None:
        return None
    dims = list(value.shape.dims)
    if dims and not isinstance(dims[-1], int):
        dims[-1] = _sliced_last_dim(value)
    start = int_attr(shape_node, "start", 0)
    end = int_attr(shape_node, "end", None)
    return dims[start:end]


def _sliced_last_dim(value: ir.Value):
    """Width of x[..., a:b] when shape inference could not tell it (bounds computed from other shapes)."""
    node = value.producer()
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return value.shape.dims[-1]
    fold = ConstantEvaluator()  # at the opset of the Slice's graph
    starts, ends, axes = fold(node.inputs[1]), fold(node.inputs[2]), fold(node.inputs[3])
    steps = fold(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
    data = node.inputs[0]
    if any(a is None for a in (starts, ends, axes, steps)) or starts.size != 1 or data.shape is None:
        return value.shape.dims[-1]
    if normalise_axis(int(axes.reshape(-1)[0]), len(data.shape)) != -1 or int(steps.reshape(-1)[0]) != 1:
        return value.shape.dims[-1]
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    width = data.shape.dims[-1]
    if not isinstance(width, int):
        width = _sliced_last_dim(data)
    if isinstance(width, int):
        end = min(end, width)
    elif end > 1 << 40 or start < 0 or end < 0:
        return value.shape.dims[-1]
    return end - start


def _bound_shape_slice(shape_node: ir.Node, dims: list[int] | None) -> np.ndarray | None:
    """What `shape_node` returns when its input has the concrete shape `dims` (None: unknown)."""
    if dims is None:
        return None
    start = int_attr(shape_node, "start", 0)
    end = int_attr(shape_node, "end", None)
    return np.array(list(dims)[start:end], dtype=np.int64)


def _static_shape_slice(shape_node: ir.Node) -> np.ndarray | None:
    dims = _shape_dims(shape_node)
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return np.array(dims, dtype=np.int64)


def run_node(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Outputs of `node` on `inputs` (None: an omitted optional input), by onnx's reference implementation of
    the op at default-domain `opset`."""
    proto = ir.serde.serialize_node(node)
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    out_names = [f"o{k}" for k in range(len(proto.output))]
    del proto.output[:]
    proto.output.extend(out_names)
    proto.name = "fold"
    proto.domain = ""
    graph = onnx.helper.make_graph(
        [proto],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, inputs, strict=True) if a is not None],
        [onnx.helper.make_empty_tensor_value_info(n) for n in out_names],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: a for n, a in zip(names, inputs, strict=True) if a is not None}
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)


def trace_through(
    value: ir.Value,
    ops: Iterable[str] = VIEW_OPS,
    *,
    limit: int | None = None,
    until: Callable[[ir.Value], bool] | None = None,
) -> tuple[ir.Value, list[ir.Node]]:
    """Follows the first input upward while the producer is one of `ops`; returns the value reached and the
    nodes passed. Stops early at a value for which `until` holds, or after `limit` nodes."""
    ops = frozenset(ops)
    path: list[ir.Node] = []
    while True:
        if until is not None and until(value):
            return value, path
        node = value.producer()
        if node is None or node.op_type not in ops or not node.inputs or node.inputs[0] is None:
            return value, path
        if limit is not None and len(path) >= limit:
            return value, path
        path.append(node)
        value = node.inputs[0]


def int_attr(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return int(attr.value)


def last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def normalise_axis(axis: int, value_rank: int | None) -> int | None:
    """Returns a negative axis when the rank is known (so -1 always means 'last'), else the axis as given."""
    if axis < 0:
        return axis
    if value_rank is None:
        return None
    return axis - value_rank


def concrete_dims(shape: ir.Shape, sizes: Mapping[str, int]) -> list[int] | None:
    """The dimensions of `shape` with each symbolic one replaced by its size in `sizes` (the sizes an evaluation
    binds the model's symbolic input dimensions to); None when a symbolic dimension is not in `sizes`."""
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        elif str(d) in sizes:
            dims.append(sizes[str(d)])
        else:
            return None
    return dims


def has_past_inputs(model: ir.Model) -> bool:
    """Whether the model takes a KV cache (a graph input named ``past...``, as Optimum's ``past_key_values.*`` and
    onnxruntime-genai's inputs are)."""
    return any(v.name and "past" in v.name.lower() for v in model.graph.inputs)
