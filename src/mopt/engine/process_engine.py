"""The engine side of :class:`~mopt.engine.process_client.EngineProcessClient`: an
:class:`~mopt.engine.async_engine.AsyncEngine` in a process of its own, talking over two pipes.

Why a process: a server's event loop formats and sends an event per token of every stream, and in one
process it takes the GIL from the engine thread that must start each next step at once. On 2x H200, a
thread taking the GIL 2.7 ms in every 4 (64 short pieces with a write between them, as an event loop
does) slowed Llama-3-8B FP8 decode at batch 64 from 3.0 to 4.2 ms a step at TP=2 (TP=1's 4.3 ms steps,
which leave the host more slack, did not move); ``mopt serve -tp 2``'s steps took 4.0 ms instead of 3.0.
With the engine in its own process they take 3.0-3.2 ms, and the server gives 15.9-16.0k output tokens/s
instead of 12.3-12.7k (64 clients; ``bench/results/serve-engine-process-h200x2-2026-11-27.txt``). vLLM
splits its API server from its engine core for the same reason.

Messages are tuples, pickled by ``multiprocessing.connection``:

* server -> engine: ``("add", submission id, prompts, params, arrival time)``, ``("abort", request id)``,
  ``("shutdown",)`` (refuse new requests, end those in flight), ``("exit",)``;
* engine -> server: ``("ready", info)`` or ``("failed", error)`` once the model is loaded or not;
  ``("answer", submission id, [(request id, prompt token ids, arrival time), ...] or error)``,
  ``("out", [(request id, delta tuple or error), ...], time)`` once per step, ``("stats", EngineStats
  fields)`` when they change, ``("fatal", reason)`` when the model can never step again (its tensor-parallel
  world failed: the engine ends its requests and its process), and ``("stopped",)`` last.

Errors cross as themselves when they pickle (``RequestError`` keeps its field), else as a
``RuntimeError`` with their type and message. The engine process ignores SIGINT (the server stops it
with ``exit``; Ctrl-C reaches the whole process group) and ends cleanly on SIGTERM or when the server's
end of the pipe closes (also while the model loads), stopping its tensor-parallel workers.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from mopt.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError, _Submission, _Tracked
from mopt.engine.llm import LLM
from mopt.engine.stream import RequestDelta

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # for the engine thread to finish its step once told to exit
WEDGED_STOP_TIMEOUT_S = 1.0  # the same when a rank failed under this GPU's collectives


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a ``RuntimeError`` carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def delta_tuple(delta: RequestDelta) -> tuple:
    return (delta.text, delta.token_ids, delta.logprobs, delta.finish_reason, delta.stop_reason)


@dataclass
class _PipedSubmission(_Submission):
    submission_id: int = 0


class PipedEngine(AsyncEngine):
    """An :class:`AsyncEngine` whose callers are in another process: submissions come as messages and
    answers, outputs and stats leave on ``outputs`` instead of going to event loops."""

    def __init__(self, llm: LLM, max_queue: int, outputs: Connection) -> None:
        super().__init__(llm, max_queue)
        self._outputs, self._send_lock = outputs, threading.Lock()
        self._sent_stats: tuple | None = None

    def send(self, message: tuple) -> None:
        with self._send_lock:  # the engine thread and the command reader both send
            try:
                self._outputs.send(message)
            except OSError:  # the server is gone; the command reader sees the pipe close and stops us
                pass

    def submit(self, submission_id: int, prompts: list, params: list, arrival_time: float) -> None:
        submission = _PipedSubmission(prompts, params, None, None, arrival_time, submission_id)
        try:
            self._enqueue(submission)
        except (EngineStoppedError, QueueFullError) as e:
            self.send(("answer", submission_id, e))

    def _answer(self, sub: _Submission, result: Any) -> None:
        if isinstance(result, BaseException):
            self.send(("answer", sub.submission_id, portable(result)))
        else:
            self.send(("answer", sub.submission_id,
                       [(s.request_id, s.prompt_token_ids, s.arrival_time) for s in result]))

    def _deliver(self, items: list[tuple[_Tracked, Any]], when: float) -> None:
        if items:
            self.send(("out", [(tracked.seq.request_id, portable(item) if isinstance(item, BaseException)
                                else delta_tuple(item)) for tracked, item in items], when))

    def _update_stats(self) -> None:
        super()._update_stats()
        stats = dataclasses.astuple(self.stats)
        if stats != self._sent_stats:
            self._sent_stats = stats
            self.send(("stats", stats))

    def _stop_for_good(self, error: BaseException, hung: bool = False) -> bool:
        if not super()._stop_for_good(error, hung):
            return False
        self.send(("fatal", self.failure))
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread leaves its wait for commands and cleans up
        return True

    def stop_now(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """End what is in flight and the engine thread; whether the thread ended within ``timeout``."""
        self._signal_exit()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run(factory: Callable[[], LLM], max_queue: int, commands: Connection, outputs: Connection,
        log_level: int = logging.WARNING) -> None:
    """The engine process: load with ``factory``, then serve ``commands`` until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=log_level, format="%(levelname)s %(message)s")
    loaded = threading.Event()
    threading.Thread(target=_stop_if_orphaned_while_loading, args=(commands, loaded), daemon=True,
                     name="mopt-engine-orphan-watch").start()
    engine: PipedEngine | None = None
    try:
        try:
            llm = factory()
        except BaseException as e:  # SystemExit from SIGTERM included: the server waits for an answer
            logger.debug("loading failed", exc_info=True)
            if not isinstance(e, Exception):
                e = RuntimeError(f"the engine process was stopped while loading the model ({type(e).__name__})")
            try:
                outputs.send(("failed", portable(e)))
            except OSError:  # the server is gone
                pass
            return
        finally:
            loaded.set()
        engine = PipedEngine(llm, max_queue, outputs)
        del llm
        engine.send(("ready", {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                               "tensor_parallel_size": engine.llm.tensor_parallel_size,
                               "stats": dataclasses.astuple(engine.stats)}))
        engine.start()  # after "ready": nothing else may come first
        _serve(engine, commands)
    finally:
        _close(engine)
        try:
            outputs.send(("stopped",))
            outputs.close()
        except OSError:
            pass


