"""Validation in onnxruntime: each rewritten site against the math reference, and the whole model.

Sites are checked on the subgraph that computes their cos/sin, cut out of the rewritten model: this runs in
milliseconds and reads no weights, whatever the model's size. The whole model is also run at the new length
when its weights are small enough to run here (see `FULL_RUN_MAX_BYTES`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._graph import numpy_dtype
from posrewrite.sites.rope import AngleSource, Layout, RopeSite

FULL_RUN_MAX_BYTES = 512 * 1024 * 1024
MAX_VALIDATION_LENGTH = 4096


@dataclasses.dataclass
class ValidationReport:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "notes": self.notes, "seconds": round(self.seconds, 3)}


def _ancestor_inputs(graph: ir.Graph, outputs: list[ir.Value]) -> list[ir.Value]:
    graph_inputs = {id(v): v for v in graph.inputs}
    seen: set[int] = set()
    found: dict[int, ir.Value] = {}
    stack = list(outputs)
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            found[id(v)] = v
            continue
        node = v.producer()
        if node is not None:
            stack.extend(i for i in node.inputs if i is not None)
    return [v for v in graph.inputs if id(v) in found]


def _session(model_proto_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_proto_bytes, options, providers=["CPUExecutionProvider"])


def subgraph_session(model: ir.Model, outputs: list[ir.Value]):
    """An onnxruntime session computing `outputs` from the graph inputs they depend on."""
    inputs = _ancestor_inputs(model.graph, outputs)
    sub = ir.convenience.extract(model.graph, inputs, outputs)
    for init in list(sub.initializers.values()):
        if isinstance(init.const_value, ir.ExternalTensor):  # small tables only; bring them inline
            init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    sub.opset_imports.update(model.graph.opset_imports)
    sub_model = ir.Model(sub, ir_version=model.ir_version)
    proto = ir.to_proto(sub_model)
    return _session(proto.SerializeToString()), inputs


def make_feeds(inputs: list[ir.Value], length: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Inputs for a run at `length` tokens: ids 0, masks 1, positions 0..length-1."""
    feeds = {}
    for v in inputs:
        name = (v.name or "").lower()
        dims = list(v.shape.dims) if v.shape is not None else [batch, length]
        shape = []
        for k, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(batch if k == 0 and len(dims) > 1 else length)
        dtype = numpy_dtype(v.dtype) if v.dtype is not None else np.dtype(np.int64)
        if "position" in name:
            arr = np.broadcast_to(np.arange(length, dtype=dtype), shape).copy()
        elif "mask" in name:
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = np.zeros(shape, dtype=dtype)
        feeds[v.name] = arr
    return feeds


def _as_rows(arr: np.ndarray, length: int) -> np.ndarray:
    """[.., S, w] (any leading 1-dims) -> [S, w]."""
    a = np.asarray(arr, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1])
    if a.shape[0] != length:
        a = a[:length] if a.shape[0] > length else a
    return a


def reference_tables(site: RopeSite, params: rope_math.RopeParameters | None, length: int, width: int,
                     attention_factor_before: float) -> tuple[np.ndarray, np.ndarray]:
    """What cos/sin of a (rewritten) site must be at positions 0..length-1, from the math module only."""
    if params is None or (params.rope_type == "default" and params.rope_theta is None):
        # not rescaled (at most extended): the site's own frequencies and attention factor
        inv, factor = site.inv_freq, attention_factor_before
    else:  # rescaled: the new method's attention factor replaces the old one, as in HF
        inv, factor = rope_math.scaled_inv_freq(params, inv_freq=site.inv_freq, base=site.base,
                                                dim=site.rotary_dim, seq_len=length)
    if width * 2 == site.rotary_dim:
        layout = "half"
    else:
        layout = "interleaved" if site.layout == Layout.INTERLEAVED else "rotate_half"
    return rope_math.cos_sin_tables(inv, length, attention_factor=factor, layout=layout, dtype=np.float64)


def tolerance(dtype_name: str, length: int, inv_freq: np.ndarray | None) -> float:
    """Bound on |graph - reference| for cos/sin: the table's rounding plus the float32 angle rounding at
    the largest angle (fp32 products and Pow may differ by a few ulp between numpy and onnxruntime)."""
    table_eps = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}.get(dtype_name, 2.0 ** -23)
    max_angle = float(length) * float(np.max(inv_freq)) if inv_freq is not None else float(length)
    return 2 * table_eps + 8 * max_angle * 2.0 ** -24 + 1e-6


