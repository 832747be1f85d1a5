"""What a posrewrite rewrite records in its output, and reading it back.

Every rewrite appends one entry to the JSON list under the model's ``metadata_props["posrewrite.rewrites"]`` (the
ONNX model's own key/value metadata, kept by every ONNX tool that saves a model): the posrewrite version, the
options that were given (only those that are not defaults), and per RoPE site the HF-style ``rope_parameters`` it
was rescaled with (method, factor, trained length L, base) and the length it now supports. ``inspect`` shows it,
a second rescale takes L and the base from it, and ``validate ORIGINAL REWRITTEN`` without flags checks the
rewrite REWRITTEN records (:func:`validation_options`).

A rewrite with a run-time RoPE method (dynamic, longrope) of a KV-cache export also records, under
``metadata_props["posrewrite.decode"]``, the decode contract a generation loop must honour (:func:`decode_contract`,
read back by :func:`read_decode_contract`; ``posrewrite.decode`` is the loop that honours it).

This module is at the bottom of the import layers: onnx_ir and the standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from posrewrite import __version__

__all__ = ["DECODE_KEY", "DECODE_MODES", "KEY", "REPREFILL", "decode_contract", "describe", "entry", "history",
           "last_rescale", "read_decode_contract", "record", "validation_options"]

KEY = "posrewrite.rewrites"
DECODE_KEY = "posrewrite.decode"

#: ``--runtime-decode`` modes: what the decode of a run-time RoPE method on a KV-cache export computes
DECODE_MODES = ("hf", "rerotate", "exact")

#: when a loop decoding with ``--runtime-decode exact`` must run the whole sequence so far from an empty past:
#: never (``hf``, ``rerotate``: the cache is always reused), at the first step whose total length exceeds L
#: (longrope: one set of frequencies up to L, one past it), at every step whose total length exceeds L (dynamic:
#: the frequencies are a function of the total length past L)
REPREFILL = {"never": "never", "longrope": "first_past_L", "dynamic": "every_past_L"}

# option fields recorded when they differ from RewriteOptions' defaults (paths and output switches are not)
_OPTION_FIELDS = ("rope_scale", "rope_method", "original_max_positions", "rope_base", "rope_params", "fp32_positions",
                  "fuse", "max_positions", "pos_scale", "alibi_scale", "extend", "window", "group_size", "leaky",
                  "logn_scaling", "runtime_decode", "allow_partial")
_DEFAULTS: dict[str, Any] = {"rope_method": "linear", "fuse": "none", "fp32_positions": False, "logn_scaling": False,
                             "allow_partial": False, "rope_params": {}}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return float(value)
    return str(value)


def entry(options: Any, rope: list[dict[str, Any]], *, context_length: int | None,
          changes: int) -> dict[str, Any]:
    """One record: version, the options given, the rope_parameters of each rescaled RoPE site (``rope``: HF-style
    dicts with ``rope_theta`` set to the base used), the context length the output supports, how many changes."""
    given = {}
    for name in _OPTION_FIELDS:
        value = getattr(options, name, None)
        if value is None or value == _DEFAULTS.get(name, None):
            continue
        given[name] = _plain(value)
    return {"posrewrite_version": __version__, "options": given, "rope_parameters": _plain(rope),
            "context_length": context_length, "changes": int(changes)}


def history(model: ir.Model) -> list[dict[str, Any]]:
    """The entries recorded in `model`, oldest first ([] when none, or when the text is not posrewrite's)."""
    text = model.metadata_props.get(KEY)
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    return [_clean(d) for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value == value else None


def _clean(item: dict[str, Any]) -> dict[str, Any]:
    """An entry as read from a file (which anyone may have edited): the keys posrewrite reads, of the types it
    reads them as; anything else dropped."""
    rope = [dict(rp) for rp in item.get("rope_parameters") or [] if isinstance(rp, dict)] \
        if isinstance(item.get("rope_parameters"), list) else []
    for rp in rope:
        if not isinstance(rp.get("rope_type"), str):
            rp.pop("rope_type", None)
        for key in ("factor", "rope_theta", "original_max_position_embeddings"):
            if key in rp and _number(rp[key]) is None:
                rp.pop(key)
    options = item.get("options") if isinstance(item.get("options"), dict) else {}
    length = _number(item.get("context_length"))
    return {"posrewrite_version": str(item.get("posrewrite_version", "?")), "options": options,
            "rope_parameters": rope, "context_length": None if length is None else int(length),
            "changes": int(_number(item.get("changes")) or 0)}


def record(model: ir.Model, item: dict[str, Any]) -> None:
    """Append `item` to the model's history (in its metadata_props)."""
    model.metadata_props[KEY] = json.dumps([*history(model), item], sort_keys=True)


def last_rescale(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rope_parameters of the latest entry that rescaled RoPE (a rescale replaces earlier ones), or None."""
    for item in reversed(items):
        rope = item.get("rope_parameters") or []
        if rope and isinstance(rope[0], dict) and rope[0].get("rope_type"):
            return dict(rope[0])
    return None


def describe(item: dict[str, Any]) -> str:
    """One line for people: ``posrewrite 0.2.0: yarn x4 (L 64, base 10000) -> 256 tokens; fuse ort``."""
    parts = []
    for rp in item.get("rope_parameters") or []:
        what = rp.get("rope_type", "?")
        if rp.get("factor") is not None:
            what += f" x{float(rp['factor']):g}"
        detail = []
        if rp.get("original_max_position_embeddings"):
            detail.append(f"L {int(rp['original_max_position_embeddings'])}")
        if rp.get("rope_theta") is not None:
            detail.append(f"base {float(rp['rope_theta']):g}")
        parts.append(what + (f" ({', '.join(detail)})" if detail else ""))
    options = item.get("options") or {}
    for name in ("extend", "window", "group_size", "leaky", "fuse", "max_positions", "pos_scale", "alibi_scale",
                 "runtime_decode"):
        if name in options:
            parts.append(f"{name.replace('_', '-')} {options[name]}")
    for flag in ("fp32_positions", "logn_scaling"):
        if options.get(flag):
            parts.append(flag.replace("_", "-"))
    length = item.get("context_length")
    text = "; ".join(parts) or "rewritten"
    if length:
        text += f"; supports {int(length)} tokens"
    return f"posrewrite {item.get('posrewrite_version', '?')}: {text}"


def validation_options(items: list[dict[str, Any]]) -> dict[str, Any]:
    """RewriteOptions fields that make ``validate ORIGINAL REWRITTEN`` check the rewrite REWRITTEN records: the
    latest rescale's rope_parameters, and fp32 positions / table lengths when one was recorded."""
    out: dict[str, Any] = {}
    rope = last_rescale(items)
    if rope is not None:
        out["rope_params"] = rope
    for item in items:
        options = item.get("options") or {}
        if options.get("fp32_positions"):
            out["fp32_positions"] = True
        if _number(options.get("max_positions")):
            out["max_positions"] = int(options["max_positions"])
    return out


def decode_contract(mode: str, method: str, original_max_positions: int) -> dict[str, Any]:
    """The decode contract of a KV-cache export rewritten with the run-time method ``method`` (dynamic,
    longrope; switching at ``original_max_positions`` = L) in ``--runtime-decode`` ``mode``: a JSON-able dict
    ``{"mode", "rope_type", "original_max_position_embeddings", "reprefill"}``; ``reprefill`` (one of
    `REPREFILL`'s values) says when a loop must run the whole sequence so far from an empty past instead of a
    cached step (only ``exact`` asks for it)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if method not in ("dynamic", "longrope"):
        raise ValueError(f"{method!r} is not a run-time RoPE method (dynamic, longrope)")
    return {"mode": mode, "rope_type": method, "original_max_position_embeddings": int(original_max_positions),
            "reprefill": REPREFILL[method] if mode == "exact" else REPREFILL["never"]}


def read_decode_contract(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The decode contract recorded in a model's metadata (``metadata_props``, or onnxruntime's
    ``get_modelmeta().custom_metadata_map``), or None when there is none. A contract that is not posrewrite's
    (unreadable JSON, an unknown mode or re-prefill rule, no positive L) raises ValueError: a loop must not guess
    what a model's decode needs."""
    text = metadata.get(DECODE_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{DECODE_KEY} metadata is not JSON: {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{DECODE_KEY} metadata is not a JSON object: {text[:80]!r}")
    length = _number(data.get("original_max_position_embeddings"))
    if data.get("mode") not in DECODE_MODES or data.get("reprefill") not in REPREFILL.values() \
            or length is None or length < 1 or length != int(length):
        raise ValueError(f"{DECODE_KEY} metadata is not a decode contract posrewrite wrote: {text[:120]!r}")
    return {"mode": data["mode"], "rope_type": str(data.get("rope_type", "?")),
            "original_max_position_embeddings": int(length), "reprefill": data["reprefill"]}
