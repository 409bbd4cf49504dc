"""Progress of the long steps users wait for, told to whoever watches: a job's row, or a terminal.

Code doing a long step (converting the embedded model, exporting, merging, evaluating) calls
``report(label, done, total)`` or wraps its loop in ``track``; that costs nothing when nobody watches.
A watcher is installed for a block with ``watching(sink)``:

- the job child (``jobs.run``) installs its ``Recorder``, which writes ``phase`` (the label), ``step``,
  ``total_steps`` and ``eta_s`` to the job's row: what the Jobs tab and ``python -m jobs show`` read;
- a command line run in the foreground installs ``TerminalBars``: one tqdm bar per label on stderr when
  stderr is a terminal, and nothing otherwise (a log keeps its own line per update).

The watcher is a context variable, so concurrent requests of the web server never see each other's,
and a thread started inside a block does not inherit it.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

# (label, done, total or None when unknown, detail shown beside the bar or None)
Sink = Callable[[str, int, "int | None", "str | None"], None]
T = TypeVar("T")

_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("workbench_progress", default=None)


def report(label: str, done: int, total: int | None = None, detail: str | None = None) -> None:
    """Tell the watcher (if any) that ``done`` of ``total`` units of the step ``label`` are done."""
    sink = _sink.get()
    if sink is not None:
        sink(label, done, total, detail)


def watched() -> bool:
    """Whether anyone watches (to skip preparing a report that is costly to compute)."""
    return _sink.get() is not None


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items``, reporting ``label``'s progress after each (``total``: ``len(items)`` if it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    report(label, 0, total)
    done = 0
    for item in items:
        yield item
        done += 1
        report(label, done, total)


@contextlib.contextmanager
def watching(sink: Sink) -> Iterator[Sink]:
    """Send every ``report`` made in this block (in this thread or task) to ``sink``."""
    token = _sink.set(sink)
    try:
        yield sink
    finally:
        _sink.reset(token)


class TerminalBars:
    """A sink drawing one tqdm bar per label on ``stream`` (stderr), only when it is a terminal.

    A label's bar ends (and stays on screen) when ``done`` reaches ``total``; ``close`` ends any left
    open, e.g. after an error, so that what follows starts on a line of its own.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.bars: dict[str, Any] = {}

    def __call__(self, label: str, done: int, total: int | None, detail: str | None = None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(label)
        if bar is not None and bar.total != total:
            bar.close()
            bar = None
        if bar is None:
            bar = self.bars[label] = tqdm(total=total, desc=label, file=self.stream, dynamic_ncols=True, leave=True)
        if detail:
            bar.set_postfix_str(detail, refresh=False)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()
            del self.bars[label]

    def write(self, line: str) -> None:
        """Print ``line`` on the stream above the bars (tqdm's way, so a bar is not cut in two)."""
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> "TerminalBars":
        self._watch = watching(self)
        self._watch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._watch.__exit__(*exc)