def validate_sites(model: ir.Model, plans: list, lengths: list[int]) -> ValidationReport:
    """Runs each rewritten site's cos/sin subgraph at `lengths` and compares with the math reference."""
    report = ValidationReport()
    start = time.perf_counter()
    for k, plan in enumerate(plans):
        site: RopeSite = plan.site
        params = plan.params
        if getattr(plan, "caches", None) is not None:
            targets = list(plan.caches)  # written by the rescale (the fused node may be inside an attention op)
        elif site.angles == AngleSource.FUSED_OP and site.cos_cache is not None and site.sin_cache is not None:
            targets = [site.cos_cache, site.sin_cache]  # the caches (the fused node may be inside an attention op now)
        elif site.angles == AngleSource.FUSED_OP:
            node = site.fused_nodes[0]
            contrib = node.domain == "com.microsoft"
            targets = [node.inputs[2], node.inputs[3]] if contrib else [node.inputs[1], node.inputs[2]]
        else:
            targets = current_cos_sin(model, site.applications[0])
        try:
            session, inputs = subgraph_session(model, targets)
        except Exception as exc:  # noqa: BLE001 - reported as a failed row
            report.rows.append({"site": k, "length": None, "max_abs_error": None, "tolerance": None, "ok": False,
                                "error": f"cannot run the site subgraph: {exc}"})
            continue
        for n in lengths:
            feeds = make_feeds(inputs, n)
            try:
                cos, sin = session.run(None, feeds)
            except Exception as exc:  # noqa: BLE001
                report.rows.append({"site": k, "length": n, "max_abs_error": None, "tolerance": None, "ok": False,
                                    "error": str(exc).splitlines()[0][:200]})
                continue
            width = cos.shape[-1]
            rows = min(n, int(np.prod(cos.shape[:-1])))
            gcos, gsin = _as_rows(cos, rows), _as_rows(sin, rows)
            rcos, rsin = reference_tables(site, params, n, width, site.attention_factor)
            rcos, rsin = rcos[:rows], rsin[:rows]
            if site.angles == AngleSource.CACHED and site.extra.cos_src.columns is not None:
                pass  # app.cos already holds only its column range
            err = float(max(np.max(np.abs(gcos - rcos)), np.max(np.abs(gsin - rsin))))
            dt = str(np.asarray(cos).dtype)
            tol = tolerance(dt, n, site.inv_freq)
            report.rows.append({"site": k, "length": n, "rows": rows, "max_abs_error": err, "tolerance": tol, "ok": err <= tol})
    report.seconds = time.perf_counter() - start
    return report


def current_cos_sin(model: ir.Model, app) -> list[ir.Value]:
    """The cos/sin values a rotation multiplies with now: later passes (fp32 positions) may have replaced
    the ones detection saw; the replacements are found from the rotation's own Mul nodes."""
    if app.cos.graph is model.graph and app.sin.graph is model.graph and app.cos.uses() and app.sin.uses():
        return [app.cos, app.sin]
    inside = {id(n) for n in app.nodes}
    found: dict[str, ir.Value] = {}
    for node in app.nodes:
        if node.op_type != "Mul":
            continue
        for v in node.inputs:
            if v is None or v is app.input or (v.producer() is not None and id(v.producer()) in inside):
                continue
            w = v
            for _ in range(12):
                p = w.producer()
                if p is None:
                    break
                if p.op_type in ("Cos", "Sin"):
                    found.setdefault(p.op_type.lower(), v)
                    break
                w = p.inputs[0]
    if "cos" not in found or "sin" not in found:
        return [app.cos, app.sin]
    return [found["cos"], found["sin"]]


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            total += int(np.prod(t.shape.dims)) * max(1, t.dtype.itemsize if hasattr(t.dtype, "itemsize") else 4)
    return total


