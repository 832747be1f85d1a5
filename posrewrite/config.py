"""Reading the JSON files a request may name: the HF ``config.json`` beside a model (:func:`read_config_json`, the
one reader of it: a rewrite reads it once, in `posrewrite.plan`) and ``--rope-params`` (JSON text or a file, which
may be a whole HF config.json: :func:`load_rope_params`), with the RoPE part of a config as one flat
``rope_parameters``-style dict (:func:`rope_params_from_config`).

Files are read only when they are regular files of at most ``MAX_CONFIG_BYTES`` (a FIFO would block, a link to
/dev/zero never end); the values posrewrite uses are checked against the documented bounds (exit 2 naming the key).
"""

from __future__ import annotations

__all__ = [
    "NO_SCALING_TYPES",
    "load_rope_params",
    "read_config_json",
    "rope_params_from_config",
]

import json
import os
import stat
from pathlib import Path
from typing import Any

from posrewrite.errors import ModelLoadError, UsageError
from posrewrite.limits import MAX_CONFIG_BYTES, MAX_LENGTH, MAX_ROPE_BASE, MAX_SCALE, check_positive, shown

#: HF ``rope_type`` values that mean "no scaling".
NO_SCALING_TYPES = ("default", "none")


def _is_hf_config(d: dict[str, Any]) -> bool:
    return any(k in d for k in ("rope_parameters", "rope_scaling", "max_position_embeddings", "model_type"))


def rope_params_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE part of an HF ``config.json`` as one flat dict (HF 5 ``rope_parameters`` or HF 4
    ``rope_scaling`` + ``rope_theta``), with ``original_max_position_embeddings`` filled from
    ``max_position_embeddings`` when the config does not scale. A ``rope_type`` meaning "no scaling" is dropped.
    """
    params: dict[str, Any] = {}
    if "rope_theta" in config and config["rope_theta"] is not None:
        params["rope_theta"] = config["rope_theta"]
    rope = config.get("rope_parameters")
    if rope is None:
        rope = config.get("rope_scaling")
    if isinstance(rope, dict):
        params.update(rope)
    if "type" in params and "rope_type" not in params:  # HF 4's older spelling
        params["rope_type"] = params.pop("type")
    if str(params.get("rope_type", "")).lower() in NO_SCALING_TYPES:
        params.pop("rope_type")
    if "original_max_position_embeddings" not in params and config.get("max_position_embeddings"):
        if "factor" not in params or "rope_type" not in params:
            params["original_max_position_embeddings"] = config["max_position_embeddings"]
    if "partial_rotary_factor" in config and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = config["partial_rotary_factor"]
    if isinstance(config.get("dual_chunk_attention_config"), dict):  # Qwen2.5-1M
        params["dual_chunk_attention_config"] = dict(config["dual_chunk_attention_config"])
    return params


def load_rope_params(text: str) -> dict[str, Any]:
    """Parse ``--rope-params``: JSON text, or the path of a JSON file (which may be a whole HF config.json)."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        source = "--rope-params"
        raw = stripped
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(f"--rope-params text is over {MAX_CONFIG_BYTES} bytes")
    else:
        path = Path(os.path.expanduser(stripped))
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # a name too long, a NUL
            is_file = False
        if not is_file:
            raise UsageError(f"--rope-params is neither JSON text nor an existing file: {shown(text)}")
        source = str(path)
        raw = _read_small_json_file(path, "--rope-params file", UsageError)
    data = _parse_json(raw, source, UsageError)
    if not isinstance(data, dict):
        raise UsageError(f"{source} must be a JSON object, not {type(data).__name__}")
    _check_config_values(data, Path(source))
    if _is_hf_config(data):
        return rope_params_from_config(data)
    if "type" in data and "rope_type" not in data:
        data["rope_type"] = data.pop("type")
    return data


def read_config_json(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """The HF ``config.json`` beside the model, or ``None`` when there is none (or it is not a JSON object)."""
    path = Path(model_path).parent / "config.json"
    if not os.path.lexists(path):
        return None
    raw = _read_small_json_file(path, "config.json beside the model", ModelLoadError)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return None  # not JSON: as if there were none (the flags must then say what the graph does not)
    if not isinstance(data, dict):
        return None
    _check_config_values(data, path)
    return data


def _read_small_json_file(path: Path, what: str, error: type[Exception]) -> str:
    """The text of ``path``, read only when it is a regular file of at most MAX_CONFIG_BYTES (a FIFO would block
    forever, a link to /dev/zero would never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a FIFO, device or directory); refused")
    if st.st_size > MAX_CONFIG_BYTES:
        raise error(f"{what} {path} has {st.st_size} bytes, over the limit of {MAX_CONFIG_BYTES}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise error(f"{what} {path} is not a regular file; refused")
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise error(f"{what} {path} is over the limit of {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None


def _parse_json(raw: str, source: str, error: type[Exception]) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise error(f"{source} is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise error(f"{source} is not usable JSON: {' '.join(str(e).split())[:120]}") from None


# keys of config.json (top level, or inside rope_scaling / rope_parameters) that must be numbers, and their bound
_CONFIG_NUMBERS: dict[str, tuple[bool, float]] = {
    "max_position_embeddings": (True, MAX_LENGTH),
    "original_max_position_embeddings": (True, MAX_LENGTH),
    "rope_theta": (False, MAX_ROPE_BASE),
    "factor": (False, MAX_SCALE),
    "partial_rotary_factor": (False, 1.0),
    "beta_fast": (False, 1e6),
    "beta_slow": (False, 1e6),
    "attention_factor": (False, 1e6),
    "low_freq_factor": (False, 1e6),
    "high_freq_factor": (False, 1e6),
}


def _check_config_values(config: dict[str, Any], path: Path) -> None:
    """config.json values posrewrite uses are numbers within the documented bounds (exit 2 naming the key)."""
    sections = [(config, "")]
    for key in ("rope_scaling", "rope_parameters"):
        section = config.get(key)
        if section is not None and not isinstance(section, dict):
            raise UsageError(f"{path}: {key} must be a JSON object, not {type(section).__name__}")
        if isinstance(section, dict):
            sections.append((section, f"{key}."))
    for section, prefix in sections:
        for key, (integer, bound) in _CONFIG_NUMBERS.items():
            if section.get(key) is not None:
                check_positive(section[key], f"{path}: {prefix}{key}", integer=integer, maximum=bound)
        for key in ("long_factor", "short_factor"):
            values = section.get(key)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) > 65536:
                raise UsageError(f"{path}: {prefix}{key} must be a list of numbers")
            for v in values:
                check_positive(v, f"{path}: {prefix}{key}", maximum=MAX_SCALE * 1e3)
