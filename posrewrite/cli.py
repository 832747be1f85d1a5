"""The ``posrewrite`` command: argument parsing, output formatting and exit codes — nothing else.

Every command parses its flags into :class:`~posrewrite.options.RewriteOptions` (or plain arguments), calls the
Python API (``posrewrite.api``, ``posrewrite.plot``, ``posrewrite.advise``, imported lazily so that ``--help``
and usage errors stay fast), and prints the result: rich tables for people, or exactly one JSON object on
stdout with ``--json``. Errors print one line ``posrewrite: error: ...`` on stderr and exit with the code of
their :mod:`posrewrite.errors` class; ``--debug`` adds the traceback.
"""

from __future__ import annotations

__all__ = ["main", "build_parser", "options_from_args"]

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import IO, Any

from posrewrite.errors import EXIT_CODES, PosrewriteError, UsageError
from posrewrite.options import FUSE_MODES, ROPE_METHODS, RewriteOptions, load_rope_params

PROG = "posrewrite"
COMMANDS = ("rewrite", "inspect", "check", "plot", "advise", "validate")

_DESCRIPTION = """\
Find the positional encodings of an exported transformer (ONNX) and rewrite them: rescale RoPE for longer
contexts (linear, ntk, dynamic, yarn, llama3, longrope, or a new base), make positions fp32-safe, extend
absolute/ALiBi tables, fuse RoPE into fused ops, and validate the result in onnxruntime.

  posrewrite MODEL.onnx --rope-scale 4 --rope-method yarn --original-max-positions 4096 -o out.onnx
  posrewrite inspect MODEL.onnx
  posrewrite check MODEL.onnx --max-length 131072
  posrewrite plot MODEL.onnx --rope-scale 4 --rope-method yarn -o rope.png
  posrewrite advise --context 131072 --head-dim 128
"""


def _exit_code_epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageError (one line, exit 2) instead of usage text + SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")


def _add_rope_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RoPE scaling (llama.cpp spellings accepted)")
    g.add_argument("--rope-scale", type=float, metavar="S", help="context scaling factor: expand the context S times")
    g.add_argument(
        "--rope-freq-scale", type=float, metavar="F", help="llama.cpp's inverse spelling: same as --rope-scale 1/F"
    )
    g.add_argument(
        "--rope-method",
        "--rope-scaling",
        dest="rope_method",
        metavar="METHOD",
        help=f"scaling method: {', '.join(ROPE_METHODS)} (default linear; 'none' = no scaling)",
    )
    g.add_argument(
        "--original-max-positions",
        type=int,
        metavar="N",
        help="context length the model was trained with (yarn, llama3, dynamic, longrope need it; "
        "default: config.json beside the model, or the model's cache length)",
    )
    g.add_argument(
        "--yarn-orig-ctx",
        type=int,
        metavar="N",
        help="llama.cpp's name for --original-max-positions (0 = from the model)",
    )
    g.add_argument(
        "--rope-base", "--rope-freq-base", dest="rope_base", type=float, metavar="B", help="new RoPE base (theta)"
    )
    g.add_argument(
        "--rope-params",
        metavar="JSON|FILE",
        help="HF-style rope parameters as JSON text or a JSON file; a whole HF config.json works too",
    )
    g.add_argument("--yarn-beta-fast", type=float, metavar="X", help="YaRN beta_fast (default 32)")
    g.add_argument("--yarn-beta-slow", type=float, metavar="X", help="YaRN beta_slow (default 1)")
    g.add_argument(
        "--yarn-attn-factor",
        type=float,
        metavar="X",
        help="llama.cpp's YaRN attention factor: multiplies the default magnitude scale 0.1*ln(S)+1",
    )


