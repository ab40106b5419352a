"""Rank 0's command frames (``mopt.engine.tp_protocol``), sent and received through a stand-in control group
that hands rank 0's broadcasts to one worker in order (as gloo's tags match them).

* every command's header and payload arrive as sent: no payload, an empty one, one that fits the frame, one
  that fills it exactly, and longer ones, whose rest follows in a second broadcast;
* a command sent without waiting is still in flight, holds its frames, and the caller may reuse its array
  at once (the part beyond the frame is copied);
* an int64 header value (a KV-cache budget in bytes) survives the int32 frame.
The real groups carry these in every ``tests/parallel`` test that runs processes.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from mopt.engine import tp_protocol
from mopt.engine.tp_protocol import FRAME_INTS, Op, receive_command, send_command

ROOM = FRAME_INTS - 2 * tp_protocol.HEADER_INTS  # payload ints that fit the frame beside the header


class _Work:
    def __init__(self, done: bool = True) -> None:
        self.done = done
        self.waits = 0

    def wait(self, timeout=None) -> bool:
        self.waits += 1
        self.done = True
        return True


class _Ctrl:
    """Rank 0's broadcasts are queued (copied when they complete, as a send reads its tensor then); the
    worker's take them in order."""

    def __init__(self, rank: int, queue: list) -> None:
        self.rank, self.queue = rank, queue

    def broadcast(self, tensor: torch.Tensor, async_op: bool = True):
        if self.rank == 0:
            work = _Work(done=False)
            self.queue.append((tensor, work))
            return work
        sent, work = self.queue.pop(0)
        assert sent.shape == tensor.shape and sent.dtype == tensor.dtype
        tensor.copy_(sent)
        return _Work()


def _worlds():
    queue: list = []
    timeouts = types.SimpleNamespace(collective=5.0)
    return (types.SimpleNamespace(rank=0, ctrl=_Ctrl(0, queue), timeouts=timeouts),
            types.SimpleNamespace(rank=1, ctrl=_Ctrl(1, queue), timeouts=timeouts), queue)


@pytest.mark.parametrize("length", [None, 0, 1, 1000, ROOM - 1, ROOM, ROOM + 1, 3 * FRAME_INTS + 5])
def test_a_command_arrives_as_sent(length):
    root, worker, queue = _worlds()
    payload = None if length is None else np.arange(length, dtype=np.int32) * 7 - 3
    ints = (64, 64, 17, 64, 2)
    send_command(root, Op.DECODE, 3, ints, payload)
    assert len(queue) == (2 if length is not None and length > ROOM else 1)
    op, model_id, got_ints, got = receive_command(worker, check=lambda: None)
    assert (op, model_id, got_ints[:len(ints)]) == (Op.DECODE, 3, list(ints))
    assert not queue
    if payload is None:
        assert got is None
    else:
        assert got.dtype == np.int32 and np.array_equal(got, payload)


def test_a_command_sent_without_waiting_is_in_flight_and_owns_its_data():
    root, worker, queue = _worlds()
    payload = np.arange(ROOM + 10, dtype=np.int32)
    sent = send_command(root, Op.PREFILL, 1, (5, 2, 3, 0), payload, wait=False)
    assert len(sent.works) == 2 and not any(w.done for w in sent.works)
    expected = payload.copy()
    payload[:] = -1  # rank 0 reuses its staging array while the broadcasts are still in flight
    _, _, _, got = receive_command(worker, check=lambda: None)
    assert np.array_equal(got, expected)
    works = list(sent.works)
    sent.wait()
    assert all(w.done for w in works) and not sent.works and not sent.tensors


def test_header_ints_keep_64_bits():
    root, worker, _ = _worlds()
    budget = 96 << 30  # a KV-cache budget in bytes, past int32
    send_command(root, Op.KV_BLOCKS, 2, (16, budget))
    op, model_id, ints, payload = receive_command(worker, check=lambda: None)
    assert (op, model_id, ints[:2], payload) == (Op.KV_BLOCKS, 2, [16, budget], None)


def test_too_many_ints_is_refused():
    root, _, _ = _worlds()
    with pytest.raises(ValueError, match="at most 5 ints"):
        send_command(root, Op.DECODE, 1, (1, 2, 3, 4, 5, 6))
