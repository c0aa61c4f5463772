"""A progress line for long conversions: tensors and bytes done, rate, time left. Terminal only."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


class Progress:
    """Call it with each tensor's byte count as it is written; it redraws one line on ``stream``.

    Silent unless ``stream`` is a terminal (so logs and pipes stay clean) and until the work has
    taken ``delay`` seconds (so quick conversions print nothing).

    >>> import io
    >>> p = Progress(total_bytes=2000, total_tensors=2, stream=io.StringIO(), delay=0)
    >>> p(1000); p(1000); p.close(); p.line()
    '2/2 tensors  2.0 KB/2.0 KB  100%'
    """

    def __init__(
        self,
        total_bytes: int,
        total_tensors: int,
        *,
        stream: TextIO | None = None,
        delay: float = 2.0,
        enabled: bool | None = None,
    ):
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay, self.start, self.drawn_at = delay, time.monotonic(), 0.0
        self.bytes = self.tensors = 0
        self.shown = False

    def __call__(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.tensors += 1
        now = time.monotonic()
        if self.enabled and now - self.start >= self.delay and now - self.drawn_at >= 0.1:
            self.drawn_at, self.shown = now, True
            self.stream.write("\r" + self.line(now) + "\033[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The progress line, without terminal control characters."""
        elapsed = (now or time.monotonic()) - self.start
        done = self.bytes / self.total_bytes if self.total_bytes else 1.0
        text = f"{self.tensors}/{self.total_tensors} tensors  {_size(self.bytes)}/{_size(self.total_bytes)}  {done:.0%}"
        if elapsed > 0 and self.bytes and done < 1:
            rate = self.bytes / elapsed
            text += f"  {_size(rate)}/s  {(self.total_bytes - self.bytes) / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + self.line() + "\033[K\n")
            self.stream.flush()
