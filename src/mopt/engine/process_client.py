""":class:`EngineProcessClient`: what :class:`~mopt.engine.async_engine.AsyncEngine` offers asyncio code
(``add``, ``abort``, ``begin_shutdown``, ``stop``, ``stats``), with the engine in a process of its own
(``process_engine``, which says why and what the messages are).

The client's reader thread receives the engine's messages: it makes a request's
:class:`~mopt.engine.stream.RequestStream` when the engine admits it, and hands each step's deltas to
each event loop in one callback, as the in-process engine does. If the engine process dies, every
waiting caller and every open stream gets :class:`EngineStoppedError` naming its exit code, and
``is_running`` turns false (a server's ``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import threading
import time
import weakref
from typing import Any, Callable

from mopt.engine import process_engine
from mopt.engine.async_engine import _call_soon
from mopt.engine.serving_engine import EngineStats, EngineStoppedError
from mopt.engine.llm import LLM, Prompt
from mopt.engine.sequence import SamplingParams
from mopt.engine.stream import RequestDelta, RequestStream
from mopt.errors import EngineArgumentError

logger = logging.getLogger(__name__)

KILL_AFTER_S = 5.0  # after SIGTERM, before SIGKILL


class EngineProcessClient:
    """Start an engine process that builds its LLM with ``factory`` (a picklable callable: the process
    is spawned) and wait until the model is loaded; a load that fails raises its error here."""

    def __init__(self, factory: Callable[[], LLM], max_queue: int = 512) -> None:
        if type(max_queue) is not int or max_queue < 1:
            raise EngineArgumentError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.max_queue = max_queue
        context = multiprocessing.get_context("spawn")
        engine_commands, self._commands = context.Pipe(duplex=False)
        self._outputs, engine_outputs = context.Pipe(duplex=False)
        self._process = context.Process(
            target=process_engine.run, name="mopt-engine", daemon=False,  # a daemon may not start TP workers
            args=(factory, max_queue, engine_commands, engine_outputs, logging.getLogger().getEffectiveLevel()))
        self._lock = threading.Lock()  # _pending, _dead, and sends from several threads
        self._reap_lock = threading.Lock()  # see _ended
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._streams: dict[int, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}  # reader thread only
        self._ids = itertools.count()
        self._started = self._stopping = self._dead = False
        # Why the engine stopped for good (its model failed, or its process died); None while it serves or
        # after a requested stop. Set by the reader thread; a server shuts down on it.
        self.failure: str | None = None
        # At exit, before multiprocessing joins its children: an engine still serving (or loading) would never end.
        self._closer = weakref.finalize(self, _close_pipe, self._commands)
        atexit.register(self._closer)
        try:
            self._process.start()
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # what pickling a bad factory raises
            for end in (engine_commands, engine_outputs, self._commands, self._outputs):
                end.close()
            raise EngineArgumentError(f"the engine factory {factory!r} cannot be sent to the engine process, which is "
                                      f"spawned: give a picklable callable such as functools.partial(mopt.LLM, "
                                      f"path, ...) ({type(e).__name__}: {e})") from None
        try:
            engine_commands.close()
            engine_outputs.close()  # so that the engine's death closes the pipe on our side
            info = self._wait_until_loaded()
        except BaseException:  # a failed load, or Ctrl-C while loading: stop the engine now, not in 10 s
            self._end_process(0.0)
            raise
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.tensor_parallel_size: int = info["tensor_parallel_size"]
        self.stats = EngineStats(*info["stats"])
        self._reader = threading.Thread(target=self._read, name="mopt-engine-outputs", daemon=True)
        self._reader.start()

    def _wait_until_loaded(self) -> dict:
        while True:
            if self._outputs.poll(0.1):
                try:
                    message = self._outputs.recv()
                except EOFError:  # it died without a word
                    break
                if message[0] == "ready":
                    return message[1]
                if message[0] == "failed":
                    self._process.join(KILL_AFTER_S)
                    raise message[1]
                raise RuntimeError(f"the engine process sent {message[0]!r} before it was ready")
            if not self._process.is_alive():
                break
        self._process.join(KILL_AFTER_S)
        raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while loading the "
                           "model; see its output above")

    # -- the event loop's side --------------------------------------------------------------------

    def start(self) -> None:
        self._started = True

    @property
    def is_running(self) -> bool:
        return (self._started and not self._stopping and not self._dead and self.failure is None
                and not self._ended(0.0))

    async def add(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestStream]:
        """As :meth:`AsyncEngine.add <mopt.engine.async_engine.AsyncEngine.add>`."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(params)} SamplingParams: give one of each, at least one")
        if not self._started or self._stopping:
            raise EngineStoppedError("the engine is not running (shutting down, stopped or not started)")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._dead:
                raise EngineStoppedError(self.failure or "the engine is shutting down")
            submission_id = next(self._ids)
            self._pending[submission_id] = (loop, future)
            sent = self._send(("add", submission_id, list(prompts), list(params), time.monotonic()))
            if not sent:
                del self._pending[submission_id]
        if not sent:
            raise EngineStoppedError("the engine process is gone")
        return await future  # if cancelled, the answer aborts the requests once they exist

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._send(("abort", request_id))

    def begin_shutdown(self) -> None:
        self._stopping = True
        with self._lock:
            self._send(("shutdown",))

    async def stop(self, timeout: float = 10.0) -> None:
        """End the requests in flight and the engine process (waiting up to ``timeout`` seconds before
        killing it), without blocking the event loop."""
        self._stopping = True
        with self._lock:
            self._send(("exit",))
        await asyncio.get_running_loop().run_in_executor(None, self._end_process, timeout)

    def release(self) -> None:
        """Make sure the engine process has ended (the model lives there)."""
        self._end_process(0.0)

    # -- any thread -------------------------------------------------------------------------------

    def _send(self, message: tuple) -> bool:
        """Under ``_lock``; whether the engine got it (not when its process is gone)."""
        try:
            self._commands.send(message)
            return True
        except (OSError, ValueError):  # ValueError: our end was closed
            return False

    def _ended(self, timeout: float) -> bool:
        """Whether the engine process ended within ``timeout`` seconds; if it did, it is reaped.

        Any thread may ask. It waits on the process's sentinel, and one thread at a time reaps: two threads in
        ``Process.join`` race in ``waitpid``, and the loser gets ECHILD, which ``multiprocessing`` takes for a
        process still running (a stop then logged that the engine did not stop and sent SIGTERM to its pid)."""
        if not multiprocessing.connection.wait([self._process.sentinel], timeout):
            return False
        with self._reap_lock:
            self._process.join()  # it has ended: this only collects its exit status
        return True

    def _end_process(self, timeout: float = 10.0) -> None:
        process = self._process
        if not self._ended(timeout):
            if timeout:
                logger.error("the engine process did not stop within %.0f s; terminating it", timeout)
            process.terminate()
            if not self._ended(KILL_AFTER_S):
                process.kill()
                self._ended(KILL_AFTER_S)
        with self._lock:
            _close_pipe(self._commands)
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(KILL_AFTER_S)

    # -- the reader thread ------------------------------------------------------------------------

    def _read(self) -> None:
        handlers = {"out": self._on_outputs, "answer": self._on_answer, "stats": self._on_stats,
                    "fatal": self._on_failure}
        try:
            while True:
                message = self._outputs.recv()
                if message[0] == "stopped":
                    break
                handlers[message[0]](*message[1:])
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading the engine's outputs failed")
        finally:
            self._on_exit()

    def _on_failure(self, reason: str) -> None:
        self.failure = reason

    def _on_stats(self, stats: tuple) -> None:
        self.stats = EngineStats(*stats)

    def _on_answer(self, submission_id: int, result: Any) -> None:
        with self._lock:
            loop, future = self._pending.pop(submission_id)
        streams = []
        if not isinstance(result, BaseException):
            for request_id, prompt_token_ids, arrival_time in result:
                stream = RequestStream(request_id, prompt_token_ids, arrival_time)
                self._streams[request_id] = (stream, loop)
                streams.append(stream)

        def settle() -> None:
            if future.cancelled():  # the caller went away while the engine validated: drop its requests
                for stream in streams:
                    self.abort(stream.request_id)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(streams)

        _call_soon(loop, settle)

    def _on_outputs(self, items: list[tuple[int, Any]], when: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is None:
                continue
            stream, loop = entry
            if isinstance(item, BaseException):
                del self._streams[request_id]
            else:
                item = RequestDelta(*item)
                if item.finish_reason is not None:
                    del self._streams[request_id]
            by_loop.setdefault(loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            _call_soon(loop, lambda batch=batch: [stream._push(item, when) for stream, item in batch])

    def _on_exit(self) -> None:
        """The engine process ended (or its pipe broke): fail whoever still waits."""
        self._ended(1.0)
        if self.failure is None and not self._stopping:
            self.failure = (f"the engine process exited unexpectedly ({_describe(self._process.exitcode)}); "
                            "see the server log")
            logger.error("%s", self.failure)
        message = self.failure or "the engine is shutting down"
        with self._lock:
            self._dead = True
            pending, self._pending = self._pending, {}
        for loop, future in pending.values():
            _call_soon(loop, lambda future=future: future.done() or future.set_exception(EngineStoppedError(message)))
        when = time.monotonic()
        for stream, loop in self._streams.values():
            _call_soon(loop, lambda stream=stream: stream._push(EngineStoppedError(message), when))
        self._streams.clear()


def _describe(code: int | None) -> str:
    if code is None:
        return "still running, its pipe closed"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _close_pipe(connection) -> None:
    try:
        connection.close()
    except OSError:
        pass
