"""Validation in onnxruntime: an oracle of what a rewrite claims, never a re-reading of what it wrote.

- Rotations (every RoPE rewrite): each q/k rotation of the rewritten model, run on its own subgraph with
  random pre-rotation q/k (no weights read) or captured from the model's prefix, against `numpy_rotation`
  of the same q/k with the frequencies and attention factor `posrewrite.math.rope` gives for the request.
- Output-preserving rewrites: the original and the rewritten model on the same inputs, one after the other,
  within `output_tolerance` (from the outputs' magnitude and dtype; see COMPARE_EPS_UNITS).
- Rescales: the whole rewritten model at the new length runs and gives finite outputs.
Entry points: `validate_rewrite` (called by `api.rewrite` and `api.validate`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite import errors
from posrewrite.cut import graph_inputs_for
from posrewrite.math import precision
from posrewrite.math import rope as rope_math
from posrewrite.passes.onnx._graph import call_input, numpy_dtype
from posrewrite.sites.rope import Layout, RopeSite, site_key

MAX_VALIDATION_LENGTH = 4096


@dataclasses.dataclass
class ValidationReport:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    scope: str = "full"  # "bounded": model-level checks ran on a cut (posrewrite.cut), see docs/validation.md

    @property
    def ok(self) -> bool:
        """Every row holds."""
        return all(r["ok"] for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "scope": self.scope, "rows": self.rows, "notes": self.notes,
                "seconds": round(self.seconds, 3)}


def _session(model_proto_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed run becomes a row of the report (and one error line), not a log line
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model_proto_bytes, options, providers=["CPUExecutionProvider"])


def _session_for(path, quiet: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # a failed run becomes a row of the report (and one error line): onnxruntime's own log stays off stderr
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = False  # a whole-model run gives back each layer's scores (the arena keeps them)
    options.add_session_config_entry("session.disable_prepacking", "1")
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


def _full_model_feeds(session, length: int, vocab: dict[str, int] | None = None, *,
                      empty_past: bool = False) -> dict[str, np.ndarray] | str:
    """Inputs for a whole-model run over `length` positions, or a string saying why the model cannot be fed.

    Token ids come from the middle of the vocabulary (`vocab` gives its size per input when known), masks
    are ones. A model with KV-cache inputs (``past_key_values.*``) gets a decode-style call: half of the
    positions as a random past (fixed seed), the rest as new tokens at positions past..length-1, so the
    cache path of the graph (and of any fused attention) is exercised too."""
    inputs = session.get_inputs()
    caches = [i for i in inputs if _is_cache_input(i)]

    def symbolic_axes(i) -> list[int]:
        return [k for k, d in enumerate(i.shape) if not isinstance(d, int) and k != 0]

    # a key cache packed on the heads axis by `--extend` (heads symbolic too) takes the shape of its value cache,
    # and an empty past: a past of that shape reads as the empty cache of every position system
    by_name = {i.name: i for i in caches}
    shape_of = {}
    for i in caches:
        sibling = by_name.get("value".join(i.name.rsplit("key", 1)))  # past_key_values.0.key -> ....0.value
        if len(symbolic_axes(i)) != 1 and sibling is not None and len(symbolic_axes(sibling)) == 1:
            shape_of[i.name] = sibling
    past = length // 2 if caches and not empty_past and not shape_of else 0
    seq = length - past
    rng = np.random.default_rng(0)
    feeds = {}
    vocab = vocab or {}
    for i in inputs:
        name, name_of_input = i.name.lower(), i.name
        if i in caches:
            i = shape_of.get(i.name, i)
            symbolic = symbolic_axes(i)
            if len(symbolic) != 1:
                return f"cache input {i.name} has no single length axis ({i.shape})"
            shape = [1 if k == 0 and not isinstance(d, int) else (past if k == symbolic[0] else d)
                     for k, d in enumerate(i.shape)]
            dtype = np.float16 if "float16" in i.type else np.float32
            feeds[name_of_input] = rng.standard_normal(shape).astype(dtype)
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


# Bound on |original - rewritten| for output-preserving rewrites, in units of the dtype's epsilon times the
# output's magnitude (max |original output|). Measured on the fixtures (tests/test_validation.py,
# `python benchmarks/validation_noise.py`): benign changes (onnxruntime graph optimisation level, intra-op
# threads 1 vs 2) move fp32 logits by up to 4.8e-7 of their magnitude (4 eps) and fp16 ones by 4.6e-4 (0.5 eps);
# correct fusions of 8 architectures by up to 5.4e-7 (fp32) and 4.6e-4 (fp16). The bound is 64 eps (fp32: 7.6e-6)
# and 8 eps (fp16: 7.8e-3), 14-17x above what correct rewrites move, far below what a wrong rotation moves
# (a Cohere fusion without `interleaved`, which pairs the wrong channels: 4e-3 of the magnitude).
COMPARE_EPS_UNITS = {"float32": 64.0, "float16": 8.0, "bfloat16": 8.0, "float64": 2.0 ** 29}


def _eps(dtype: str) -> float:
    """Machine epsilon of a float dtype (`posrewrite.math.precision`); float32's for any other type."""
    try:
        return precision.machine_epsilon(dtype)
    except ValueError:
        return precision.machine_epsilon("float32")


