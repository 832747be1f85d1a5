"""The output protocol: :func:`stage_model` / :func:`save_model`.

The new model is written beside the output under names no reader uses (its data under a fresh name when the old
data file exists), can be validated there, and is switched into place by one rename of the .onnx, after which
the replaced model's data is removed: a reader sees the old model with its data or the new one with its data,
never a mix. Any failure before the switch (an exception, KeyboardInterrupt, SIGTERM via the CLI) removes what
was written; a later run removes what a killed one left (:func:`remove_leftovers`). Only regular files or new
paths are replaced; a missing output folder is an error, never created. Tensors that no pass touched are copied
file to file (external data: from the input's data file, holes kept; inline weights: from the input's .onnx
into the output's, :mod:`posrewrite.io.protowire`), never held in memory. Nothing is ever written over the
input model or its data files.
"""

from __future__ import annotations

__all__ = ["INLINE_LIMIT_BYTES", "StagedModel", "check_output_path", "copy_sparse", "current_umask",
           "default_output_path", "ensure_distinct_output", "external_data_path", "output_disk_bytes",
           "remove_leftovers", "save_model", "shares_weights_with", "stage_model"]

import errno
import fcntl
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

from posrewrite.errors import OutputError, UsageError
from posrewrite.io import protowire
from posrewrite.io.load import (
    META_DATA_FILES,
    META_SOURCE,
    META_SOURCE_STAT,
    InlineTensor,
    all_tensors,
    external_data_files,
    external_tensors,
    replace_tensors,
    restore_tensors,
    source_path,
)
from posrewrite.io.policy import printable

#: Above this many bytes of initializers, "auto" saving puts weights in external data (protobuf's hard limit
#: is 2 GiB for the whole file).
INLINE_LIMIT_BYTES = int(1.8 * 2**30)
#: Tensors smaller than this stay inside the .onnx file when saving with external data.
_EXTERNAL_THRESHOLD_BYTES = 1024


def external_data_path(output: str | os.PathLike) -> Path:
    """Where :func:`save_model` puts the external data of ``output``: ``<output>.data`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".data")


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
    for tensor in all_tensors(model):
        try:
            total += tensor.nbytes
        except Exception:  # a tensor type that cannot say its size counts as small
            pass
    return total


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
    shown = printable(out, 300)
    try:
        parent = os.stat(out.parent)
    except FileNotFoundError:
        raise OutputError(f"cannot write {shown}: the directory {printable(out.parent, 300)} does not exist") from None
    except OSError as e:
        raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
    if not stat.S_ISDIR(parent.st_mode):
        raise OutputError(f"cannot write {shown}: {printable(out.parent, 300)} is not a directory")
    for candidate in (out, external_data_path(out)):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputError(f"cannot write {shown}: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {printable(candidate, 300)}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(
                f"cannot write {printable(candidate, 300)}: it exists and is not a regular file (a device, FIFO, "
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
            raise OutputError(f"cannot write {printable(self.out, 300)}: {e.strerror or e}") from None
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
    data_files = model.meta.get(META_DATA_FILES) or []
    protected = [Path(p) for p in [*data_files, *external_data_files(model)]]
    ensure_distinct_output(source_path(model), out, data_files=protected)

    if external_data is None or external_data == "auto":
        use_external = any(True for _ in external_tensors(model)) or bool(data_files)
        use_external = use_external or _initializer_bytes(model) > INLINE_LIMIT_BYTES
    elif isinstance(external_data, bool):
        use_external = external_data
    else:
        raise ValueError(f"external_data must be 'auto', None, True or False, not {external_data!r}")
    if not use_external and _initializer_bytes(model) > INLINE_LIMIT_BYTES:
        raise OutputError(f"cannot write {out} as one file: its tensors exceed 1.8 GB; save with external data")

    shown = printable(out, 300)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-", suffix=".onnx")
        os.close(fd)
        os.chmod(tmp_name, 0o666 & ~current_umask())  # mkstemp's 0600 would become the output's mode
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
    source = model.meta.get(META_SOURCE)
    if source is not None and any(isinstance(t, InlineTensor) for t in all_tensors(model)):
        _check_unchanged(model, Path(source))
    ranges: dict[str, protowire.FileRange] = {}

    def placeholder(t: ir.TensorProtocol, main: bool) -> ir.ExternalTensor | None:
        if not isinstance(t, ir.ExternalTensor) or (external_main and main and not isinstance(t, InlineTensor)):
            return None
        key = f"\0posrewrite-{len(ranges)}"  # no location of a loaded model holds NUL (refused at load)
        ranges[key] = protowire.FileRange(os.path.abspath(t.path), int(t.offset or 0), int(t.nbytes))
        return ir.ExternalTensor(key, None, None, t.dtype, shape=t.shape, name=t.name or "",
                                 doc_string=t.doc_string, metadata_props=t.metadata_props)

    restore = replace_tensors(model, placeholder)
    try:
        data = ir.to_proto(model).SerializeToString()
    finally:
        restore_tensors(restore)
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
        if source is not None and ranges:
            _check_unchanged(model, Path(source))  # and not while it was copied
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
    if now != model.meta.get(META_SOURCE_STAT):
        raise OutputError(f"{printable(source, 300)} changed on disk after it was read (its inline weights are "
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
               for t in external_tensors(model))


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


def current_umask() -> int:
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