def _output_path(text: str) -> Path:
    if not text.strip() or "\0" in text or Path(text).name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"not a file name: {text!r}")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "rewrite",
        help="rewrite a model (the default: 'posrewrite MODEL ...' means 'posrewrite rewrite MODEL ...')",
        description="Rewrite the positional encodings of MODEL and write a new model beside it (or to -o).",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the ONNX model (external data is read from beside it), or a "
                   "model folder (onnxruntime-genai's genai_config.json, or config.json + *.onnx): -o is a new folder")
    _add_rope_flags(p)
    g = p.add_argument_group("other rewrites")
    g.add_argument(
        "--fp32-positions", action="store_true", help="compute positions and angles in fp32 (no fp16 rounding)"
    )
    g.add_argument(
        "--fuse", default="none", metavar="MODE", help=(
            f"fuse RoPE (and the attention around it) into fused ops: {', '.join(FUSE_MODES)}. ort: "
            "com.microsoft.RotaryEmbedding/GroupQueryAttention/MultiHeadAttention (onnxruntime only); onnx: "
            "RotaryEmbedding-23 + Attention-23 (raises the opset to 23). Default none: a rescaled model keeps "
            "standard ops and runs on every runtime and opset it ran on before"
        ),
    )
    g.add_argument(
        "--max-positions", type=int, metavar="N",
        help="extend absolute / sinusoidal / ALiBi tables to N positions; rows of fused RoPE caches "
        "(default: config.json's max_position_embeddings, else 4096)"
    )
    g.add_argument("--pos-scale", type=float, metavar="S", help="interpolate learned absolute positions by S")
    g.add_argument("--alibi-scale", type=float, metavar="S", help="scale ALiBi slopes by S")
    g = p.add_argument_group("attention-level extension (the model is unchanged inside the window)")
    g.add_argument("--extend", metavar="METHOD", help="self-extend (Jin et al. 2024: grouped positions beyond the "
                   "window) or rerope (Su 2023: relative positions clipped at the window)")
    g.add_argument("--window", type=int, metavar="W", help="neighbour window in tokens (--extend)")
    g.add_argument("--group-size", type=int, metavar="G", help="self-extend group size")
    g.add_argument("--leaky", type=float, metavar="K", help="leaky ReRoPE: relative positions grow at slope 1/K "
                   "beyond the window")
    g.add_argument("--logn-scaling", action="store_true", help="scale queries at position n > L by log(n)/log(L) "
                   "(Qwen-1 use_logn_attn); L from --original-max-positions or config.json")
    g = p.add_argument_group("output")
    g.add_argument(
        "-o", "--output", type=_output_path, metavar="OUT",
        help="output model (default: MODEL.<what>.onnx beside MODEL; its folder must exist)",
    )
    g.add_argument(
        "--link-weights", action="store_true",
        help="folders: hard-link the external weights into OUT (onnxruntime reads them; onnx/onnx_ir refuse "
        "hard-linked data) instead of a copy-on-write clone or copy",
    )
    g.add_argument("--no-validate", dest="validate", action="store_false", help="skip the onnxruntime validation")
    g.add_argument(
        "--allow-partial", action="store_true", help="rewrite the understood sites even if others were not understood"
    )
    _add_common(p)
    p.set_defaults(handler=_cmd_rewrite)

    p = sub.add_parser(
        "validate",
        help="check a rewrite made earlier or by another tool (exit 0 holds, 6 does not)",
        description="Check that REWRITTEN is what the flags make of ORIGINAL: without RoPE flags, that it computes "
        "the same outputs (fusion, fp32 positions on a safe model); with them, that its q/k rotations are that "
        "rescale of ORIGINAL's (numpy rotation of the rewritten model's own q/k) and the model runs at the new "
        "length.",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("original", metavar="ORIGINAL", help="the model before the rewrite")
    p.add_argument("rewritten", metavar="REWRITTEN", help="the rewritten model")
    _add_rope_flags(p)
    g = p.add_argument_group("other rewrites")
    g.add_argument("--fp32-positions", action="store_true",
                   help="the rewrite made half-precision positions fp32 (outputs of such models are not compared)")
    g.add_argument("--max-positions", type=int, metavar="N", help="the rewrite extended tables to N positions")
    _add_common(p)
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser(
        "inspect",
        help="list the positional encodings found in a model",
        description="List the positional-encoding sites of MODEL and the sites that were not understood.",
    )
    p.add_argument("model", metavar="MODEL")
    _add_common(p)
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser(
        "check",
        help="check that positions and angles are precise enough",
        description="Check each site's position and angle precision up to --max-length (exit 7 when unsafe).",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--max-length", type=int, metavar="N", help="longest sequence to check (default: the model's)")
    _add_common(p)
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser(
        "plot",
        help="plot RoPE frequencies before and after scaling",
        description="Plot the RoPE frequencies of MODEL, and the scaled ones when scaling flags are given.",
    )
    p.add_argument("model", metavar="MODEL")
    _add_rope_flags(p)
    p.add_argument("-o", "--output", type=_output_path, metavar="OUT.png", required=True, help="the picture to write")
    _add_common(p)
    p.set_defaults(handler=_cmd_plot)

    p = sub.add_parser(
        "advise",
        help="which RoPE base a context needs, and whether a model (or a planned rescaling) has it",
        description="The smallest RoPE base that supports --context (Men et al. 2024) for --head-dim (default "
        "128) or MODEL's rotary dimension, and whether MODEL, rescaled as the RoPE flags say, meets it.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("--context", type=int, metavar="N", required=True, help="target context length")
    p.add_argument("--head-dim", type=int, metavar="D", help="attention head dimension (default: from MODEL)")
    p.add_argument("--eval-text", type=Path, metavar="FILE", help="measure every method (frequency and attention "
                   "level) on this text at --context tokens in onnxruntime and rank them (needs MODEL)")
    _add_rope_flags(p)
    _add_common(p)
    p.set_defaults(handler=_cmd_advise)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("posrewrite")
    except Exception:
        return "unknown"


def _with_default_command(argv: list[str]) -> list[str]:
    """``posrewrite MODEL ...`` (or flags first) means ``posrewrite rewrite MODEL ...``."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["rewrite", *argv]


# -------------------------------------------------------------------------------------------------- options


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def options_from_args(ns: argparse.Namespace, *, require_work: bool = True) -> RewriteOptions:
    """Turn parsed flags into RewriteOptions, refusing contradictions with one line each."""
    scale = ns.rope_scale
    if ns.rope_freq_scale is not None:
        if not ns.rope_freq_scale > 0 or not math.isfinite(ns.rope_freq_scale):
            raise UsageError(f"--rope-freq-scale must be greater than 0, not {ns.rope_freq_scale:g}")
        inverse = 1.0 / ns.rope_freq_scale
        if scale is not None and not _close(scale, inverse):
            raise UsageError(
                f"--rope-freq-scale {ns.rope_freq_scale:g} (= --rope-scale {inverse:g}) "
                f"disagrees with --rope-scale {scale:g}"
            )
        scale = inverse

    method = ns.rope_method.strip().lower() if ns.rope_method else None
    if method == "none":
        if scale is not None:
            raise UsageError("--rope-scaling none contradicts --rope-scale")
        method = None

    orig = ns.original_max_positions
    if ns.yarn_orig_ctx:  # llama.cpp: 0 means "from the model"
        if orig is not None and orig != ns.yarn_orig_ctx:
            raise UsageError(f"--yarn-orig-ctx {ns.yarn_orig_ctx} disagrees with --original-max-positions {orig}")
        orig = ns.yarn_orig_ctx
    elif ns.yarn_orig_ctx is not None and ns.yarn_orig_ctx < 0:
        raise UsageError(f"--yarn-orig-ctx must be 0 or more, not {ns.yarn_orig_ctx}")

    params = load_rope_params(ns.rope_params) if ns.rope_params else {}
    params_type = params.get("rope_type")
    if params_type in ("default", "none"):
        params_type = None
    has_factor = params.get("factor") is not None or "long_factor" in params
    if method is not None and scale is None and not has_factor:
        raise UsageError(f"--rope-method {method} needs --rope-scale (or a factor in --rope-params)")
    if method is not None and params_type is not None and str(params_type).lower() != method:
        raise UsageError(f"--rope-params rope_type {params_type!r} disagrees with --rope-method {method!r}")

    effective_method = method or (str(params_type).lower() if params_type else None)
    yarn_flags = {
        "--yarn-beta-fast": ("beta_fast", ns.yarn_beta_fast),
        "--yarn-beta-slow": ("beta_slow", ns.yarn_beta_slow),
    }
    if ns.yarn_attn_factor is not None:
        factor = scale if scale is not None else params.get("factor")
        magnitude = 0.1 * math.log(factor) + 1.0 if factor is not None and factor > 1 else 1.0
        yarn_flags["--yarn-attn-factor"] = ("attention_factor", ns.yarn_attn_factor * magnitude)
    for flag, (key, value) in yarn_flags.items():
        if value is None:
            continue
        if effective_method != "yarn":
            raise UsageError(f"{flag} applies only to --rope-method yarn")
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag} must be greater than 0, not {value:g}")
        if key in params and not _close(float(params[key]), value):
            raise UsageError(f"{flag} disagrees with {key}={params[key]} in --rope-params")
        params[key] = value

    fields: dict[str, Any] = dict(
        rope_scale=scale,
        rope_method=method or "linear",
        original_max_positions=orig,
        rope_base=ns.rope_base,
        rope_params=params,
        json=ns.json,
        debug=ns.debug,
    )
    for name in (
        "fp32_positions",
        "fuse",
        "validate",
        "allow_partial",
        "max_positions",
        "pos_scale",
        "alibi_scale",
        "extend",
        "window",
        "group_size",
        "leaky",
        "logn_scaling",
        "output",
        "link_weights",
    ):
        if hasattr(ns, name):
            fields[name] = getattr(ns, name)
    if isinstance(fields.get("fuse"), str):
        fields["fuse"] = fields["fuse"].strip().lower()
    opts = RewriteOptions(**fields)
    if require_work and not opts.has_work():
        raise UsageError(
            "nothing to do: give --rope-scale, --rope-base, --rope-params, --fp32-positions, --fuse, "
            "--max-positions, --pos-scale or --alibi-scale"
        )
    return opts


def _rope_flags_given(ns: argparse.Namespace) -> bool:
    names = (
        "rope_scale",
        "rope_freq_scale",
        "rope_method",
        "original_max_positions",
        "yarn_orig_ctx",
        "rope_base",
        "rope_params",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_attn_factor",
    )
    return any(getattr(ns, n, None) is not None for n in names)


# --------------------------------------------------------------------------------------------------- output


class _Output:
    """Where a command's result goes: one JSON object on the real stdout, or rich text."""

    def __init__(self, stdout: IO[str], json_mode: bool) -> None:
        self.stdout = stdout
        self.json = json_mode

    def console(self):
        from rich.console import Console

        width = None if _isatty(self.stdout) else 120
        return Console(file=self.stdout, width=width, highlight=False, soft_wrap=True)

    def emit_json(self, payload: Any) -> None:
        self.stdout.write(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
        self.stdout.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays, paths, tuples, sets, non-finite floats ('inf', 'nan')."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _jsonable(obj.tolist())
    if hasattr(obj, "value") and hasattr(obj, "name"):  # enums
        return _jsonable(obj.value)
    return str(obj)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_fmt(v) for v in value[:4])
        return f"[{shown}{', …' if len(value) > 4 else ''}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)


def _table(title: str | None, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_escape(_fmt(v)) for v in row))
    return table


def _escape(text: str) -> str:
    """Text for the rich console: markup escaped, and control characters (terminal escape sequences a model's
    names may hold) shown as escapes instead of being sent to the terminal."""
    from rich.markup import escape

    return escape(_printable(text))


def _printable(text: object) -> str:
    """``text`` with every non-printable character (ESC, BEL, CR, newlines, ...) written as a Python escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _notice(message: str) -> None:
    """A notice for a person watching: stderr, only on a terminal."""
    if _isatty(sys.stderr):
        print(f"{PROG}: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- commands


def _preload(path: str | os.PathLike, *, output: str | os.PathLike | None = None) -> Path:
    """Read the model once up front so a bad file fails fast with exit 3 (the API reuses the parsed model), and
    refuse an ``output`` that would overwrite the model or its external data."""
    from posrewrite.io import check_output_path, ensure_distinct_output, external_data_files, preload_model

    if output is not None:
        ensure_distinct_output(path, output)
        check_output_path(output)  # before a possibly long load: a missing folder or a device fails at once
    model = preload_model(path)
    if output is not None:
        ensure_distinct_output(path, output, data_files=external_data_files(model))
    return Path(path)


def _cmd_rewrite(ns: argparse.Namespace, out: _Output) -> int:
    opts = options_from_args(ns)
    model = Path(ns.model) if Path(ns.model).is_dir() else _preload(ns.model, output=opts.output)

    from posrewrite import api
    from posrewrite.progress import progress_reporter

    if not opts.debug:
        _quiet_onnxruntime()
    with progress_reporter(enabled=not out.json) as reporter:
        result = api.rewrite(model, opts, progress=reporter)

    validation = getattr(result, "validation", None)
    failed = validation is not None and not validation.ok
    if out.json:
        out.emit_json(result.to_dict())
    else:
        console = out.console()
        changes = list(getattr(result, "changes", []) or [])
        if result.modified:
            console.print(f"[bold]{_escape(str(model))}[/bold]: {len(changes)} change(s)")
        else:
            console.print(f"[bold]{_escape(str(model))}[/bold]: nothing to change")
        for line in changes:
            console.print(f"  • {_escape(line)}")
        for line in getattr(result, "notes", []) or []:
            console.print(f"  [dim]note:[/dim] {_escape(line)}")
        if validation is not None:
            _print_validation(console, validation)
        if result.output_path is not None and not failed:
            console.print(f"wrote [bold]{_escape(str(result.output_path))}[/bold]")
    if failed:
        from posrewrite.errors import ValidationError

        bad = [r.get("site") for r in validation.rows if not r.get("ok")]
        print(f"{PROG}: error: validation failed for {len(bad)} site(s): {', '.join(map(str, bad))}", file=sys.stderr)
        return ValidationError.exit_code
    return 0


# Site fields shown as their own columns (when a site has them); the rest go to "details".
_INSPECT_COLUMNS = [
    "kind",
    "layout",
    "head_dim",
    "rotary_dim",
    "base",
    "angles",
    "position_dtype",
    "angle_dtype",
    "max_positions",
    "attention_factor",
    "sites",
]
_INSPECT_TITLES = {
    "head_dim": "dim",
    "rotary_dim": "rotary",
    "position_dtype": "pos dtype",
    "angle_dtype": "angle dtype",
    "max_positions": "max pos",
    "attention_factor": "attn",
    "sites": "uses",
}


def _cmd_validate(ns: argparse.Namespace, out: _Output) -> int:
    opts = options_from_args(ns, require_work=False)
    _preload(ns.original)
    _preload(ns.rewritten)
    from posrewrite import api

    result = api.validate(Path(ns.original), Path(ns.rewritten), opts)
    validation = result.validation
    if out.json:
        out.emit_json(result.to_dict())
    else:
        _print_validation(out.console(), validation)
    if not validation.ok:
        from posrewrite.errors import ValidationError
        from posrewrite.validate import describe_failure

        print(f"{PROG}: error: validation failed: {describe_failure(validation)}", file=sys.stderr)
        return ValidationError.exit_code
    return 0


def _print_validation(console, validation) -> None:
    """The validation table: each row with what was compared with what, its error and tolerance."""
    rows = [
        [r.get("site"), r.get("length"), r.get("max_abs_error"), r.get("tolerance"), r.get("ok"),
         r.get("compared") or r.get("message") or ""]
        for r in validation.rows
    ]
    console.print(_table("validation (onnxruntime)", ["site", "length", "max |error|", "tolerance", "ok", "compared"],
                         rows))
    for r in validation.rows:
        if r.get("message") and (r.get("site") == "past cache" or not r.get("ok")):
            console.print(f"  [dim]{_escape(str(r.get('site')))}:[/dim] {_escape(r['message'])}")
    for line in getattr(validation, "notes", []) or []:
        console.print(f"  [dim]note:[/dim] {_escape(line)}")


def _cmd_inspect(ns: argparse.Namespace, out: _Output) -> int:
    if not Path(ns.model).is_dir():  # a model folder: api.inspect reads its model
        _preload(ns.model)
    from posrewrite import api

    result = api.inspect(Path(ns.model))
    payload = result.to_dict()
    if out.json:
        out.emit_json(payload)
    else:
        console = out.console()
        sites = payload.get("encodings", [])
        console.print(f"[bold]{_escape(str(ns.model))}[/bold]: {len(sites)} positional encoding site(s)")
        if sites:
            keys = [k for k in _INSPECT_COLUMNS if any(k in site for site in sites)]
            rows = [[i, *(site.get(k) for k in keys)] for i, site in enumerate(sites)]
            console.print(_table(None, ["#", *(_INSPECT_TITLES.get(k, k) for k in keys)], rows))
            for i, site in enumerate(sites):
                details = {k: v for k, v in site.items() if k not in keys and v not in (None, [], {}, "")}
                if details:
                    console.print(f"  [dim]#{i}:[/dim] {_escape(_fmt(details))}")
        refusals = payload.get("refusals", [])
        if refusals:
            rows = [[r.get("kind"), r.get("where"), r.get("reason")] for r in refusals]
            console.print(_table("not understood", ["kind", "where", "reason"], rows))
    if not result.sites:
        from posrewrite.errors import NoEncodingError

        print(f"{PROG}: error: no positional encoding found in {ns.model}", file=sys.stderr)
        return NoEncodingError.exit_code
    return 0


_CHECK_COLUMNS = [
    ("kind", "kind"),
    ("position_dtype", "positions"),
    ("angle_dtype", "angles"),
    ("exact_position_fraction", "exact positions"),
    ("colliding_positions", "colliding"),
    ("max_angle_error", "max angle error"),
    ("max_length", "up to"),
    ("safe", "safe"),
]


def _cmd_check(ns: argparse.Namespace, out: _Output) -> int:
    if ns.max_length is not None and ns.max_length <= 0:
        raise UsageError(f"--max-length must be greater than 0, not {ns.max_length}")
    if not Path(ns.model).is_dir():  # a model folder: api.check reads its model
        _preload(ns.model)
    from posrewrite import api

    result = api.check(Path(ns.model), max_length=ns.max_length)
    if out.json:
        out.emit_json(result.to_dict())
    else:
        console = out.console()
        rows = [[site.get(key) for key, _ in _CHECK_COLUMNS] for site in result.sites]
        console.print(_table(f"{ns.model}: precision check", [title for _, title in _CHECK_COLUMNS], rows))
        verdict = "[green]safe[/green]" if result.safe else "[red]unsafe[/red] (try --fp32-positions)"
        console.print(f"verdict: {verdict}")
    if not result.safe:
        from posrewrite.errors import UnsafeModelError

        unsafe = [str(site.get("site", k)) for k, site in enumerate(result.sites) if not site.get("safe")]
        length = getattr(result, "max_length", None) or ns.max_length or "the checked"
        print(
            f"{PROG}: error: unsafe at {length} tokens: site(s) {', '.join(unsafe)} lose position or angle "
            "precision (try --fp32-positions)",
            file=sys.stderr,
        )
        return UnsafeModelError.exit_code
    return 0


def _cmd_plot(ns: argparse.Namespace, out: _Output) -> int:
    opts = options_from_args(ns, require_work=False) if _rope_flags_given(ns) else None
    _preload(ns.model, output=ns.output)
    from posrewrite import plot

    result = plot.plot(Path(ns.model), ns.output, opts)
    return _print_lines_result(result, out)


def _cmd_advise(ns: argparse.Namespace, out: _Output) -> int:
    if ns.context <= 0:
        raise UsageError(f"--context must be greater than 0, not {ns.context}")
    if ns.head_dim is not None and ns.head_dim <= 0:
        raise UsageError(f"--head-dim must be greater than 0, not {ns.head_dim}")
    if getattr(ns, "eval_text", None) is not None:
        return _cmd_advise_eval(ns, out)
    rope_params = None
    if _rope_flags_given(ns):
        if ns.model is None:
            raise UsageError("a planned rescaling (--rope-scale, --rope-method, ...) needs a MODEL to apply it to")
        from posrewrite.options import read_config_json, rope_parameters_from_options

        opts = options_from_args(ns, require_work=False)
        rope_params = rope_parameters_from_options(opts, config_json=read_config_json(ns.model))
    path = _preload(ns.model) if ns.model is not None else None
    from posrewrite import advise

    result = advise.advise_model(ns.context, head_dim=ns.head_dim, path=path, rope_params=rope_params)
    from posrewrite.advise_eval import rule_of_thumb

    rule = rule_of_thumb(_training_length(ns), ns.context)
    result.lines.extend(rule)
    if out.json:
        out.emit_json(result.to_dict() | {"method": {"measured": False, "rule_of_thumb": rule}})
        return 0
    return _print_lines_result(result, out)


def _training_length(ns: argparse.Namespace) -> int | None:
    """--original-max-positions (or --yarn-orig-ctx), else config.json beside MODEL."""
    orig = ns.original_max_positions or ns.yarn_orig_ctx
    if orig:
        return int(orig)
    if ns.model is not None:
        from posrewrite.options import read_config_json

        config = read_config_json(ns.model) or {}
        rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
        for value in (rp.get("original_max_position_embeddings") if isinstance(rp, dict) else None,
                      config.get("original_max_position_embeddings"), config.get("max_position_embeddings")):
            if value:
                return int(value)
    return None


def _cmd_advise_eval(ns: argparse.Namespace, out: _Output) -> int:
    if ns.model is None:
        raise UsageError("--eval-text needs a MODEL to rewrite and measure")
    for flag in ("rope_scale", "rope_freq_scale", "rope_method", "rope_base", "rope_params"):
        if getattr(ns, flag, None) is not None:
            raise UsageError(f"--eval-text measures every method itself: leave out --{flag.replace('_', '-')}")
    original = _training_length(ns)
    if original is None:
        raise UsageError("--eval-text needs the training length: pass --original-max-positions L (or keep "
                         "config.json beside MODEL)")
    path = _preload(ns.model)
    from posrewrite.advise_eval import evaluate_candidates
    from posrewrite.progress import progress_reporter

    with progress_reporter(enabled=not out.json) as reporter:
        result = evaluate_candidates(path, ns.context, ns.eval_text, original, progress=reporter)
    return _print_lines_result(result, out)


def _print_lines_result(result: Any, out: _Output) -> int:
    if out.json:
        out.emit_json(result.to_dict())
    else:
        console = out.console()
        for line in result.lines:
            console.print(_escape(line))
    return 0


# ------------------------------------------------------------------------------------------------------ main


def _quiet_onnxruntime() -> None:
    """onnxruntime's own log (coloured warnings about unused initializers...) stays off stderr: errors only."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except Exception:  # noqa: BLE001 - no onnxruntime: nothing to quiet
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``except BaseException`` removes what it wrote."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise _Terminated()


@contextlib.contextmanager
def _library_output_captured(debug: bool):
    """Warnings (numpy RuntimeWarnings, onnx_ir, onnxscript) and library log records are kept off stderr unless
    --debug: an error is one line, a success prints only its result."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_error(out: _Output, code: int, kind: str, message: str) -> None:
    message = _printable(" ".join(message.split()))
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if out.json:
        try:
            out.emit_json({"error": {"exit_code": code, "type": kind, "message": message}})
        except Exception:  # stdout gone: the exit code still says it
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see :mod:`posrewrite.errors`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = _Output(sys.stdout, json_mode="--json" in args)
    debug = "--debug" in args
    if not args:
        build_parser().print_usage(sys.stderr)
        print(f"{PROG}: error: give a MODEL to rewrite or a command (see '{PROG} --help')", file=sys.stderr)
        return UsageError.exit_code
    # In --json mode nothing but the one JSON object may reach stdout: stray prints go to stderr.
    guard = contextlib.redirect_stdout(sys.stderr) if out.json else contextlib.nullcontext()
    try:
        with guard, _sigterm_as_interrupt(), _library_output_captured(debug):
            ns = build_parser().parse_args(_with_default_command(args))
            if getattr(ns, "handler", None) is None:
                raise UsageError(f"give a MODEL to rewrite or a command (see '{PROG} --help')")
            return ns.handler(ns, out)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PosrewriteError as e:
        if debug:
            traceback.print_exc()
        _report_error(out, e.exit_code, type(e).__name__, str(e))
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, _Terminated):
            print(f"{PROG}: error: terminated (nothing was left behind)", file=sys.stderr)
            return 143
        print(f"{PROG}: error: interrupted (nothing was left behind)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as e:  # a bug: one line, or the traceback with --debug
        if debug:
            traceback.print_exc()
        message = " ".join(f"internal error: {type(e).__name__}: {e}".split())
        if not debug:
            message += " (rerun with --debug for the traceback)"
        _report_error(out, 1, "InternalError", message)
        return 1
