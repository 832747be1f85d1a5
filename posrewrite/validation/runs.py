"""Running models in onnxruntime for validation: sessions, the inputs of a whole-model call (token ids from the middle
of the vocabulary, masks, positions, a random KV-cache past), whole-model runs and original-vs-rewritten output
comparisons within `output_tolerance`, the probe one position past fused caches, and the graphs of the saved models
(loaded once per validation, no weight read).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite import errors
from posrewrite.math import precision
from posrewrite.validation.report import ModelCheck

__all__ = [
    "COMPARE_EPS_UNITS",
    "MAX_VALIDATION_LENGTH",
    "MemoryRefusal",
    "compare_models",
    "compare_outputs",
    "dtype_eps",
    "full_model_feeds",
    "graph_of",
    "output_tolerance",
    "probe_past_cache",
    "release_graphs",
    "run_full_model",
    "session_for",
    "session_from_bytes",
    "token_id_limits",
    "token_ids",
]

#: Longest call a whole-model check runs (the rotation oracle reaches 4x further on the rotation subgraphs).
MAX_VALIDATION_LENGTH = 4096


def session_from_bytes(model_proto_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed run becomes a row of the report (and one error line), not a log line
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model_proto_bytes, options, providers=["CPUExecutionProvider"])


def session_for(path, quiet: bool = False):
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
    from posrewrite import io

    proto = io.read_proto(path)  # inline weights left in the file
    inputs = {i.name for i in proto.graph.input}
    tables = {t.name: t.dims for t in proto.graph.initializer}
    limits: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs and node.input[0] in tables:
            dims = tables[node.input[0]]
            if len(dims) == 2 and dims[0] > 0:
                limits[node.input[1]] = min(limits.get(node.input[1], dims[0]), int(dims[0]))
    return limits


def token_ids(count: int, vocab: int | None) -> np.ndarray:
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


def full_model_feeds(session, length: int, vocab: dict[str, int] | None = None, *,
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
            ids = token_ids(shape[-1] if shape else 1, vocab.get(i.name)).astype(dtype)
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
        session = session_for(path, quiet=what != "the rewritten model")
    except Exception as exc:  # noqa: BLE001
        return False, f"onnxruntime cannot load {what}: {str(exc).splitlines()[0][:200]}"
    feeds = full_model_feeds(session, length, token_id_limits(path))
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


def dtype_eps(dtype: str) -> float:
    """Machine epsilon of a float dtype (`posrewrite.math.precision`); float32's for any other type."""
    try:
        return precision.machine_epsilon(dtype)
    except ValueError:
        return precision.machine_epsilon("float32")


def output_tolerance(reference: np.ndarray) -> tuple[float, str]:
    """(bound, how) for comparing a rewritten model's output with the original's `reference`."""
    dtype = str(np.asarray(reference).dtype)
    units = COMPARE_EPS_UNITS.get(dtype, 64.0)
    eps = dtype_eps(dtype)
    a = np.asarray(reference, dtype=np.float64)
    magnitude = float(np.max(np.abs(a))) if a.size else 0.0
    how = f"{units:g} {dtype} eps x max|original| ({magnitude:.3g})"
    return units * eps * max(magnitude, float(np.finfo(np.float32).tiny)), how


def _run_model(path, feeds_from=None, length: int = 0, vocab=None, empty_past: bool = False):
    """Runs the model at `path` (a session of its own, released on return); (outputs, feeds) or a message."""
    try:
        session = session_for(path)
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}", None
    feeds = feeds_from if feeds_from is not None else full_model_feeds(session, length, vocab,
                                                                        empty_past=empty_past)
    if isinstance(feeds, str):
        return feeds, None
    try:
        return session.run(None, feeds), feeds
    except Exception as exc:  # noqa: BLE001
        return f"fails at {length} tokens: {str(exc).splitlines()[0][:200]}", feeds


