"""RoPE rotations in ATen graphs identified by what they compute: the torch side of
`posrewrite.passes.onnx.rope.rotation_probe` (both read probe matrices with `passes.rotation_reading`).

Candidates come from structure (aten.cos / aten.sin, the values computed from them with constants and positions
only, the muls where they meet an activation, x the activation's nearest common ancestor through data movement,
y the first value combining every term); identity comes from evaluating the cone from x to y with torch on unit
vectors of x (parameters and buffers of the cone are the program's own; no weight outside it is touched). The
probe matrices are read by the same graph-free `read_matrices` as on the ONNX side.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.fx import Node

from posrewrite.math.precision import machine_epsilon
from posrewrite.passes.fx import _graph as g
from posrewrite.passes.rotation_reading import MatrixReading, NotARotation, read_matrices

aten = torch.ops.aten

#: ATen ops that only move, select, negate or retype activation elements
_MOVE = frozenset({
    "view", "_unsafe_view", "reshape", "slice", "select", "squeeze", "unsqueeze", "transpose", "permute", "neg",
    "cat", "stack", "clone", "_to_copy", "expand", "split", "split_with_sizes", "unbind", "chunk", "alias",
    "contiguous", "flatten", "unflatten", "t", "index_select", "to", "type_as",
})
_RESHAPE = frozenset({"view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "_to_copy", "clone",
                      "alias", "to", "type_as"})
_PROBE_POSITIONS = 16
_MAX_CHANNELS = 4096
_MAX_GRID_CHANNELS = 512  # one probe run per channel on a grid
_MAX_CONE_ELEMENTS = 1 << 23  # constants a rotation's cone may read (cos/sin tables of 64k x 128 fit)


def _name(node: Node) -> str:
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", str(node.target))


def _inputs(node: Node) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


class _Hidden:
    """Whether a node depends on hidden states: a user input (other than positions / masks) read other than
    through its size."""

    def __init__(self, ep: ExportedProgram) -> None:
        self._user = {n: not _position_like(n) for n in g.user_inputs(ep)}
        self._memo: dict[Node, bool] = {}

    def __call__(self, node: Node) -> bool:
        if node in self._memo:
            return self._memo[node]
        order = [node]
        stack = [node]
        while stack:  # iterative post-order
            n = stack.pop()
            for i in _inputs(n):
                if i not in self._memo and i not in order:
                    order.append(i)
                    stack.append(i)
        for n in reversed(order):
            if n in self._memo:
                continue
            if n.op == "placeholder":
                self._memo[n] = self._user.get(n, False)
            elif _name(n) in ("sym_size", "size", "sym_numel", "numel"):
                self._memo[n] = False
            else:
                self._memo[n] = any(self._memo.get(i, False) for i in _inputs(n))
        return self._memo[node]


def _position_like(node: Node) -> bool:
    v = g.val(node)
    name = node.name.lower()
    if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
        return False
    return "pos" in name or "mask" in name


def _family(seeds: list[Node], hidden: _Hidden) -> set[Node]:
    family: set[Node] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n in family:
            continue
        family.add(n)
        for user in n.users:
            if _name(user) in ("sym_size", "size"):
                continue
            if any(i not in family and i is not n and hidden(i) for i in _inputs(user)):
                continue
            stack.append(user)
    return family


def _ancestors(node: Node, limit: int = 64) -> list[Node]:
    found: list[Node] = []
    stack = [node]
    while stack and len(found) < limit:
        n = stack.pop()
        if n in found:
            continue
        found.append(n)
        if n.op != "call_function" or (_name(n) not in _MOVE and _name(n) != "getitem"):
            continue
        first = n.args[0] if n.args else None
        if isinstance(first, (list, tuple)):
            stack.extend(a for a in first if isinstance(a, Node))
        elif isinstance(first, Node):
            stack.append(first)
    return found


def _candidates(ep: ExportedProgram) -> list[tuple[list[Node], list[tuple[Node, Node, Node]]]]:
    """([x, ...] nearest first, [(mul, activation, factor)]) per group of cos/sin terms."""
    graph = ep.graph
    hidden = _Hidden(ep)
    seeds = [n for n in graph.nodes if g.is_op(n, aten.cos, aten.sin) and not hidden(n)]
    if not seeds:
        return []
    family = _family(seeds, hidden)
    order = {n: k for k, n in enumerate(graph.nodes)}
    groups: list[tuple[list[Node], list[tuple[Node, Node, Node]]]] = []
    for n in graph.nodes:
        if not g.is_op(n, aten.mul) or len(n.args) != 2 or not all(isinstance(a, Node) for a in n.args):
            continue
        a, b = n.args
        if a in family and b not in family and hidden(b):
            term = (n, b, a)
        elif b in family and a not in family and hidden(a):
            term = (n, a, b)
        else:
            continue
        anc = _ancestors(term[1])
        for common, members in groups:
            shared = [c for c in common if c in anc]
            if shared:
                common[:] = shared
                members.append(term)
                break
        else:
            groups.append((anc, [term]))
    return [(sorted(c, key=lambda v: order[v], reverse=True)[:4], m) for c, m in groups if len(m) >= 2]


def _output(x: Node, terms: list[tuple[Node, Node, Node]], ep: ExportedProgram) -> Node | None:
    need = {t[0]: k for k, t in enumerate(terms)}
    full = (1 << len(terms)) - 1
    deps: dict[Node, int] = {}
    y0 = None
    for n in ep.graph.nodes:
        mask = 0
        for i in _inputs(n):
            mask |= deps.get(i, 0)
        if n in need:
            mask |= 1 << need[n]
        if mask:
            deps[n] = mask
        if mask == full:
            y0 = n
            break
    if y0 is None:
        return None
    y = y0
    for _ in range(6):
        if g.rank(y) == g.rank(x) and g.last_dim(y) == g.last_dim(x):
            return y
        users = list(y.users)
        if len(users) != 1 or _name(users[0]) not in _RESHAPE:
            return y
        y = users[0]
    return y


def cone(x: Node, y: Node) -> list[Node]:
    seen: set[Node] = set()
    stack = [y]
    while stack:
        n = stack.pop()
        if n in seen or n is x:
            continue
        seen.add(n)
        stack.extend(_inputs(n))
    return [n for n in y.graph.nodes if n in seen]


def _cone_constant(ep: ExportedProgram, n: Node) -> torch.Tensor | None:
    """The program tensor behind placeholder `n` (None for a user input); NotARotation when it is large: a
    rotation's cone holds frequencies and tables, never weights (as the ONNX side's limit)."""
    tensor = g.placeholder_tensor(ep, n)
    if tensor is not None and tensor.numel() > _MAX_CONE_ELEMENTS:
        raise NotARotation(f"the rotation's cone reads {n.name} of {tensor.numel()} elements (a weight?)")
    return tensor


def _evaluate(ep: ExportedProgram, x: Node, y: Node, probe: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """y of `probe` fed at x: the cone's user inputs fed as positions 0..length-1 (batch `batch`), refused when y
    reads another activation than x (an input read other than through its sizes)."""
    hidden = _Hidden(ep)
    nodes = cone(x, y)
    inside = set(nodes)
    feeds: dict[Node, torch.Tensor] = {}
    for n in nodes:
        if n.op == "placeholder" and _cone_constant(ep, n) is None:
            sizes_only = all(_name(u) in ("sym_size", "size", "sym_numel", "numel") for u in n.users if u in inside)
            if hidden(n) and not sizes_only:
                raise NotARotation(f"the rotated value depends on {n.name} other than through {x.name}")
            feeds[n] = _position_feed(n, batch, length)
    return _run_cone(ep, x, y, probe, feeds)


def _position_feed(n: Node, batch: int, length: int) -> torch.Tensor:
    v = g.val(n)
    dims = [d if isinstance(d, int) else None for d in v.shape]
    shape = [d if d is not None else (batch if k == 0 and len(dims) > 1 else length) for k, d in enumerate(dims)]
    if "mask" in n.name.lower():
        return torch.ones(shape, dtype=v.dtype)
    return torch.arange(length, dtype=v.dtype).expand(shape).clone()


def probe(ep: ExportedProgram, x: Node, y: Node) -> MatrixReading:
    v = g.val(x)
    if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
        raise NotARotation("the rotated value is not a float tensor")
    dims = list(v.shape)
    width = g.static_int(dims[-1])
    if width is None or width > _MAX_CHANNELS:
        raise NotARotation("the rotated width is not static (or too large to probe)")
    symbolic = [k for k, d in enumerate(dims[:-1]) if g.static_int(d) is None]
    if symbolic in ([], [0]) and len(dims) >= 3:
        _identify_static(ep, x, y, dims)
    if symbolic and symbolic[0] != 0 and g.static_int(dims[0]) == 1:
        return _read(_probe_grid(ep, x, y, dims, symbolic), v.dtype)
    if len(symbolic) != 2 or symbolic[0] != 0:
        raise NotARotation(f"cannot tell batch and position axes of {tuple(dims)}")
    seq_axis, length = symbolic[1], _PROBE_POSITIONS
    shape = [width if k == 0 else (length if k == seq_axis else g.static_int(d)) for k, d in enumerate(dims)]
    probe_x = torch.zeros(shape, dtype=v.dtype)
    torch.movedim(probe_x, 0, -2)[...] = torch.eye(width, dtype=v.dtype)
    with torch.no_grad():
        try:
            out = _evaluate(ep, x, y, probe_x, width, length)
        except NotARotation:
            raise
        except Exception as exc:  # noqa: BLE001 - a cone that does not run on the probe is not a rotation
            raise NotARotation(f"probe run failed: {str(exc).splitlines()[0][:160]}") from exc
    if tuple(out.shape) != tuple(shape):
        raise NotARotation(f"rotated value {tuple(out.shape)} does not line up with its input {tuple(shape)}")
    m = np.moveaxis(out.double().numpy(), seq_axis, 1).reshape(width, length, -1, width)
    return _read(np.transpose(m, (2, 1, 3, 0)), v.dtype)


def _read(m_all: np.ndarray, dtype: torch.dtype) -> MatrixReading:
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    return read_matrices(m_all, max(1e-5, 8 * machine_epsilon(name)))


def _probe_grid(ep: ExportedProgram, x: Node, y: Node, dims: list, grid_axes: list[int]) -> np.ndarray:
    """Probe matrices [heads, positions, W, W] for a batch of one (static) over one or more symbolic position
    axes (a patch grid: rotary-embedding-torch's axial frequencies): one run per input channel, that unit vector
    at every grid point; the grid points, row-major, are the positions (point (0, .., 0) first: angle 0). Other
    inputs of the cone may be read only through their size (fed at the probe's grid), or be a position input
    (fed 0..n-1 on a 1-D sequence)."""
    width = g.static_int(dims[-1])
    if width is None or width > _MAX_GRID_CHANNELS:
        raise NotARotation("the rotated width is not static (or too large to probe on a grid)")
    side = max(2, round(_PROBE_POSITIONS ** (1 / len(grid_axes))))
    symbols = {str(dims[k]) for k in grid_axes}
    shape = [side if k in grid_axes else g.static_int(d) for k, d in enumerate(dims)]
    hidden = _Hidden(ep)
    inside = set(cone(x, y))
    feeds: dict[Node, torch.Tensor] = {}
    for n in inside:
        if n.op != "placeholder" or g.placeholder_tensor(ep, n) is not None:
            continue
        meta = g.val(n)
        sizes_only = all(_name(u) in ("sym_size", "size", "sym_numel", "numel") for u in n.users if u in inside)
        if len(grid_axes) == 1 and _position_like(n):
            feeds[n] = _position_feed(n, 1, side)
            continue
        if (hidden(n) and not sizes_only) or not isinstance(meta, torch.Tensor):
            raise NotARotation(f"the rotation over a grid reads {n.name} besides {x.name}")
        if any(g.static_int(d) is None and str(d) not in symbols for d in meta.shape):
            raise NotARotation(f"cannot tell the grid axes of {n.name} {tuple(meta.shape)}")
        feeds[n] = torch.zeros([side if g.static_int(d) is None else g.static_int(d) for d in meta.shape],
                               dtype=meta.dtype)
    runs = []
    for j in range(width):
        probe_x = torch.zeros(shape, dtype=g.val(x).dtype)
        probe_x[..., j] = 1
        with torch.no_grad():
            try:
                out = _run_cone(ep, x, y, probe_x, feeds)
            except NotARotation:
                raise
            except Exception as exc:  # noqa: BLE001 - a cone that does not run on the probe is not a rotation
                raise NotARotation(f"probe run failed: {str(exc).splitlines()[0][:160]}") from exc
        if tuple(out.shape) != tuple(shape):
            raise NotARotation(f"rotated value {tuple(out.shape)} does not line up with its input {tuple(shape)}")
        moved = np.moveaxis(out.double().numpy()[0], [a - 1 for a in grid_axes], range(len(grid_axes)))
        runs.append(moved.reshape(side ** len(grid_axes), -1, width))  # [P, heads, i]
    return np.transpose(np.stack(runs), (2, 1, 3, 0))


class StaticLength(Exception):
    """A rotation identified on a program whose sequence length is fixed (a static export): it cannot run past
    that many positions, so no rescale helps; the message says so and what to do (as on the ONNX side)."""


def _identify_static(ep: ExportedProgram, x: Node, y: Node, dims: list) -> None:
    """x has no symbolic position axis: each static axis before the channels is tried as the positions (one run
    per channel, its unit vector everywhere, the program's own sizes); a rotation read there raises
    `StaticLength`, else this returns (not identified)."""
    width = g.static_int(dims[-1])
    if width is None or width > _MAX_GRID_CHANNELS or any(g.static_int(d) is None for d in dims[1:]):
        return
    hidden = _Hidden(ep)
    inside = set(cone(x, y))
    shape = [g.static_int(d) or 1 for d in dims]
    for axis in range(len(dims) - 2, 0, -1):
        n = shape[axis]
        if n < 2:
            continue
        feeds: dict[Node, torch.Tensor] = {}
        try:
            for p in inside:
                if p.op != "placeholder" or g.placeholder_tensor(ep, p) is not None:
                    continue
                sizes_only = all(_name(u) in ("sym_size", "size", "sym_numel", "numel") for u in p.users if u in inside)
                if hidden(p) and not sizes_only:
                    return
                feeds[p] = _position_feed(p, shape[0], n)
            runs = []
            for j in range(width):
                probe_x = torch.zeros(shape, dtype=g.val(x).dtype)
                probe_x[..., j] = 1
                with torch.no_grad():
                    out = _run_cone(ep, x, y, probe_x, feeds)
                if tuple(out.shape) != tuple(shape):
                    raise NotARotation("shapes do not line up")
                runs.append(np.moveaxis(out.double().numpy(), axis, 0).reshape(n, -1, width))
            reading = _read(np.transpose(np.stack(runs), (2, 1, 3, 0)), g.val(x).dtype)
        except Exception:  # noqa: BLE001 - this axis is not the positions of a rotation
            continue
        if reading.rotary_dim:
            raise StaticLength(
                f"RoPE rotation of {x.name} exported at a fixed length of {n} positions (a static export: the "
                f"program cannot run past {n}); re-export with a dynamic sequence axis (torch.export "
                "dynamic_shapes) and rewrite that")


def _run_cone(ep: ExportedProgram, x: Node, y: Node, probe_x: torch.Tensor, feeds: dict[Node, torch.Tensor]
              ) -> torch.Tensor:
    env: dict[Node, object] = {x: probe_x}
    for n in cone(x, y):
        if n.op == "placeholder":
            tensor = _cone_constant(ep, n)
            env[n] = tensor if tensor is not None else feeds[n]
        elif n.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            kwargs = {k: (torch.device("cpu") if k == "device" else a) for k, a in kwargs.items()}
            env[n] = n.target(*args, **kwargs)
        else:
            raise NotARotation(f"cannot evaluate {n.op} {n.name}")
    out = env[y]
    if not isinstance(out, torch.Tensor):
        raise NotARotation("the rotated value is not a tensor")
    return out


def probed_rotations(ep: ExportedProgram, claimed: set[Node]
                     ) -> tuple[list[tuple[Node, Node, Node, Node, MatrixReading, tuple[Node, ...]]], list[str],
                                list[tuple[Node, str]]]:
    """[(x, y, cos, sin, reading, nodes)] for rotations no pattern claimed, why other candidates are not, and
    [(y, reason)] for rotations identified but not rewritable (a static export)."""
    found, failed, refused = [], [], []
    for xs, terms in _candidates(ep):
        if any(t[0] in claimed for t in terms):
            continue
        why = None
        for x in xs:
            y = _output(x, terms, ep)
            if y is None or y in claimed:
                continue
            try:
                reading = probe(ep, x, y)
            except StaticLength as exc:
                refused.append((y, str(exc)))
                why = None
                break
            except (NotARotation, ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
                why = why or f"{y.name}: {exc}"
                continue
            cos = next((t[2] for t in terms if _trig(t[2]) == "cos"), terms[0][2])
            sin = next((t[2] for t in terms if _trig(t[2]) == "sin" and t[2] is not cos), terms[-1][2])
            found.append((x, y, cos, sin, reading, tuple(cone(x, y))))
            why = None
            break
        if why:
            failed.append(why)
    return found, failed, refused


def _trig(node: Node, limit: int = 32) -> str | None:
    stack, seen = [node], []
    while stack and len(seen) < limit:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.append(n)
        if g.is_op(n, aten.cos):
            return "cos"
        if g.is_op(n, aten.sin):
            return "sin"
        stack.extend(_inputs(n))
    return None