def output_tolerance(reference: np.ndarray) -> tuple[float, str]:
    """(bound, how) for comparing a rewritten model's output with the original's `reference`."""
    dtype = str(np.asarray(reference).dtype)
    units = COMPARE_EPS_UNITS.get(dtype, 64.0)
    eps = _eps(dtype)
    a = np.asarray(reference, dtype=np.float64)
    magnitude = float(np.max(np.abs(a))) if a.size else 0.0
    how = f"{units:g} {dtype} eps x max|original| ({magnitude:.3g})"
    return units * eps * max(magnitude, float(np.finfo(np.float32).tiny)), how


def _run_model(path, feeds_from=None, length: int = 0, vocab=None, empty_past: bool = False):
    """Runs the model at `path` (a session of its own, released on return); (outputs, feeds) or a message."""
    try:
        session = _session_for(path)
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}", None
    feeds = feeds_from if feeds_from is not None else _full_model_feeds(session, length, vocab,
                                                                        empty_past=empty_past)
    if isinstance(feeds, str):
        return feeds, None
    try:
        return session.run(None, feeds), feeds
    except Exception as exc:  # noqa: BLE001
        return f"fails at {length} tokens: {str(exc).splitlines()[0][:200]}", feeds


def compare_models(original, rewritten, length: int, *, cache_contract_changed: bool = False) -> dict[str, Any]:
    """Runs the original and the rewritten model on the same inputs at `length` tokens, one after the other
    (one model in memory at a time), and compares every floating output (logits, and presents of KV-cache
    models) within `output_tolerance`; the row reports the worst one relative to its bound.
    ``cache_contract_changed`` (the rewritten cache holds other values, e.g. keys before rotation): a prefill
    from an empty past, the first output (logits) only."""
    row: dict[str, Any] = {"site": "model", "length": length, "max_abs_error": None, "tolerance": None, "ok": True,
                           "compared": f"original vs rewritten outputs at {length} tokens"}
    ref, feeds = _run_model(original, length=length, vocab=token_id_limits(original),
                            empty_past=cache_contract_changed)
    if cache_contract_changed and not isinstance(ref, str):
        ref = ref[:1]
    if isinstance(ref, str):
        row["message"] = f"comparison skipped: the original: {ref}"
        return row
    new, _ = _run_model(rewritten, feeds_from=feeds, length=length)
    if isinstance(new, str):
        row.update(ok=False, message=f"the rewritten model {new}")
        return row
    if cache_contract_changed:
        new = new[:1]
    return _compare_outputs(row, ref, new, length, f"at {length} tokens")


def _compare_outputs(row: dict[str, Any], ref, new, length: int, where: str) -> dict[str, Any]:
    """Fills `row` with the comparison of every floating output of `ref` (the original's) with `new`'s, within
    `output_tolerance`; the row reports the worst one relative to its bound."""
    pairs = [(a, b) for a, b in zip(ref, new) if np.issubdtype(np.asarray(a).dtype, np.floating)]  # noqa: B905
    if not pairs or len(ref) != len(new):
        row.update(ok=not pairs and len(ref) == len(new),
                   message="comparison skipped: no floating output" if not pairs else "output counts differ")
        return row
    worst, tol_at_worst, how_at_worst, ok = 0.0, None, "", True
    for k, (x, y) in enumerate(pairs):  # logits, and present keys/values where the model returns them
        a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if np.any(np.isnan(a)):
            if k == 0:
                row["message"] = f"comparison skipped: the original model itself gives NaN outputs {where}"
                return row
            continue
        if a.shape != b.shape:
            row.update(ok=False, message=f"output {k} shapes differ: {a.shape} vs {b.shape}")
            return row
        finite = np.isfinite(a)  # masked scores inside a cut hold -inf: the same entries must, the rest compare
        same_inf = bool(np.array_equal(np.isfinite(b), finite) and np.array_equal(a[~finite], b[~finite]))
        a, b = a[finite], b[finite]
        tol, how = output_tolerance(np.asarray(x)[finite] if not finite.all() else x)
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        good = bool(err <= tol and np.all(np.isfinite(b)) and same_inf)
        if tol_at_worst is None or (not good and ok) or (good == ok and err / tol > worst / tol_at_worst):
            worst, tol_at_worst, how_at_worst = err, tol, how
        ok = ok and good
    outputs = "outputs" if len(pairs) > 1 else "output"
    row.update(max_abs_error=worst, tolerance=tol_at_worst, ok=ok, tolerance_from=how_at_worst,
               message=f"original and rewritten {outputs} ({len(pairs)}) {where}",
               compared=f"original vs rewritten {outputs} ({len(pairs)}) on the same inputs {where}")
    return row