def compare_models(original, rewritten, length: int, *, cache_contract_changed: bool = False) -> ModelCheck:
    """Runs the original and the rewritten model on the same inputs at `length` tokens, one after the other
    (one model in memory at a time), and compares every floating output (logits, and presents of KV-cache
    models) within `output_tolerance`; the row reports the worst one relative to its bound.
    ``cache_contract_changed`` (the rewritten cache holds other values, e.g. keys before rotation): a prefill
    from an empty past, the first output (logits) only."""
    row = ModelCheck(site="model", length=length, ok=True, compared=f"original vs rewritten outputs at {length} tokens")
    ref, feeds = _run_model(original, length=length, vocab=token_id_limits(original),
                            empty_past=cache_contract_changed)
    if cache_contract_changed and not isinstance(ref, str):
        ref = ref[:1]
    if isinstance(ref, str):
        return dataclasses.replace(row, message=f"comparison skipped: the original: {ref}")
    new, _ = _run_model(rewritten, feeds_from=feeds, length=length)
    if isinstance(new, str):
        return dataclasses.replace(row, ok=False, message=f"the rewritten model {new}")
    if cache_contract_changed:
        new = new[:1]
    return compare_outputs(row, ref, new, length, f"at {length} tokens")


def compare_outputs(row: ModelCheck, ref, new, length: int, where: str) -> ModelCheck:
    """`row` completed with the comparison of every floating output of `ref` (the original's) with `new`'s, within
    `output_tolerance`; the row reports the worst one relative to its bound."""
    pairs = [(a, b) for a, b in zip(ref, new) if np.issubdtype(np.asarray(a).dtype, np.floating)]  # noqa: B905
    if not pairs or len(ref) != len(new):
        return dataclasses.replace(
            row, ok=not pairs and len(ref) == len(new),
            message="comparison skipped: no floating output" if not pairs else "output counts differ")
    worst, tol_at_worst, how_at_worst, ok = 0.0, None, "", True
    for k, (x, y) in enumerate(pairs):  # logits, and present keys/values where the model returns them
        a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if np.any(np.isnan(a)):
            if k == 0:
                return dataclasses.replace(
                    row, message=f"comparison skipped: the original model itself gives NaN outputs {where}")
            continue
        if a.shape != b.shape:
            return dataclasses.replace(row, ok=False, message=f"output {k} shapes differ: {a.shape} vs {b.shape}")
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
    return dataclasses.replace(
        row, max_abs_error=worst, tolerance=tol_at_worst, ok=ok, tolerance_from=how_at_worst,
        message=f"original and rewritten {outputs} ({len(pairs)}) {where}",
        compared=f"original vs rewritten {outputs} ({len(pairs)}) on the same inputs {where}")


def probe_past_cache(path, rows: int) -> ModelCheck:
    """Runs a fused model at `rows + 1` tokens, one position past its caches: the run must fail with an error
    (onnxruntime CPU checks position ids against the cache) rather than give outputs from unrotated or
    out-of-bounds values. The error comes from the first layer's RotaryEmbedding, so the probe is cheap."""
    length = rows + 1
    row = ModelCheck(site="past cache", length=length, ok=True,
                     compared=f"the fused model at {length} tokens, one past its {rows}-row caches: must be rejected")
    try:
        session = session_for(path, quiet=True)
    except Exception as exc:  # noqa: BLE001
        return dataclasses.replace(row, ok=False, message="onnxruntime cannot load the rewritten model: "
                                                          f"{str(exc).splitlines()[0][:200]}")
    feeds = full_model_feeds(session, length, token_id_limits(path))
    if isinstance(feeds, str):
        return dataclasses.replace(row, message=f"probe skipped: {feeds}")
    try:
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).splitlines()[0]
        text = text.split("Status Message:", 1)[-1].strip()  # onnxruntime's own reason, without the node preamble
        return dataclasses.replace(row, message=f"position {rows} is rejected by onnxruntime: {text[:160]}")
    return dataclasses.replace(row, ok=False, message=f"position {rows} is past the {rows}-row caches but the model "
                                                      "ran without error")


_GRAPHS: dict[tuple[str, int, int], ir.Model] = {}


def release_graphs() -> None:
    """Forget the graphs `graph_of` loaded (the end of a validation)."""
    _GRAPHS.clear()


def graph_of(path) -> ir.Model:
    """The graph of a model loaded (and checked) before: onnx_ir's lazy load, no weight read (a folder rewrite
    with --link-weights hard-links the data files, which io.load_model refuses to read; nothing here reads them:
    onnxruntime maps them). Loaded once per validation (`validate_rewrite` clears them); inline weights stay
    in the file too (io.read_model)."""
    import os

    from posrewrite import io

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _GRAPHS:
        _GRAPHS[key] = io.read_model(path)
    return _GRAPHS[key]


class MemoryRefusal(errors.UsageError):
    """A session would not fit in the memory available (message: the estimate and the way out; exit 2)."""
