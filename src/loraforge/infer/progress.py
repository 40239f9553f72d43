"""A one-line progress report for long commands (images or prompts done, rate, ETA) on stderr.

Writes to stderr so that a command's ``--json`` output on stdout stays JSON only. On a terminal the
line is rewritten in place; otherwise (a log, a pipe) one line is printed at most every `every`
seconds and at the end."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``with Progress(total, "images", "eval-style") as p: ... p.advance()``."""

    def __init__(
        self, total: int, unit: str, label: str, stream=None, every: float = 5.0, enabled: bool = True
    ):
        self.total, self.unit, self.label = total, unit, label
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.enabled = every, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last = float("-inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _duration(left) if left == left else "?"
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
            f"elapsed {_duration(elapsed)}, ETA {eta}"
        )

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif self.done >= self.total or now - self._last >= self.every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
