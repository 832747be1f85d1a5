"""Model folders: `posrewrite DIR ... -o OUTDIR` on an onnxruntime-genai folder (genai_config.json) or a Hugging
Face / Optimum export folder (config.json beside *.onnx).

The output is a complete runnable folder, written beside OUTDIR and renamed into place once complete:
- every ONNX model of the folder rewritten (genai: the decoder named in genai_config.json; HF/Optimum: every
  top-level *.onnx that has a positional encoding);
- the config files updated as their own tools write them for the new context: genai_config.json's
  `model.context_length` and `search.max_length`; config.json's `rope_parameters` (or `rope_scaling` where the
  file uses that older key) and `max_position_embeddings`;
- the other files (tokenizer, chat template, processor configs...) carried over unchanged;
- the weights: the rewritten model keeps referring to its original external-data file (tensors the rewrite does
  not touch are never read or rewritten; the new, small ones are stored inside the .onnx), and that file is
  placed in OUTDIR by a reflink (copy-on-write clone: no space used, where the filesystem can) or else a copy.
  `link_weights=True` (`--link-weights`) hard-links it instead: onnxruntime and onnxruntime-genai read it, but
  onnx and onnx_ir refuse external data with several hard links (a hard-link attack guard), so neither the
  input nor the output can then be read by ONNX tools (posrewrite included) until one of them is copied.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from posrewrite import errors, io

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


def folder_kind(path: str | os.PathLike) -> str | None:
    """"genai", "hf" or None (not a model folder)."""
    p = Path(path)
    if (p / GENAI_CONFIG).is_file():
        return "genai"
    if (p / HF_CONFIG).is_file() and any(p.glob("*.onnx")):
        return "hf"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.ModelLoadError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise errors.ModelLoadError(f"{path}: not a JSON object")
    return data


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The ONNX models a folder holds: genai's decoder (genai_config.json model.decoder.filename), else every
    top-level *.onnx beside config.json."""
    p = Path(folder)
    kind = folder_kind(p)
    if kind is None:
        raise errors.UsageError(f"{p} is a folder without genai_config.json or config.json and *.onnx: "
                                "give the .onnx file, or a genai / HF export folder")
    if kind == "genai":
        config = _read_json(p / GENAI_CONFIG)
        name = ((config.get("model") or {}).get("decoder") or {}).get("filename")
        if not isinstance(name, str):
            raise errors.ModelLoadError(f"{p / GENAI_CONFIG}: no model.decoder.filename")
        model = p / name
        if not model.is_file() or os.path.commonpath([p.resolve(), model.resolve()]) != str(p.resolve()):
            raise errors.ModelLoadError(f"{p / GENAI_CONFIG}: model.decoder.filename {name!r} is not a file in {p}")
        return [model]
    return sorted(p.glob("*.onnx"))


# ------------------------------------------------------------------------------------------------- weights


def _reflink(src: Path, dst: Path) -> bool:
    """Copy-on-write clone (Linux FICLONE); False where the filesystem cannot."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return False
    ficlone = 0x40049409
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fcntl.ioctl(fo.fileno(), ficlone, fi.fileno())
        shutil.copystat(src, dst)
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


def place_file(src: Path, dst: Path, *, link: bool = False) -> str:
    """Put `src` at `dst` without duplicating its bytes where possible: "hard-linked" (link=True and the
    filesystem allows), "reflinked" or "copied"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return "hard-linked"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    if _reflink(src, dst):
        return "reflinked"
    io.copy_sparse(src, dst)  # holes of a sparse file stay holes
    return "copied"


