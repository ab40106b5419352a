"""The async engine without HTTP: streams equal LLM.generate, aborts free blocks before the next
step, a full queue refuses at once, a failing step fails only its requests, stop ends everything.

Prompts are token ids on a tiny random Llama (no tokenizer needed); the engine runs in its own
thread as in the server. Every wait is bounded (``asyncio.wait_for``), so a hang fails the test.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from mopt import LLM, SamplingParams
from mopt.engine.async_engine import AsyncEngine, EngineStepError, EngineStoppedError, QueueFullError
from mopt.errors import EngineArgumentError, RequestError

PROMPTS = [[5, 17, 33], list(range(40, 60)), [7] * 9]
TIMEOUT = 30  # seconds for any one wait: far above the ~1 s these runs take on 2 busy cores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import tiny_llama

    path = tmp_path_factory.mktemp("tiny-async")
    tiny_llama(256).save_pretrained(path)
    return path


def small_llm(path, **kw) -> LLM:
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=2 << 20, max_model_len=64, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def started(llm, **kw) -> AsyncEngine:
    engine = AsyncEngine(llm, **kw)
    engine.start()
    return engine


async def collect(stream):
    tokens, finish = [], None
    async for delta in stream:
        tokens += delta.token_ids
        finish = delta.finish_reason
    return tokens, finish


async def wait_until(condition, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def idle(engine: AsyncEngine) -> bool:
    s = engine.llm.scheduler
    return not s.waiting and not s.running and s.blocks.num_free == s.blocks.num_blocks


ASYNC_SCHEDULING = pytest.mark.parametrize("async_scheduling", [False, True],
                                           ids=["sync steps", "async scheduling (as on a GPU)"])


@ASYNC_SCHEDULING
def test_streams_equal_generate(model_dir, async_scheduling):
    params = [SamplingParams(max_tokens=6 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    want = [o.token_ids for o in small_llm(model_dir).generate(PROMPTS, params)]

    async def main():
        engine = await started(small_llm(model_dir, async_scheduling=async_scheduling))
        streams = await engine.add(PROMPTS, params)
        got = await asyncio.gather(*(collect(s) for s in streams))
        await engine.stop()
        assert idle(engine)
        return got

    assert run(main()) == [(w, "length") for w in want]


def test_bad_request_is_refused_whole(model_dir):
    async def main():
        engine = await started(small_llm(model_dir))
        with pytest.raises(RequestError, match="outside the vocabulary") as caught:
            await engine.add([PROMPTS[0], [999]], [SamplingParams(max_tokens=3)] * 2)
        assert caught.value.field == "prompt"
        assert idle(engine)
        await engine.stop()

    run(main())


@ASYNC_SCHEDULING
def test_abort_frees_blocks_before_the_next_step(model_dir, async_scheduling):
    async def main():
        llm = small_llm(model_dir, async_scheduling=async_scheduling)
        engine = await started(llm)
        steps_after_abort = []
        original = llm.runner.launch

        def launch(seqs, *args, **kw):
            if aborted.is_set():
                steps_after_abort.append([s.request_id for s in seqs])
            return original(seqs, *args, **kw)

        aborted = threading.Event()
        llm.runner.launch = launch
        long, short = await engine.add([PROMPTS[1], PROMPTS[0]], [SamplingParams(max_tokens=40, ignore_eos=True)] * 2)
        first = await anext(long)
        assert first.token_ids and llm.scheduler.blocks.num_free < llm.scheduler.blocks.num_blocks
        engine.abort(long.request_id)
        aborted.set()
        rest = [d async for d in long]
        assert rest[-1].finish_reason == "abort"
        await collect(short)
        await wait_until(lambda: idle(engine), "the engine to go idle")
        # At most the step already under way when abort() was called ran the aborted request.
        assert sum(long.request_id in ids for ids in steps_after_abort) <= 1
        assert len(steps_after_abort) >= 2  # the short request went on stepping
        await engine.stop()

    run(main())


def test_full_queue_refuses_at_once(model_dir):
    async def main():
        llm = small_llm(model_dir, max_num_seqs=1)
        gate = threading.Event()
        original = llm.runner.launch
        llm.runner.launch = lambda *a, **k: (gate.wait(TIMEOUT), original(*a, **k))[1]  # stalls in its first step
        engine = await started(llm, max_queue=1)
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        (running,) = await engine.add([PROMPTS[0]], [params])  # admitted, then its prefill stalls
        await wait_until(lambda: llm.scheduler.running, "the first request to run")
        queued = asyncio.ensure_future(engine.add([PROMPTS[1]], [params]))  # takes the one queue slot
        await wait_until(lambda: engine._inbox.num_sequences == 1, "the second request to queue")
        with pytest.raises(QueueFullError, match="takes at most 1"):
            await engine.add([PROMPTS[2]], [params])
        gate.set()
        (second,) = await queued
        assert (await collect(running))[1] == (await collect(second))[1] == "length"
        await engine.stop()

    run(main())


@ASYNC_SCHEDULING
def test_failed_step_fails_its_requests_and_the_engine_goes_on(model_dir, async_scheduling, caplog):
    async def main():
        llm = small_llm(model_dir, async_scheduling=async_scheduling)
        original, calls = llm.runner.launch, [0]

        def launch(*args, **kw):
            calls[0] += 1
            if calls[0] == 2:  # the first decode step (async: queued before the prefill's tokens are read)
                raise RuntimeError("injected failure")
            return original(*args, **kw)

        llm.runner.launch = launch
        engine = await started(llm)
        streams = await engine.add(PROMPTS[:2], [SamplingParams(max_tokens=5, ignore_eos=True)] * 2)
        for stream in streams:
            with pytest.raises(EngineStepError, match="model step failed"):
                await collect(stream)
        assert idle(engine)
        (again,) = await engine.add([PROMPTS[0]], [SamplingParams(max_tokens=5, ignore_eos=True)])
        assert len((await collect(again))[0]) == 5
        await engine.stop()

    run(main())
    assert "injected failure" in caplog.text


def test_stop_ends_requests_in_flight_and_refuses_new_ones(model_dir):
    async def main():
        engine = await started(small_llm(model_dir))
        (stream,) = await engine.add([PROMPTS[0]], [SamplingParams(max_tokens=60, ignore_eos=True)])
        await anext(stream)
        engine.begin_shutdown()
        with pytest.raises(EngineStoppedError):
            await collect(stream)
        with pytest.raises(EngineStoppedError):
            await engine.add([PROMPTS[0]], [SamplingParams()])
        await engine.stop()
        assert not engine._thread.is_alive() and idle(engine)

    run(main())


def test_cancelled_submission_leaves_nothing_behind(model_dir):
    """A caller that goes away while the engine validates its request: the request is aborted."""
    async def main():
        llm = small_llm(model_dir)
        gate = threading.Event()
        original = llm._make_sequence
        llm._make_sequence = lambda *a: (gate.wait(TIMEOUT), original(*a))[1]
        aborted = []
        abort = llm.scheduler.abort
        llm.scheduler.abort = lambda seq: (aborted.append(seq.finish_reason), abort(seq))
        engine = await started(llm)
        task = asyncio.ensure_future(engine.add([PROMPTS[0]], [SamplingParams(max_tokens=60, ignore_eos=True)]))
        await asyncio.sleep(0.05)
        task.cancel()
        gate.set()
        await wait_until(lambda: idle(engine) and aborted, "the orphan to be aborted")
        assert aborted == [None]  # aborted while unfinished, not cleaned up after running to its end
        await engine.stop()

    run(main())


def test_release_lets_go_of_the_model_only_once_the_engine_thread_stopped(model_dir, caplog):
    """``mopt serve`` releases the model after its server stops (a web framework may keep the engine alive
    until exit: see test_tp_processes.py); a running engine keeps it."""
    import gc
    import weakref

    async def main():
        llm = small_llm(model_dir)
        model = weakref.ref(llm)
        engine = await started(llm)
        del llm
        with caplog.at_level("WARNING", logger="mopt.engine.async_engine"):
            engine.release()
        assert engine.llm is model() is not None and "still running" in caplog.text
        await engine.stop()
        engine.release()
        gc.collect()
        assert engine.llm is None and model() is None

    run(main())


def test_max_queue_is_checked():
    with pytest.raises(EngineArgumentError, match="max_queue must be an integer >= 1"):
        AsyncEngine(object(), max_queue=0)


def test_a_dying_engine_thread_fails_everything_instead_of_hanging(model_dir, caplog):
    async def main():
        engine = await started(small_llm(model_dir))
        (stream,) = await engine.add([PROMPTS[0]], [SamplingParams(max_tokens=60, ignore_eos=True)])
        await anext(stream)
        iteration = engine._iteration
        engine._iteration = lambda inbox: (_ for _ in ()).throw(SystemExit("the loop itself broke"))
        engine.abort(-1)  # wakes the loop
        with pytest.raises(EngineStoppedError, match="engine thread stopped"):
            await collect(stream)
        with pytest.raises(EngineStoppedError):
            await engine.add([PROMPTS[0]], [SamplingParams()])
        engine._iteration = iteration
        await engine.stop()

    run(main())
    assert "the engine thread stopped" in caplog.text


def test_a_step_hung_on_a_failed_model_still_stops_the_engine(model_dir, monkeypatch, caplog):
    """A GPU that waits on a dead tensor-parallel rank can hold the engine thread inside the driver for good
    (seen on 2x H200: loading a Triton kernel mid-prefill, after a worker was killed). The watch thread then
    ends the requests with the model's error and stops the engine without the engine thread."""
    from mopt.engine import async_engine
    from mopt.engine.distributed import TensorParallelError

    monkeypatch.setattr(async_engine, "HUNG_STEP_S", 0.5)

    async def main():
        llm = small_llm(model_dir)
        hang, failed = threading.Event(), []
        original = llm.runner.launch
        llm.runner.launch = lambda *a, **kw: (failed and hang.wait(TIMEOUT), original(*a, **kw))[1]
        monkeypatch.setattr(LLM, "fatal_error", property(lambda self: failed[0] if failed else None))
        engine = await started(llm)
        (stream,) = await engine.add([PROMPTS[0]], [SamplingParams(max_tokens=60, ignore_eos=True)])
        await anext(stream)
        failed.append(TensorParallelError("tensor-parallel rank 1 was killed by signal SIGKILL"))
        with pytest.raises(EngineStoppedError, match="rank 1 was killed by signal SIGKILL"):
            await collect(stream)
        assert engine.failure == "the engine stopped: tensor-parallel rank 1 was killed by signal SIGKILL"
        assert engine._thread.is_alive() and not hang.is_set()  # stopped without the engine thread
        with pytest.raises(EngineStoppedError):
            await engine.add([PROMPTS[0]], [SamplingParams()])
        hang.set()
        await engine.stop()
        assert not engine._thread.is_alive()

    run(main())
    assert "stuck in a step" in caplog.text


