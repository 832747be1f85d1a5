"""Loading a model without reading its weights: :func:`load_model` (the loading policy of
:mod:`posrewrite.io.policy` applied first), :func:`read_model` / :func:`read_proto` for files checked before.

Tensors stored as external data stay :class:`onnx_ir.ExternalTensor` objects, memory-mapped only when a pass
actually reads one; inline weights (the ``raw_data`` of a main-graph initializer of at least
:data:`LAZY_INLINE_BYTES`) stay in the .onnx file as :class:`InlineTensor` objects
(:mod:`posrewrite.io.protowire`). Also the walks over every tensor of a model (main graph, subgraphs,
attributes, local functions) that loading and saving share.
"""

from __future__ import annotations

__all__ = ["LAZY_INLINE_BYTES", "InlineTensor", "all_tensors", "external_data_files", "external_tensors",
           "has_inline_tensors", "load_model", "read_model", "read_proto", "replace_tensors", "restore_tensors",
           "source_path"]

import mmap
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from posrewrite.errors import ModelLoadError
from posrewrite.io import protowire
from posrewrite.io.policy import check_opset, check_proto, printable

# Keys in ``model.meta`` (not serialized) recorded by load_model and read when saving.
META_SOURCE = "posrewrite.source_path"
META_DATA_FILES = "posrewrite.external_data_files"
META_SOURCE_STAT = "posrewrite.source_stat"
#: Inline tensors (raw_data) of at least this many bytes stay in the model file until something reads them.
LAZY_INLINE_BYTES = 1024


# ------------------------------------------------------------------------------------------------ tensors


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


def all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, in the main graph, its subgraphs (If,
    Loop, Scan bodies) and the bodies of the model's local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions.values():
        yield from _graph_tensors(function)


class InlineTensor(ir.ExternalTensor):
    """A tensor stored inline in the model file (its ``raw_data``), read from there (mapped) only when something
    reads it: loading and saving never hold it (see :mod:`posrewrite.io.protowire`). An ``ExternalTensor`` whose
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
    return any(isinstance(t, InlineTensor) for t in all_tensors(model))


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Tensors stored in external data files (not the model's own inline tensors read lazily)."""
    for tensor in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and not isinstance(tensor, InlineTensor):
            yield tensor


def replace_tensors(model: ir.Model, replace: Callable[[ir.TensorProtocol, bool], ir.TensorProtocol | None]
                    ) -> list[tuple[object, str, object]]:
    """Replace each tensor `t` of the model (initializers and tensor attributes, in every graph, subgraph and
    function body) for which ``replace(t, main)`` (main: an initializer of the main graph) returns a tensor;
    return what to restore (see restore_tensors). When ``replace`` raises, the model is restored first."""
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

    try:
        visit(model.graph, True)
        for function in model.functions.values():
            visit(function, False)
    except BaseException:
        restore_tensors(done)
        raise
    return done


def restore_tensors(restore: list[tuple[object, str, object]]) -> None:
    for owner, key, old in reversed(restore):
        if isinstance(owner, ir.Value):
            owner.const_value = old
        else:
            owner[key] = old


def external_data_files(model: ir.Model) -> list[Path]:
    """Absolute paths of the files the model's external tensors live in (none read)."""
    return sorted({Path(os.path.abspath(t.path)) for t in external_tensors(model)})


def source_path(model: ir.Model) -> Path | None:
    """The file :func:`load_model` read this model from, if it did."""
    src = model.meta.get(META_SOURCE)
    return Path(src) if src else None


# ---------------------------------------------------------------------------------------------------- load


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model without reading its external weight bytes.

    Raises:
        ModelLoadError: one clear line saying what is wrong with the file.
    """
    path = Path(path)
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
    check_opset(proto, path)
    base_dir = Path(os.path.abspath(path)).parent
    data_files = check_proto(proto, path, base_dir, (path.name, offsets))
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        reason = printable(" ".join(str(e).split()) or type(e).__name__, 300)
        raise ModelLoadError(f"{path}: invalid ONNX model: {reason}") from None
    del proto

    for tensor in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = os.fspath(base_dir)
    _make_inline(model, path, offsets)
    model.meta[META_SOURCE] = os.path.abspath(path)
    model.meta[META_DATA_FILES] = data_files
    model.meta[META_SOURCE_STAT] = (st.st_size, st.st_mtime_ns, st.st_ino)
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
    for tensor in all_tensors(model):
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

    replace_tensors(model, lazy)


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