def probe_past_cache(path, rows: int) -> dict[str, Any]:
    """Runs a fused model at `rows + 1` tokens, one position past its caches: the run must fail with an error
    (onnxruntime CPU checks position ids against the cache) rather than give outputs from unrotated or
    out-of-bounds values. The error comes from the first layer's RotaryEmbedding, so the probe is cheap."""
    length = rows + 1
    row: dict[str, Any] = {"site": "past cache", "length": length, "max_abs_error": None, "tolerance": None, "ok": True,
                           "compared": f"the fused model at {length} tokens, one past its {rows}-row caches: must be "
                                       "rejected"}
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


# ==================================================================================================
# The bounded check (the default): the same comparisons on a cut of the model (posrewrite.cut)
# ==================================================================================================

#: Largest weights (as onnxruntime holds them) a cut may take: past it a shallower cut is taken (the first
#: attention's own result rather than the whole first layer).
CUT_WEIGHT_CAP = 2 << 30


_GRAPHS: dict[tuple[str, int, int], ir.Model] = {}


def release_graphs() -> None:
    """Forget the graphs `_graph_of` loaded (the end of a validation)."""
    _GRAPHS.clear()


def _graph_of(path) -> ir.Model:
    """The graph of a model loaded (and checked) before: onnx_ir's lazy load, no weight read (a folder rewrite
    with --link-weights hard-links the data files, which io.load_model refuses to read; nothing here reads them:
    onnxruntime maps them). Loaded once per validation (`validate_rewrite` clears them): a model with inline
    weights holds them in its graph."""
    import os

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _GRAPHS:
        _GRAPHS[key] = ir.load(str(path))
    return _GRAPHS[key]


class MemoryRefusal(errors.UsageError):
    """A session would not fit in the memory available (message: the estimate and the way out; exit 2)."""


def _check_fits(sub: ir.Model, length: int, what: str, way_out: str) -> None:
    from posrewrite import cut, memory

    est = cut.estimate(sub, length)
    avail, source = memory.available_bytes()
    if avail is not None and est["total"] > avail:
        raise MemoryRefusal(
            f"{what} at {length} tokens would need about {memory.describe_bytes(est['total'])} (weights as "
            f"onnxruntime holds them {memory.describe_bytes(est['weights'])}, activations "
            f"{memory.describe_bytes(est['activations'])}), {memory.describe_bytes(avail)} available ({source}); "
            f"{way_out}")


def _seed_groups(model: ir.Model, sites) -> list[list[str]]:
    """Per RoPE site, the names of its first-layer rotation outputs (the applications whose input depends on no
    other rotation of any site), or of its fused nodes' outputs; then [] (the model's first attention)."""
    from posrewrite.cut import _descendants

    by_name = {o.name: o for n in model.graph for o in n.outputs if o.name}
    groups = []
    all_out = [by_name[a.output.name] for site in sites for a in site.applications if a.output.name in by_name]
    all_out += [by_name[n.outputs[0].name] for site in sites for n in site.fused_nodes
                if n.outputs and n.outputs[0].name in by_name]
    after = _descendants(model.graph, {id(v) for v in all_out}) - {id(v) for v in all_out}
    for site in sites:
        names = [a.output.name for a in site.applications
                 if a.input.name in by_name and id(by_name[a.input.name]) not in after]
        names += [n.outputs[0].name for n in site.fused_nodes if n.outputs and n.inputs and n.inputs[0] is not None
                  and n.inputs[0].name in by_name and id(by_name[n.inputs[0].name]) not in after]
        if names:
            groups.append(names)
    return [*groups, []]


