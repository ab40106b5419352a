"""How CUDA graphs are captured, alone and as one rank of a tensor-parallel world.

The capture itself needs a GPU; here the real capture loops and ``capture_graph`` run over stand-ins for
CUDA's graph, event and synchronize, and the model step fails where a test asks it to. Prefill graphs: a
bucket whose capture fails is left out and only its prefills run eagerly, a bucket another rank failed is
left out too (every rank must replay the same graphs), each bucket is agreed on once and in the same
order on every rank, and a failure of the world itself (``TensorParallelError``) is not taken for a failed
bucket. Decode graphs: a failed capture is an error that names the batch and what to do. On two GPUs,
``tests/parallel/test_tp_gpu.py`` fails a prefill bucket on one rank for real.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mopt.engine.distributed import TensorParallelError
from mopt.engine.prefill_graphs import FAULT_ENV, MAX_SEQS, PrefillGraphs

SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048]


class _Graph:
    """Stands in for ``torch.cuda.CUDAGraph``: records the pool it was captured into."""

    def __init__(self) -> None:
        self.captured_into = None

    def pool(self) -> tuple[str, int]:
        return ("pool", id(self))


class _Sync:
    """A rank's ``CaptureSync`` whose other ranks fail the buckets in ``others_fail``; buckets come largest
    first, so the n-th vote is the n-th largest bucket's."""

    def __init__(self, rank: int = 0, others_fail: tuple[int, ...] = ()) -> None:
        self.rank, self.others_fail = rank, set(others_fail)
        self.votes: list[tuple[int, bool]] = []
        self.waits = 0

    def wait(self, event) -> None:
        self.waits += 1

    def agree(self, ok: bool) -> bool:
        t = sorted(SIZES, reverse=True)[len(self.votes)]
        self.votes.append((t, ok))
        return ok and t not in self.others_fail


