"""Finds RoPE in an ONNX graph and describes it as `RopeSite`s.

Three steps: (1) the rotation patterns (`rope_patterns`) find every q/k application and the cos/sin
values it multiplies with; (2) each cos/sin value is traced upstream through broadcasting ops to its
source: Cos/Sin of computed angles, a row selection of a constant table, or a fused RotaryEmbedding
node; (3) the angle computation is read: inv_freq (a constant, or folded from a base), positions and
their dtype, any attention factor. Applications sharing a source form one site.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from posrewrite.math import rope as rope_math
from posrewrite.math.precision import machine_epsilon
from posrewrite.passes.onnx._graph import VIEW_OPS, ConstantEvaluator, dtype_name, int_attr, last_dim, rank
from posrewrite.passes.onnx.rope_patterns import ApplicationMatch, find_applications, read_slice
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import AngleSource, Layout, RopeApplication, RopeSite

_FUSED_DOMAINS = {"com.microsoft": "contrib", "": "onnx", "ai.onnx": "onnx"}


@dataclasses.dataclass
class _Source:
    """Where one cos (or sin) value comes from."""

    kind: AngleSource
    value: ir.Value  # the site-level value (Cos output or its attention-factor Mul; or the gathered table rows)
    trig_node: ir.Node | None = None  # Cos/Sin for computed
    factor: float = 1.0
    factor_node: ir.Node | None = None
    table: ir.Value | None = None  # cached: the constant table
    columns: tuple[int, int] | None = None  # cached: column range of the table holding this function
    select_node: ir.Node | None = None  # cached: Gather/Slice selecting rows by position
    path: tuple[ir.Node, ...] = ()


class RopeDetector:
    def __init__(self, model: ir.Model) -> None:
        self.model = model
        _ensure_ranks(model)
        opset = model.opset_imports.get("", 18)
        self.fold = ConstantEvaluator(opset)
        self.tracer = orp.MatchingTracer()
        self.refusals: list[Refusal] = []

    # -- step 2: cos/sin value -> source -------------------------------------------------------
    def _source_of(self, value: ir.Value) -> _Source | str:
        path: list[ir.Node] = []
        factor, factor_node = 1.0, None
        v = value
        columns: tuple[int, int] | None = None
        for _ in range(64):
            node = v.producer()
            if node is None:
                return f"{value.name} is a graph input or constant without a position lookup"
            op = node.op_type
            if op in ("Cos", "Sin"):
                site_value = factor_node.outputs[0] if factor_node is not None else node.outputs[0]
                return _Source(
                    AngleSource.COMPUTED,
                    value=site_value,
                    trig_node=node,
                    factor=factor,
                    factor_node=factor_node,
                    path=tuple(path),
                )
            if op == "Mul":
                a, b = node.inputs
                ca, cb = self.fold(a), self.fold(b)
                scalar = ca if ca is not None and ca.size == 1 else cb if cb is not None and cb.size == 1 else None
                if scalar is not None and factor_node is None:
                    factor, factor_node = float(scalar.reshape(-1)[0]), node
                    path.append(node)
                    v = b if scalar is ca else a
                    continue
                return f"{value.name}: cos/sin scaled by a non-constant ({node.name})"
            if op in ("GatherElements", "Gather") and self._repeats_columns(node):
                path.append(node)  # repeat_interleave of the columns (interleaved layouts)
                v = node.inputs[0]
                continue
            if op in ("Gather", "Slice", "Split", "GatherElements", "GatherND"):
                data = node.inputs[0]
                table = None
                if data is not None and op != "Split":
                    root = self._stored_table(data)
                    if root is not None:
                        data, table = root, self.fold(root)
                if op in ("Slice", "Split") and self._last_axis_op(node):
                    # a column range of a combined table (e.g. GPT-J's concat(sin, cos))
                    rng = self._column_range(node, v)
                    if rng is None:
                        return f"{value.name}: column split {node.name} not understood"
                    columns = rng if columns is None else (rng[0] + columns[0], rng[0] + columns[1])
                    path.append(node)
                    v = data
                    continue
                if table is not None and table.ndim >= 2:
                    return _Source(AngleSource.CACHED, value=node.outputs[0], table=data, columns=columns,
                                   select_node=node, factor=factor, factor_node=factor_node, path=tuple(path))
                path.append(node)
                v = data
                continue
            if op in VIEW_OPS:
                path.append(node)
                v = node.inputs[0]
                continue
            if op == "Concat" and len(node.inputs) >= 2 and all(i is node.inputs[0] for i in node.inputs):
                path.append(node)  # repeat of cos along an axis
                v = node.inputs[0]
                continue
            return f"{value.name}: reached {op} ({node.name}) while looking for cos/sin"
        return f"{value.name}: source too far upstream"

    def _repeats_columns(self, node: ir.Node) -> bool:
        """A gather along the last axis with constant indices that only repeats columns in order."""
        indices = self.fold(node.inputs[1])
        if indices is None or indices.size == 0:
            return False
        axis = int_attr(node, "axis", 0)
        r = rank(node.inputs[0])
        if not (axis == -1 or (r is not None and axis == r - 1)):
            return False
        cols = np.asarray(indices).reshape(-1, indices.shape[-1])
        row = cols[0]
        return bool(np.all(cols == row)) and bool(np.all(np.diff(row) >= 0)) and row[0] == 0

    def _stored_table(self, value: ir.Value) -> ir.Value | None:
        """The initializer/Constant a table operand is broadcast from (through Expand/Tile/Unsqueeze...)."""
        v = value
        for _ in range(16):
            if ir.convenience.get_const_tensor(v) is not None:
                return v
            node = v.producer()
            if node is None or node.op_type not in ("Expand", "Tile", "Unsqueeze", "Reshape", "Identity", "Cast"):
                return None
            v = node.inputs[0]
        return None

    def _is_small_constant(self, v: ir.Value) -> bool:
        t = ir.convenience.get_const_tensor(v)
        return t is not None

    def _last_axis_op(self, node: ir.Node) -> bool:
        if node.op_type == "Split":
            axis = int_attr(node, "axis", 0)
            r = rank(node.inputs[0])
            return axis == -1 or (r is not None and axis == r - 1)
        spec = read_slice(node, self.fold)
        return spec is not None and spec.axis == -1

    def _column_range(self, node: ir.Node, out: ir.Value) -> tuple[int, int] | None:
        if node.op_type == "Slice":
            spec = read_slice(node, self.fold)
            width = last_dim(node.inputs[0])
            end = spec.end if width is None else min(spec.end, width)
            return (spec.start, end) if spec.step == 1 else None
        sizes = self.fold(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None and node.attributes.get("split") is not None:
            sizes = np.array(node.attributes["split"].value)
        index = list(node.outputs).index(out)
        if sizes is None:
            width = last_dim(node.inputs[0])
            if width is None:
                return None
            n = len(node.outputs)
            sizes = np.full(n, width // n)
        start = int(np.sum(sizes[:index]))
        return start, start + int(sizes[index])

    # -- step 3: angles --------------------------------------------------------------------------
    def _read_angles(self, cos_src: _Source) -> dict | str:
        """inv_freq, positions and dtypes of computed angles."""
        angles = cos_src.trig_node.inputs[0]
        v = angles
        duplicated = None
        for _ in range(16):
            node = v.producer()
            if node is None:
                return "angles are a graph input"
            if node.op_type == "Concat" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
                duplicated = "concat"
                v = node.inputs[0]
                continue
            if node.op_type in ("Transpose", "Reshape", "Unsqueeze", "Expand", "Tile", "Squeeze"):
                if node.op_type in ("Reshape", "Expand", "Tile"):
                    duplicated = duplicated or "repeat"
                v = node.inputs[0]
                continue
            if node.op_type in ("Cast", "Identity"):
                v = node.inputs[0]
                continue
            if node.op_type in ("Mul", "MatMul", "Einsum"):
                break
            return f"angles produced by {node.op_type} ({node.name}), expected positions x inv_freq"
        else:
            return "angle computation too deep"
        product = node
        if product.op_type == "Einsum":
            operands = list(product.inputs)
        else:
            operands = list(product.inputs[:2])
        freq_info = [self._constant_root(o) for o in operands]
        consts = [k for k, f in enumerate(freq_info) if f is not None]
        runtime = None
        selected = None
        if not consts:
            for k, operand in enumerate(operands):
                marked = _runtime_marker(operand)
                if marked is not None:
                    marker_value, runtime = marked
                    freq_info[k] = (marker_value, None, None, np.asarray(runtime["inv_freq"], np.float32))
                    consts = [k]
                    break
        if not consts:
            for k, operand in enumerate(operands):
                found = self._length_selected(operand)
                if found is not None:
                    root, use_node, use_index, selected = found
                    freq_info[k] = (root, use_node, use_index, selected["short"])
                    consts = [k]
                    break
        if len(consts) != 1:
            return (
                f"angle product {product.name}: expected exactly one constant operand (inv_freq), found {len(consts)}"
            )
        k = consts[0]
        root_value, use_node, use_index, arr = freq_info[k]
        positions = operands[1 - k]
        inv_freq = np.asarray(arr, dtype=np.float64).reshape(-1)
        pos_root = positions
        for _ in range(16):
            p = pos_root.producer()
            if p is None or p.op_type not in ("Cast", "Unsqueeze", "Reshape", "Expand", "Transpose", "Squeeze"):
                break
            pos_root = p.inputs[0]
        consumer = use_node if use_node is not None else product
        rescaled = consumer.metadata_props.get(RESCALED_KEY)
        return {
            "rescaled": json.loads(rescaled) if rescaled else None,
            "product": product,
            "inv_freq": inv_freq.astype(np.float32),
            "inv_freq_root": root_value,
            "inv_freq_use": (use_node, use_index),
            "positions": positions,
            "position_source": pos_root,
            "position_dtype": dtype_name(positions),
            "angle_dtype": dtype_name(product.outputs[0]),
            "duplicated": duplicated,
            "runtime": runtime,
            "selected": selected,
        }

    def _length_selected(self, value: ir.Value):
        """HF's LongRoPE export: inv_freq = Where(max(position)+1 > L, long, short) with constant branches.
        Returns (the Where output, its consumer, input index, {"threshold", "short", "long"}) or None."""
        use_node, use_index = None, None
        v = value
        for _ in range(16):
            node = v.producer()
            if node is None:
                return None
            if node.op_type == "Where":
                break
            if node.op_type not in ("Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Transpose"):
                return None
            use_node, use_index = node, 0
            v = node.inputs[0]
        else:
            return None
        cond, long_v, short_v = node.inputs
        compare = cond.producer() if cond is not None else None
        if compare is None or compare.op_type not in ("Greater", "Less"):
            return None
        a, b = (self.fold(x) for x in compare.inputs)
        threshold = b if compare.op_type == "Greater" else a
        if threshold is None or (a is None) == (b is None) or np.asarray(threshold).size != 1:
            return None
        long_f, short_f = self.fold(long_v), self.fold(short_v)
        if long_f is None or short_f is None or np.asarray(long_f).size != np.asarray(short_f).size:
            return None
        return v, use_node, use_index, {
            "threshold": int(np.asarray(threshold).reshape(-1)[0]),
            "short": np.asarray(short_f, np.float32).reshape(-1),
            "long": np.asarray(long_f, np.float32).reshape(-1),
        }

    def _constant_root(self, value: ir.Value, ops=("Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Transpose")):
        """The first constant-evaluable value walking up through broadcasting ops, with the (node, input
        index) where it is consumed; None when the operand depends on runtime data."""
        use_node, use_index = None, None
        v = value
        for _ in range(16):
            arr = self.fold(v)
            if arr is not None:
                return v, use_node, use_index, arr
            node = v.producer()
            if node is None or node.op_type not in ops:
                return None
            use_node, use_index = node, 0
            v = node.inputs[0]
        return None

    # -- assembling sites ------------------------------------------------------------------------
    def detect(self) -> list[RopeSite]:
        applications = find_applications(self.model, self.fold, self.tracer)
        groups: dict[int, list[tuple[ApplicationMatch, _Source, _Source]]] = {}
        for app in applications:
            cs, ss = self._source_of(app.cos), self._source_of(app.sin)
            if isinstance(cs, str) or isinstance(ss, str):
                self.refusals.append(Refusal("rope", app.output.name or "?", cs if isinstance(cs, str) else ss))
                continue
            if cs.kind != ss.kind:
                self.refusals.append(
                    Refusal("rope", app.output.name or "?", "cos and sin come from different kinds of source")
                )
                continue
            key = id(cs.trig_node.inputs[0]) if cs.kind == AngleSource.COMPUTED else id(cs.table) * 31 + id(ss.table)
            groups.setdefault(key, []).append((app, cs, ss))
        sites = []
        for members in groups.values():
            site = self._make_site(members)
            if isinstance(site, str):
                self.refusals.append(Refusal("rope", members[0][0].output.name or "?", site))
            else:
                sites.append(site)
        sites.extend(self._fused_sites())
        self._unclaimed_trig(sites)
        for site in sites:
            self._unmatched_uses(site)
        return sites

    def _unmatched_uses(self, site: RopeSite) -> None:
        """Multiplications by this site's cos/sin that no rotation pattern accounts for (a layer exported
        differently): rewriting the site would change them without the tool understanding them."""
        if site.angles == AngleSource.FUSED_OP:
            return
        claimed = {id(n) for app in site.applications for n in app.nodes}
        claimed.update(id(n) for n in site.source_nodes if n is not None)
        for root in (site.cos, site.sin):
            stack, seen = [root], set()
            while stack:
                v = stack.pop()
                if id(v) in seen:
                    continue
                seen.add(id(v))
                for use in v.uses():
                    node = use.node
                    if id(node) in claimed or node.op_type in ("Shape", "Size"):
                        continue  # reading only the shape is not a use of the values
                    if (
                        node.op_type in VIEW_OPS
                        or node.op_type in ("Slice", "Split", "Gather", "GatherElements", "GatherND")
                        or (node.op_type == "Mul" and any(self._scalar(i) for i in node.inputs if i is not v))
                    ):
                        stack.extend(node.outputs)
                        continue
                    if node.op_type == "Concat" and all(i is v for i in node.inputs):
                        stack.extend(node.outputs)
                        continue
                    self.refusals.append(
                        Refusal(
                            "rope",
                            node.name or "?",
                            f"{node.op_type} uses the RoPE {'cos' if root is site.cos else 'sin'} of a site but is "
                            "not part of a recognised q/k rotation",
                        )
                    )

    def _scalar(self, v: ir.Value | None) -> bool:
        arr = self.fold(v) if v is not None else None
        return arr is not None and arr.size == 1

    def _application(self, app: ApplicationMatch) -> RopeApplication:
        x, out = app.x, app.output
        head_dim = last_dim(x)
        nodes = list(app.nodes)
        # partial rotary: x = full[..., :rd] and out is concatenated with full[..., rd:]
        prod = x.producer()
        if prod is not None and prod.op_type == "Slice":
            spec = read_slice(prod, self.fold)
            full = prod.inputs[0]
            if spec is not None and spec.axis == -1 and spec.start == 0 and spec.step == 1:
                for use in out.uses():
                    cat = use.node
                    if cat.op_type == "Concat" and len(cat.inputs) == 2 and cat.inputs[0] is out:
                        other = cat.inputs[1].producer()
                        ospec = read_slice(other, self.fold) if other is not None else None
                        if ospec is not None and other.inputs[0] is full and ospec.start == spec.end:
                            x, out, head_dim = full, cat.outputs[0], last_dim(full)
                            nodes.extend([prod, other, cat])
                        break
        if head_dim is None:
            head_dim = app.rotary_dim if last_dim(x) is None else last_dim(x)
        num_heads = None
        if x.shape is not None and len(x.shape) == 4 and isinstance(x.shape[1], int):
            num_heads = x.shape[1]
        return RopeApplication(input=x, output=out, layout=app.layout, rotary_dim=app.rotary_dim,
                               head_dim=head_dim, num_heads=num_heads, nodes=tuple(nodes), cos=app.cos, sin=app.sin)

    def _make_site(self, members) -> RopeSite | str:
        apps = [self._application(m[0]) for m in members]
        _, cs, ss = members[0]
        layouts = {a.layout for a in apps}
        rotary_dims = {a.rotary_dim for a in apps}
        if len(layouts) != 1 or len(rotary_dims) != 1:
            return "applications sharing one cos/sin disagree on layout or rotary_dim"
        layout, rotary_dim = layouts.pop(), rotary_dims.pop()
        head_dims = {a.head_dim for a in apps if a.head_dim is not None}
        head_dim = max(head_dims) if head_dims else None
        notes = []
        if cs.kind == AngleSource.COMPUTED:
            info = self._read_angles(cs)
            if isinstance(info, str):
                return info
            if ss.trig_node.inputs[0] is not cs.trig_node.inputs[0]:
                return "cos and sin are computed from different angles"
            inv_freq = info["inv_freq"]
            if 2 * inv_freq.size != rotary_dim:
                return f"inv_freq has {inv_freq.size} entries but the rotation spans {rotary_dim} channels"
            if not np.isclose(cs.factor, ss.factor, rtol=1e-6):
                return "cos and sin are scaled by different factors"
            if info["runtime"] is not None:
                r = info["runtime"]
                notes.append(f"inv_freq computed at run time ({r['rope_type']} x{r['factor']:g} "
                             f"from L={r['original_max_position_embeddings']}, "
                             "written by posrewrite); base and inv_freq shown are the model's before that rescale")
            base = _fit_base(inv_freq, info["inv_freq_root"])
            prior = None
            if info["selected"] is not None:
                sel = info["selected"]
                ratio = sel["short"].astype(np.float64) / sel["long"].astype(np.float64)
                prior = rope_math.PriorScaling("by_length", float(np.max(ratio)), 0)
                notes.append(f"inv_freq switches at run time (LongRoPE export): the short frequencies up to "
                             f"{sel['threshold']} tokens, the long ones (up to {np.max(ratio):.4g}x slower) beyond; "
                             "inv_freq shown is the short one")
                if base is None:
                    notes.append("the base is not recoverable from LongRoPE frequencies: a rescale needs "
                                 "--rope-base or a config.json with rope_theta beside the model")
            elif base is None and info["rescaled"] and info["rescaled"].get("base"):
                r = info["rescaled"]
                base = float(r["base"])
                prior = rope_math.PriorScaling("rewritten", float(r.get("factor") or 1.0), 0)
                notes.append(f"inv_freq written by posrewrite ({r['rope_type']} x{r.get('factor') or 1:g} from base "
                             f"{base:g}); a rescale starts again from that base")
            elif base is None:
                base, prior = _fit_scaled_base(inv_freq, info["inv_freq_root"], notes)
            if base is not None and info["inv_freq_root"].dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                # a half-precision copy of b^(-2i/d): the frequencies the model means are the exact ones
                inv_freq = rope_math.default_inv_freq(base, rotary_dim)
                notes.append(f"inv_freq stored in {dtype_name(info['inv_freq_root'])}: exact base-{base:g} "
                             "frequencies assumed")
            return RopeSite(
                layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, angles=AngleSource.COMPUTED,
                base=base, inv_freq=inv_freq, inv_freq_value=info["inv_freq_root"],
                max_positions=None, position_dtype=info["position_dtype"], angle_dtype=info["angle_dtype"],
                attention_factor=cs.factor, positions=info["positions"], cos=cs.value, sin=ss.value,
                applications=tuple(apps), source_nodes=(cs.trig_node, ss.trig_node, info["product"]),
                notes=tuple(notes), prior_scaling=prior, extra=_Extra(cos_src=cs, sin_src=ss, angles=info),
            )
        # cached tables
        cos_table = self._table(cs)
        sin_table = self._table(ss)
        if cos_table is None or sin_table is None or cos_table.shape != sin_table.shape:
            return "cos/sin tables have different or unknown shapes"
        fitted = _fit_tables(cos_table, sin_table, layout, _eps(cs.table))
        if isinstance(fitted, str):
            return fitted
        inv_freq, factor = fitted
        if 2 * inv_freq.size != rotary_dim:
            return f"cache holds {2 * inv_freq.size} rotary channels but the rotation spans {rotary_dim}"
        sel = cs.select_node
        positions = sel.inputs[1] if sel.op_type in ("Gather", "GatherElements", "GatherND") else None
        base, prior = rope_math.fit_base(inv_freq), None
        if base is None:
            base, prior = _fit_scaled_base(inv_freq, None, notes)
        return RopeSite(
            layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, angles=AngleSource.CACHED,
            base=base, inv_freq=inv_freq, inv_freq_value=None, prior_scaling=prior,
            max_positions=int(cos_table.shape[0]),
            position_dtype=dtype_name(positions) if positions is not None else "int64",
            angle_dtype=dtype_name(cs.table), attention_factor=factor * cs.factor, positions=positions,
            cos=cs.value, sin=ss.value, cos_cache=cs.table, sin_cache=ss.table, applications=tuple(apps),
            source_nodes=(cs.select_node, ss.select_node), notes=tuple(notes),
            extra=_Extra(cos_src=cs, sin_src=ss, angles=None),
        )

    def _table(self, src: _Source) -> np.ndarray | None:
        t = self.fold(src.table)
        if t is None:
            return None
        t = np.asarray(t, dtype=np.float64)
        if src.columns is not None:
            t = t[..., src.columns[0]:src.columns[1]]
        # drop broadcast axes of size 1: [1, N, w] or [N, 1, w] -> [N, w]
        kept = [d for d in t.shape[:-1] if d != 1] or [1]
        return t.reshape(kept + [t.shape[-1]]) if len(kept) == 1 else t

    def _fused_sites(self) -> list[RopeSite]:
        sites = []
        by_cache: dict[tuple[int, int], list[ir.Node]] = {}
        for node in self.model.graph:
            if _is_rotary_attention(node):
                cos_v, sin_v = _attention_caches(node)
                if cos_v is None or sin_v is None:
                    self.refusals.append(Refusal("rope", node.name or "?", "GroupQueryAttention with do_rotary=1 "
                                                 "but no cos_cache/sin_cache inputs"))
                    continue
                by_cache.setdefault((id(cos_v), id(sin_v)), []).append(node)
                continue
            if node.op_type != "RotaryEmbedding" or node.domain not in _FUSED_DOMAINS:
                continue
            contrib = node.domain == "com.microsoft"
            if len(node.inputs) < (4 if contrib else 3):  # a malformed node: cos/sin caches missing
                continue
            cos_v, sin_v = (node.inputs[2], node.inputs[3]) if contrib else (node.inputs[1], node.inputs[2])
            by_cache.setdefault((id(cos_v), id(sin_v)), []).append(node)
        for nodes in by_cache.values():
            node = nodes[0]
            if _is_rotary_attention(node):
                site = self._attention_site(nodes)
                if isinstance(site, str):
                    self.refusals.append(Refusal("rope", node.name or "?", site))
                else:
                    sites.append(site)
                continue
            contrib = node.domain == "com.microsoft"
            cos_v, sin_v = (node.inputs[2], node.inputs[3]) if contrib else (node.inputs[1], node.inputs[2])
            positions = node.inputs[1] if contrib else (node.inputs[3] if len(node.inputs) > 3 else None)
            cos_t, sin_t = self.fold(cos_v), self.fold(sin_v)
            interleaved = bool(int_attr(node, "interleaved", 0))
            layout = Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF
            if cos_t is None or sin_t is None:
                self.refusals.append(Refusal("rope", node.name or "?",
                                             "fused RotaryEmbedding whose caches are computed at run time"))
                continue
            fitted = _fit_tables(np.asarray(cos_t, np.float64), np.asarray(sin_t, np.float64), "half", _eps(cos_v))
            if isinstance(fitted, str):
                self.refusals.append(Refusal("rope", node.name or "?", fitted))
                continue
            inv_freq, factor = fitted
            rotary_dim = int_attr(node, "rotary_embedding_dim", 0) or 2 * inv_freq.size
            head_dim = last_dim(node.inputs[0])
            num_heads = int_attr(node, "num_heads", 0) or None
            if head_dim is not None and rank(node.inputs[0]) == 3 and num_heads:
                head_dim //= num_heads
            notes = [f"fused {_FUSED_DOMAINS[node.domain]} RotaryEmbedding"]
            base, prior = rope_math.fit_base(inv_freq), None
            if base is None:
                base, prior = _fit_scaled_base(inv_freq, None, notes)
                base, prior = _rewritten_base(self.model.graph, cos_v, base, prior, notes)
            sites.append(RopeSite(
                layout=layout, head_dim=head_dim, rotary_dim=rotary_dim, angles=AngleSource.FUSED_OP,
                base=base, inv_freq=inv_freq, inv_freq_value=None, prior_scaling=prior,
                max_positions=int(cos_t.shape[0]),
                position_dtype=dtype_name(positions) if positions is not None else "int64",
                angle_dtype=dtype_name(cos_v), attention_factor=factor, positions=positions, cos=cos_v, sin=sin_v,
                cos_cache=cos_v, sin_cache=sin_v, fused_nodes=tuple(nodes), notes=tuple(notes),
                extra=_marker_extra(self.model.graph, cos_v, prior),
            ))
        return sites

    def _attention_site(self, nodes: list[ir.Node]) -> RopeSite | str:
        """RoPE applied inside com.microsoft.GroupQueryAttention (do_rotary=1): its caches [rows, rotary_dim/2]
        are the site's tables; positions are the op's own (past length + 0..S-1)."""
        node = nodes[0]
        cos_v, sin_v = _attention_caches(node)
        producer = cos_v.producer()
        if producer is not None and producer.op_type == "If":
            return self._switched_attention_site(nodes, producer)
        cos_t, sin_t = self.fold(cos_v), self.fold(sin_v)
        if cos_t is None or sin_t is None:
            return f"{node.op_type} whose cos/sin caches are computed at run time"
        cos_t, sin_t = np.asarray(cos_t, np.float64), np.asarray(sin_t, np.float64)
        if cos_t.ndim != 2 or cos_t.shape != sin_t.shape:
            return f"{node.op_type} caches of shapes {cos_t.shape} and {sin_t.shape}, expected two [rows, rotary_dim/2]"
        fitted = _fit_tables(cos_t, sin_t, "half", _eps(cos_v))
        if isinstance(fitted, str):
            return fitted
        inv_freq, factor = fitted
        interleaved = bool(int_attr(node, "rotary_interleaved", 0))
        rotary_dim = 2 * inv_freq.size
        head_dim = _attention_head_size(node)
        if head_dim is not None and rotary_dim > head_dim:
            return f"{node.op_type} caches rotate {rotary_dim} channels but heads have {head_dim}"
        notes = [f"rotary inside com.microsoft.{node.op_type} (do_rotary=1, rotary_interleaved={int(interleaved)}): "
                 f"{len(nodes)} node(s) share caches {cos_v.name}/{sin_v.name} [{cos_t.shape[0]}, {cos_t.shape[1]}]; "
                 "positions are the op's own (past length + 0..S-1)"]
        if head_dim is not None and rotary_dim < head_dim:
            notes.append(f"partial rotary: {rotary_dim} of {head_dim} channels")
        base, prior = rope_math.fit_base(inv_freq), None
        if base is None:
            base, prior = _fit_scaled_base(inv_freq, None, notes)
            base, prior = _rewritten_base(self.model.graph, cos_v, base, prior, notes)
        return RopeSite(
            layout=Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF, head_dim=head_dim, rotary_dim=rotary_dim,
            angles=AngleSource.FUSED_OP, base=base, inv_freq=inv_freq, inv_freq_value=None, prior_scaling=prior,
            max_positions=int(cos_t.shape[0]), position_dtype="int32", angle_dtype=dtype_name(cos_v),
            attention_factor=factor, positions=None, cos=cos_v, sin=sin_v, cos_cache=cos_v, sin_cache=sin_v,
            fused_nodes=tuple(nodes), notes=tuple(notes), op=f"com.microsoft.{node.op_type}",
            extra=_marker_extra(self.model.graph, cos_v, prior),
        )

    def _switched_attention_site(self, nodes: list[ir.Node], if_node: ir.Node) -> RopeSite | str:
        """onnxruntime-genai's LongRoPE form (Phi-3/3.5 128k): If(length > L) selects constant long caches [N, d/2]
        (then) or short caches [L, d/2] (else), fed to GroupQueryAttention."""
        node = nodes[0]
        cos_v, sin_v = _attention_caches(node)
        why = f"{node.op_type} caches chosen at run time by If ({if_node.name})"
        if sin_v.producer() is not if_node:
            return f"{why}, but its sin cache comes from elsewhere"
        compare = if_node.inputs[0].producer() if if_node.inputs and if_node.inputs[0] is not None else None
        threshold = self.fold(compare.inputs[1]) if compare is not None and compare.op_type == "Greater" else None
        if threshold is None or np.asarray(threshold).size != 1:
            return f"{why}: the condition is not Greater(length, constant)"
        L = int(np.asarray(threshold).reshape(-1)[0])
        outputs = list(if_node.outputs)
        ci, si = outputs.index(cos_v), outputs.index(sin_v)
        branches = {}
        for name in ("then_branch", "else_branch"):
            attr = if_node.attributes.get(name)
            graph = attr.value if attr is not None else None
            consts = []
            for k in (ci, si):
                value = graph.outputs[k] if graph is not None and len(graph.outputs) > max(ci, si) else None
                producer = value.producer() if value is not None else None
                is_const = producer is not None and producer.op_type == "Constant"
                tensor = producer.attributes.get("value") if is_const else None
                if tensor is None:
                    return f"{why}: its {name} does not output constant caches"
                consts.append((producer, np.asarray(tensor.value.numpy(), np.float64)))
            fitted = _fit_tables(consts[0][1], consts[1][1], "half", _eps(cos_v))
            if isinstance(fitted, str):
                return f"{why}, {name}: {fitted}"
            branches[name] = (consts, fitted)
        (long_consts, (long_inv, long_factor)) = branches["then_branch"]
        (short_consts, (short_inv, short_factor)) = branches["else_branch"]
        rows = int(long_consts[0][1].shape[0])
        if short_inv.size != long_inv.size:
            return f"{why}: short and long caches differ in width"
        ratio = short_inv.astype(np.float64) / long_inv.astype(np.float64)
        notes = [f"rotary inside com.microsoft.{node.op_type} (do_rotary=1), {len(nodes)} node(s); LongRoPE caches "
                 f"switched by {if_node.name}: short [{short_consts[0][1].shape[0]}, {short_inv.size}] up to {L} "
                 f"tokens (attention factor {short_factor:.6g}), long [{rows}, {long_inv.size}] beyond (up to "
                 f"{np.max(ratio):.4g}x slower, attention factor {long_factor:.6g}); inv_freq shown is the short one"]
        base, prior = rope_math.fit_base(short_inv), rope_math.PriorScaling("by_length", float(np.max(ratio)), 0)
        if base is None:
            notes.append("the base is not recoverable from LongRoPE frequencies: a rescale needs --rope-base "
                         "(the model's rope_theta)")
        interleaved = bool(int_attr(node, "rotary_interleaved", 0))
        selected = {"threshold": L, "short": short_inv, "long": long_inv, "if_node": if_node,
                    "long_constants": (long_consts[0][0], long_consts[1][0]), "long_factor": long_factor}
        return RopeSite(
            layout=Layout.INTERLEAVED if interleaved else Layout.ROTATE_HALF, head_dim=_attention_head_size(node),
            rotary_dim=2 * short_inv.size, angles=AngleSource.FUSED_OP, base=base, inv_freq=short_inv,
            inv_freq_value=None, prior_scaling=prior, max_positions=rows, position_dtype="int32",
            angle_dtype=dtype_name(cos_v), attention_factor=short_factor, positions=None, cos=cos_v, sin=sin_v,
            cos_cache=cos_v, sin_cache=sin_v, fused_nodes=tuple(nodes), notes=tuple(notes),
            op=f"com.microsoft.{node.op_type}", extra=_Extra(cos_src=None, sin_src=None, angles={"selected": selected}),
        )

    def _unclaimed_trig(self, sites: list[RopeSite]) -> None:
        """Cos nodes that feed q/k-like multiplications but belong to no site are reported as refusals."""
        claimed = {id(n) for s in sites for n in s.source_nodes if n is not None}
        for node in self.model.graph:
            if node.op_type != "Cos" or id(node) in claimed:
                continue
            reason = _best_failure(self.tracer)
            self.refusals.append(Refusal("rope?", node.name or node.outputs[0].name or "?",
                                         "Cos node not part of any recognised q/k rotation"
                                         + (f" (closest pattern failed: {reason})" if reason else "")))


#: attention ops that rotate q/k themselves: op_type -> (cos_cache input index, sin_cache input index)
ROTARY_ATTENTION_CACHES = {"GroupQueryAttention": (7, 8)}


def _is_rotary_attention(node: ir.Node) -> bool:
    return (node.domain == "com.microsoft" and node.op_type in ROTARY_ATTENTION_CACHES
            and int_attr(node, "do_rotary", 0) == 1)


def _attention_caches(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    ci, si = ROTARY_ATTENTION_CACHES[node.op_type]
    inputs = list(node.inputs)
    return (inputs[ci] if len(inputs) > ci else None), (inputs[si] if len(inputs) > si else None)


def fused_cache_indices(node: ir.Node) -> tuple[int, int]:
    """Input indices of the cos and sin caches of a fused RoPE node (RotaryEmbedding or a rotary attention op)."""
    if _is_rotary_attention(node):
        return ROTARY_ATTENTION_CACHES[node.op_type]
    return (2, 3) if node.domain == "com.microsoft" else (1, 2)


def _attention_head_size(node: ir.Node) -> int | None:
    """Head size of GroupQueryAttention: query [B, S, N*H] with separate k/v, or packed [B, S, (N + 2 Nkv)*H]."""
    width = last_dim(node.inputs[0])
    heads = int_attr(node, "num_heads", 0)
    kv = int_attr(node, "kv_num_heads", 0)
    if width is None or not heads:
        return None
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    div = heads + 2 * kv if packed else heads
    return width // div if div and width % div == 0 else None


def _ensure_ranks(model: ir.Model) -> None:
    """Older exporters (TorchScript) leave intermediate shapes out; the patterns need ranks to tell which
    axis is last. Shape inference is run only then (onnx_ir's pass leaves big weights out of it)."""
    needs = any(
        n.op_type == "Neg" and n.inputs and n.inputs[0] is not None and n.inputs[0].shape is None for n in model.graph
    )
    if needs:
        from onnx_ir.passes.common import ShapeInferencePass

        try:
            ShapeInferencePass()(model)
        except Exception:  # noqa: BLE001 - detection then works with what it has
            pass


@dataclasses.dataclass(frozen=True)
class _Extra:
    """Detection details the rewrites need but `inspect` does not show."""

    cos_src: _Source
    sin_src: _Source
    angles: dict | None


RUNTIME_INV_FREQ_KEY = "posrewrite.runtime_inv_freq"
#: on the node that consumes a rescaled inv_freq constant: what the rescale did (JSON)
RESCALED_KEY = "posrewrite.rescaled_rope"


def mark_rescaled_cache(graph: ir.Graph, cache: ir.Value, what: dict) -> None:
    """Records on the graph (metadata_props, keyed by the cos cache's name, which survives attention fusion and
    saving) the rescale a fused cache was computed with, so that inspect / a later rescale start from its base."""
    if cache.name and what.get("base") is not None:
        graph.metadata_props[f"{RESCALED_KEY}:{cache.name}"] = json.dumps(what)


def _cache_marker(graph: ir.Graph, cache: ir.Value) -> dict | None:
    text = graph.metadata_props.get(f"{RESCALED_KEY}:{cache.name}") if cache.name else None
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _rewritten_base(graph: ir.Graph, cache: ir.Value, base: float | None, prior, notes: list[str]):
    """(base, prior) of a fused cache: a posrewrite rescale's record when the fit finds no plain base."""
    marker = _cache_marker(graph, cache) if base is None else None
    if not marker:
        return base, prior
    notes[:] = [n for n in notes if "not geometric" not in n and "already scaled" not in n]
    base = float(marker["base"])
    notes.append(f"caches written by posrewrite ({marker['rope_type']} x{marker.get('factor') or 1:g} from base "
                 f"{base:g}); a rescale starts again from that base")
    return base, rope_math.PriorScaling("rewritten", float(marker.get("factor") or 1.0), 0)


def _marker_extra(graph: ir.Graph, cache: ir.Value, prior) -> _Extra | None:
    """Detection details of a fused site whose caches posrewrite rescaled: the record (for its trained length)."""
    if prior is None or prior.kind != "rewritten":
        return None
    return _Extra(cos_src=None, sin_src=None, angles={"rescaled": _cache_marker(graph, cache)})


def _runtime_marker(value: ir.Value) -> tuple[ir.Value, dict] | None:
    """(the run-time inv_freq value, the parameters posrewrite recorded on it) for a dynamic / longrope
    rewrite of posrewrite's, walking up from an operand of the angle product."""
    import json

    v = value
    for _ in range(8):
        node = v.producer()
        if node is None:
            return None
        text = node.metadata_props.get(RUNTIME_INV_FREQ_KEY)
        if text:
            return v, json.loads(text)
        if node.op_type not in ("Cast", "Reshape", "Unsqueeze", "Expand", "Identity", "Transpose"):
            return None
        v = node.inputs[0]
    return None


def _eps(value: ir.Value | None) -> float:
    """Machine epsilon of a half-precision table's type; float32's for any other (or unknown) type."""
    name = dtype_name(value)
    return machine_epsilon(name if name in ("float16", "bfloat16") else "float32")


def _stored_dtype(stored: ir.Value | None) -> str | None:
    """The float type an inv_freq vector is stored in (its round-off bounds the base fit), or None."""
    if stored is None or stored.dtype is None or not stored.dtype.is_floating_point():
        return None
    return stored.dtype.name


def _fit_base(inv_freq: np.ndarray, stored: ir.Value | None) -> float | None:
    """The base of an inv_freq vector, within the round-off of the precision it is stored in."""
    return rope_math.fit_base(inv_freq, dtype=_stored_dtype(stored))


def _fit_scaled_base(inv_freq: np.ndarray, stored: ir.Value | None, notes: list[str]):
    """(base, PriorScaling) of an already-scaled inv_freq, or (None, None); adds a note saying what was found."""
    fitted = rope_math.fit_scaled_base(inv_freq, dtype=_stored_dtype(stored))
    if fitted is None:
        notes.append("inv_freq is not geometric and its scaling is not recognised: pass --rope-base (or a "
                     "config.json with rope_theta beside the model) to rescale it")
        return None, None
    base, prior = fitted
    notes.append(f"inv_freq is already scaled: {prior.describe()}, base {base:g}; a rescale replaces that "
                 "scaling (as new rope_parameters in config.json would)")
    return base, prior


def _best_failure(tracer: orp.MatchingTracer) -> str | None:
    """The reason of the failed match that got furthest (highest `MatchInfo.score`: most pattern nodes
    matched), the first of equals; None when no pattern failed with a reason."""
    best, best_score = None, -1
    for infos in tracer.best_matches_map.values():
        for info in infos:
            if (info.status != orp.MatchStatus.SUCCESS and info.match_result.reason
                    and info.score() > best_score):
                best, best_score = info.match_result.reason, info.score()
    return best


def _fit_tables(cos_t: np.ndarray, sin_t: np.ndarray, layout,
                eps: float = 2.0 ** -23) -> tuple[np.ndarray, float] | str:
    """Recovers (inv_freq, attention factor) from cos/sin tables [N, w] by unwrapping their phase."""
    if cos_t.ndim != 2 or cos_t.shape[0] < 2:
        return f"cos/sin table of shape {cos_t.shape} is not [positions, channels]"
    width = cos_t.shape[1]
    if layout == "half":
        cols = np.arange(width)
    elif layout == Layout.ROTATE_HALF:
        if width % 2 or not np.allclose(cos_t[:, : width // 2], cos_t[:, width // 2:], atol=1e-3):
            # a table already holding only the half
            cols = np.arange(width)
        else:
            cols = np.arange(width // 2)
    else:
        if width % 2 == 0 and np.allclose(cos_t[:, 0::2], cos_t[:, 1::2], atol=1e-3):
            cols = np.arange(0, width, 2)
        else:
            cols = np.arange(width)
    c, s = cos_t[:, cols], sin_t[:, cols]
    amplitude = np.sqrt(c[0] ** 2 + s[0] ** 2)
    factor = float(np.median(amplitude))
    if factor <= 0:
        return "cos/sin table has zero amplitude"
    phase = np.unwrap(np.arctan2(s, c), axis=0)
    n = phase.shape[0]
    pos = np.arange(n, dtype=np.float64)
    # least-squares slope through the origin: phase = pos * inv_freq
    inv_freq = (pos @ phase) / (pos @ pos)
    resid = np.max(np.abs(phase - np.outer(pos, inv_freq)))
    # tables computed in half precision drift by up to ~position x eps in phase
    if resid > 1e-2 * max(1.0, n / 1000) + 4 * n * eps:
        return "cos/sin table is not cos/sin of position x frequency (rows not in position order?)"
    return inv_freq.astype(np.float32), factor


def detect_rope(model: ir.Model) -> tuple[list[RopeSite], list[Refusal]]:
    detector = RopeDetector(model)
    sites = detector.detect()
    return sites, detector.refusals
