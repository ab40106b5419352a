"""A time limit for code under test that could hang (a fuzz example, an interpreted kernel waiting on a peer):
the alarm raises ``TimeoutError`` in the main thread, so the test fails instead of hanging."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` naming ``what`` if the block runs longer than ``seconds``. Only the main thread
    receives signals: elsewhere (or without ``setitimer``) the block runs unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