class BoundedRuns:
    """The model-level checks run on a cut (posrewrite.cut) of the original and of the rewritten model: the
    first attention after each RoPE site's first-layer rotations, up to the inputs of the next attention.
    Positions far past the old length are reached by a short call after a random first-layer past (KV-cache
    exports) or by position_ids. External weights stay in their files (onnxruntime maps them)."""

    WAY_OUT = "rerun with --no-validate to write the model unvalidated, or free memory"

    def __init__(self, original, rewritten, sites, vocab: dict[str, int] | None) -> None:
        from posrewrite import cut as cut_mod

        self.original, self.rewritten, self.vocab = original, rewritten, vocab
        self.orig_model = _graph_of(original)
        self.new_model = _graph_of(rewritten)
        self.cut = cut_mod.find_cut(self.orig_model, self.new_model, _seed_groups(self.orig_model, sites))
        self.orig_sub = self.new_sub = None
        if self.cut is None:
            return
        names = list(self.cut.outputs)
        while names:
            try:
                orig_sub = cut_mod.sub_model(self.orig_model, names)
                new_sub = cut_mod.sub_model(self.new_model, names)
            except Exception:  # noqa: BLE001 - a name the rewritten graph holds but cannot bound: a shallower cut
                orig_sub = new_sub = None
            if orig_sub is not None and max(cut_mod.estimate(m, SHORT_CALL_LENGTH)["weights"]
                                            for m in (orig_sub, new_sub)) <= CUT_WEIGHT_CAP:
                self.orig_sub, self.new_sub, self.cut.outputs = orig_sub, new_sub, names
                break
            names = names[:-1]

    @property
    def usable(self) -> bool:
        return self.new_sub is not None

    def describe(self) -> str:
        if not self.usable:
            return ""
        names = ", ".join(self.cut.outputs[:3]) + (", ..." if len(self.cut.outputs) > 3 else "")
        return f"cut at {names} ({self.cut.reason})"

    def _feeds(self, length: int, seed: int = 0):
        from posrewrite import cut

        inputs = {v.name: v for m in (self.orig_sub, self.new_sub) for v in m.graph.inputs}
        return cut.cut_feeds(list(inputs.values()), length, self.vocab, _token_ids, seed)

    def _run(self, sub: ir.Model, feeds: dict[str, np.ndarray], length: int, what: str, quiet: bool = False):
        from posrewrite import cut

        _check_fits(sub, length, f"the bounded check of {what}", self.WAY_OUT)
        session = cut.extracted_session(sub, quiet=quiet)
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names})

    def compare(self, length: int) -> dict[str, Any]:
        row: dict[str, Any] = {"site": "model", "length": length, "max_abs_error": None, "tolerance": None,
                               "ok": True, "compared": f"original vs rewritten cut outputs at {length} tokens"}
        fed = self._feeds(length)
        if isinstance(fed, str):
            row["message"] = f"comparison skipped: {fed}"
            return row
        feeds, how = fed
        try:
            ref = self._run(self.orig_sub, feeds, length, "the original model", quiet=True)
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            row["message"] = f"comparison skipped: the original: {str(exc).splitlines()[0][:200]}"
            return row
        try:
            new = self._run(self.new_sub, feeds, length, "the rewritten model")
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            row.update(ok=False, message=f"the rewritten model's cut fails ({how}): {str(exc).splitlines()[0][:200]}")
            return row
        where = f"at {length} positions ({how}), {self.describe()}"
        return _compare_outputs(row, ref, new, length, where)

    def run_far(self, length: int) -> tuple[bool, str]:
        fed = self._feeds(length, seed=1)
        if isinstance(fed, str):
            return True, f"far-position run skipped: {fed}"
        feeds, how = fed
        try:
            outputs = self._run(self.new_sub, feeds, length, "the rewritten model")
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            return False, f"the rewritten model's cut fails at {length} positions ({how}): " \
                          f"{str(exc).splitlines()[0][:200]}"
        for o in outputs:  # -inf is a masked score inside a cut; NaN is never right
            if np.issubdtype(np.asarray(o).dtype, np.floating) and (np.any(np.isnan(o)) or np.any(np.isposinf(o))):
                return False, f"the rewritten model's cut gives NaN or +inf at {length} positions ({how})"
        return True, f"the rewritten model's cut ran at {length} positions ({how}), {self.describe()}"

    def probe_past_cache(self, rows: int) -> dict[str, Any]:
        length = rows + 1
        row: dict[str, Any] = {"site": "past cache", "length": length, "max_abs_error": None, "tolerance": None,
                               "ok": True, "compared": f"the fused model's cut at {length} positions, one past its "
                                                      f"{rows}-row caches: must be rejected"}
        fed = self._feeds(length, seed=2)
        if isinstance(fed, str):
            row["message"] = f"probe skipped: {fed}"
            return row
        try:
            self._run(self.new_sub, fed[0], length, "the rewritten model", quiet=True)
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc).splitlines()[0].split("Status Message:", 1)[-1].strip()
            row["message"] = f"position {rows} is rejected by onnxruntime: {text[:160]}"
            return row
        row.update(ok=False, message=f"position {rows} is past the {rows}-row caches but the model ran without error")
        return row


SHORT_CALL_LENGTH = 16
#: Positions per run when the rotation oracle captures a model's own q/k through position_ids.
CAPTURE_CHUNK = 1024


# ==================================================================================================
# The rotation oracle: rotated q/k of the rewritten model against a numpy rotation of its own pre-rotation q/k
# ==================================================================================================