def _session_for(path, quiet: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3  # quiet: an expected failure is not logged to stderr
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def token_id_limits(path) -> dict[str, int]:
    """Vocabulary size per integer graph input that indexes an embedding table (a Gather whose data is an
    initializer), read from shapes only: the table's weights are not loaded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in proto.graph.input}
    tables = {t.name: t.dims for t in proto.graph.initializer}
    limits: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs and node.input[0] in tables:
            dims = tables[node.input[0]]
            if len(dims) == 2 and dims[0] > 0:
                limits[node.input[1]] = min(limits.get(node.input[1], dims[0]), int(dims[0]))
    return limits


def _token_ids(count: int, vocab: int | None) -> np.ndarray:
    """`count` ids that avoid the ends of the vocabulary, where pad/bos/eos and other special tokens live (a
    zero pad embedding can turn a whole-model run into NaNs that say nothing about the rewrite)."""
    if vocab is None or vocab < 16:
        lo, span = (3, 7) if vocab is None else (min(3, vocab - 1), max(1, vocab - 3))
    else:
        lo, span = vocab // 4, max(1, vocab // 2)
    return lo + (np.arange(count, dtype=np.int64) * 7919) % span


def _is_cache_input(i) -> bool:
    name = i.name.lower()
    return "float" in i.type and ("past" in name or "cache" in name) and len(i.shape) >= 3


def _full_model_feeds(session, length: int, vocab: dict[str, int] | None = None) -> dict[str, np.ndarray] | str:
    """Inputs for a whole-model run over `length` positions, or a string saying why the model cannot be fed.

    Token ids come from the middle of the vocabulary (`vocab` gives its size per input when known), masks
    are ones. A model with KV-cache inputs (``past_key_values.*``) gets a decode-style call: half of the
    positions as a random past (fixed seed), the rest as new tokens at positions past..length-1, so the
    cache path of the graph (and of any fused attention) is exercised too."""
    inputs = session.get_inputs()
    caches = [i for i in inputs if _is_cache_input(i)]
    past = length // 2 if caches else 0
    seq = length - past
    rng = np.random.default_rng(0)
    feeds = {}
    vocab = vocab or {}
    for i in inputs:
        name = i.name.lower()
        if i in caches:
            symbolic = [k for k, d in enumerate(i.shape) if not isinstance(d, int) and k != 0]
            if len(symbolic) != 1:
                return f"cache input {i.name} has no single length axis ({i.shape})"
            shape = [1 if k == 0 and not isinstance(d, int) else (past if k == symbolic[0] else d)
                     for k, d in enumerate(i.shape)]
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
            continue
        if "int" not in i.type:
            return f"input {i.name} is {i.type}"
        n = past + seq if "mask" in name else seq
        shape = [d if isinstance(d, int) else (1 if k == 0 and len(i.shape) > 1 else n) for k, d in enumerate(i.shape)]
        dtype = np.int64 if "int64" in i.type else np.int32
        if "position" in name:
            feeds[i.name] = np.broadcast_to(np.arange(past, past + seq, dtype=dtype), shape).copy()
        elif "mask" in name:
            feeds[i.name] = np.ones(shape, dtype=dtype)
        else:
            ids = _token_ids(shape[-1] if shape else 1, vocab.get(i.name)).astype(dtype)
            feeds[i.name] = np.broadcast_to(ids, shape).copy()
    return feeds


def run_full_model(path, length: int, original=None) -> tuple[bool, str]:
    """Runs the saved model at `length` tokens; (ok, message). When it cannot run and `original` (the input
    model) cannot run in onnxruntime either, even at a few tokens, the run says nothing about the rewrite:
    it is reported as skipped, not failed."""
    ok, message = _run_once(path, length, "the rewritten model")
    if ok or original is None:
        return ok, message
    base_ok, base_message = _run_once(original, min(length, 8), "the original model")
    if not base_ok:
        return True, f"whole-model run skipped: {base_message}"
    return ok, message


def _run_once(path, length: int, what: str) -> tuple[bool, str]:
    try:
        session = _session_for(path, quiet=what != "the rewritten model")
    except Exception as exc:  # noqa: BLE001
        return False, f"onnxruntime cannot load {what}: {str(exc).splitlines()[0][:200]}"
    feeds = _full_model_feeds(session, length, token_id_limits(path))
    if isinstance(feeds, str):
        return True, f"whole-model run skipped: {feeds}"
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return False, f"{what} fails at {length} tokens: {str(exc).splitlines()[0][:200]}"
    for o in outputs:
        if np.issubdtype(np.asarray(o).dtype, np.floating) and not np.all(np.isfinite(o)):
            return False, f"{what} gives non-finite outputs at {length} tokens"
    return True, f"whole model ran at {length} tokens"


def compare_models(original, rewritten, length: int) -> dict[str, Any]:
    """Runs the original and the rewritten model on the same inputs at `length` tokens and compares every
    floating output (logits, and presents of KV-cache models); the row reports the worst one. For rewrites that must not change the function (fusion alone): fp32 models must agree to
    float32 round-off; half-precision ones within half-precision noise (the fused caches are computed in fp32,
    so they are closer to exact than the original, not bit-identical to it)."""
    row: dict[str, Any] = {"site": "model", "length": length, "max_abs_error": None, "tolerance": None, "ok": True}
    try:
        ref_session, new_session = _session_for(original), _session_for(rewritten)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, message=f"onnxruntime cannot load a model: {str(exc).splitlines()[0][:200]}")
        return row
    feeds = _full_model_feeds(ref_session, length, token_id_limits(original))
    if isinstance(feeds, str):
        row["message"] = f"comparison skipped: {feeds}"
        return row
    try:
        ref = ref_session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        row["message"] = f"comparison skipped: the original fails at {length} tokens: {str(exc).splitlines()[0][:160]}"
        return row
    try:
        new = new_session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, message=f"the rewritten model fails at {length} tokens: {str(exc).splitlines()[0][:200]}")
        return row
    pairs = [(a, b) for a, b in zip(ref, new) if np.issubdtype(np.asarray(a).dtype, np.floating)]
    if not pairs:
        row["message"] = "comparison skipped: no floating output"
        return row
    worst, tol_at_worst, ok = 0.0, None, True
    for k, (x, y) in enumerate(pairs):  # logits, and present keys/values where the model returns them
        a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            if k == 0:
                row["message"] = f"comparison skipped: the original model itself gives non-finite outputs at {length} tokens"
                return row
            continue
        if a.shape != b.shape:
            row.update(ok=False, message=f"output {k} shapes differ: {a.shape} vs {b.shape}")
            return row
        half = np.asarray(x).dtype == np.float16 or str(np.asarray(x).dtype) == "bfloat16"
        tol = (5e-2 if half else 1e-3) * (1.0 + float(np.max(np.abs(a)) if a.size else 0.0))
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        good = bool(err <= tol and np.all(np.isfinite(b)))
        if tol_at_worst is None or (not good and ok) or (good == ok and err / tol > worst / tol_at_worst):
            worst, tol_at_worst = err, tol
        ok = ok and good
    outputs = "outputs" if len(pairs) > 1 else "output"
    row.update(max_abs_error=worst, tolerance=tol_at_worst, ok=ok,
               message=f"original and rewritten {outputs} ({len(pairs)}) at {length} tokens")
    return row


def probe_past_cache(path, rows: int) -> dict[str, Any]:
    """Runs a fused model at `rows + 1` tokens, one position past its caches: the run must fail with an error
    (onnxruntime CPU checks position ids against the cache) rather than give outputs from unrotated or
    out-of-bounds values. The error comes from the first layer's RotaryEmbedding, so the probe is cheap."""
    length = rows + 1
    row: dict[str, Any] = {"site": "past cache", "length": length, "max_abs_error": None, "tolerance": None, "ok": True}
    try:
        session = _session_for(path, quiet=True)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, message=f"onnxruntime cannot load the rewritten model: {str(exc).splitlines()[0][:200]}")
        return row
    feeds = _full_model_feeds(session, length, token_id_limits(path))
    if isinstance(feeds, str):
        row["message"] = f"probe skipped: {feeds}"
        return row
    try:
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).splitlines()[0]
        text = text.split("Status Message:", 1)[-1].strip()  # onnxruntime's own reason, without the node preamble
        row["message"] = f"position {rows} is rejected by onnxruntime: {text[:160]}"
        return row
    row.update(ok=False, message=f"position {rows} is past the {rows}-row caches but the model ran without error")
    return row
