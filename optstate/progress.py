"""A progress bar for long conversions and verifications (``rich.progress``): bytes, rate, time left. Terminal only.

``rich`` is imported only when a bar is drawn, so ``import optstate`` stays NumPy only.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

# Quick conversions print nothing: the bar appears once the work has taken this long.
SHOW_AFTER_S = 2.0
# No rate (and no time left) is shown before the work has taken this long: a first guess is a wild one.
MIN_RATE_S = 1.0


class Progress:
    """Call it with each tensor's byte count as it is written; it draws one ``rich`` bar on ``stream``,
    headed ``label`` and counting calls in ``unit`` (``verify`` counts its checks: a parameter compared after a step).

    Silent unless ``stream`` is a terminal (so logs and pipes stay clean) and until the work has taken
    ``delay`` seconds. ``total_bytes`` and ``total_tensors`` are the caller's estimate: a writer may
    write more (step counters, parameters) or less, so the bar's total grows to what was written
    rather than passing 100%, and :meth:`close` ends it at exactly what was written.

    >>> import io
    >>> p = Progress(total_bytes=2000, total_tensors=2, stream=io.StringIO(), delay=0)
    >>> p(1000); p(1000); p(24); p.close(); p.line()
    '3 tensors  2.0 KB/2.0 KB  100%'
    """

    def __init__(
        self,
        total_bytes: int,
        total_tensors: int,
        *,
        stream: TextIO | None = None,
        delay: float | None = None,
        enabled: bool | None = None,
        label: str = "converting",
        unit: str = "tensors",
    ):
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = SHOW_AFTER_S if delay is None else delay
        self.start = time.monotonic()
        self.bytes = self.tensors = 0
        self.closed = False
        self._bar: Any = None  # the rich.progress.Progress, once shown
        self._task: Any = None

    @property
    def shown(self) -> bool:
        """Whether the bar was drawn (on a terminal, after ``delay`` seconds)."""
        return self._bar is not None

    def __call__(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.tensors += 1
        if self.enabled and not self.closed:
            if self._bar is None and time.monotonic() - self.start >= self.delay:
                self._show()
            if self._bar is not None:
                self._bar.update(self._task, completed=self.bytes, total=self._total(), **self._fields())

    def _fields(self) -> dict[str, Any]:
        """The count, rate and time left the bar shows. The rate is the mean since the work began, not
        rich's rate over its last updates: writers and ``verify`` report in bursts (a chunk's tensors
        microseconds apart), which rich would read as hundreds of GB/s and a second left."""
        elapsed = time.monotonic() - self.start
        rate = self.bytes / elapsed if self.bytes and elapsed >= MIN_RATE_S else None
        return {
            "tensors": self.tensors,
            "rate": "?" if rate is None else f"{_size(rate)}/s",
            "left": _clock(None if rate is None else (self._total() - self.bytes) / rate),
        }

    def _total(self) -> int:
        """The estimate, or what was written where a writer wrote more: the bar never passes 100%."""
        return max(self.total_bytes, self.bytes)

    def _show(self) -> None:
        from rich.console import Console  # here, not at the top: only a terminal conversion needs rich
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
        )

        self._bar = Progress(
            TextColumn(self.label),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TextColumn("[progress.data.speed]{task.fields[rate]}"),
            TextColumn("[progress.remaining]{task.fields[left]}"),
            TextColumn("{task.fields[tensors]} " + self.unit),
            console=Console(file=self.stream),
        )
        self._task = self._bar.add_task(self.label, total=self._total(), **self._fields())
        self._bar.start()

    def line(self) -> str:
        """What the bar says, as plain text (for logs and tests).

        >>> Progress(3000, 3, enabled=False).line()
        '0 tensors  0 B/3.0 KB  0%'
        """
        total = self._total()
        done = self.bytes / total if total else 1.0
        return f"{self.tensors} {self.unit}  {_size(self.bytes)}/{_size(total)}  {done:.0%}"

    def close(self, finished: bool = True) -> None:
        """End the bar, once: at exactly what was written when ``finished``, else where it stopped."""
        if self.closed:
            return
        self.closed = True
        if finished:
            self.total_bytes = self.bytes  # what was written is the total, whatever the estimate said
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bytes, total=self._total(), **self._fields())
            self._bar.stop()


def _clock(seconds: float | None) -> str:
    """Time left as ``H:MM:SS``; ``-:--:--`` while unknown.

    >>> _clock(None), _clock(0.2), _clock(3725)
    ('-:--:--', '0:00:01', '1:02:05')
    """
    if seconds is None:
        return "-:--:--"
    whole = math.ceil(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _size(nbytes: float) -> str:
    """``nbytes`` in decimal units.

    >>> _size(999), _size(1500), _size(2.5e9)
    ('999 B', '1.5 KB', '2.5 GB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError
