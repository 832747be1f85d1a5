"""Progress reporting that is visible only where a person is watching.

:func:`progress_reporter` gives a :class:`Reporter`: rich progress bars and notices on stderr when stderr is a
terminal (and the output is not ``--json``), and a silent one otherwise (pipes, CI, tests, the Python API).

Code that does long work takes an optional reporter and uses it like this::

    def rewrite(path, options, *, progress: Reporter | None = None):
        progress = progress or NullReporter()
        with progress.stage("detecting RoPE", total=len(nodes)) as stage:
            for node in nodes:
                ...
                stage.advance()
        progress.note("3 sites rescaled")
"""

from __future__ import annotations

__all__ = ["NullReporter", "Reporter", "RichReporter", "Stage", "progress_reporter"]

import contextlib
import sys
from collections.abc import Iterator
from typing import IO, Protocol


class Stage(Protocol):
    """One unit of work with an optional total."""

    def advance(self, amount: float = 1) -> None: ...

    def update(
        self, *, completed: float | None = None, total: float | None = None, description: str | None = None
    ) -> None: ...


class Reporter(Protocol):
    """What long-running functions accept as ``progress=``."""

    def stage(self, description: str, total: float | None = None) -> contextlib.AbstractContextManager[Stage]: ...

    def note(self, message: str) -> None: ...


class _NullStage:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(
        self, *, completed: float | None = None, total: float | None = None, description: str | None = None
    ) -> None:
        pass


class NullReporter:
    """Says nothing."""

    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None) -> Iterator[Stage]:
        yield _NullStage()

    def note(self, message: str) -> None:
        pass


class _RichStage:
    def __init__(self, progress, task_id) -> None:
        self._progress = progress
        self._task = task_id

    def advance(self, amount: float = 1) -> None:
        self._progress.advance(self._task, amount)

    def update(
        self, *, completed: float | None = None, total: float | None = None, description: str | None = None
    ) -> None:
        kwargs = {}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        self._progress.update(self._task, **kwargs)


class RichReporter:
    """Rich progress bars on a (terminal) stream; transient, so finished bars leave no trace."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream, stderr=stream is sys.stderr)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None) -> Iterator[Stage]:
        task = self._progress.add_task(description, total=total)
        try:
            yield _RichStage(self._progress, task)
        finally:
            self._progress.remove_task(task)

    def note(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_reporter(*, enabled: bool = True, stream: IO[str] | None = None) -> Iterator[Reporter]:
    """A reporter for one command: rich bars when ``enabled`` and ``stream`` (stderr) is a terminal, else silence."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not _is_terminal(stream):
        yield NullReporter()
        return
    with RichReporter(stream) as reporter:
        yield reporter