def _rotation_tolerance(xs: np.ndarray, rotary_dim: int, inv: np.ndarray, factor: float, length: int,
                        dtype: str) -> tuple[float, str]:
    """(bound, how) on |rotated - numpy rotation| of q/k `xs`: 4 ulp of the activation dtype (float32 at least)
    plus the float32 round-off of angles up to length x max(inv_freq), relative to 2 max|x| max(1, factor)."""
    scale = float(np.max(np.abs(xs[..., :rotary_dim]))) * 2.0 * max(1.0, abs(factor))
    eps = max(_eps(dtype), _eps("float32"))
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
            v, 1, length, ids=lambda n, v=v: _token_ids(n, (vocab or {}).get(v.name)))
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
    tensor = ir.convenience.get_const_tensor(cos_v) if cos_v is not None else None
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
                      source: str, start: int = 0) -> dict[str, Any]:
    """One row: the rotated q/k `y` against `numpy_rotation` of the pre-rotation `x` (positions start.., in a call
    over positions 0..length-1)."""
    row: dict[str, Any] = {"site": rot.label.split(":")[0], "rotation": rot.label.split(": ", 1)[-1],
                           "length": length, "max_abs_error": None, "tolerance": None, "ok": False}
    if seq_axis is not None and np.shape(y) != np.shape(x) and _same_rows(np.shape(x), np.shape(y), seq_axis):
        y = np.reshape(y, np.shape(x))  # [B,S,H,D] written as [B,S,H·D] (or back): the same rows
    if seq_axis is None or np.shape(y) != np.shape(x):
        row["message"] = f"cannot line up pre-rotation {np.shape(x)} with rotated {np.shape(y)} at {length} positions"
        return row
    xs, ys = _heads_last(x, seq_axis, rot.head_dim), _heads_last(y, seq_axis, rot.head_dim)
    inv, factor = rot.reference.frequencies(length)
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
    row.update(max_abs_error=err, tolerance=tol, ok=bool(np.isfinite(err) and err <= tol),
               compared=f"rotated q/k vs numpy {rot.layout} rotation{' by -theta' if encoding.angle_sign < 0 else ''} "
                        f"(rotary_dim {rot.rotary_dim}, factor "
                        f"{factor:.6g}) of {source}, positions 0..{length - 1}",
               tolerance_from=how)
    return row


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

    def rows(self, rotations: list[_Rotation], length: int, seed: int = 0) -> list[dict[str, Any]]:
        rows = []
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
            worst: dict[int, dict[str, Any]] = {}
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
                    if k not in worst or _worse(row, worst[k]):
                        worst[k] = row
                del values
            rows.extend(worst[k] for k in sorted(worst))
        return rows

    @staticmethod
    def _failed(rot: _Rotation, length: int, message: str) -> dict[str, Any]:
        return {"site": rot.label.split(":")[0], "rotation": rot.label.split(": ", 1)[-1], "length": length,
                "max_abs_error": None, "tolerance": None, "ok": False, "message": message}


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
                       vocab: dict[str, int] | None = None) -> dict[str, Any]:
    """A GroupQueryAttention node rotating q/k inside: its q/k are not exposed, so its cos/sin caches (as the
    graph computes them at this length) and its `rotary_interleaved` flag drive a lone com.microsoft.RotaryEmbedding
    on random q, compared with the numpy rotation."""
    import onnx

    row: dict[str, Any] = {"site": str(0), "rotation": node.name, "length": length, "max_abs_error": None,
                           "tolerance": None, "ok": False}
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
        (y,) = _session(proto.SerializeToString()).run(None, {"x": x, "p": np.arange(length)[None], "c": cos,
                                                              "s": sin})
    except Exception as exc:  # noqa: BLE001
        row["message"] = (f"GroupQueryAttention rotation does not run at {length} positions: "
                          f"{str(exc).splitlines()[0][:200]}")
        return row
    xs, ys = _heads_last(x, 1, head_dim), _heads_last(y, 1, head_dim)
    inv, factor = ref.frequencies(length)
    expected = numpy_rotation(xs, inv, factor, np.arange(length), ref.site.layout.value, ref.site.rotary_dim)
    tol, how = _rotation_tolerance(xs, ref.site.rotary_dim, inv, factor, length, str(cos.dtype))
    err = float(np.max(np.abs(ys - expected)))
    row.update(max_abs_error=err, tolerance=tol, ok=bool(np.isfinite(err) and err <= tol),
               compared=f"RotaryEmbedding with this GroupQueryAttention's caches and rotary_interleaved on random q "
                        f"vs numpy {ref.site.layout.value} rotation, positions 0..{length - 1}",
               tolerance_from=how)
    return row


def check_rotations(model: ir.Model, references: list[RopeReference], lengths: list[int],
                    vocab: dict[str, int] | None = None, *, keys_rotated_after_cache: bool = False,
                    bounded: bool = False) -> list[dict[str, Any]]:
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
    rows: list[dict[str, Any]] = [{
        "site": "rotations", "length": None, "max_abs_error": None, "tolerance": None, "ok": found >= expected,
        "compared": f"q/k rotations found in the rewritten model ({found}) vs in the original model ({expected})"}]
    runner = _RotationRunner(model, rotations, vocab, max(lengths, default=MAX_VALIDATION_LENGTH), bounded)
    if runner.skipped:
        rows[0]["message"] = (f"{runner.skipped} rotation(s) of later layers read the model's own q/k: checked "
                              "with --validate full only")
    for n in lengths:
        worst: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        for row in runner.rows(rotations, n):
            key = row["site"]
            counts[key] = counts.get(key, 0) + 1
            if key not in worst or _worse(row, worst[key]):
                worst[key] = row
        for node, same in _distinct_gqa(gqa):
            ref = references[0] if len(references) == 1 else None
            if ref is None:
                continue
            row = check_gqa_rotation(model, node, ref, n, vocab)
            counts["gqa"] = counts.get("gqa", 0) + same
            if "gqa" not in worst or _worse(row, worst["gqa"]):
                worst["gqa"] = row
        for key, row in worst.items():
            row["rotations_checked"] = counts[key]  # the row shows the worst of them
        rows.extend(worst.values())
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


