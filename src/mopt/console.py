"""What the command line shows while it works: a live status line for long steps, and quiet libraries.

* :func:`status` puts one line on stderr for a step of unknown length (a download, a conversion, an
  export) and keeps its elapsed time ticking on a terminal; elsewhere (logs, CI) it prints the line
  once and its time when the step ends.
* :func:`quiet_libraries` silences what third-party libraries print while mopt builds, loads and
  runs models: ModelOpt prints to stdout ("Inserted 756 quantizers"), transformers and torch warn
  about things a user of ``mopt`` cannot change. Verbose mode lets all of it through, moved to
  stderr, so that stdout carries nothing but the answer either way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from typing import Iterator

_NOISY_LOGGERS = ("transformers", "modelopt", "accelerate", "torch", "huggingface_hub")
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def status(message: str, stream=None, tick: float = 0.5) -> Iterator[None]:
    """``message ... 12 s`` on stderr while the block runs; ``message: done in 12.3 s`` after it."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    live = getattr(stream, "isatty", lambda: False)()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(tick):
            stream.write(f"\r{message} ... {time.perf_counter() - start:.0f} s")
            stream.flush()

    thread = threading.Thread(target=ticker, daemon=True) if live else None
    stream.write(f"{message} ...{'' if live else chr(10)}")
    stream.flush()
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        stream.write(f"{chr(13) if live else ''}{message}: done in {time.perf_counter() - start:.1f} s\n")
        stream.flush()


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Run the block with library chatter on stdout and in warnings silenced (``verbose``: moved to stderr).

    Our own logging (``mopt.*``) is untouched; errors still raise.
    """
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    transformers_verbosity = _set_transformers_verbosity(logging.ERROR)
    saved_env = {name: os.environ.get(name) for name in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)  # read when transformers / huggingface_hub are first imported
    progress_bars = _set_hf_progress_bars(False)
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if transformers_verbosity is not None:
            _set_transformers_verbosity(transformers_verbosity)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if progress_bars:
            _set_hf_progress_bars(True)


def _set_transformers_verbosity(level: int) -> int | None:
    """transformers keeps its own verbosity beside the logging level; set it if transformers is loaded."""
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is None:
        return None
    previous = tf_logging.get_verbosity()
    tf_logging.set_verbosity(level)
    return previous


def _set_hf_progress_bars(enabled: bool) -> bool:
    """Turn transformers' own progress bars (``Writing model shards``) on or off if it is loaded; returns
    whether they were on."""
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is None:
        return False
    was = tf_logging.is_progress_bar_enabled()
    (tf_logging.enable_progress_bar if enabled else tf_logging.disable_progress_bar)()
    return was
