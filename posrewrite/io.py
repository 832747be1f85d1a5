"""Load and save ONNX models through onnx_ir, safely.

- :func:`load_model` parses the graph but never reads weight bytes: tensors stored as external data stay
  :class:`onnx_ir.ExternalTensor` objects, memory-mapped only when a pass actually reads one. One loading policy
  applies to every tensor of the file, in the main graph, subgraphs (If/Loop/Scan) and local function bodies
  alike, before a byte of external data is read: external data must be a regular file inside the model's folder
  (resolved against that folder, symlinks followed), with the tensor's bytes within the file and its declared
  length; inline data must match its shape; sparse tensors, training_info and strings that are not UTF-8 are
  refused rather than dropped. Every way a model can be unusable is a one-line
  :class:`~posrewrite.errors.ModelLoadError` (exit 3) at load time.
- :func:`stage_model` / :func:`save_model` follow one output protocol: the new model is written beside the output
  under names no reader uses (its data under a fresh name when the old data file exists), can be validated
  there, and is switched into place by one rename of the .onnx, after which the replaced model's data is removed:
  a reader sees the old model with its data or the new one with its data, never a mix. Any failure before the
  switch (an exception, KeyboardInterrupt, SIGTERM via the CLI) removes what was written. Only regular files or
  new paths are replaced; a missing output folder is an error, never created. External tensors that no pass
  touched are copied file-to-file from the input's data file, never held in memory all at once. Nothing is ever
  written over the input model or its data files.
"""

from __future__ import annotations

__all__ = [
    "INLINE_LIMIT_BYTES",
    "InlineTensor",
    "MAX_OPSET",
    "MIN_OPSET",
    "default_output_path",
    "ensure_distinct_output",
    "external_data_files",
    "external_data_path",
    "has_inline_tensors",
    "load_model",
    "max_supported_opset",
    "preload_model",
    "read_model",
    "read_proto",
    "StagedModel",
    "check_output_path",
    "copy_sparse",
    "output_disk_bytes",
    "remove_leftovers",
    "save_model",
    "shares_weights_with",
    "stage_model",
    "source_path",
]

import errno
import fcntl
import functools
import math
import mmap
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir

from posrewrite import protowire
from posrewrite.errors import ModelLoadError, OutputError, UsageError

#: Oldest default-domain opset accepted (onnxruntime guarantees nothing below 7).
MIN_OPSET = 7
#: Every onnxruntime the project supports (>= 1.20) runs opset 21; newer stamps are probed once.
_SAFE_OPSET = 21
#: Above this many bytes of initializers, "auto" saving puts weights in external data (protobuf's hard limit
#: is 2 GiB for the whole file).
INLINE_LIMIT_BYTES = int(1.8 * 2**30)
#: Tensors smaller than this stay inside the .onnx file when saving with external data.
_EXTERNAL_THRESHOLD_BYTES = 1024

# Keys in ``model.meta`` (not serialized) recorded by load_model and read by save_model.
_META_SOURCE = "posrewrite.source_path"
_META_DATA_FILES = "posrewrite.external_data_files"
_META_SOURCE_STAT = "posrewrite.source_stat"
#: Inline tensors (raw_data) of at least this many bytes stay in the model file until something reads them.
LAZY_INLINE_BYTES = 1024

_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------------------------------- opsets