@pytest.fixture
def recorder(monkeypatch):
    """The real capture loop and ``capture_graph`` over stand-ins for CUDA's graph, event and synchronize.
    ``fail[(tokens, "warm-up" or "capture")] = exception``: the model step raises it in that run of that
    bucket; ``graphs[tokens]`` is the stand-in graph a bucket was captured as."""
    state = {"fail": {}, "runs": {}, "graphs": {}}

    @contextlib.contextmanager
    def graph(g, pool=None):
        g.captured_into = pool
        yield

    class Event:
        def record(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    state["forward"] = lambda ids, positions, meta, last_rows: _step(state, ids.shape[0])
    return state


def _step(state, t: int) -> torch.Tensor:
    state["runs"][t] = state["runs"].get(t, 0) + 1
    phase = "warm-up" if state["runs"][t] == 1 else "capture"
    if (t, phase) in state["fail"]:
        raise state["fail"][(t, phase)]
    return torch.full((MAX_SEQS, 4), float(t))


def _capture(recorder, sync=None) -> PrefillGraphs:
    return PrefillGraphs(recorder["forward"], torch.device("cpu"), 16, 4096, 256, capture=True, sync=sync)


@pytest.mark.parametrize("local_fail,others_fail,rank,env", [
    ((), (), 0, ""),
    ((2048,), (), 0, ""),  # out of memory in the largest bucket: the smaller ones still get graphs
    ((64, 16), (), 1, ""),
    ((), (256,), 0, ""),  # another rank failed 256: this rank drops the graph it captured
    ((1024,), (1024, 32), 1, ""),
    ((), (), 1, "1:128,0:512"),  # the test hook fails 128's capture on rank 1 only
    ((), (), 0, "1:128,0:512"),
])
def test_failed_captures_run_eagerly_and_the_rest_keep_graphs(recorder, monkeypatch, local_fail, others_fail, rank,
                                                              env):
    if env:
        monkeypatch.setenv(FAULT_ENV, env)
    hooked = {int(t) for r, t in (p.split(":") for p in env.split(",") if p) if int(r) == rank}
    for t in local_fail:
        recorder["fail"][(t, "capture")] = torch.cuda.OutOfMemoryError(f"CUDA out of memory capturing {t}")
    sync = _Sync(rank, others_fail)
    graphs = _capture(recorder, sync)
    mine = set(local_fail) | hooked
    failed = mine | set(others_fail)
    assert graphs.sizes == SIZES
    assert sorted(graphs.graphs) == [t for t in SIZES if t not in failed]
    assert sorted(graphs.failed) == sorted(failed)
    for t in failed:
        assert graphs.failed[t].startswith("this rank: " if t in mine else "another rank"), graphs.failed[t]
    assert sync.waits == len(SIZES)  # every warm-up waited for through the sync (polled, under TP)
    # One agreement per bucket, largest first, voting this rank's own outcome: the ranks stay in step.
    assert sync.votes == [(t, t not in mine) for t in sorted(SIZES, reverse=True)]
    # A failed bucket's prefills run eagerly (None); a prefill that a failed bucket would have taken does
    # not move up to the next bucket's graph, which would pad it further.
    for t in SIZES:
        assert graphs.bucket(t, 1) == (None if t in failed else t)
    # Each graph is captured into the pool of the last graph kept before it (one pool for the family), never
    # into a dropped graph's.
    kept = [graphs.graphs[t] for t in sorted(graphs.graphs, reverse=True)]
    assert not kept or kept[0].captured_into is None
    assert all(g.captured_into == prev.pool() for prev, g in zip(kept, kept[1:]))


def test_every_bucket_failing_leaves_an_eager_engine_and_one_warning(recorder, caplog):
    for t in SIZES:
        recorder["fail"][(t, "capture")] = RuntimeError("operation not permitted when stream is capturing")
    with caplog.at_level("WARNING", logger="mopt.engine.prefill_graphs"):
        graphs = _capture(recorder)
    assert graphs.graphs == {} and sorted(graphs.failed) == SIZES
    assert all(graphs.bucket(n, 1) is None for n in (1, 100, 2048))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "16, 32, 64, 128, 256, 512, 1024, 2048-token buckets run eagerly" in warnings[0]
    assert "operation not permitted" in warnings[0]


@pytest.mark.parametrize("how", ["model", "hook"])
def test_a_failed_warm_up_drops_its_bucket_alone_but_stops_a_tensor_parallel_world(recorder, monkeypatch, how):
    """The warm-up runs the model's collectives: a rank that leaves it midway (or never starts it) leaves
    the others waiting inside one, so under TP it must raise at once rather than vote and wait."""
    if how == "model":
        recorder["fail"][(512, "warm-up")] = torch.cuda.OutOfMemoryError("CUDA out of memory")
    else:
        monkeypatch.setenv(FAULT_ENV, "0:512:warm-up,1:512:warm-up")
    alone = _capture(recorder)
    assert 512 not in alone.graphs and alone.failed[512].startswith("this rank's eager run: ")
    assert sorted(alone.graphs) == [t for t in SIZES if t != 512]
    recorder["runs"].clear()
    sync = _Sync(1)
    with pytest.raises(TensorParallelError, match="rank 1: the eager run before capturing the 512-token prefill "
                                                  "graph failed .*every rank stops"):
        _capture(recorder, sync)
    assert [t for t, _ in sync.votes] == [2048, 1024]  # no vote for 512: the world is over


@pytest.mark.parametrize("phase", ["warm-up", "capture"])
def test_a_failed_world_is_not_a_failed_bucket(recorder, phase):
    """Another rank's failure, raised inside this rank's run, is reported as it is: this rank is not blamed."""
    recorder["fail"][(512, phase)] = TensorParallelError("tensor-parallel rank 1 failed: CUDA error")
    sync = _Sync(0)
    with pytest.raises(TensorParallelError, match="^tensor-parallel rank 1 failed: CUDA error$"):
        _capture(recorder, sync)
    assert [t for t, _ in sync.votes] == [2048, 1024]


@pytest.mark.parametrize("value", ["128", "1:x", "1:2:3", "a:b", "1:128:capture", "1:128:warm-up:x"])
def test_the_fault_hook_names_itself_when_malformed(recorder, monkeypatch, value):
    monkeypatch.setenv(FAULT_ENV, value)
    with pytest.raises(ValueError, match=f"{FAULT_ENV} must be RANK:TOKENS or RANK:TOKENS:warm-up items"):
        _capture(recorder)


def test_a_malformed_fault_hook_fails_before_the_model_loads(monkeypatch):
    from mopt import LLM
    from mopt.engine import llm as llm_module

    monkeypatch.setenv(FAULT_ENV, "1:x")
    monkeypatch.setattr(llm_module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=f"{FAULT_ENV} must be RANK:TOKENS"):
        LLM("no-such-checkpoint", device="cpu")


@pytest.mark.parametrize("phase", ["warm-up", "capture"])
def test_a_failed_decode_capture_names_the_batch_and_the_way_out(recorder, phase):
    from mopt.engine.cuda_graphs import DecodeGraphs, GraphCaptureError

    runs = {}

    def forward(ids, positions, meta):
        bs = ids.shape[0]
        runs[bs] = runs.get(bs, 0) + 1
        if bs == 32 and runs[bs] == (1 if phase == "warm-up" else 2):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(bs, 4), torch.zeros(bs, dtype=torch.long)

    with pytest.raises(GraphCaptureError, match=r"capturing the decode CUDA graph of 32 sequences failed \(CUDA out "
                                                 r"of memory\. Tried to allocate 2\.00 GiB\); start with "
                                                 r"--enforce-eager \(enforce_eager=True\)"):
        DecodeGraphs(forward, torch.device("cpu"), 64, 8, capture=True)
    assert sorted(runs) == [32, 48, 64]  # largest first, stopped at the failure


def test_a_failed_world_during_a_decode_capture_is_reported_as_it_is(recorder):
    from mopt.engine.cuda_graphs import DecodeGraphs

    def forward(ids, positions, meta):
        raise TensorParallelError("tensor-parallel rank 1 failed: CUDA error")

    with pytest.raises(TensorParallelError, match="^tensor-parallel rank 1 failed: CUDA error$"):
        DecodeGraphs(forward, torch.device("cpu"), 16, 8, capture=True)
