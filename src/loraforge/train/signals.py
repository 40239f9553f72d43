"""Stopping a run cleanly: the first Ctrl-C (or SIGTERM) asks the loop to finish the current step,
save a checkpoint and stop; a second Ctrl-C stops at once (KeyboardInterrupt).

    with stop_requests() as stop:
        while ...:
            ...
            if stop.requested:
                break
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by the signal handler; read by the loop once per step."""

    def __init__(self):
        self.requested = False


def install_interrupt_handlers(stop: StopRequest) -> dict | None:
    """Installs the handlers; returns the previous ones (None off the main thread, where Python
    cannot install signal handlers: there Ctrl-C keeps its default meaning)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)...", flush=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    return previous


def restore_interrupt_handlers(previous: dict | None) -> None:
    for sig, old in (previous or {}).items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """The handlers for the duration of the block; the previous ones come back after it."""
    stop = StopRequest()
    previous = install_interrupt_handlers(stop)
    try:
        yield stop
    finally:
        restore_interrupt_handlers(previous)