@functools.lru_cache(maxsize=1)
def max_supported_opset() -> int:
    """Newest default-domain opset the installed onnxruntime accepts (falls back to onnx's when ORT is absent).

    Found by asking onnxruntime to load a one-node model (a few milliseconds, once per process).
    """
    newest = onnx.defs.onnx_opset_version()
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return newest

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the probe is expected to fail above the maximum

    def accepts(opset: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        proto.ir_version = 8
        try:
            ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    lo, hi = _SAFE_OPSET, newest  # invariant: lo accepted; answer in [lo, hi]
    if accepts(hi):
        return hi
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if accepts(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


#: Newest opset posrewrite itself knows about (onnx's schemas); onnxruntime's limit may be lower.
MAX_OPSET = onnx.defs.onnx_opset_version()


def _check_opset(proto: onnx.ModelProto, path: Path) -> None:
    versions = [op.version for op in proto.opset_import if op.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ModelLoadError(
            f"{path}: not a usable ONNX model: no opset for the default domain (truncated or not a model file?)"
        )
    opset = max(versions)
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest onnxruntime supports; "
            "convert it first with onnx.version_converter.convert_version"
        )
    if opset > _SAFE_OPSET and opset > max_supported_opset():
        import onnxruntime as ort

        raise ModelLoadError(
            f"{path}: opset {opset} is newer than onnxruntime {ort.__version__} supports "
            f"(at most {max_supported_opset()}); export with an older opset or upgrade onnxruntime"
        )


# ------------------------------------------------------------------------------------------- external data


def _graph_tensors(graph: ir.Graph | ir.Function) -> Iterator[ir.TensorProtocol]:
    """Initializers (of graphs) and tensor attributes of ``graph``'s nodes, recursing into subgraphs."""
    if isinstance(graph, ir.Graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in graph:
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value
            elif attr.type == ir.AttributeType.GRAPH:
                yield from _graph_tensors(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _graph_tensors(sub)


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, in the main graph, its subgraphs (If,
    Loop, Scan bodies) and the bodies of the model's local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions.values():
        yield from _graph_tensors(function)


class InlineTensor(ir.ExternalTensor):
    """A tensor stored inline in the model file (its ``raw_data``), read from there (mapped) only when something
    reads it: loading and saving never hold it (see :mod:`posrewrite.protowire`). An ``ExternalTensor`` whose
    file is the model itself, so that onnxruntime sessions of cuts read it from the file too; written back
    inline (or into the output's data file when the output has one)."""

    __slots__ = ()

    def _check_path_containment(self) -> None:
        # onnx_ir's check refuses a hard-linked data file; this file is the model the user gave, already opened
        # and checked by load_model (a hard-linked .onnx file is the user's own business, as before).
        return None


def has_inline_tensors(model: ir.Model) -> bool:
    """Whether some tensor of the model is still read from its .onnx file (InlineTensor): onnx_ir's writer
    would store it as external data of that file; save_model writes it inline."""
    return any(isinstance(t, InlineTensor) for t in _all_tensors(model))


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Tensors stored in external data files (not the model's own inline tensors read lazily)."""
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and not isinstance(tensor, InlineTensor):
            yield tensor


def _replace_tensors(model: ir.Model, replace) -> list[tuple[object, str, object]]:
    """Replace each tensor `t` of the model (initializers and tensor attributes, in every graph, subgraph and
    function body) for which ``replace(t, main)`` (main: an initializer of the main graph) returns a tensor;
    return what to restore (see _restore)."""
    done: list[tuple[object, str, object]] = []

    def visit(graph, is_main: bool) -> None:
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                new = None if value.const_value is None else replace(value.const_value, is_main)
                if new is not None:
                    done.append((value, "const_value", value.const_value))
                    value.const_value = new
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    new = replace(attr.value, False)
                    if new is not None:
                        done.append((node.attributes, name, attr))
                        node.attributes[name] = ir.AttrTensor(name, new, doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.TENSORS:
                    news = [replace(t, False) for t in attr.value]
                    if any(n is not None for n in news):
                        done.append((node.attributes, name, attr))
                        tensors = [t if n is None else n for t, n in zip(attr.value, news, strict=True)]
                        node.attributes[name] = ir.AttrTensors(name, tensors, doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.GRAPH:
                    visit(attr.value, False)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        visit(sub, False)

    visit(model.graph, True)
    for function in model.functions.values():
        visit(function, False)
    return done


# ----------------------------------------------------------------------------------- the loading policy
#
# Every TensorProto of the file (main graph, subgraphs, local function bodies, attributes, attribute defaults)
# is checked on the protobuf, before onnx_ir sees it and before a byte of external data is read:
#   - external data: a relative location without NUL, resolved against the model's folder and staying inside it
#     (symlinks resolved), a regular file with one link, offset/length parseable, the declared length at least
#     what the shape needs, and offset + bytes within the file;
#   - inline data: a known data type, non-negative dimensions, raw_data exactly the bytes the shape needs;
#   - what onnx_ir would drop on the way (sparse tensors, training_info) and strings that are not UTF-8 (onnx_ir
#     cannot write them back) are refused rather than lost.

_TENSOR = onnx.TensorProto
_TYPE_STRING = 9  # google.protobuf FieldDescriptor.TYPE_STRING
_TYPE_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE


def _printable(text: object, limit: int = 120) -> str:
    """A name from the model, safe to print on one line of a terminal: control characters escaped, cut short."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[: limit - 1] + "…"


class _ProtoChecker:
    def __init__(self, path: Path, base_dir: Path) -> None:
        self.path = path
        self.base_dir = base_dir
        self.base_real = os.path.realpath(base_dir)
        self.files: dict[str, int] = {}  # real path -> size
        self.opset = MIN_OPSET
        # inline payloads left in the model file by protowire.read_skeleton: (its location, their offsets)
        self.inline: tuple[str, set[int]] = ("", set())

    def fail(self, message: str) -> None:
        raise ModelLoadError(f"{self.path}: {message}")

    def walk(self, msg: object, where: object) -> None:
        """Check ``msg`` and everything in it; ``where`` is rendered (by :meth:`_where`) only for a message."""
        if isinstance(msg, _TENSOR):
            self.tensor(msg, where)
            return
        if isinstance(msg, onnx.NodeProto):
            self.node(msg, where)
        elif isinstance(msg, onnx.AttributeProto) and msg.type == onnx.AttributeProto.UNDEFINED:
            if not msg.ref_attr_name:
                self.fail(f"{self._where(where)}: attribute '{_printable(msg.name)}' has no type")
        elif isinstance(msg, onnx.GraphProto):
            for vi in (*msg.input, *msg.output):
                if not vi.name:
                    self.fail(f"{self._where(where)} has an input or output without a name")
            self.string_uses(msg)
        if isinstance(msg, onnx.SparseTensorProto):
            self.fail(f"{self._where(where)} is a sparse tensor, which posrewrite does not support (it would be lost)")
        for field, value in msg.ListFields():
            name = field.name
            if field.type == _TYPE_MESSAGE:
                if name == "training_info":
                    self.fail("the model holds training_info, which posrewrite does not support (it would be lost)")
                if name == "sparse_initializer":
                    self.fail(
                        f"{self._where(where)} has sparse initializers, which posrewrite does not support "
                        "(they would be lost)"
                    )
                if field.is_repeated:
                    for k, item in enumerate(value):
                        self.walk(item, (where, name, k, item))
                else:
                    self.walk(value, (where, name, None, None))
            elif field.type == _TYPE_STRING:
                for item in value if field.is_repeated else (value,):
                    if isinstance(item, bytes):
                        self.fail(
                            f"{self._where(where)}.{name} is not valid UTF-8 ({_printable(item, 60)}); "
                            "ONNX strings must be"
                        )

    def node(self, node: onnx.NodeProto, where: object) -> None:
        """A node of a standard op has the inputs and outputs its schema requires (named where required); no
        node has two attributes of one name."""
        names = [a.name for a in node.attribute]
        if len(set(names)) != len(names):
            self.fail(f"{self._where(where)} has two attributes of the same name")
        if node.domain not in _DEFAULT_DOMAINS or not isinstance(node.op_type, str):
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except Exception:  # noqa: BLE001 - an op onnx does not know (onnxruntime may): nothing to check
            return
        label = f"node '{_printable(node.name)}' ({_printable(node.op_type)})" if node.name else self._where(where)
        if not schema.min_input <= len(node.input) <= schema.max_input:
            self.fail(f"{label} has {len(node.input)} inputs, {node.op_type} takes {schema.min_input} to "
                      f"{schema.max_input}")
        if not schema.min_output <= len(node.output) <= schema.max_output:
            self.fail(f"{label} has {len(node.output)} outputs, {node.op_type} gives {schema.min_output} to "
                      f"{schema.max_output}")
        for k, param in enumerate(schema.inputs[: len(node.input)]):
            if param.option == onnx.defs.OpSchema.FormalParameterOption.Single and not node.input[k]:
                self.fail(f"{label}: its required input {k} has no name")
        if node.output and not any(node.output):
            self.fail(f"{label}: none of its outputs has a name")

    def string_uses(self, graph: onnx.GraphProto) -> None:
        """A string initializer feeds only inputs that take strings (onnxruntime refuses the model otherwise;
        posrewrite would read a string tensor as numbers)."""
        strings = {t.name for t in graph.initializer if t.data_type == _TENSOR.STRING}
        if not strings:
            return
        for node in graph.node:
            if node.domain not in _DEFAULT_DOMAINS or not any(i in strings for i in node.input):
                continue
            try:
                schema = onnx.defs.get_schema(node.op_type, self.opset, "")
            except Exception:  # noqa: BLE001 - unknown op: nothing to check
                continue
            constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
            for k, name in enumerate(node.input):
                if name not in strings or not schema.inputs:
                    continue
                param = schema.inputs[min(k, len(schema.inputs) - 1)]
                allowed = constraints.get(param.type_str, [param.type_str])
                if "tensor(string)" not in allowed:
                    self.fail(
                        f"string tensor '{_printable(name)}' feeds input {k} of node '{_printable(node.name)}' "
                        f"({node.op_type}), which does not take strings"
                    )

    @classmethod
    def _where(cls, where: object) -> str:
        if not isinstance(where, tuple):
            return str(where)
        parent, name, k, item = where
        text = f"{cls._where(parent)}.{name}"
        if k is not None:
            text += f"[{k}]"
            label = getattr(item, "name", None)
            if isinstance(label, str) and label:
                text += f" '{_printable(label, 60)}'"
        return text

    def tensor(self, t: onnx.TensorProto, where: str) -> None:
        for text in (t.name, t.doc_string):
            if isinstance(text, bytes):
                self.fail(f"{self._where(where)}: a string of the tensor is not valid UTF-8")
        label = f"tensor '{_printable(t.name)}'" if t.name else self._where(where)
        try:
            dtype = ir.DataType(t.data_type)
        except ValueError:
            self.fail(f"{label} has an unknown data type {t.data_type}")
        if dtype == ir.DataType.UNDEFINED:
            self.fail(f"{label} has data type UNDEFINED")
        if any(d < 0 for d in t.dims):
            self.fail(f"{label} has a negative dimension {list(t.dims)}")
        count = math.prod(t.dims)
        if dtype == ir.DataType.STRING:
            if t.data_location == _TENSOR.EXTERNAL:
                self.fail(f"{label}: string tensors cannot be stored as external data")
            if len(t.string_data) != count:
                self.fail(f"{label} has {len(t.string_data)} strings, its shape needs {count}")
            for s in t.string_data:
                if not isinstance(s, bytes):
                    self.fail(f"{label}: bad string data")
            return
        nbytes = math.ceil(count * dtype.itemsize)
        if t.data_location == _TENSOR.EXTERNAL:
            self.external(t, label, nbytes)
            return
        if t.HasField("raw_data"):
            have = len(t.raw_data)
            if have != nbytes:
                self.fail(f"{label} has {have} bytes of raw_data, its shape {list(t.dims)} needs {nbytes}")
            return
        typed = [len(f) for f in (t.float_data, t.int32_data, t.int64_data, t.double_data, t.uint64_data) if len(f)]
        have = sum(typed)
        need = count * (2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1)
        if dtype.itemsize == 0.5:
            need = (count + 1) // 2
        if dtype.itemsize < 0.5:  # 2-bit and 6-bit packings: only "some data" is checked
            need = min(need, 1)
        if have < need:
            self.fail(f"{label} holds {have} values, its shape {list(t.dims)} needs {need}")

    def external(self, t: onnx.TensorProto, label: str, nbytes: int) -> None:
        entries = {}
        for e in t.external_data:
            if isinstance(e.key, bytes) or isinstance(e.value, bytes):
                self.fail(f"{label}: external data entries are not valid UTF-8")
            entries[e.key] = e.value
        location = entries.get("location", "")
        if location == self.inline[0] and entries.get("offset", "").isdigit() and \
                int(entries["offset"]) in self.inline[1]:  # raw_data left in the model file: the inline rule
            have = int(entries.get("length", -1))
            if have != nbytes:
                self.fail(f"{label} has {have} bytes of raw_data, its shape {list(t.dims)} needs {nbytes}")
            return
        shown = _printable(location)
        if not location:
            self.fail(f"{label} is stored as external data without a location")
        if "\0" in location:
            self.fail(f"external data location '{shown}' of {label} contains a NUL character")
        try:
            offset = int(entries.get("offset", "0") or 0)
            length = int(entries["length"]) if entries.get("length") not in (None, "") else None
        except ValueError:
            self.fail(f"{label}: external data offset/length are not integers")
        if offset < 0 or (length is not None and length < 0):
            self.fail(f"{label}: negative external data offset or length")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            self.fail(f"external data '{shown}' of {label} is an absolute path; it must lie in the model's folder")
        data_path = os.path.join(self.base_dir, location)
        real = os.path.realpath(data_path)
        if os.path.commonpath([self.base_real, real]) != self.base_real or real == self.base_real:
            self.fail(f"external data '{shown}' of {label} lies outside the model's directory; refused")
        if real not in self.files:
            try:
                st = os.stat(real)
            except FileNotFoundError:
                self.fail(f"external data file '{shown}' of {label} is missing (expected at {_printable(data_path)})")
            except OSError as e:
                self.fail(f"cannot read external data file '{shown}': {e.strerror}")
            if not stat.S_ISREG(st.st_mode):
                self.fail(f"external data '{shown}' of {label} is not a regular file")
            if st.st_nlink > 1:
                self.fail(
                    f"external data file '{shown}' has {st.st_nlink} hard links, which onnx_ir refuses to read; "
                    "copy it to a file of its own"
                )
            self.files[real] = st.st_size
        if length is not None and length < nbytes:
            self.fail(f"{label} declares {length} bytes of external data, its shape {list(t.dims)} needs {nbytes}")
        end = offset + max(nbytes, length or 0)  # onnx_ir reads the declared length, not the shape's bytes
        if end > self.files[real]:
            self.fail(
                f"external data file '{shown}' is truncated: {label} needs bytes up to {end} but the file has "
                f"{self.files[real]}"
            )


def _check_proto(proto: onnx.ModelProto, path: Path, base_dir: Path,
                 inline: tuple[str, set[int]] = ("", set())) -> list[str]:
    """Apply the loading policy to every tensor and string of ``proto``; return the external data files.
    ``inline``: the location and offsets of the raw_data payloads left in the model file (read_skeleton)."""
    checker = _ProtoChecker(path, base_dir)
    checker.inline = inline
    checker.opset = max((op.version for op in proto.opset_import if op.domain in _DEFAULT_DOMAINS), default=MIN_OPSET)
    try:
        checker.walk(proto, "model")
    except RecursionError:
        raise ModelLoadError(f"{path}: the model's graphs are nested too deeply") from None
    return sorted(checker.files)


def external_data_files(model: ir.Model) -> list[Path]:
    """Absolute paths of the files the model's external tensors live in (none read)."""
    return sorted({Path(os.path.abspath(t.path)) for t in _external_tensors(model)})


def external_data_path(output: str | os.PathLike) -> Path:
    """Where :func:`save_model` puts the external data of ``output``: ``<output>.data`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".data")


def source_path(model: ir.Model) -> Path | None:
    """The file :func:`load_model` read this model from, if it did."""
    src = model.meta.get(_META_SOURCE)
    return Path(src) if src else None


# ---------------------------------------------------------------------------------------------------- load


# One model read ahead by the CLI (to fail fast on a bad file) and handed, once, to the next load_model of the
# same unchanged file, so the command line parses each model once.
_preloaded: dict[tuple[str, int, int], ir.Model] = {}


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (os.path.abspath(path), st.st_mtime_ns, st.st_size)


def preload_model(path: str | os.PathLike) -> ir.Model:
    """:func:`load_model`, keeping the result for the next ``load_model`` of the same unchanged file (once)."""
    model = load_model(path)
    key = _file_key(Path(path))
    _preloaded.clear()
    if key is not None:
        _preloaded[key] = model
    return model


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model without reading its external weight bytes.

    Raises:
        ModelLoadError: one clear line saying what is wrong with the file.
    """
    path = Path(path)
    if _preloaded:
        key = _file_key(path)
        if key is not None and key in _preloaded:
            return _preloaded.pop(key)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path}: not a regular file (a device, FIFO or socket), not an ONNX model file")
    if st.st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: cannot read: permission denied")

    proto, offsets = _parse(path, st.st_size)
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or no graph; truncated or another format?)")
    _check_opset(proto, path)
    base_dir = Path(os.path.abspath(path)).parent
    data_files = _check_proto(proto, path, base_dir, (path.name, offsets))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        reason = _printable(" ".join(str(e).split()) or type(e).__name__, 300)
        raise ModelLoadError(f"{path}: invalid ONNX model: {reason}") from None
    del proto

    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = os.fspath(base_dir)
    _make_inline(model, path, offsets)
    model.meta[_META_SOURCE] = os.path.abspath(path)
    model.meta[_META_DATA_FILES] = data_files
    model.meta[_META_SOURCE_STAT] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return model


def read_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The model's protobuf without the payloads of its large inline tensors (they are marked as external data
    of the model file itself): shapes, names and graphs of a model of any size, for a few MB. No loading
    policy: for files loaded (checked) before, or written by posrewrite. Raises ModelLoadError."""
    path = Path(path)
    return _parse(path, path.stat().st_size)[0]


def read_model(path: str | os.PathLike) -> ir.Model:
    """onnx_ir's lazy load of a file loaded (checked) before or written by posrewrite, without the loading
    policy (a folder written with --link-weights has hard-linked data files, which load_model refuses): no
    weight is read, inline ones included (InlineTensor). Raises ModelLoadError."""
    path = Path(path)
    proto, offsets = _parse(path, path.stat().st_size)
    model = ir.serde.deserialize_model(proto)
    del proto
    base_dir = os.path.dirname(os.path.abspath(path))
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir
    _make_inline(model, path, offsets)
    return model


def _make_inline(model: ir.Model, path: Path, offsets: set[int]) -> None:
    """The external tensors read_skeleton marked (the model file's name as location, a payload's offset) become
    InlineTensor objects."""
    if not offsets:
        return

    def lazy(t: ir.TensorProtocol, _main: bool) -> InlineTensor | None:
        if isinstance(t, ir.ExternalTensor) and t.offset in offsets and t.location == path.name:
            return InlineTensor(t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                doc_string=t.doc_string, metadata_props=t.metadata_props, base_dir=t.base_dir)
        return None

    _replace_tensors(model, lazy)


def _parse(path: Path, size: int) -> tuple[onnx.ModelProto, set[int]]:
    """The model's protobuf without the payloads of its large inline tensors (left in the file: their offsets
    are returned), see protowire.read_skeleton; a file that walk cannot follow is parsed whole by protobuf, whose
    verdict counts."""
    skeleton = None
    offsets: set[int] = set()
    if size < 2**31:  # protobuf's limit for a model file: larger ones get protobuf's own verdict
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                skeleton, found = protowire.read_skeleton(mm, path.name, LAZY_INLINE_BYTES)
            offsets = {p.offset for p in found}
        except (protowire.WireError, RecursionError, OSError, ValueError):
            skeleton, offsets = None, set()
    try:
        if skeleton is None:
            return onnx.load(os.fspath(path), format="protobuf", load_external_data=False), set()
        return onnx.load_model_from_string(skeleton), offsets
    except Exception as e:  # protobuf's DecodeError, or anything from a garbage file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(
            f"{path}: not an ONNX model, or the file is corrupt or truncated (protobuf parse failed: {reason})"
        ) from None


# ---------------------------------------------------------------------------------------------------- save


def default_output_path(input_path: str | os.PathLike, suffix: str) -> Path:
    """``<stem>.<suffix>.onnx`` beside the input (``model.onnx`` + ``yarn4`` -> ``model.yarn4.onnx``)."""
    input_path = Path(input_path)
    stem = input_path.name[: -len(".onnx")] if input_path.name.endswith(".onnx") else input_path.stem
    suffix = suffix.strip(".")
    if not suffix:
        raise UsageError("the output suffix is empty")
    return input_path.with_name(f"{stem}.{suffix}.onnx")


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def ensure_distinct_output(
    input_path: str | os.PathLike | None, output_path: str | os.PathLike, *, data_files: list | None = None
) -> None:
    """Refuse (UsageError) an output that would overwrite the input model or one of its external data files."""
    if input_path is not None and _same_file(input_path, output_path):
        raise UsageError(f"the output {output_path} is the input model; posrewrite never overwrites its input")
    for data in data_files or ():
        for written in (output_path, external_data_path(output_path)):
            if _same_file(data, written):
                raise UsageError(
                    f"writing {output_path} would overwrite {data}, the input's external data; choose another name"
                )


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for tensor in _all_tensors(model):
        try:
            total += tensor.nbytes
        except Exception:  # a tensor type that cannot say its size counts as small
            pass
    return total


def _restore(restore: list[tuple[object, str, object]]) -> None:
    for owner, key, old in reversed(restore):
        if isinstance(owner, ir.Value):
            owner.const_value = old
        else:
            owner[key] = old


def check_output_path(path: str | os.PathLike) -> Path:
    """The absolute output path, or an error when it cannot be written safely.

    Only a new path or an existing regular file is ever replaced; a directory, device, FIFO, socket or symbolic
    link is refused, and so is a path whose folder does not exist (it is not created).

    Raises:
        UsageError: the path is empty.
        OutputError: any other reason (exit 8).
    """
    if not os.fspath(path).strip() or os.fspath(path) in (".", ".."):
        raise UsageError("the output path is empty or a directory: give a file name (-o OUT.onnx)")
    if "\0" in os.fspath(path):
        raise UsageError("the output path contains a NUL character")
    out = Path(os.path.abspath(path))
    shown = _printable(out, 300)
    try:
        parent = os.stat(out.parent)
    except FileNotFoundError:
        raise OutputError(f"cannot write {shown}: the directory {_printable(out.parent, 300)} does not exist") from None
    except OSError as e:
        raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
    if not stat.S_ISDIR(parent.st_mode):
        raise OutputError(f"cannot write {shown}: {_printable(out.parent, 300)} is not a directory")
    for candidate in (out, external_data_path(out)):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {_printable(candidate, 300)}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(
                f"cannot write {_printable(candidate, 300)}: it exists and is not a regular file (a device, FIFO, "
                "socket or link); posrewrite replaces only regular files"
            )
    return out


def _data_name_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(re.escape(out.name) + r"(\.[0-9a-f]{12})?\.data")


def _owned_data_files(out: Path) -> list[Path]:
    """Data files that earlier saves to ``out`` wrote beside it: ``OUT.data`` and ``OUT.<hex>.data``."""
    pattern = _data_name_pattern(out)
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return [out.parent / n for n in names if pattern.fullmatch(n)]


class StagedModel:
    """A model written beside its output under names no reader uses yet; :meth:`commit` switches it into place.

    - The external data goes to ``OUT.data`` when no such file exists, else to a fresh ``OUT.<hex>.data``: the
      file an existing ``OUT`` reads is never written to.
    - The model goes to a hidden ``.OUT.tmp-*`` file in the same folder (so the data's relative location holds,
      and :attr:`path` can be loaded and validated by onnxruntime before anything is switched).
    - :meth:`commit` renames the model over ``OUT`` (one atomic rename: readers see the old model with its old
      data, or the new one with its new data) and then removes the data files of the previous ``OUT``.
    - :meth:`discard` (also on any exception, ``KeyboardInterrupt`` included, inside ``with``) removes what
      was written.
    """

    def __init__(self, out: Path, path: Path, data: Path | None, protected: list[Path]) -> None:
        self.out = out
        self.path = path
        self.data = data
        self._protected = protected
        self.committed = False
        self._locks: list[int] = []

    def hold(self, path: Path) -> None:
        """Keep an exclusive lock on a staged file while this run lives: `remove_leftovers` (of another run)
        removes only staged files nobody holds, i.e. those of killed runs."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        self._locks.append(fd)

    def _release(self) -> None:
        for fd in self._locks:
            with _suppress_os_error():
                os.close(fd)
        self._locks = []

    def commit(self) -> Path:
        if self.committed:
            return self.out
        check_output_path(self.out)  # nothing became a device or directory meanwhile
        old_data = [p for p in _owned_data_files(self.out) if self.data is None or p.name != self.data.name]
        try:
            os.replace(self.path, self.out)
        except OSError as e:
            self.discard()
            raise OutputError(f"cannot write {_printable(self.out, 300)}: {e.strerror or e}") from None
        self.committed = True
        self._release()
        for p in old_data:  # the replaced model's data
            if any(_same_file(p, keep) for keep in self._protected):
                continue
            with _suppress_os_error():
                if stat.S_ISREG(os.lstat(p).st_mode):
                    p.unlink()
        remove_leftovers(self.out, self._protected)  # and what killed runs (SIGKILL) left
        return self.out

    def discard(self) -> None:
        if self.committed:
            return
        for p in (self.path, self.data):
            if p is not None:
                with _suppress_os_error():
                    p.unlink()
        self._release()

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.discard()


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def stage_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: Literal["auto"] | bool | None = "auto",
    share_weights: bool = False,
) -> StagedModel:
    """Write ``model`` beside ``path`` without touching ``path`` or any file a reader of it uses (see
    :class:`StagedModel`); ``external_data`` as for :func:`save_model`. ``share_weights``: external tensors no
    pass touched keep reading the input's data file (which must lie in the output's folder), nothing is copied.

    Raises:
        UsageError: ``path`` is the file the model was loaded from, or one of its external data files.
        OutputError: the file cannot be written (see :func:`check_output_path`; disk full, model too large inline).
    """
    out = check_output_path(path)
    data_files = model.meta.get(_META_DATA_FILES) or []
    protected = [Path(p) for p in [*data_files, *external_data_files(model)]]
    ensure_distinct_output(source_path(model), out, data_files=protected)

    if external_data is None or external_data == "auto":
        use_external = any(True for _ in _external_tensors(model)) or bool(data_files)
        use_external = use_external or _initializer_bytes(model) > INLINE_LIMIT_BYTES
    elif isinstance(external_data, bool):
        use_external = external_data
    else:
        raise ValueError(f"external_data must be 'auto', None, True or False, not {external_data!r}")
    if not use_external and _initializer_bytes(model) > INLINE_LIMIT_BYTES:
        raise OutputError(f"cannot write {out} as one file: its tensors exceed 1.8 GB; save with external data")

    shown = _printable(out, 300)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-", suffix=".onnx")
        os.close(fd)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp's 0600 would become the output's mode
    except OSError as e:
        raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
    staged = StagedModel(out, Path(tmp_name), None, protected)
    staged.hold(staged.path)
    remove_leftovers(out, protected)
    try:
        if use_external:
            data = external_data_path(out)
            try:  # claim the name: never write into a data file that exists (an older OUT may read it)
                fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                data = _fresh_data_path(out)
                fd = os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            staged.data = data
            staged.hold(data)
            restore = _write_data_file(model, data, share=share_weights)
            try:
                _write_model(model, staged.path, external_main=True)
            finally:
                for value, tensor in restore:
                    value.const_value = tensor
            if data.stat().st_size == 0:  # every tensor was small: no data file
                data.unlink()
                staged.data = None
        else:
            _write_model(model, staged.path, external_main=False)
    except BaseException as e:
        staged.discard()
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
        if isinstance(e, ValueError):  # protobuf refuses messages over 2 GiB
            raise OutputError(f"cannot write {shown}: {' '.join(str(e).split())}") from None
        raise
    return staged


#: protobuf cannot read a message (a model file) of 2 GiB or more
_PROTOBUF_LIMIT = 2**31 - 1


def _write_model(model: ir.Model, path: Path, *, external_main: bool) -> None:
    """Write `model`'s .onnx file to `path` without holding a weight: tensors that are read from a file (the
    input's inline tensors, external tensors) are written inline, their bytes copied file to file into their
    TensorProto's raw_data (protowire.write_spliced); with `external_main`, the main graph's external tensors
    (those in the output's data file, or the input's with --share-weights) stay external. The model is left as
    it was."""
    source = model.meta.get(_META_SOURCE)
    ranges: dict[str, protowire.FileRange] = {}

    def placeholder(t: ir.TensorProtocol, main: bool) -> ir.ExternalTensor | None:
        if not isinstance(t, ir.ExternalTensor) or (external_main and main and not isinstance(t, InlineTensor)):
            return None
        if isinstance(t, InlineTensor) and source is not None:
            _check_unchanged(model, Path(source))
        key = f"\0posrewrite-{len(ranges)}"  # no location of a loaded model holds NUL (refused at load)
        ranges[key] = protowire.FileRange(os.path.abspath(t.path), int(t.offset or 0), int(t.nbytes))
        return ir.ExternalTensor(key, None, None, t.dtype, shape=t.shape, name=t.name or "",
                                 doc_string=t.doc_string, metadata_props=t.metadata_props)

    restore = _replace_tensors(model, placeholder)
    try:
        data = ir.to_proto(model).SerializeToString()
    finally:
        _restore(restore)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    sources: dict[str, int] = {}
    pos = 0

    def write(part: bytes) -> None:
        nonlocal pos
        view = memoryview(part)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + _COPY_CHUNK], pos + done)
        pos += len(view)

    def copy(part: protowire.FileRange) -> None:
        nonlocal pos
        if part.path not in sources:
            sources[part.path] = os.open(part.path, os.O_RDONLY)
        _copy_range(sources[part.path], part.offset, fd, pos, part.length)
        pos += part.length

    try:
        protowire.write_spliced(data, ranges, write, copy, max_size=_PROTOBUF_LIMIT)
        os.ftruncate(fd, pos)
    finally:
        os.close(fd)
        for src in sources.values():
            os.close(src)


