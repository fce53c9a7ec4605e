"""Phase messages on stderr while a run works (building, quantizing, wrapping, warm-up and timed steps), so that a
long build or a slow step is visibly alive. stdout stays for the result (pure JSON with --json: progress off)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Say = Callable[[str], None]


def silent(text: str) -> None:
    """The progress callback when nobody is watching (sweep workers, --json, tests)."""


@contextmanager
def phases(enabled: bool = True) -> Iterator[Say]:
    """Yields `say(text)`: on a terminal a spinner line with the current phase and the time since the start
    (replaced in place, gone when done); in a log (stderr not a terminal) one timed plain line per message."""
    if not enabled:
        yield silent
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:  # a log: plain lines, each with the seconds since the start
        t0 = time.monotonic()

        def line(text: str) -> None:
            console.print(f"[{time.monotonic() - t0:7.1f} s] {text}", markup=False, highlight=False, soft_wrap=True)

        yield line
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("loading torch, transformers, peft", total=None)
        yield lambda text: bar.update(task, description=escape(text))
