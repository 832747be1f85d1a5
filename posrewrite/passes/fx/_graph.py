"""Small helpers over ATen-level fx graphs of `torch.export` programs.

Reading: op tests that ignore overloads (`is_op`), normalised arguments (`dim_arg`, `slice_args`), shapes
from the fake tensors export leaves in ``node.meta["val"]``, the tensor behind a lifted
parameter/buffer/constant placeholder (`placeholder_tensor`).
Writing: `GraphWriter` inserts ATen calls with their ``meta["val"]`` filled in (run on the fake tensors of
the inputs, so later passes and `torch.onnx.export` see shapes and dtypes), and lifts new constant tensors
into the program's signature.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.fx import Graph, Node

aten = torch.ops.aten

INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def is_op(node: Any, *targets: Any) -> bool:
    """Whether ``node`` calls one of ``targets`` (OpOverloadPackets match every overload)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t or (isinstance(t, torch._ops.OpOverloadPacket) and _packet(node.target) is t):
            return True
    return False


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def rank(node: Any) -> int | None:
    s = shape(node)
    return None if s is None else len(s)


def static_int(x: Any) -> int | None:
    """``x`` as a Python int when it is one (not a symbolic size)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except Exception:  # pragma: no cover - defensive
            return None
    return None


def last_dim(node: Any) -> int | None:
    s = shape(node)
    return None if not s else static_int(s[-1])


def normalise_dim(d: int, r: int | None) -> int | None:
    if r is None:
        return d if d >= 0 else None
    return d + r if d < 0 else d


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_last_dim(node: Node, d: int, of: Any = None) -> bool:
    """Whether ``d`` (an axis argument of ``node``) is the last axis of ``of`` (default: node's input)."""
    ref = of if of is not None else node.args[0]
    r = rank(ref)
    return d == -1 or (r is not None and d == r - 1)


@dataclasses.dataclass(frozen=True)
class SliceOf:
    """A contiguous or strided range of one axis of ``source``."""

    source: Node
    dim: int
    start: int
    end: int | None  # None: to the end
    step: int


def slice_of(node: Any) -> SliceOf | None:
    """``node`` as a slice of another tensor: aten.slice, or one piece of split/split_with_sizes/chunk."""
    if is_op(node, aten.slice):
        src = node.args[0]
        dim = arg(node, 1, "dim", 0)
        start = arg(node, 2, "start", None) or 0
        end = arg(node, 3, "end", None)
        step = arg(node, 4, "step", 1)
        if not all(isinstance(v, int) for v in (dim, start, step)) or not (end is None or isinstance(end, int)):
            return None
        size = static_int(shape(src)[dim]) if shape(src) is not None else None
        if end is not None and (end >= INT64_MAX or (size is not None and end >= size)):
            end = None
        return SliceOf(src, normalise_dim(dim, rank(src)), start, end, step)
    if node is not None and isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem:
        parent, index = node.args
        if not isinstance(index, int):
            return None
        if is_op(parent, aten.split, aten.split_with_sizes, aten.chunk):
            src = parent.args[0]
            dim = arg(parent, 2, "dim", 0)
            size = shape(src)
            if size is None or not isinstance(dim, int):
                return None
            total = static_int(size[dim])
            if is_op(parent, aten.chunk):
                n = parent.args[1]
                if total is None:
                    return None
                piece = -(-total // n)
                sizes = [min(piece, total - i * piece) for i in range(n)]
            elif is_op(parent, aten.split_with_sizes):
                sizes = [static_int(v) for v in parent.args[1]]
                if any(v is None for v in sizes):  # symbolic sizes (DINOv3's prefix tokens / patches)
                    return None
            else:
                piece = parent.args[1]
                if total is None or not isinstance(piece, int):
                    return None
                sizes = [min(piece, total - i) for i in range(0, total, piece)]
            if index >= len(sizes):
                return None
            start = sum(sizes[:index])
            end = start + sizes[index]
            return SliceOf(src, normalise_dim(dim, rank(src)), start, None if end == total else end, 1)
    return None


def negated(node: Any) -> Node | None:
    """x when ``node`` is -x (neg, or mul by -1)."""
    if is_op(node, aten.neg):
        return node.args[0]
    if is_op(node, aten.mul) and len(node.args) == 2:
        a, b = node.args
        if b == -1 or b == -1.0:
            return a
        if a == -1 or a == -1.0:
            return b
    return None


def scalar_mul(node: Any) -> tuple[Node, float] | None:
    """(x, c) when ``node`` is x * c with a Python number c."""
    if is_op(node, aten.mul) and len(node.args) == 2:
        a, b = node.args
        if isinstance(b, (int, float)) and isinstance(a, Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, Node):
            return b, float(a)
    return None


def cast_dtype(node: Any) -> torch.dtype | None:
    """The dtype a cast node (_to_copy / to.*) converts to, None when it is not such a cast."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t = node.target
    if t is aten._to_copy.default or t is aten.to.dtype_layout:
        return node.kwargs.get("dtype")
    if t is aten.to.dtype:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    if t is aten.to.device:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    return None


def set_cast_dtype(node: Node, dtype: torch.dtype) -> None:
    """Make a cast node (see `cast_dtype`) convert to ``dtype``."""
    t = node.target
    if t is aten._to_copy.default or t is aten.to.dtype_layout or "dtype" in node.kwargs:
        node.kwargs = {**node.kwargs, "dtype": dtype}
    elif t is aten.to.dtype:
        node.args = (node.args[0], dtype, *node.args[2:])
    elif t is aten.to.device:
        node.args = (node.args[0], node.args[1], dtype, *node.args[3:])
    else:
        raise ValueError(f"{node.name} is not a cast")


CAST_OPS = (aten._to_copy, aten.to, aten.type_as, aten.clone, aten.alias, aten.contiguous, aten.lift_fresh_copy,
            aten.detach)
VIEW_OPS = (aten.unsqueeze, aten.squeeze, aten.expand, aten.view, aten.reshape, aten._unsafe_view, aten.permute,
            aten.transpose, aten.t, aten.repeat, aten.select, aten.flatten)


def through(node: Any, ops: Iterable[Any]) -> tuple[Any, list[Node]]:
    """Follow single-input ``ops`` upward from ``node``; returns the first other node and those passed."""
    ops = tuple(ops)
    passed: list[Node] = []
    while is_op(node, *ops):
        passed.append(node)
        node = node.args[0]
    return node, passed


# --------------------------------------------------------------------------------------------------
# Programs: placeholders backed by tensors
# --------------------------------------------------------------------------------------------------


def input_spec(ep: ExportedProgram, node: Node) -> InputSpec | None:
    if node.op != "placeholder":
        return None
    for spec in ep.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
            return spec
    return None


def placeholder_tensor(ep: ExportedProgram, node: Any) -> torch.Tensor | None:
    """The value of a parameter/buffer/constant placeholder (None for user inputs and other nodes)."""
    if not isinstance(node, Node):
        return None
    spec = input_spec(ep, node)
    if spec is None or spec.target is None:
        return None
    if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
        return ep.state_dict.get(spec.target)
    if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
        t = ep.constants.get(spec.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def set_placeholder_tensor(ep: ExportedProgram, node: Node, value: torch.Tensor) -> None:
    """Replace the tensor behind a parameter/buffer/constant placeholder (same shape, dtype)."""
    spec = input_spec(ep, node)
    if spec is None or spec.target is None:
        raise ValueError(f"{node.name} is not backed by a tensor of the program")
    old = placeholder_tensor(ep, node)
    if old is not None and (old.shape != value.shape or old.dtype != value.dtype):
        raise ValueError(f"{node.name}: new value {tuple(value.shape)} {value.dtype} does not match "
                         f"{tuple(old.shape)} {old.dtype}")
    value = value.to(old.device) if old is not None else value
    if spec.kind == InputKind.PARAMETER:
        ep.state_dict[spec.target] = torch.nn.Parameter(value, requires_grad=False)
    elif spec.kind == InputKind.BUFFER and spec.persistent:
        ep.state_dict[spec.target] = value
    else:
        ep.constants[spec.target] = value


def user_inputs(ep: ExportedProgram) -> list[Node]:
    names = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def fake_mode_of(graph: Graph):
    for n in graph.nodes:
        v = val(n)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


class GraphWriter:
    """Inserts ATen calls into ``ep``'s graph with ``meta["val"]`` computed on fake tensors."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.graph: Graph = ep.graph
        self.fake_mode = fake_mode_of(self.graph)
        self._added = 0

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, name: str | None = None) -> Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        if name:
            node.name = self.graph._graph_namespace.create_name(name, None)
        self._fill_meta(node)
        return node

    def _fill_meta(self, node: Node) -> None:
        def fake(a):
            return val(a) if isinstance(a, Node) else a

        args = torch.fx.node.map_aggregate(node.args, fake)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
        if self.fake_mode is None:
            return
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)

    def refresh(self, nodes: Iterable[Node]) -> None:
        """Recompute ``meta["val"]`` of ``nodes`` (in graph order) after their inputs changed."""
        wanted = set(nodes)
        for n in self.graph.nodes:
            if n in wanted and n.op == "call_function":
                self._fill_meta(n)

    def add_constant(self, stem: str, value: torch.Tensor) -> Node:
        """Lift ``value`` into the program as a new constant-tensor placeholder and return it."""
        ep = self.ep
        name = stem
        i = 0
        taken = set(ep.constants) | {n.name for n in self.graph.nodes}
        while name in taken:
            i += 1
            name = f"{stem}_{i}"
        user_names = set(ep.graph_signature.user_inputs)
        first_user = next((n for n in self.graph.nodes if n.op == "placeholder" and n.name in user_names), None)
        if first_user is None:
            first_user = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        with self.graph.inserting_before(first_user):
            node = self.graph.placeholder(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        specs = list(ep.graph_signature.input_specs)
        at = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
        specs.insert(at, InputSpec(kind=InputKind.CONSTANT_TENSOR, arg=TensorArgument(name=node.name),
                                   target=node.name, persistent=None))
        ep._graph_signature = ExportGraphSignature(input_specs=specs,
                                                   output_specs=list(ep.graph_signature.output_specs))
        ep.constants[node.name] = value
        self._added += 1
        return node