def _check_unchanged(model: ir.Model, source: Path) -> None:
    """The model's inline tensors are copied from its file: refuse when that file is no longer the one read."""
    try:
        st = source.stat()
        now = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        now = None
    if now != model.meta.get(_META_SOURCE_STAT):
        raise OutputError(f"{_printable(source, 300)} changed on disk after it was read (its inline weights are "
                          "copied from it): nothing written; run again")


def _locked_by_a_live_run(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _referenced_data(out: Path) -> set[str]:
    """Names of the data files the model at `out` reads (none read; an unreadable model reads nothing)."""
    try:
        proto = onnx.load(os.fspath(out), load_external_data=False)
    except Exception:  # noqa: BLE001 - no model or not a model: nothing of ours is referenced
        return set()
    names = set()
    for t in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001 - walks subgraphs and functions too
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    names.add(os.path.basename(e.value))
    return names


def remove_leftovers(out: Path, protected: list[Path] = ()) -> list[Path]:
    """Remove what runs killed while writing left beside their outputs in `out`'s folder: staged models
    (``.NAME.tmp-*.onnx``, any NAME), onnx_ir's staging folders (``.NAME.data.*``, ``.NAME.<hex>.data.*``) and
    data files of ``out`` (``OUT.data``, ``OUT.<hex>.data``) that the model at ``out`` does not read. A file a
    live run holds (an exclusive lock, see StagedModel.hold) is left; so are protected files (the input's
    data). Returns what was removed."""
    folder = out.parent
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    owned = _data_name_pattern(out)
    staging_dir = re.compile(r"\..+\.data\.[A-Za-z0-9_]{8}")
    referenced = None
    for name in names:
        p = folder / name
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if any(_same_file(p, keep) for keep in protected):
            continue
        if stat.S_ISREG(st.st_mode) and name.startswith(".") and ".tmp-" in name and name.endswith(".onnx"):
            doomed = [p]
        elif stat.S_ISDIR(st.st_mode) and staging_dir.fullmatch(name):
            try:
                inner = [p / n for n in os.listdir(p)]
            except OSError:
                continue
            if not all(stat.S_ISREG(os.lstat(q).st_mode) for q in inner):
                continue
            doomed = [*inner, p]
        elif stat.S_ISREG(st.st_mode) and owned.fullmatch(name):
            if referenced is None:
                referenced = _referenced_data(out)
            if name in referenced:
                continue
            doomed = [p]
        else:
            continue
        if any(not q.is_dir() and _locked_by_a_live_run(q) for q in doomed):
            continue
        for q in doomed:
            with _suppress_os_error():
                q.rmdir() if q.is_dir() else q.unlink()
        removed.append(p)
    return removed


#: Tensors of at least this many bytes start at a multiple of _ALIGNMENT in the data file (onnxruntime maps
#: them page by page); smaller ones at a multiple of 16.
_ALIGN_THRESHOLD = 1 << 20
_ALIGNMENT = 1 << 16
_COPY_CHUNK = 8 << 20


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of `fd` within [start, end) that hold data (SEEK_DATA / SEEK_HOLE); the whole range where
    the file system cannot say."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end of the file
                return
            yield pos, end  # no SEEK_DATA here: copy everything
            return
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes file to file, the holes of `src` left as holes in `dst` (nothing written there)."""
    for a, b in _data_extents(src, src_offset, src_offset + length):
        done = a
        while done < b:
            n = min(_COPY_CHUNK, b - done)
            target = dst_offset + (done - src_offset)
            try:
                copied = os.copy_file_range(src, dst, n, done, target)
            except OSError:
                copied = 0
            if copied <= 0:  # another file system, or no copy_file_range: through a bounded buffer
                chunk = os.pread(src, n, done)
                if not chunk:
                    raise OSError(errno.EIO, "external data ends early")
                copied = os.pwrite(dst, chunk, target)
            done += copied


def shares_weights_with(model: ir.Model, out: Path) -> bool:
    """Whether every external tensor of `model` lives in `out`'s folder (the output can read them there)."""
    folder = os.path.realpath(out.parent)
    return all(os.path.dirname(os.path.realpath(os.path.join(str(t.base_dir), str(t.location)))) == folder
               for t in _external_tensors(model))


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy the file `src` to a new file `dst`, its holes left as holes (SEEK_DATA/SEEK_HOLE), mode and times
    as shutil.copy2 keeps them."""
    import shutil

    size = os.stat(src).st_size
    fd_in = os.open(src, os.O_RDONLY)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _copy_range(fd_in, 0, fd_out, 0, size)
            os.ftruncate(fd_out, size)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    shutil.copystat(src, dst)


def _write_data_file(model: ir.Model, data: Path, share: bool = False) -> list[tuple[ir.Value, object]]:
    """Write the main graph's tensors of at least _EXTERNAL_THRESHOLD_BYTES to `data` and point them there
    (returns what to restore). External tensors are copied file to file keeping the input's holes (a sparse
    input gives a sparse output), or with `share` left where they are (their file is in `data`'s folder);
    tensors in memory are written as they are."""
    restore: list[tuple[ir.Value, object]] = []
    offset = 0
    sources: dict[str, int] = {}
    fd = os.open(data, os.O_WRONLY)
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            nbytes = int(tensor.nbytes)
            if nbytes < _EXTERNAL_THRESHOLD_BYTES:
                if isinstance(tensor, ir.ExternalTensor):  # small: inside the .onnx (its file is not beside OUT)
                    restore.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
                continue
            if share and isinstance(tensor, ir.ExternalTensor) and not isinstance(tensor, InlineTensor):
                continue  # read from the input's data file, beside the output
            align = _ALIGNMENT if nbytes >= _ALIGN_THRESHOLD else 16
            offset = (offset + align - 1) // align * align
            if isinstance(tensor, ir.ExternalTensor):
                path = os.path.join(str(tensor.base_dir), str(tensor.location))
                if path not in sources:
                    sources[path] = os.open(path, os.O_RDONLY)
                _copy_range(sources[path], int(tensor.offset or 0), fd, offset, nbytes)
            else:
                view = memoryview(tensor.tobytes())
                done = 0
                while done < nbytes:
                    done += os.pwrite(fd, view[done:done + _COPY_CHUNK], offset + done)
            restore.append((value, tensor))
            value.const_value = ir.ExternalTensor(data.name, offset, nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=tensor.name or value.name, base_dir=str(data.parent))
            offset += nbytes
        os.ftruncate(fd, offset)  # holes up to the end are kept
    except BaseException:
        for value, tensor in restore:
            value.const_value = tensor
        raise
    finally:
        os.close(fd)
        for src in sources.values():
            os.close(src)
    return restore


def output_disk_bytes(model: ir.Model, share: bool = False) -> tuple[int, int]:
    """(bytes of new disk, apparent bytes) the external data of `model` will take when saved: the data extents
    of its external tensors (holes stay holes; none with `share`) plus tensors in memory. Nothing is read but
    extent maps."""
    new = apparent = 0
    files: dict[str, int] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            nbytes = int(tensor.nbytes)
            if nbytes < _EXTERNAL_THRESHOLD_BYTES:
                continue
            if share and isinstance(tensor, ir.ExternalTensor) and not isinstance(tensor, InlineTensor):
                continue
            apparent += nbytes
            if isinstance(tensor, ir.ExternalTensor):
                path = os.path.join(str(tensor.base_dir), str(tensor.location))
                if path not in files:
                    files[path] = os.open(path, os.O_RDONLY)
                start = int(tensor.offset or 0)
                new += sum(b - a for a, b in _data_extents(files[path], start, start + nbytes))
            else:
                new += nbytes
    finally:
        for fd in files.values():
            os.close(fd)
    return new, apparent


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fresh_data_path(out: Path) -> Path:
    for _ in range(100):
        candidate = out.with_name(f"{out.name}.{secrets.token_hex(6)}.data")
        if not os.path.lexists(candidate):
            return candidate
    raise OutputError(f"cannot find a free name for the external data of {out}")


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: Literal["auto"] | bool | None = "auto",
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    Args:
        external_data: ``"auto"`` (or ``None``): weights go to ``<path>.data`` when the model was loaded with
            external data or its tensors exceed :data:`INLINE_LIMIT_BYTES`, and inside the file otherwise.
            ``True``: always external; ``False``: always inside the file.

    :func:`stage_model` then :meth:`StagedModel.commit`: a reader of ``path`` sees the old model or the new one,
    never a mix; a failed or interrupted save leaves nothing behind. The model object itself is left unchanged.
    When ``<path>.data`` exists already, the new data goes to ``<path>.<hex>.data`` and the old file is removed
    once the new model is in place.

    Raises:
        UsageError: ``path`` is the file the model was loaded from, or one of its external data files.
        OutputError: the file cannot be written (missing directory, not a regular file, disk full, too large).
    """
    with stage_model(model, path, external_data=external_data) as staged:
        return staged.commit()
