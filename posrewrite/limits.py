"""Documented bounds on what posrewrite builds, so that no input (flag, config.json or model) can make it use
unbounded memory or time. Values past a bound are refused with exit 2 (a flag or config value) naming it."""

from __future__ import annotations

__all__ = [
    "DEFAULT_CHECK_LENGTH",
    "MAX_CONFIG_BYTES",
    "MAX_LENGTH",
    "MAX_ROPE_BASE",
    "MAX_SCALE",
    "MEMORY_BUDGET_BYTES",
    "TABLE_BYTES_PER_ELEMENT",
    "check_positive",
    "fits_budget",
    "shown",
]

import math
from collections.abc import Iterable
from typing import Any

from posrewrite.errors import UsageError

#: Longest sequence posrewrite plans for, checks or builds a table for (--max-positions, --original-max-positions,
#: check --max-length, a rescale's target length, config.json's max_position_embeddings): 2^22 = 4,194,304.
MAX_LENGTH = 1 << 22
#: Sequence length ``check`` analyses when --max-length is not given.
DEFAULT_CHECK_LENGTH = 8192
#: Largest --rope-scale / --pos-scale / --alibi-scale (and --rope-params factor).
MAX_SCALE = 4096.0
#: Largest RoPE base (--rope-base, rope_theta).
MAX_ROPE_BASE = 1e15
#: Largest array posrewrite materialises while analysing a model or builds as a new table or mask: 2 GiB.
MEMORY_BUDGET_BYTES = 2 << 30
#: Peak bytes per element of a table grown by --max-positions or a rescale (float64 math, interpolation
#: temporaries and the cast copy; measured: 4.7 GB peak RSS for a 3M x 64 learned table).
TABLE_BYTES_PER_ELEMENT = 24
#: config.json and --rope-params files larger than this are refused (1 MiB; HF configs are a few KB).
MAX_CONFIG_BYTES = 1 << 20


def fits_budget(dims: Iterable[int], itemsize: float = 8, budget: int = MEMORY_BUDGET_BYTES) -> bool:
    """Whether an array of ``dims`` with ``itemsize``-byte elements stays within ``budget`` bytes."""
    return math.prod(int(d) for d in dims) * itemsize <= budget


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and value < 1e12 else f"{value:g}"


def shown(value: Any) -> str:
    """``value`` as a message shows it: its repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_positive(
    value: Any, flag: str, *, integer: bool = False, maximum: float | None = None, minimum: float | None = None
) -> None:
    """``value`` is None or a finite number > 0 (a whole one with ``integer``) within [minimum, maximum]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{flag} must be a number, not {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer
        raise UsageError(f"{flag} is out of range ({shown(value)})") from None
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"{flag} must be greater than 0, not {shown(value)}")
    if integer and number != int(number):
        raise UsageError(f"{flag} must be a whole number, not {shown(value)}")
    if maximum is not None and number > maximum:
        raise UsageError(f"{flag} {shown(value)} is over the limit of {_bound(maximum)} (see README, Reliability)")
    if minimum is not None and number < minimum:
        raise UsageError(f"{flag} {shown(value)} is under the limit of {_bound(minimum)} (see README, Reliability)")
