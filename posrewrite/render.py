"""What the ``posrewrite`` command prints: rich tables and lines for people, exactly one JSON object on stdout
with ``--json``, and the one-line ``posrewrite: error: ...`` messages on stderr.

Nothing here parses flags, checks options or runs the API: :mod:`posrewrite.cli` does that and hands each
result to the function that shows it.
"""

from __future__ import annotations

__all__ = [
    "PROG",
    "Output",
    "jsonable",
    "fmt",
    "escape",
    "printable",
    "print_error",
    "report_error",
    "show_rewrite",
    "show_validation",
    "show_inspect",
    "show_check",
    "show_lines",
]

import json
import math
import os
import sys
from typing import IO, Any

PROG = "posrewrite"


class Output:
    """Where a command's result goes: one JSON object on the real stdout, or rich text."""

    def __init__(self, stdout: IO[str], json_mode: bool) -> None:
        self.stdout = stdout
        self.json = json_mode

    def console(self) -> Any:
        from rich.console import Console

        width = None if _isatty(self.stdout) else 120
        return Console(file=self.stdout, width=width, highlight=False, soft_wrap=True)

    def emit_json(self, payload: Any) -> None:
        self.stdout.write(json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n")
        self.stdout.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays, paths, tuples, sets, non-finite floats ('inf', 'nan')."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if hasattr(obj, "value") and hasattr(obj, "name"):  # enums
        return jsonable(obj.value)
    return str(obj)


def fmt(value: Any) -> str:
    """A value as a table cell: 3-4 significant digits, yes/no, the first four items of a list, '-' for None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(fmt(v) for v in value[:4])
        return f"[{shown}{', …' if len(value) > 4 else ''}]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(escape(fmt(v)) for v in row))
    return table


def escape(text: str) -> str:
    """Text for the rich console: markup escaped, and control characters (terminal escape sequences a model's
    names may hold) shown as escapes instead of being sent to the terminal."""
    from rich.markup import escape as rich_escape

    return rich_escape(printable(text))


def printable(text: object) -> str:
    """``text`` with every non-printable character (ESC, BEL, CR, newlines, ...) written as a Python escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------------------------------------------ errors


def print_error(message: str) -> None:
    """The one ``posrewrite: error: ...`` line on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def report_error(out: Output, code: int, kind: str, message: str) -> None:
    """An error: one line on stderr and, with --json, ``{"error": {exit_code, type, message}}`` on stdout."""
    message = printable(" ".join(message.split()))
    print_error(message)
    if out.json:
        try:
            out.emit_json({"error": {"exit_code": code, "type": kind, "message": message}})
        except Exception:  # stdout gone: the exit code still says it
            pass


# ---------------------------------------------------------------------------------------------------- commands


def show_rewrite(out: Output, model: object, result: Any) -> None:
    """A rewrite's changes, notes, validation table and output path (the JSON object with --json)."""
    validation = getattr(result, "validation", None)
    failed = validation is not None and not validation.ok
    if out.json:
        out.emit_json(result.to_dict())
        return
    console = out.console()
    changes = list(getattr(result, "changes", []) or [])
    if result.modified:
        console.print(f"[bold]{escape(str(model))}[/bold]: {len(changes)} change(s)")
    else:
        console.print(f"[bold]{escape(str(model))}[/bold]: nothing to change")
    for line in changes:
        console.print(f"  • {escape(line)}")
    for line in getattr(result, "notes", []) or []:
        console.print(f"  [dim]note:[/dim] {escape(line)}")
    if validation is not None:
        _validation_table(console, validation)
    if result.output_path is not None and not failed:
        console.print(f"wrote [bold]{escape(str(result.output_path))}[/bold]")


def show_validation(out: Output, result: Any) -> None:
    """The result of ``posrewrite validate``."""
    if out.json:
        out.emit_json(result.to_dict())
    else:
        _validation_table(out.console(), result.validation)


def _validation_table(console: Any, validation: Any) -> None:
    """The validation table: each row with what was compared with what, its error and tolerance."""
    rows = [[r.site, r.length, r.max_abs_error, r.tolerance, r.ok, r.compared or r.message or ""]
            for r in validation.rows]
    console.print(_table("validation (onnxruntime)", ["site", "length", "max |error|", "tolerance", "ok", "compared"],
                         rows))
    for r in validation.rows:
        if r.message and (r.site == "past cache" or not r.ok):
            console.print(f"  [dim]{escape(str(r.site))}:[/dim] {escape(r.message)}")
    for line in getattr(validation, "notes", []) or []:
        console.print(f"  [dim]note:[/dim] {escape(line)}")


# Site fields shown as their own columns (when a site has them); the rest go to "details".
_INSPECT_COLUMNS = [
    "kind",
    "family",
    "layout",
    "head_dim",
    "rotary_dim",
    "base",
    "angles",
    "position_dtype",
    "angle_dtype",
    "max_positions",
    "attention_factor",
    "rotations",
    "bias_adds",
]
_INSPECT_TITLES = {
    "head_dim": "dim",
    "rotary_dim": "rotary",
    "position_dtype": "pos dtype",
    "angle_dtype": "angle dtype",
    "max_positions": "max pos",
    "attention_factor": "attn",
    "bias_adds": "bias adds",
}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def inspect_headline(payload: dict[str, Any]) -> str:
    """"N positional encoding site(s), M q/k rotations": the words and numbers of ``inspect --json`` (a site is
    one entry of ``encodings``; a rotation is one q or k tensor rotated by a RoPE site, its ``rotations``)."""
    sites = payload.get("encodings", [])
    text = _count(len(sites), "positional encoding site")
    rotations = sum(int(s.get("rotations") or 0) for s in sites)
    if any(s.get("kind") == "rope" for s in sites):
        text += f", {_count(rotations, 'q/k rotation')}"
    return text


def show_inspect(out: Output, model: object, payload: dict[str, Any]) -> None:
    """The sites of ``posrewrite inspect`` (one table row each, the other fields below) and its refusals."""
    if out.json:
        out.emit_json(payload)
        return
    console = out.console()
    sites = payload.get("encodings", [])
    console.print(f"[bold]{escape(str(model))}[/bold]: {inspect_headline(payload)}")
    if sites:
        keys = [k for k in _INSPECT_COLUMNS if any(k in site for site in sites)]
        rows = [[i, *(site.get(k) for k in keys)] for i, site in enumerate(sites)]
        console.print(_table(None, ["#", *(_INSPECT_TITLES.get(k, k) for k in keys)], rows))
        for i, site in enumerate(sites):
            details = {k: v for k, v in site.items() if k not in keys and v not in (None, [], {}, "")}
            if isinstance(details.get("prior_scaling"), dict) and "description" in details["prior_scaling"]:
                details["prior_scaling"] = details["prior_scaling"]["description"]
            if details:
                console.print(f"  [dim]#{i}:[/dim] {escape(fmt(details))}")
    for item in payload.get("rewrites", []):
        console.print(f"  [dim]recorded rewrite:[/dim] {escape(str(item.get('description')))}")
    refusals = payload.get("refusals", [])
    if refusals:
        rows = [[r.get("kind"), r.get("where"), r.get("reason")] for r in refusals]
        console.print(_table("not understood", ["kind", "where", "reason"], rows))


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


def _check_cell(key: str, value: Any) -> Any:
    """A cell of the check table: the exact-position fraction of the JSON as a percentage (a bare 1 read as a
    count)."""
    if key == "exact_position_fraction" and isinstance(value, int | float):
        return f"{100 * value:.4g}%"
    return value


def show_check(out: Output, model: object, result: Any) -> None:
    """The precision table of ``posrewrite check`` and its verdict."""
    if out.json:
        out.emit_json(result.to_dict())
        return
    console = out.console()
    rows = [[_check_cell(key, site.get(key)) for key, _ in _CHECK_COLUMNS] for site in result.sites]
    console.print(_table(f"{model}: precision check", [title for _, title in _CHECK_COLUMNS], rows))
    verdict = "[green]safe[/green]" if result.safe else "[red]unsafe[/red] (try --fp32-positions)"
    console.print(f"verdict: {verdict}")


def show_lines(out: Output, result: Any, *, extra: dict[str, Any] | None = None) -> None:
    """A result made of text lines (plot, advise): the lines, or its JSON object (with ``extra`` keys added)."""
    if out.json:
        out.emit_json(result.to_dict() | (extra or {}))
    else:
        console = out.console()
        for line in result.lines:
            console.print(escape(line))
