"""Load and save ONNX models through onnx_ir, safely.

- :func:`load_model` parses the graph but never reads weight bytes: tensors stored as external data stay
  :class:`onnx_ir.ExternalTensor` objects, memory-mapped only when a pass actually reads one. Every way a model
  can be unusable (missing file, not ONNX, corrupt or truncated protobuf, missing or short external-data file,
  unsupported opset) is reported as a one-line :class:`~posrewrite.errors.ModelLoadError` at load time.
- :func:`save_model` writes atomically: everything goes to a private temporary directory beside the output and
  is moved into place with :func:`os.replace` only once complete. External tensors that no pass touched are
  copied file-to-file from the input's data file (``copy_file_range`` on Linux), never held in memory all at
  once. Nothing is ever written over the input model or its data files.
"""

from __future__ import annotations

__all__ = [
    "INLINE_LIMIT_BYTES",
    "MAX_OPSET",
    "MIN_OPSET",
    "default_output_path",
    "ensure_distinct_output",
    "external_data_files",
    "external_data_path",
    "load_model",
    "max_supported_opset",
    "preload_model",
    "save_model",
    "source_path",
]

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir

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


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, in all graphs and subgraphs."""
    for graph in model.graphs():
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


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def _check_external_data(model: ir.Model, path: Path, base_dir: Path) -> list[str]:
    """Check, with stat calls only, that each external tensor's bytes exist where onnx_ir will look."""
    sizes: dict[str, int] = {}
    base_real = os.path.realpath(base_dir)
    for tensor in _external_tensors(model):
        data_path = os.path.join(base_dir, tensor.location)
        name = tensor.name or "(unnamed)"
        if data_path not in sizes:
            real = os.path.realpath(data_path)
            if os.path.commonpath([base_real, real]) != base_real:
                raise ModelLoadError(
                    f"{path}: external data '{tensor.location}' of tensor '{name}' lies outside the model's "
                    f"directory ({real}); onnx_ir refuses to read it"
                )
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise ModelLoadError(
                    f"{path}: external data file '{tensor.location}' of tensor '{name}' is missing "
                    f"(expected at {data_path})"
                ) from None
            except OSError as e:
                raise ModelLoadError(
                    f"{path}: cannot read external data file '{tensor.location}': {e.strerror}"
                ) from None
            if st.st_nlink > 1:
                raise ModelLoadError(
                    f"{path}: external data file '{tensor.location}' has {st.st_nlink} hard links, which onnx_ir "
                    "refuses to read; copy it to a file of its own"
                )
            sizes[data_path] = st.st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[data_path]:
            raise ModelLoadError(
                f"{path}: external data file '{tensor.location}' is truncated: tensor '{name}' needs bytes up "
                f"to {end} but the file has {sizes[data_path]}"
            )
    return sorted(sizes)


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
    if st.st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: cannot read: permission denied")

    try:
        proto = onnx.load(os.fspath(path), format="protobuf", load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, or anything from a garbage file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(
            f"{path}: not an ONNX model, or the file is corrupt or truncated (protobuf parse failed: {reason})"
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or no graph; truncated or another format?)")
    _check_opset(proto, path)

    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelLoadError(f"{path}: invalid ONNX model: {reason}") from None
    del proto

    base_dir = Path(os.path.abspath(path)).parent
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = os.fspath(base_dir)
    data_files = _check_external_data(model, path, base_dir)
    model.meta[_META_SOURCE] = os.path.abspath(path)
    model.meta[_META_DATA_FILES] = data_files
    return model


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


def _inline_external_tensors(model: ir.Model) -> list[tuple[object, ir.TensorProtocol]]:
    """Replace external initializers by in-memory copies; return what to restore afterwards."""
    restore = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                restore.append((value, tensor))
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
    return restore


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

    The model is written to a temporary directory beside ``path`` and moved into place once complete, so an
    interrupted or failed save leaves no partial file. The model object itself is left unchanged.

    Raises:
        UsageError: ``path`` is the file the model was loaded from, or one of its external data files.
        OutputError: the file cannot be written (directory not writable, disk full, model too large inline).
    """
    out = Path(os.path.abspath(path))
    data_files = model.meta.get(_META_DATA_FILES) or []
    ensure_distinct_output(source_path(model), out, data_files=[*data_files, *external_data_files(model)])

    if external_data is None or external_data == "auto":
        use_external = any(True for _ in _external_tensors(model)) or bool(data_files)
        use_external = use_external or _initializer_bytes(model) > INLINE_LIMIT_BYTES
    elif isinstance(external_data, bool):
        use_external = external_data
    else:
        raise ValueError(f"external_data must be 'auto', None, True or False, not {external_data!r}")

    if out.is_dir():
        raise OutputError(f"cannot write {out}: it is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None

    final_data = external_data_path(out)
    tmp_model = tmp_dir / out.name
    tmp_data = tmp_dir / final_data.name
    moved_data = False
    try:
        if use_external:
            ir.save(model, tmp_model, external_data=final_data.name, size_threshold_bytes=_EXTERNAL_THRESHOLD_BYTES)
        else:
            if _initializer_bytes(model) > INLINE_LIMIT_BYTES:
                raise OutputError(f"cannot write {out} as one file: its tensors exceed 1.8 GB; save with external data")
            restore = _inline_external_tensors(model)
            try:
                ir.save(model, tmp_model)
            finally:
                for value, tensor in restore:
                    value.const_value = tensor
        if tmp_data.exists() and tmp_data.stat().st_size > 0:  # every tensor may have been small
            os.replace(tmp_data, final_data)
            moved_data = True
        os.replace(tmp_model, out)
    except OutputError:
        raise
    except OSError as e:
        if moved_data:
            final_data.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        if moved_data:
            final_data.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {' '.join(str(e).split())}") from None
    except BaseException:
        if moved_data:
            final_data.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
