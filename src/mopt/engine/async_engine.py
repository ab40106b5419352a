"""An asyncio front for :class:`~mopt.engine.llm.LLM`: requests come and go while one background
thread steps the scheduler.

The engine thread is the only one that touches the model, the scheduler and the tokenizer (prompts
are validated and tokenized there too: a Hugging Face tokenizer is not safe to share between
threads). Other threads talk to it through an inbox under a lock: submissions, aborts and the
shutdown flag. Each loop iteration takes the inbox (aborts first, so an aborted request's KV-cache
blocks are free before the next step), then runs one step through the same ``LLM._step`` that
``generate`` uses, and hands every request that received tokens its delta (new text, token ids,
logprobs, finish reason) on the request's event loop in one callback per step. With the LLM's async
scheduling (on GPUs) the next step is already queued on the device when ``_step`` returns, so the
event loop formats and sends while the device computes.

Failures stay with the requests they touch: a step that raises fails the sequences it ran with
:class:`EngineStepError` (details in the log) and the loop goes on serving the rest. A model that can
never step again (its tensor-parallel world lost a rank) stops the engine for good; a watch thread
makes sure of it when the step in flight never returns. The waiting
queue is bounded: a submission that would take it past ``max_queue`` sequences raises
:class:`QueueFullError` at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mopt.engine.llm import LLM, Prompt
from mopt.engine.sequence import SamplingParams, Sequence
from mopt.engine.serving_engine import (Chat, EngineStats, EngineStepError, EngineStoppedError, QueueFullError,
                                        ServingEngine)
from mopt.engine.stream import RequestDelta, RequestStream
from mopt.errors import EngineArgumentError

__all__ = ["AsyncEngine", "Chat", "EngineStats", "EngineStepError", "EngineStoppedError", "QueueFullError",
           "RequestDelta", "RequestStream", "ServingEngine"]

logger = logging.getLogger(__name__)

WATCH_S = 1.0  # how often the watch thread looks for a failed model (a dead tensor-parallel rank)
# How long after its model failed a step may go on before the watch thread declares it hung: a GPU that waits
# on a dead rank blocks the engine thread inside the driver (loading a kernel, say), where it never looks up.
HUNG_STEP_S = 3.0


@dataclass
class _Submission:
    prompts: list[Prompt | Chat]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival_time: float


@dataclass
class _Tracked:
    """A request on the engine thread: its sequence, its stream, and how much the stream has."""

    seq: Sequence
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    tokens_sent: int = 0
    text_sent: int = 0

    def delta(self) -> RequestDelta:
        seq = self.seq
        safe = seq.releasable_text_length(self.text_sent)
        logprobs = seq.output_logprobs[self.tokens_sent:] if seq.params.logprobs is not None else None
        delta = RequestDelta(seq.text[self.text_sent:safe], seq.output_token_ids[self.tokens_sent:], logprobs,
                             seq.finish_reason, seq.stop_reason)
        self.tokens_sent, self.text_sent = len(seq.output_token_ids), safe
        return delta


@dataclass
class _Inbox:
    submissions: list[_Submission] = field(default_factory=list)
    num_sequences: int = 0  # in submissions: they count against max_queue until they enter the scheduler
    aborts: list[int] = field(default_factory=list)
    stopping: bool = False
    exit: bool = False


class AsyncEngine:
    """Serve ``llm`` to asyncio code: ``streams = await engine.add(prompts, params)``, then
    ``async for delta in stream``; ``engine.abort(stream.request_id)``; ``await engine.stop()``.

    The engine owns ``llm`` from :meth:`start` on: don't call its ``generate`` meanwhile.
    ``max_queue``: most sequences accepted but not yet running.
    """

    def __init__(self, llm: LLM, max_queue: int = 512) -> None:
        if type(max_queue) is not int or max_queue < 1:
            raise EngineArgumentError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.llm, self.max_queue = llm, max_queue
        self._lock = threading.Lock()
        self._inbox = _Inbox()
        self._wake = threading.Event()
        self._tracked: dict[int, _Tracked] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        blocks = llm.scheduler.blocks
        self.stats = EngineStats(free_blocks=blocks.num_free, total_blocks=blocks.num_blocks)
        self.failure: str | None = None  # why the engine stopped for good (its tensor-parallel world failed)
        self._failure_lock = threading.Lock()
        self._watch_stop = threading.Event()

    # -- any thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mopt-engine", daemon=True)
            self._thread.start()
            threading.Thread(target=self._watch, name="mopt-engine-watch", daemon=True).start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._inbox.stopping

    async def add(self, prompts: list[Prompt | Chat], params: list[SamplingParams]) -> list[RequestStream]:
        """Submit requests that succeed or fail together: validated and tokenized on the engine
        thread (a bad one raises :class:`~mopt.RequestError` and none runs), then one stream each."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(params)} SamplingParams: give one of each, at least one")
        loop = asyncio.get_running_loop()
        submission = _Submission(list(prompts), list(params), loop, loop.create_future(), time.monotonic())
        self._enqueue(submission)
        return await submission.future  # if cancelled, _answer aborts the requests once they exist

    def _enqueue(self, submission: _Submission) -> None:
        """Into the inbox, or :class:`EngineStoppedError` / :class:`QueueFullError` at once."""
        with self._lock:
            if self._inbox.stopping or self._thread is None or not self._thread.is_alive():
                raise EngineStoppedError("the engine is not running (shutting down, stopped or not started)")
            queued = self._inbox.num_sequences + len(self.llm.scheduler.waiting)
            if queued + len(submission.prompts) > self.max_queue:
                raise QueueFullError(f"the queue holds {queued} waiting requests and takes at most {self.max_queue}; "
                                     "retry later")
            self._inbox.submissions.append(submission)
            self._inbox.num_sequences += len(submission.prompts)
        self._wake.set()

    def abort(self, request_id: int) -> None:
        """End a request and free its KV-cache blocks before the next step (no-op once finished)."""
        with self._lock:
            self._inbox.aborts.append(request_id)
        self._wake.set()

    def begin_shutdown(self) -> None:
        """Refuse new requests and end those in flight with :class:`EngineStoppedError`."""
        with self._lock:
            self._inbox.stopping = True
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """Shut down and wait (up to ``timeout`` seconds, without blocking the event loop) for the
        engine thread to finish its current step and exit."""
        self._signal_exit()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
            if self._thread.is_alive():
                logger.error("the engine thread did not stop within %.0f s", timeout)

    def _signal_exit(self) -> None:
        with self._lock:
            self._inbox.stopping = self._inbox.exit = True
        self._wake.set()
        self._watch_stop.set()

    def _watch(self) -> None:
        """The watch thread: once the model failed, wakes the engine thread, which stops the engine for good
        (idle, or at its next step); does so itself if the engine thread has not within ``HUNG_STEP_S``
        (the step in flight hangs)."""
        failed_at = None
        while not self._watch_stop.wait(WATCH_S) and self.failure is None:
            llm = self.llm
            fatal = llm.fatal_error if llm is not None else None
            if fatal is None:
                continue
            if failed_at is None:
                failed_at = time.monotonic()
                self._wake.set()
            elif time.monotonic() - failed_at >= HUNG_STEP_S:
                logger.error("the engine thread is stuck in a step of a failed model")
                self._stop_for_good(fatal, hung=True)
                return

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size

    def release(self) -> None:
        """Let go of ``llm`` once the engine thread has stopped. A web framework may keep the engine alive
        after its server has stopped (FastAPI caches the routes' endpoint functions, closures over it, for
        the life of the process); the model, and under tensor parallelism the CUDA graphs that hold NCCL
        collectives, must be freed before the world's groups shut down at exit, or NCCL's shutdown waits
        out its bound (``tp_launch.TEARDOWN_S``: 30 s on every exit of ``mopt serve -tp 2``, 2x H200)."""
        if self._thread is not None and self._thread.is_alive():
            logger.warning("the engine thread is still running; its model stays loaded")
            return
        if self.failure is not None:  # a failed world: freeing CUDA graphs may wait on a dead rank (exit handles it)
            return
        self.llm = None

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # the loop's own handling failed: never leave callers waiting
            logger.exception("the engine thread stopped")
            with self._lock:
                self._inbox.stopping = True
                orphans = self._inbox.submissions
            stopped = EngineStoppedError("the engine thread stopped; see the server log")
            for sub in orphans:
                self._answer(sub, stopped)
            self._fail(list(self._tracked.values()), stopped)

    def _loop(self) -> None:
        if self.llm.device.type == "cuda" and self.llm.device.index is not None:
            import torch

            torch.cuda.set_device(self.llm.device)  # a bare "cuda" is the current device already
        while True:
            with self._lock:
                inbox, self._inbox = self._inbox, _Inbox(num_sequences=self._inbox.num_sequences,
                                                         stopping=self._inbox.stopping, exit=self._inbox.exit)
            try:
                self._iteration(inbox)
            except Exception as e:  # a bug in the loop itself: fail what is in flight, keep serving
                logger.exception("engine loop failed")
                self._fail(list(self._tracked.values()), EngineStepError(f"internal engine error ({type(e).__name__})"))
            if inbox.exit:
                return
            if not self.llm.scheduler.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                fatal = self.llm.fatal_error  # a rank that died while the engine was idle (the watch wakes us)
                if fatal is not None and self.failure is None:
                    self._stop_for_good(fatal)

    def _iteration(self, inbox: _Inbox) -> None:
        if inbox.stopping:
            reason = self.failure or "the engine is shutting down"
            self._fail(list(self._tracked.values()), EngineStoppedError(reason))
            for sub in inbox.submissions:
                self._answer(sub, EngineStoppedError(reason))
        else:
            for request_id in inbox.aborts:
                self._abort(request_id)
            for sub in inbox.submissions:
                self._admit(sub)
        with self._lock:
            self._inbox.num_sequences -= sum(len(sub.prompts) for sub in inbox.submissions)
        if self.llm.scheduler.has_unfinished():
            self._step()
        self._update_stats()

    def _admit(self, sub: _Submission) -> None:
        llm = self.llm
        try:
            params = llm._per_prompt(sub.params, len(sub.params))
            seqs = [llm._make_sequence(llm.chat_prompt(p.messages) if isinstance(p, Chat) else p, sp)
                    for p, sp in zip(sub.prompts, params)]
        except Exception as e:  # RequestError, or a tokenizer that failed: the submitter gets it
            self._answer(sub, e)
            return
        streams = []
        for seq in seqs:
            llm.scheduler.add(seq)
            stream = RequestStream(seq.request_id, list(seq.prompt_token_ids), sub.arrival_time)
            self._tracked[seq.request_id] = _Tracked(seq, stream, sub.loop)
            streams.append(stream)
        self._answer(sub, streams)

    def _answer(self, sub: _Submission, result: list[RequestStream] | BaseException) -> None:
        def settle() -> None:
            if sub.future.cancelled():  # the submitter went away while we validated: drop its requests
                for stream in result if isinstance(result, list) else []:
                    self.abort(stream.request_id)
            elif isinstance(result, BaseException):
                sub.future.set_exception(result)
            else:
                sub.future.set_result(result)

        _call_soon(sub.loop, settle)

    def _step(self) -> None:
        llm = self.llm
        try:
            stepped = llm._step()
        except Exception as e:
            fatal = llm.fatal_error
            if fatal is not None:  # the model can never step again: every request is told why
                logger.debug("model step failed", exc_info=True)
                self._stop_for_good(fatal)
                return
            logger.exception("model step failed (%d sequences running)", len(llm.scheduler.running))
            self._step_failed(EngineStepError(f"the model step failed ({type(e).__name__}); see the server log"))
            return
        self._deliver([(tracked, tracked.delta()) for tracked in self._finished_or_stepped(stepped)], time.monotonic())

    def _stop_for_good(self, error: BaseException, hung: bool = False) -> bool:
        """The model can never step again: end every request with ``error`` named, refuse new ones, stop.
        ``hung``: called by the watch thread while the engine thread hangs in a step, so the scheduler (the
        engine thread's) is left alone and the requests' streams only get the error. Whether this call
        stopped the engine (False: it had stopped already)."""
        with self._failure_lock:
            if self.failure is not None:
                return False
            self.failure = f"the engine stopped: {error}"
        logger.error("%s", self.failure)
        self._signal_exit()
        stopped = EngineStoppedError(self.failure)
        if hung:
            self._deliver([(tracked, stopped) for tracked in list(self._tracked.values())], time.monotonic())
        else:
            self._fail(list(self._tracked.values()), stopped)
        return True

    def _finished_or_stepped(self, seqs: list[Sequence]) -> list[_Tracked]:
        """The tracked requests of ``seqs``; finished ones stop being tracked."""
        out = []
        for seq in seqs:
            tracked = self._tracked.get(seq.request_id)
            if tracked is not None:
                out.append(tracked)
                if seq.finish_reason is not None:
                    del self._tracked[seq.request_id]
        return out

    def _step_failed(self, error: EngineStepError) -> None:
        """After a failed ``LLM._step``: requests that finished before the failure get their last delta,
        the running ones (those the failing step ran or had queued) fail, waiting ones go on."""
        llm = self.llm
        pending, llm._pending = llm._pending, None  # what was queued is not to be trusted
        finished = [t.seq for t in self._tracked.values() if t.seq.finish_reason is not None]
        self._deliver([(tracked, tracked.delta()) for tracked in self._finished_or_stepped(finished)], time.monotonic())
        ran = {id(s) for s in llm.scheduler.running} | {id(s) for s in (pending.seqs if pending else [])}
        self._fail([t for t in self._tracked.values() if id(t.seq) in ran], error)

    def _abort(self, request_id: int) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        self.llm.scheduler.abort(tracked.seq)
        self._deliver([(tracked, RequestDelta("", [], [] if tracked.seq.params.logprobs is not None else None,
                                              "abort"))], time.monotonic())

    def _fail(self, failed: list[_Tracked], error: BaseException) -> None:
        """End ``failed`` with ``error``; their streams get it even if freeing their blocks fails."""
        try:
            for tracked in failed:
                self._tracked.pop(tracked.seq.request_id, None)
                self.llm.scheduler.abort(tracked.seq)
        finally:
            self._deliver([(t, error) for t in failed], time.monotonic())

    @staticmethod
    def _deliver(items: list[tuple[_Tracked, Any]], when: float) -> None:
        """One callback per event loop for the whole step (not one wake-up per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any, float]]] = {}
        for tracked, item in items:
            by_loop.setdefault(tracked.loop, []).append((tracked.stream, item, when))
        for loop, batch in by_loop.items():
            _call_soon(loop, lambda batch=batch: [stream._push(item, when) for stream, item, when in batch])

    def _update_stats(self) -> None:
        scheduler = self.llm.scheduler
        self.stats = EngineStats(running=len(scheduler.running),
                                 waiting=len(scheduler.waiting) + self._inbox.num_sequences,
                                 free_blocks=scheduler.blocks.num_free, total_blocks=scheduler.blocks.num_blocks)


def _call_soon(loop: asyncio.AbstractEventLoop, callback) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass
