"""Rank 0's commands to the workers, and what both sides run for them.

A command is one broadcast on the control group (gloo, host memory) of a frame of ``FRAME_INTS`` int32s: a
header, ``int64 [8]`` = ``(op, model id, payload length or -1, up to five ints)``, then the int32 payload (a
step's packed input array, or a forward's token ids) as far as it fits; a longer payload's rest follows in a
second broadcast. One message rather than a header and then a payload: each gloo broadcast costs the sender a
hand-off to gloo's thread and back, and the receiver a turn of its loop (a third of rank 0's time in a small
model's decode step went to two of them, on 4x H200). A step's command is not waited for before rank 0 runs
its own part of the step (:class:`SentCommand`), only after. Loading sends a :class:`LoadSpec`
pickled (``broadcast_object``: its length, then its bytes). Every rank then does the same work on its own shard, and the model's
own collectives (on the model's group) keep them in step.

Rank 0 may hold several models (``LLM`` objects, ``load_model`` results); each has an id, and a
worker keeps a :class:`ShardState` per id until rank 0 frees it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import numpy as np
import torch

from mopt.engine.distributed import ParallelState, parallel_state
from mopt.engine.tp_launch import World, wait_polled

HEADER_INTS = 8  # int64s
_HEADER_WORDS = 2 * HEADER_INTS  # the header's int32 words at the start of a frame
# int32s of one command's frame (16 KiB): a decode step of 64 sequences of up to 57 KV blocks (912 tokens of
# 16-token blocks) fits; longer steps send the rest of their block tables in a second message
FRAME_INTS = 4096


class Op(enum.IntEnum):
    STOP = 0
    LOAD = 1  # LoadSpec follows; every rank then reports its error or None (exchange_errors)
    FORWARD = 2  # ints (batch, tokens); payload: token ids -> full-sequence logits, no cache
    KV_BLOCKS = 3  # ints (block_size, kv_cache_memory or -1): MIN all-reduce of each rank's block count
    RUNNER = 4  # ints (num_blocks, block_size, max_num_seqs, max_model_len, enforce_eager)
    PREFILL = 5  # ints (n, b, max_query_len, share); payload: runner.prefill_array
    DECODE = 6  # ints (batch, bucket, width, carried, share); payload: StagedDecode.array
    # share: rank 0 then broadcasts the step's sampled ids on the model group (see ModelRunner.share_tokens)
    FREE = 7


@dataclass
class LoadSpec:
    """What every rank loads: a checkpoint folder (``kind="checkpoint"``) or dummy weights of a config
    (``kind="dummy"``, ``quantization`` the format), in ``dtype`` on its own device."""

    kind: str
    model: object
    dtype: torch.dtype
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    seed: int = 0
    expert_parallel: bool = False


@dataclass
class ShardState:
    model: torch.nn.Module
    dtype: torch.dtype
    runner: object = None
    tokens: torch.Tensor | None = None  # the last shared step's sampled ids (what a carried step reads)


def load_shard(spec: LoadSpec, world: World, progress: bool = False) -> torch.nn.Module:
    """This rank's shard of ``spec``'s model (built inside the parallel state; only its slices are read)."""
    from mopt.engine.dummy import build_dummy_model
    from mopt.engine.loader import load_local_model

    state = ParallelState(world.rank, world.size, world.group, spec.expert_parallel)
    with parallel_state(state):
        if spec.kind == "dummy":
            return build_dummy_model(spec.model, spec.quantization or "bf16", world.device, spec.dtype,
                                     spec.kv_cache_dtype, spec.seed)
        return load_local_model(spec.model, world.device, spec.dtype, spec.kv_cache_dtype, progress=progress)


def local_kv_blocks(shard: ShardState, device: torch.device, block_size: int, kv_cache_memory: int | None) -> int:
    """How many KV-cache blocks this rank's memory holds (the engine's rule; see ``LLM``)."""
    from mopt.engine.llm import CPU_KV_CACHE_BYTES, GPU_MEMORY_UTILIZATION
    from mopt.engine.runner import kv_bytes_per_token

    if kv_cache_memory is None:
        if device.type == "cuda":
            kv_cache_memory = int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_UTILIZATION)
        else:
            kv_cache_memory = CPU_KV_CACHE_BYTES
    return kv_cache_memory // (kv_bytes_per_token(shard.model, shard.dtype) * block_size)


def min_over_ranks(world: World, value: int, check=lambda: None, what: str = "agreeing on the KV-cache size") -> int:
    t = torch.tensor([value], dtype=torch.int64)
    work = world.ctrl.all_reduce(t, op="min", async_op=True)
    wait_polled(work, check, what, world.timeouts.collective)
    return int(t.item())


class RankCaptureSync:
    """``cuda_graphs.CaptureSync`` of one rank: warm-ups waited for by polling with ``check`` (which raises
    when another rank failed or rank 0 is gone), agreement over the control group (bounded by
    ``MOPT_TP_TIMEOUT``). A rank whose warm-up fails leaves the others waiting inside its collectives on
    their GPUs, so it does not vote but raises, and the others' polled waits raise its error in turn."""

    CHECK_S = 0.1

    def __init__(self, world: World, check) -> None:
        self.world, self.check, self.rank = world, check, world.rank

    def wait(self, event: torch.cuda.Event) -> None:
        last = time.monotonic()
        while not event.query():
            if time.monotonic() - last > self.CHECK_S:
                self.check()
                last = time.monotonic()
            time.sleep(0.0005)

    def agree(self, ok: bool) -> bool:
        return min_over_ranks(self.world, int(ok), self.check, "agreeing on a captured CUDA graph") == 1


class SentCommand:
    """A command's broadcasts in flight; :meth:`wait` until the workers have them (``check`` raises while
    waiting if a worker is gone). The frames stay referenced until then."""

    def __init__(self, world: World, what: str, check, works: list, tensors: list) -> None:
        self.world, self.what, self.check, self.works, self.tensors = world, what, check, works, tensors

    def wait(self) -> None:
        while self.works:
            wait_polled(self.works[0], self.check, self.what, self.world.timeouts.collective)
            self.works.pop(0)
        self.tensors = []


def send_command(world: World, op: Op, model_id: int = 0, ints: tuple = (), payload: np.ndarray | None = None,
                 check=lambda: None, wait: bool = True) -> SentCommand:
    """Rank 0: broadcast a command; with ``wait``, return once the workers have it."""
    if len(ints) > HEADER_INTS - 3:
        raise ValueError(f"a command carries at most {HEADER_INTS - 3} ints, not {len(ints)}")
    frame = torch.zeros(FRAME_INTS, dtype=torch.int32)
    header = frame[:_HEADER_WORDS].view(torch.int64)
    length = -1 if payload is None else int(payload.size)
    header[:3 + len(ints)] = torch.tensor([int(op), model_id, length, *(int(v) for v in ints)], dtype=torch.int64)
    tensors = [frame]
    if length > 0:
        data = np.ascontiguousarray(payload, dtype=np.int32).reshape(-1)
        head = min(length, FRAME_INTS - _HEADER_WORDS)
        frame.numpy()[_HEADER_WORDS:_HEADER_WORDS + head] = data[:head]
        if head < length:
            tensors.append(torch.from_numpy(data[head:].copy()))  # the caller may reuse its array before the send ends
    works = [world.ctrl.broadcast(t, async_op=True) for t in tensors]
    sent = SentCommand(world, f"tensor-parallel command {op.name}", check, works, tensors)
    if wait:
        sent.wait()
    return sent


def receive_command(world: World, check) -> tuple[Op, int, list[int], np.ndarray | None]:
    """Worker: wait for rank 0's next command (``check`` raises if rank 0 is gone)."""
    frame = torch.zeros(FRAME_INTS, dtype=torch.int32)
    wait_polled(world.ctrl.broadcast(frame, async_op=True), check, "waiting for rank 0")
    op, model_id, length, *ints = frame[:_HEADER_WORDS].view(torch.int64).tolist()
    payload = None
    if length >= 0:
        head = min(length, FRAME_INTS - _HEADER_WORDS)
        payload = frame.numpy()[_HEADER_WORDS:_HEADER_WORDS + head]
        if head < length:
            payload = np.concatenate([payload, np.zeros(length - head, np.int32)])
            rest = torch.from_numpy(payload[head:])
            wait_polled(world.ctrl.broadcast(rest, async_op=True), check, "waiting for rank 0")
    return Op(op), model_id, ints, payload


ERROR_BYTES = 4096


def broadcast_object(world: World, value=None, check=lambda: None):
    """Rank 0's ``value`` (pickled) on every rank."""
    import pickle

    data = pickle.dumps(value) if world.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    wait_polled(world.ctrl.broadcast(size, async_op=True), check, "receiving a model spec", world.timeouts.collective)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if world.rank == 0 else \
        torch.empty(int(size.item()), dtype=torch.uint8)
    wait_polled(world.ctrl.broadcast(buffer, async_op=True), check, "receiving a model spec", world.timeouts.collective)
    return value if world.rank == 0 else pickle.loads(buffer.numpy().tobytes())


def exchange_errors(world: World, error: str | None, check=lambda: None) -> list[str | None]:
    """Every rank's error (or None) after a command that may fail on some ranks only (loading: no time
    limit, since a large checkpoint may take long; a rank that dies or goes silent ends the wait)."""
    mine = torch.zeros(ERROR_BYTES + 1, dtype=torch.uint8)
    if error is not None:
        data = (error or "error").encode()[:ERROR_BYTES]
        mine[0] = 1
        mine[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = torch.zeros(world.size * (ERROR_BYTES + 1), dtype=torch.uint8)
    wait_polled(world.ctrl.all_gather_into(gathered, mine, async_op=True), check, "loading the model")
    rows = gathered.view(world.size, ERROR_BYTES + 1)
    return [bytes(row[1:].tolist()).rstrip(b"\0").decode(errors="replace") if row[0] else None for row in rows]


def receive_tokens(world: World, count: int) -> torch.Tensor:
    """Worker: a step's sampled ids, broadcast by rank 0 on the model group (stream-ordered on GPUs)."""
    tokens = torch.empty(count, dtype=torch.int64, device=world.device)
    world.group.broadcast(tokens)
    return tokens
