"""A byte progress bar on stderr: percent, bytes, rate, ETA and the tensor being written.

On a terminal it redraws one line at most ten times a second; in a log (not a tty) it prints a
line every tenth of the work, so CI logs stay short.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from streammerge.sizes import format_bytes


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """Callable as ``progress(done, total, name)``; call :meth:`close` at the end."""

    def __init__(self, label: str = "merging", stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.last_decile = -1
        self.drawn = False

    def line(self, done: int, total: int, name: str, width: int = 100) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        frac = done / total if total else 1.0
        eta = _clock((total - done) / rate) if rate > 0 and done < total else "--:--"
        bar_width = 20
        filled = int(frac * bar_width)
        bar = "#" * filled + "-" * (bar_width - filled)
        text = f"{self.label} {frac:4.0%} [{bar}] {format_bytes(done)}/{format_bytes(total)} {format_bytes(int(rate))}/s ETA {eta} {name}"
        return text[:width]

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw < 0.1 and done < total:
                return
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + self.line(done, total, name, width))
            self.drawn = True
        else:
            decile = int(10 * done / total) if total else 10
            if decile == self.last_decile:
                return
            self.last_decile = decile
            self.stream.write(self.line(done, total, name, 200) + "\n")
        self.last_draw = now
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
