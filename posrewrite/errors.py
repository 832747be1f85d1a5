"""Exceptions, one per documented exit code of the ``posrewrite`` command.

Every error the package raises on purpose derives from :class:`PosrewriteError` and carries the exit code the
command-line tool returns for it. Messages are written to be printed as one line after ``posrewrite: error:``.

=====  =======================  ==========================================================================
code   exception                meaning
=====  =======================  ==========================================================================
0      (none)                   done
1      (any other exception)    unexpected internal error (a bug: rerun with ``--debug`` and report it)
2      UsageError               bad usage or contradicting options
3      ModelLoadError           unreadable or invalid model (not ONNX, corrupt, missing external data, opset)
4      NoEncodingError          no positional encoding found
5      PartialMatchError        some sites were not understood; refused without ``--allow-partial``
6      ValidationError          the rewritten model failed validation
7      UnsafeModelError         ``check`` found sites that are unsafe at the requested length
8      OutputError              the output cannot be written
=====  =======================  ==========================================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_CODES",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "ModelLoadError",
    "NoEncodingError",
    "OutputError",
    "PartialMatchError",
    "PosrewriteError",
    "UnsafeModelError",
    "UsageError",
    "ValidationError",
]

EXIT_OK = 0
EXIT_INTERNAL = 1


class PosrewriteError(Exception):
    """Base class of every error posrewrite raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, detail: object | None = None) -> None:
        # Keep messages on one line: the CLI prints them after "posrewrite: error: ".
        super().__init__(" ".join(str(message).split()))
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self)


class UsageError(PosrewriteError):
    """Bad command-line usage or options that contradict each other (exit 2)."""

    exit_code = 2


class ModelLoadError(PosrewriteError):
    """The model cannot be read: missing, not ONNX, corrupt or truncated, missing external data, unsupported
    opset (exit 3)."""

    exit_code = 3


class NoEncodingError(PosrewriteError):
    """No positional encoding was found in the model (exit 4)."""

    exit_code = 4


class PartialMatchError(PosrewriteError):
    """Some encoding sites were not understood; the rewrite is refused without ``--allow-partial`` (exit 5)."""

    exit_code = 5


class ValidationError(PosrewriteError):
    """The rewritten model did not agree with the reference within tolerance (exit 6)."""

    exit_code = 6


class UnsafeModelError(PosrewriteError):
    """``check`` found sites that are not precision-safe at the requested length (exit 7)."""

    exit_code = 7


class OutputError(PosrewriteError):
    """The output file (or its external data) cannot be written (exit 8)."""

    exit_code = 8


#: exit code -> one-line meaning, for help texts and the README table.
EXIT_CODES: dict[int, str] = {
    0: "done",
    1: "unexpected internal error (rerun with --debug and report it)",
    UsageError.exit_code: "usage error or contradicting options",
    ModelLoadError.exit_code: "unreadable or invalid model (not ONNX, corrupt, missing external data, opset)",
    NoEncodingError.exit_code: "no positional encoding found",
    PartialMatchError.exit_code: "some sites not understood (refused without --allow-partial)",
    ValidationError.exit_code: "validation failed",
    UnsafeModelError.exit_code: "check found unsafe sites",
    OutputError.exit_code: "cannot write the output",
}
