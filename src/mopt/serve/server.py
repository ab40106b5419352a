"""Running the app under uvicorn: a socket bound before the model loads, and a clean shutdown.

SIGINT/SIGTERM: uvicorn stops accepting connections and the engine ends the requests in flight at
once (their streams get an error event, waiting callers a 503), so open connections finish within
moments; ``SHUTDOWN_GRACE_SECONDS`` bounds the wait for any that don't. The process then exits 0:
uvicorn would re-raise the captured signal after its graceful shutdown, which ends the process
with the signal's status instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading

import uvicorn

from mopt.engine.serving_engine import ServingEngine
from mopt.serve.app import create_app

SHUTDOWN_GRACE_SECONDS = 5.0
SWITCH_INTERVAL_SECONDS = 0.0002


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one); raises OSError (port taken, bad host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: ServingEngine, announce: str) -> None:
        super().__init__(config)
        self.engine, self.announce = engine, announce
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: str | None = None  # the engine's, when it stopped for good and took the server down

    async def on_tick(self, counter: int) -> bool:
        """(Ten times a second.) An engine that stopped for good (its process died, its tensor-parallel world
        failed) would fail every request from now on: shut down instead, so that whatever runs the server
        sees it exit with the reason."""
        if self.failure is None and self.engine.failure is not None:
            self.failure = self.engine.failure
            print(f"mopt serve: {self.failure}; shutting down", file=sys.stderr, flush=True)
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            print(self.announce, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler may interrupt code holding the engine's lock: hand the work to the loop.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.engine.begin_shutdown)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without re-raising the signal afterwards (see the module doc)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(engine: ServingEngine, sock: socket.socket, model_name: str, api_key: str | None = None,
                log_level: str = "warning") -> _Server:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(create_app(engine, model_name, api_key), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, lifespan="on")
    return _Server(config, engine, f"mopt serve: {model_name} listening on http://{shown}:{port}")


def serve(engine: ServingEngine, sock: socket.socket, model_name: str, api_key: str | None = None,
          log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM (blocking; the engine starts and stops with the app), or until the engine
    stops for good: then the server shuts down and this raises ``RuntimeError`` with the engine's reason."""
    # The engine thread gives up the GIL while the device works and needs it back at once to start
    # the next step; with Python's default 5 ms switch interval a busy event loop (formatting
    # events for many streams) could hold it for up to a decode step's length.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    server = make_server(engine, sock, model_name, api_key, log_level)
    server.run(sockets=[sock])
    if server.failure is not None:
        raise RuntimeError(server.failure)