@dataclasses.dataclass
class SharingSaver:
    """Saves a rewritten model so that it refers to its input's external-data files, placed beside it (see the
    module docstring); falls back to posrewrite.io.save_model when the model cannot be saved that way."""

    link: bool = False
    placed: dict[str, str] = dataclasses.field(default_factory=dict)  # data file name -> how it was placed

    def __call__(self, model: ir.Model, output: str | os.PathLike) -> Path:
        out = Path(os.path.abspath(output))
        source = io.source_path(model)
        if io.has_inline_tensors(model):  # weights inline in the input's .onnx: written inline, file to file
            return io.save_model(model, out)
        external = [v for v in model.graph.initializers.values()
                    if isinstance(v.const_value, ir.ExternalTensor)]
        src_dir = Path(os.path.abspath(source)).parent if source is not None else None
        files = {}
        for value in external:
            tensor = value.const_value
            path = Path(os.path.abspath(tensor.path))
            if src_dir is None or path.parent != src_dir or Path(tensor.location).name != tensor.location:
                return io.save_model(model, out)  # data in a sub-folder or elsewhere: the ordinary save
            files[tensor.location] = path
        inline = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                     if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
        if inline > io.INLINE_LIMIT_BYTES:
            return io.save_model(model, out)
        for name, path in files.items():
            dst = out.parent / name
            if not dst.exists():
                self.placed[name] = place_file(path, dst, link=self.link)
        try:
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
            try:
                ir.save(model, tmp / out.name)  # external tensors keep their location, offset and length
                os.replace(tmp / out.name, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            raise errors.OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
        return out


# ------------------------------------------------------------------------------------------------- configs


def _context_length(results) -> int | None:
    lengths = [r.context_length for r in results if getattr(r, "context_length", None)]
    return max(lengths) if lengths else None


def updated_genai_config(config: dict[str, Any], context: int) -> tuple[dict[str, Any], list[str]]:
    """genai_config.json for a model that now runs to `context` tokens: model.context_length and search.max_length
    (the builder writes both as the model's context length)."""
    new = json.loads(json.dumps(config))
    changes = []
    model = new.setdefault("model", {})
    old = model.get("context_length")
    if old != context:
        model["context_length"] = int(context)
        changes.append(f"{GENAI_CONFIG}: model.context_length {old} -> {context}")
    search = new.setdefault("search", {})
    old_max = search.get("max_length")
    if old_max is None or old_max == old or old_max > context:
        if old_max != context:
            search["max_length"] = int(context)
            changes.append(f"{GENAI_CONFIG}: search.max_length {old_max} -> {context}")
    return new, changes


def updated_hf_config(config: dict[str, Any], rope_parameters: dict[str, Any] | None,
                      context: int | None) -> tuple[dict[str, Any], list[str]]:
    """config.json as transformers writes it for the new scaling: `rope_parameters` (v5) or `rope_scaling` (the
    older key, with rope_theta kept at the top level) and max_position_embeddings."""
    new = json.loads(json.dumps(config))
    changes = []
    if rope_parameters:
        rp = dict(rope_parameters)
        if "rope_scaling" in config and "rope_parameters" not in config:
            theta = rp.pop("rope_theta", None)
            if theta is not None:
                new["rope_theta"] = theta
            new["rope_scaling"] = None if rp.get("rope_type") == "default" and len(rp) == 1 else rp
            changes.append(f"{HF_CONFIG}: rope_scaling = {json.dumps(new['rope_scaling'])}")
        else:
            old = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
            merged = {k: v for k, v in old.items() if k in ("rope_theta", "partial_rotary_factor")}
            merged.update(rp)
            new["rope_parameters"] = merged
            new.pop("rope_scaling", None)
            changes.append(f"{HF_CONFIG}: rope_parameters = {json.dumps(merged)}")
    old_max = config.get("max_position_embeddings")
    if context and old_max != context and (not isinstance(old_max, int) or context > old_max):
        new["max_position_embeddings"] = int(context)
        changes.append(f"{HF_CONFIG}: max_position_embeddings {old_max} -> {context}")
    return new, changes


# ------------------------------------------------------------------------------------------------- rewrite


def default_output_folder(folder: Path, suffix: str) -> Path:
    return folder.with_name(f"{folder.name}.{suffix}")


def rewrite_folder(folder: str | os.PathLike, options, *, rewrite_model: Callable[..., Any], progress=None):
    """Rewrites every model of a genai / HF export folder into a new folder (see the module docstring).

    ``rewrite_model(path, options, progress=, saver=)`` rewrites one model and returns its result (the API's
    `rewrite`, handed down by the caller: this module sits below the API and does not import it); the folder's
    result is the first model's, with the folder's paths and every model's lines."""
    src = Path(folder)
    kind = folder_kind(src)
    models = model_files(src)
    if not models:
        raise errors.NoEncodingError(f"no .onnx model in {src}")
    out = Path(options.output) if options.output is not None else default_output_folder(src, options.output_suffix())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise errors.UsageError(f"{out} exists and is not an empty folder: give a new folder with -o")
    src_real, out_real = os.path.realpath(src), os.path.realpath(out)
    if os.path.commonpath([src_real, out_real]) == src_real:
        raise errors.UsageError(f"the output folder {out} must not be the input folder or inside it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise errors.OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    saver = SharingSaver(link=bool(getattr(options, "link_weights", False)))
    try:
        results, skipped = [], []
        for model in models:
            opts = dataclasses.replace(options, output=stage / model.name)
            try:
                results.append(rewrite_model(model, opts, progress=progress, saver=saver))
            except errors.NoEncodingError:
                if kind == "genai" or len(models) == 1:
                    raise
                skipped.append(model)  # an Optimum encoder/vision part without positions: carried over
        if not results:
            raise errors.NoEncodingError(f"no positional encoding found in any model of {src}")
        written = {Path(r.output_path).name for r in results}
        written.update(saver.placed)
        changes = [f"{Path(r.input_path).name}: {c}" for r in results for c in r.changes]
        notes = [n for r in results for n in r.notes]
        context = _context_length(results)
        config_names = {GENAI_CONFIG, HF_CONFIG}
        if kind == "genai":
            if context:
                new, lines = updated_genai_config(_read_json(src / GENAI_CONFIG), context)
                (stage / GENAI_CONFIG).write_text(json.dumps(new, indent=4) + "\n", encoding="utf-8")
                changes.extend(lines)
                written.add(GENAI_CONFIG)
        if (src / HF_CONFIG).is_file():
            rope = next((r.rope_parameters[0] for r in results if getattr(r, "rope_parameters", None)), None)
            new, lines = updated_hf_config(_read_json(src / HF_CONFIG), rope, context)
            (stage / HF_CONFIG).write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
            changes.extend(lines)
            written.add(HF_CONFIG)
        carried = []
        for entry in sorted(src.iterdir()):
            if entry.name in written or entry.name in config_names and (stage / entry.name).exists():
                continue
            if entry.is_dir():
                shutil.copytree(entry, stage / entry.name, symlinks=True)
                carried.append(entry.name + "/")
            elif entry.is_file():
                place_file(entry, stage / entry.name, link=False)
                carried.append(entry.name)
        if carried:
            notes.append(f"carried over unchanged: {', '.join(carried)}")
        for name, how in sorted(saver.placed.items()):
            size = (stage / name).stat().st_size
            line = f"weights {name} ({size / 2**20:.1f} MB) {how}: untouched tensors are referenced, not rewritten"
            if how == "hard-linked":
                line += ("; onnx/onnx_ir refuse hard-linked external data, so copy the file before reading either "
                         "model with ONNX tools (posrewrite included)")
            elif how == "copied":
                line += " (the filesystem has no copy-on-write clones; --link-weights hard-links it instead)"
            notes.append(line)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            out.rmdir()
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    first = results[0]
    return dataclasses.replace(
        first, input_path=str(src), output_path=str(out), modified=any(r.modified for r in results),
        changes=changes, notes=notes,
        validation=first.validation if len(results) == 1 else _merge_validation(results),
        sites=[s for r in results for s in r.sites], context_length=context,
        rope_parameters=[p for r in results for p in (r.rope_parameters or [])],
    )


def _merge_validation(results):
    reports = [r.validation for r in results if r.validation is not None]
    if not reports:
        return None
    merged = reports[0]
    for rep in reports[1:]:
        merged.rows.extend(rep.rows)
        merged.notes.extend(rep.notes)
    return merged
