"""The loading policy: what posrewrite accepts in a model file before onnx_ir sees it (see :func:`check_proto`)
and the opsets onnxruntime runs. Every way a model can be unusable is a one-line
:class:`~posrewrite.errors.ModelLoadError` (exit 3)."""

from __future__ import annotations

__all__ = ["DEFAULT_DOMAINS", "MAX_OPSET", "MIN_OPSET", "check_opset", "check_proto", "max_supported_opset",
           "printable"]

import functools
import math
import os
import stat
from pathlib import Path

import onnx
import onnx_ir as ir

from posrewrite.errors import ModelLoadError

#: Oldest default-domain opset accepted (onnxruntime guarantees nothing below 7).
MIN_OPSET = 7
#: Every onnxruntime the project supports (>= 1.20) runs opset 21; newer stamps are probed once.
_SAFE_OPSET = 21

DEFAULT_DOMAINS = ("", "ai.onnx")


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


def check_opset(proto: onnx.ModelProto, path: Path) -> None:
    versions = [op.version for op in proto.opset_import if op.domain in DEFAULT_DOMAINS]
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


def printable(text: object, limit: int = 120) -> str:
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
                self.fail(f"{self._where(where)}: attribute '{printable(msg.name)}' has no type")
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
                            f"{self._where(where)}.{name} is not valid UTF-8 ({printable(item, 60)}); "
                            "ONNX strings must be"
                        )

    def node(self, node: onnx.NodeProto, where: object) -> None:
        """A node of a standard op has the inputs and outputs its schema requires (named where required); no
        node has two attributes of one name."""
        names = [a.name for a in node.attribute]
        if len(set(names)) != len(names):
            self.fail(f"{self._where(where)} has two attributes of the same name")
        if node.domain not in DEFAULT_DOMAINS or not isinstance(node.op_type, str):
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except Exception:  # noqa: BLE001 - an op onnx does not know (onnxruntime may): nothing to check
            return
        label = f"node '{printable(node.name)}' ({printable(node.op_type)})" if node.name else self._where(where)
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
            if node.domain not in DEFAULT_DOMAINS or not any(i in strings for i in node.input):
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
                        f"string tensor '{printable(name)}' feeds input {k} of node '{printable(node.name)}' "
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
                text += f" '{printable(label, 60)}'"
        return text

    def tensor(self, t: onnx.TensorProto, where: str) -> None:
        for text in (t.name, t.doc_string):
            if isinstance(text, bytes):
                self.fail(f"{self._where(where)}: a string of the tensor is not valid UTF-8")
        label = f"tensor '{printable(t.name)}'" if t.name else self._where(where)
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
        shown = printable(location)
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
                self.fail(f"external data file '{shown}' of {label} is missing (expected at {printable(data_path)})")
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


def check_proto(proto: onnx.ModelProto, path: Path, base_dir: Path,
                 inline: tuple[str, set[int]] = ("", set())) -> list[str]:
    """Apply the loading policy to every tensor and string of ``proto``; return the external data files.
    ``inline``: the location and offsets of the raw_data payloads left in the model file (read_skeleton)."""
    checker = _ProtoChecker(path, base_dir)
    checker.inline = inline
    checker.opset = max((op.version for op in proto.opset_import if op.domain in DEFAULT_DOMAINS), default=MIN_OPSET)
    try:
        checker.walk(proto, "model")
    except RecursionError:
        raise ModelLoadError(f"{path}: the model's graphs are nested too deeply") from None
    return sorted(checker.files)