def _worse(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["ok"] != b["ok"]:
        return not a["ok"]
    if a["max_abs_error"] is None or b["max_abs_error"] is None:
        return a["max_abs_error"] is None
    return a["max_abs_error"] / (a["tolerance"] or 1.0) > b["max_abs_error"] / (b["tolerance"] or 1.0)


# ==================================================================================================
# What a rewrite claims, and the checks that follow from it
# ==================================================================================================

FUSE_COMPARE_LENGTH = 48  # tokens at which an output-preserving rewrite is run beside the original


def _half(dtype_name: str | None) -> bool:
    return str(dtype_name) in ("float16", "bfloat16")


def _plan_for(site: RopeSite, plans: list) -> Any:
    """The plan made for `site` (a later pass may have replaced the plan's site object by an updated copy)."""
    for p in plans:
        if p.site is site:
            return p
    key = site_key(site)
    for p in plans:
        if site_key(p.site) == key:
            return p
    inputs = {a.input.name for a in site.applications}
    for p in plans:  # fused since: its nodes read the rotations' inputs (or a Reshape of them)
        read = set()
        for node in p.site.fused_nodes:
            x = node.inputs[0] if node.inputs else None
            if x is None:  # the node was folded into an attention op since
                continue
            read.add(x.name)
            if x.producer() is not None and x.producer().inputs:
                read.add(x.producer().inputs[0].name)
        if inputs and inputs <= read:
            return p
    return None


def rotation_lengths(references: list[RopeReference]) -> list[int]:
    """Lengths for the rotation oracle: below and just above each site's original length L and the new length,
    never past the rows a table holds (a table of L rows serves positions 0..L-1 only)."""
    lengths = {FUSE_COMPARE_LENGTH}
    limits = []
    for ref in references:
        plan, site = ref.plan, ref.site
        if plan is not None:
            L = plan.params.original_max_position_embeddings or site.max_positions
            target = plan.new_length or plan.params.target_length() or (L * 4 if L else 2048)
            lengths.add(int(target))
            if site.max_positions is not None:
                limits.append(int(plan.new_length or site.max_positions))
        else:
            L = site.max_positions
            if L:
                limits.append(int(L))
        if L:
            lengths.update({max(2, L // 2), L + 1})
    limit = min(limits) if limits else None
    if limit is not None:
        lengths = {min(n, limit) for n in lengths}
    return sorted(n for n in lengths if n <= 4 * MAX_VALIDATION_LENGTH)


def _switch_lengths(sites) -> set[int]:
    """One token past every length at which a site switches its frequencies at run time (LongRoPE exports,
    dynamic rewrites): a fused model must keep the switch."""
    lengths: set[int] = set()
    for site in sites:
        encoding = site.encoding
        switch = (encoding.selection.threshold if encoding.selection is not None
                  else encoding.runtime.original_max_position_embeddings if encoding.runtime is not None else None)
        if switch and switch + 1 <= MAX_VALIDATION_LENGTH:
            lengths.add(int(switch) + 1)
    return lengths


class FullRuns:
    """The model-level checks on the whole original and rewritten models (`--validate full`); a run whose
    memory estimate does not fit falls back to the bounded check of the same thing, and says so."""

    def __init__(self, original, rewritten, report: ValidationReport, fallback) -> None:

        self.original, self.rewritten, self.report, self.fallback = original, rewritten, report, fallback
        self.models = {str(original): _graph_of(original), str(rewritten): _graph_of(rewritten)}

    def _fits(self, path, length: int) -> str | None:
        from posrewrite import memory

        est = memory.session_estimate(self.models[str(path)], length - length // 2, length)
        avail, source = memory.available_bytes()
        if avail is None or est["total"] <= avail:
            return None
        return (f"the whole model at {length} tokens would need about {memory.describe_bytes(est['total'])}, "
                f"{memory.describe_bytes(avail)} available ({source}): checked on the bounded cut instead")

    def _bounded(self, why: str):
        if why not in self.report.notes:
            self.report.notes.append(why)
        runs = self.fallback()
        if runs is None:
            raise MemoryRefusal(why.replace(": checked on the bounded cut instead", "") + "; no cut of the model "
                                "was found for the bounded check: rerun with --no-validate")
        return runs

    def compare(self, length: int) -> dict[str, Any]:
        why = self._fits(self.original, length) or self._fits(self.rewritten, length)
        return self._bounded(why).compare(length) if why else compare_models(self.original, self.rewritten, length)

    def run_far(self, length: int) -> tuple[bool, str]:
        why = self._fits(self.rewritten, length)
        return self._bounded(why).run_far(length) if why else run_full_model(self.rewritten, length,
                                                                               original=self.original)

    def probe_past_cache(self, rows: int) -> dict[str, Any]:
        why = self._fits(self.rewritten, rows + 1)
        return self._bounded(why).probe_past_cache(rows) if why else probe_past_cache(self.rewritten, rows)


def model_runs(original, rewritten, options, sites, vocab, report: ValidationReport):
    """The runner of the model-level checks (compare, run_far, probe_past_cache) for `options.validate_scope`:
    BoundedRuns (the default) or FullRuns. In the bounded scope, a model whose original onnxruntime cannot
    load is refused (ModelLoadError, exit 3)."""
    made: list = []

    def bounded():
        if not made:
            runs = BoundedRuns(original, rewritten, sites, vocab)
            made.append(runs if runs.usable else None)
        return made[0]

    from posrewrite.cut import onnxruntime_load_error

    reason = onnxruntime_load_error(_graph_of(original))  # the whole graph, no weight held
    if reason is not None:
        raise errors.ModelLoadError(f"{original}: onnxruntime cannot load the model: {reason}")

    if getattr(options, "validate_scope", "bounded") == "full":
        return FullRuns(original, rewritten, report, bounded)
    report.scope = "bounded"
    runs = bounded()
    if runs is None:
        report.notes.append("no cut of the model was found (no attention whose result both models hold): the "
                            "whole models are run instead, within the memory estimate")
        return FullRuns(original, rewritten, report, lambda: None)
    report.notes.append(f"model-level checks on a cut of both models ({runs.describe()}); --validate full runs "
                        "the whole models")
    return runs


def validate_rewrite(original, rewritten, options, *, found, plans, other_changes, fused_cache_rows=None,
                     compare_lengths=(), model: ir.Model | None = None, exact_decode: bool = False,
                     rotations: bool | None = None) -> ValidationReport:
    """The oracle of what a rewrite of `original` into `rewritten` (saved files) claims, from the options:

    - every RoPE rotation of the rewritten model (each site, each layer) against a numpy rotation of its own
      pre-rotation q/k with the frequencies and attention factor `posrewrite.math.rope` gives for the request
      (the original's own numbers when nothing was rescaled), at lengths below and above L and at the new one;
    - output-preserving rewrites (fusion, --fp32-positions on a model with fp32 positions, extension within the
      old length, dynamic below L): original and rewritten outputs on the same inputs (`compare_models`);
    - rescales: the whole rewritten model at the new length is finite;
    - fused caches: a position past them is rejected.

    `found` is the detection of the original, `plans` the SitePlans of the rewrite (from that detection).
    Whole models are run one after the other, never skipped for their size."""
    try:
        return _validate_rewrite(original, rewritten, options, found=found, plans=plans, other_changes=other_changes,
                                 fused_cache_rows=fused_cache_rows, compare_lengths=compare_lengths, model=model,
                                 rotations=rotations, exact_decode=exact_decode)
    finally:
        _GRAPHS.clear()


def _validate_rewrite(original, rewritten, options, *, found, plans, other_changes, fused_cache_rows,
                      compare_lengths, model, rotations, exact_decode=False) -> ValidationReport:
    report = ValidationReport()
    start = time.perf_counter()
    grid_plans = [p for p in plans if p.grid is not None]
    if grid_plans:  # 2-D RoPE: the rewritten angles re-fitted by probing against the planned ones
        if model is None:
            from posrewrite import io

            model = io.load_model(rewritten)
        report.rows.extend(check_grid_rescales(model, grid_plans))
        plans = [p for p in plans if p.grid is None]
    rope_sites = [s for s in found.rope_sites if all(p.site is not s for p in grid_plans)]
    if len(plans) == len(rope_sites) and all(_plan_for(s, plans) is None for s in rope_sites):
        references = [RopeReference(s, p) for s, p in zip(rope_sites, plans, strict=True)]  # one plan per site
    else:
        references = [RopeReference(s, _plan_for(s, plans)) for s in rope_sites]
    rescaled = any(p.params.rope_type != "default" or p.params.rope_theta is not None for p in plans)
    touches_rope = bool(plans) or options.fuse != "none" or options.fp32_positions if rotations is None else rotations
    vocab = token_id_limits(original)
    if touches_rope and references:
        if model is None:
            from posrewrite import io

            model = io.load_model(rewritten)
        lengths = set(rotation_lengths(references))
        # the fused caches' last row (claimed by the rewrite, or by --max-positions) must be reachable
        lengths.update(n for n in (fused_cache_rows, options.max_positions) if n and n <= 4 * MAX_VALIDATION_LENGTH)
        bounded = getattr(options, "validate_scope", "bounded") != "full"
        report.rows.extend(check_rotations(model, references, sorted(lengths), vocab,
                                           keys_rotated_after_cache=exact_decode, bounded=bounded))
    half_positions = any(_half(s.position_dtype) or _half(s.angle_dtype) for s in rope_sites)
    changes_outputs = (rescaled or bool(options.pos_scale) or bool(options.alibi_scale) or bool(options.bias_scale)
                       or (options.fp32_positions and half_positions))
    lengths = set(compare_lengths)
    if not changes_outputs:
        lengths.update(_switch_lengths(rope_sites))
    for p in plans:
        if (p.params.rope_type == "dynamic" and p.params.original_max_position_embeddings
                and p.site.prior_scaling is None and p.params.rope_theta is None):
            lengths.add(max(2, int(p.params.original_max_position_embeddings) // 2))  # dynamic keeps it below L
    if not changes_outputs and (touches_rope or other_changes):
        lengths.add(FUSE_COMPARE_LENGTH)
    elif options.fp32_positions and half_positions and not rescaled:
        report.notes.append("outputs not compared with the original: its positions or angles are in half "
                            "precision, which --fp32-positions changes on purpose (rotations were checked)")
    runs = model_runs(original, rewritten, options, rope_sites, vocab, report)
    if not changes_outputs or rescaled:
        for n in sorted(lengths):
            if n <= MAX_VALIDATION_LENGTH:
                # exact decode (--runtime-decode rerotate): the caches hold other values, so the whole models
                # are compared from an empty past
                report.rows.append(compare_models(original, rewritten, n, cache_contract_changed=True)
                                   if exact_decode else runs.compare(n))
    length = None
    if rescaled:
        length = min(max(rotation_lengths(references)), MAX_VALIDATION_LENGTH)
    elif (other_changes or plans) and options.max_positions:  # extended tables: run at their new length
        length = min(int(options.max_positions), MAX_VALIDATION_LENGTH)
    if length:
        ok, message = runs.run_far(length)
        report.rows.append({"site": "model", "length": length, "max_abs_error": None, "tolerance": None,
                            "ok": ok, "message": message,
                            "compared": f"the rewritten model at {length} positions: runs, no NaN or +inf"})
    rows = fused_cache_rows
    if rows and rows < 4 * MAX_VALIDATION_LENGTH:
        report.rows.append(runs.probe_past_cache(int(rows)))
    report.seconds = time.perf_counter() - start
    return report


def check_grid_rescales(model: ir.Model, plans: list) -> list[dict[str, Any]]:
    """Each 2-D RoPE plan against the rewritten model: its angle tensor is found and fitted again by probing
    (a·row + b·column per channel at the same probe grid), and must equal the original slopes times the planned
    per-channel ratio, with the planned attention factor on cos/sin."""
    from posrewrite.passes.onnx.rope.detect import detect_rope

    sites, _ = detect_rope(model)
    by_key = {site_key(s): s for s in sites}
    rows = []
    for index, plan in enumerate(plans):
        row = {"site": index, "length": None, "tolerance": None, "max_abs_error": None,
               "compared": "2-D RoPE angles of the rewritten model (fitted per channel on probe grids) vs the "
                           "original's times the planned per-axis ratios"}
        new = by_key.get(site_key(plan.site))
        if new is None or new.angles.value != "grid":
            rows.append({**row, "ok": False, "message": "the 2-D RoPE is not found in the rewritten model"})
            continue
        ratio = np.asarray(plan.grid.angle_ratio, np.float64).reshape(-1)
        old_axes, new_axes = plan.site.source.axes, new.source.axes
        want = np.stack([old_axes.row_slope * ratio, old_axes.col_slope * ratio])
        got = np.stack([new_axes.row_slope, new_axes.col_slope])
        if want.shape != got.shape:
            rows.append({**row, "ok": False, "message": f"angle channels {got.shape} vs planned {want.shape}"})
            continue
        err = float(np.max(np.abs(got - want)))
        # the slopes are fitted from float32 angles of up to slope x grid size: a few roundings of those
        tol = 16 * precision.unit_roundoff("float32") * max(1.0, float(np.max(np.abs(want)))) * max(
            old_axes.probe_grid)
        factor_ok = bool(np.isclose(new.attention_factor, plan.attention_factor, rtol=1e-6))
        rows.append({**row, "max_abs_error": err, "tolerance": tol, "ok": err <= tol and factor_ok,
                     **({} if factor_ok else {"message": f"attention factor {new.attention_factor:g}, planned "
                                                         f"{plan.attention_factor:g}"})})
    return rows


def describe_failure(report: ValidationReport) -> str:
    """One line for the first failed row: what was compared, the error and its bound, or the message."""
    row = next(r for r in report.rows if not r["ok"])
    where = f"site {row['site']}" + (f" ({row['rotation']})" if row.get("rotation") else "")
    where += f" at {row['length']} tokens" if row.get("length") is not None else ""
    what = row.get("compared", "")
    if row.get("max_abs_error") is not None and row.get("tolerance") is not None:
        detail = f"max |error| {row['max_abs_error']:.3g} > tolerance {row['tolerance']:.3g}"
    else:
        detail = row.get("message", "failed")
    text = f"{where}: {what}: {detail}" if what else f"{where}: {detail}"
    return " ".join(text.split())