def _stop_if_orphaned_while_loading(commands: Connection, loaded: threading.Event) -> None:
    """The server sends nothing before "ready", so a readable command pipe during loading means it closed:
    the server is gone (killed, say), and a load of minutes should not go on for nobody. SIGTERM ends the
    load as a server's SIGTERM would (``SystemExit`` in the main thread, then the usual clean-up)."""
    while not loaded.is_set():
        try:
            closed = commands.poll(0.5)
        except (OSError, ValueError):
            closed = True
        if closed and not loaded.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _serve(engine: PipedEngine, commands: Connection) -> None:
    handlers = {"add": engine.submit, "abort": engine.abort, "shutdown": engine.begin_shutdown}
    while True:
        try:
            message = commands.recv()
        except (EOFError, OSError):
            logger.warning("the server went away; stopping the engine")
            return
        if message[0] == "exit":
            return
        handlers[message[0]](*message[1:])


def _close(engine: PipedEngine | None) -> None:
    """Stop the engine, free the model, then stop any tensor-parallel workers (in that order: CUDA
    graphs that hold NCCL collectives must go before the world's groups do)."""
    from mopt.engine import tp_runtime

    wedged = tp_runtime._RUNTIME is not None and tp_runtime._RUNTIME.wedged
    if engine is not None:
        timeout = WEDGED_STOP_TIMEOUT_S if wedged else STOP_TIMEOUT_S  # a step on a wedged GPU never returns
        if not engine.stop_now(timeout):
            logger.error("the engine thread did not stop within %.0f s", timeout)
        if not wedged:  # freeing CUDA graphs would wait on GPUs that wait on a dead rank; the exit skips it
            engine.release()
            gc.collect()  # the model's reference cycles too
    tp_runtime.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