@pytest.mark.gpu
def test_streams_equal_generate_on_gpu(model_dir):
    """On CUDA with async scheduling (decode steps queued before the last tokens are read): streams equal
    synchronous generate, with penalties and logprobs computed on the device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    carried = [SamplingParams(max_tokens=8, ignore_eos=True), SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2),
               SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, seed=1)]
    penalised = [SamplingParams(max_tokens=8, ignore_eos=True, repetition_penalty=1.5, logprobs=2)] * 3

    def gpu_llm(async_scheduling: bool):
        return LLM(model_dir, device="cuda", dtype=torch.float32, block_size=16, kv_cache_memory=16 << 20,
                   async_scheduling=async_scheduling)

    sync = gpu_llm(False)
    for params in (carried, penalised):  # the second batch is never carried (penalties need the last token)
        want = sync.generate(PROMPTS, params)

        async def main():
            engine = await started(gpu_llm(True))
            streams = await engine.add(PROMPTS, params)
            deltas = [[d async for d in s] for s in streams]
            await engine.stop()
            assert idle(engine)
            return deltas

        got = run(main())
        for out, ds in zip(want, got):
            assert [t for d in ds for t in d.token_ids] == out.token_ids and ds[-1].finish_reason == "length"
        # The same batches through the same kernels: equal up to float32 rounding of another launch order.
        assert [p.chosen.logprob for d in got[1] for p in d.logprobs] == \
            pytest.approx([p.chosen.logprob for p in want[1].logprobs], abs=1e-5)
