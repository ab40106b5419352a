"""Tensor parallelism on 2 GPUs (NCCL; run with ``pytest -m gpu tests/parallel``, skipped with fewer), or on
``MOPT_TEST_TP`` GPUs (``MOPT_TEST_TP=4``: every test below at TP=4; "TP=2" reads TP=N).

* float32, unquantized (dense, and MoE with expert parallelism): TP=2 logits equal TP=1 to float32
  rounding (relative L2 <= 1e-4; measured on CPUs: <= 4e-7) and greedy tokens are identical;
* BF16 activations in BF16, FP8 (+FP8 KV) and NVFP4 dummy models, CUDA graphs on: the all-reduce of
  BF16 partial sums rounds differently from one GPU's GEMM, and quantized activations amplify that
  (a code on a rounding boundary flips), so the prefill logits agree to a per-format tolerance and
  greedy tokens are identical up to the first step where TP=1 itself had a near tie (its top logit
  within a per-format margin of the token TP=2 chose); a wrong shard or a missing all-reduce moves
  the logits by their own size (relative error ~1). TP=2 with graphs equals TP=2 eager exactly (two
  ranks sum in one addition, whatever NCCL's algorithm);
* a worker killed mid-run (NCCL collectives in flight) ends every process with an error naming it;
* a prefill graph that fails to capture on one rank only is left out on both, whose prefills of that
  bucket then run eagerly, in step: the tokens equal an eager TP=2 engine's; a failed eager warm-up
  before a capture on one rank (the other waits in its collectives) ends both with an error naming it;
* prefills wider or longer than one graph run as consecutive replays on both ranks, in step: the tokens
  equal an eager TP=2 engine's.

Measured values are printed; ``bench/tp_gpu.sh`` runs this file with ``-rP`` to keep them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mopt import LLM, SamplingParams
from tp_helpers import pid_alive, subprocess_env, tp_world_per_module  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("tp_world_per_module")]

TP = int(os.environ.get("MOPT_TEST_TP", "2"))
PROMPTS = [[(7 * i + 3 * j) % 300 for j in range(5 + 3 * i)] for i in range(6)]
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cuda", max_model_len=256, max_num_seqs=8, kv_cache_memory=64 << 20, load_format="dummy")
# BF16 activations: prefill logits' relative L2 error, and the near-tie margin (logits have std ~1).
BF16_TOLERANCE = {"bf16": (0.03, 0.1), "fp8-kv": (0.1, 0.3), "fp8": (0.1, 0.3), "fp8-pcpt": (0.1, 0.3),
                  "nvfp4": (0.3, 0.6)}


@pytest.fixture(scope="module", autouse=True)
def _enough_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < TP:
        pytest.skip(f"needs {TP} GPUs (MOPT_TEST_TP)")


def _dense():
    from mopt.engine.dummy import tiny_preset_config

    return tiny_preset_config()


def _moe():
    from mopt.engine.dummy import tiny_moe_preset_config

    return tiny_moe_preset_config()


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _prefill_error(one: LLM, two: LLM) -> float:
    ids = torch.tensor([PROMPTS[-1]], device="cuda")
    with torch.no_grad():
        return _rel(two.model(ids).float(), one.model(ids).float())


@pytest.mark.parametrize("config,expert_parallel", [(_dense, False), (_moe, False), (_moe, True)],
                         ids=["dense", "moe-intermediate-split", "moe-expert-parallel"])
def test_float32_tp2_equals_tp1(config, expert_parallel):
    """Unquantized only: float32 rounding differences can flip a quantized activation's code (see
    test_tp_logits.py), which greedy tokens need not survive."""
    kw = dict(ENGINE, quantization="bf16", dtype=torch.float32)
    one = LLM(config(), **kw)
    two = LLM(config(), **kw, tensor_parallel_size=TP, enable_expert_parallel=expert_parallel)
    error = _prefill_error(one, two)
    print(f"float32 {config.__name__} ep={expert_parallel}: prefill logits relative L2 error {error:.2e}")
    assert error <= 1e-4
    assert _tokens(two) == _tokens(one)


def _first_divergence(one: LLM, a: list[int], b: list[int], prompt: list[int]) -> tuple[int, float] | None:
    """Where greedy tokens ``a`` (TP=1) and ``b`` (TP=2) first differ, and by how much TP=1's own logits
    there prefer its token over TP=2's."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None:
        return None
    with torch.no_grad():
        logits = one.model(torch.tensor([prompt + a[:i]], device="cuda"))[0, -1].float()
    return i, (logits.max() - logits[b[i]]).item()


@pytest.mark.parametrize("config,fmt,expert_parallel", [(_dense, "bf16", False), (_dense, "fp8-kv", False),
                                                        (_dense, "fp8-pcpt", False),  # row-parallel amaxes over peers
                                                        (_dense, "nvfp4", False), (_moe, "fp8", True),
                                                        (_moe, "nvfp4", True),
                                                        (_moe, "fp8-pcpt", False)])  # w2 input amaxes over peers
def test_bf16_tp2_with_graphs_agrees_with_tp1(config, fmt, expert_parallel):
    rel_tolerance, margin = BF16_TOLERANCE[fmt]
    one = LLM(config(), **ENGINE, quantization=fmt)
    two = LLM(config(), **ENGINE, quantization=fmt, tensor_parallel_size=TP, enable_expert_parallel=expert_parallel)
    assert two.runner.graphs.graphs, "decode CUDA graphs were not captured"
    error = _prefill_error(one, two)
    want, got = _tokens(one), _tokens(two)
    gaps = [_first_divergence(one, a, b, p) for p, a, b in zip(PROMPTS, want, got)]
    print(f"bf16 activations, {config.__name__} {fmt} ep={expert_parallel}: prefill logits relative L2 error {error:.2e}; first divergence (step, TP=1 "
          f"logit gap) per prompt: {gaps}")
    assert error <= rel_tolerance
    assert all(g is None or g[1] <= margin for g in gaps), gaps
    eager = LLM(config(), **ENGINE, quantization=fmt, tensor_parallel_size=TP, enable_expert_parallel=expert_parallel,
                enforce_eager=True)
    assert _tokens(eager) == got


def test_tp2_prefills_wider_and_longer_than_a_graph_equal_eager():
    """Prefills cut into runs of graph replays (more than ``MAX_SEQS`` prompts; more than 2048 tokens of
    prompts that each fit a graph) at TP=2, with the start-up eager run of ``MAX_SEQS + 1`` prompts behind
    them: the same greedy tokens as an eager TP=2 engine (two ranks sum in one addition, so bit for bit).
    Over more ranks NCCL's order of addition depends on the sum's size (its chunks), and a graph's padded
    bucket is larger than the eager run's tokens, so the KV cache may differ in last bits (seen at TP=4 on
    4 H200s): there the tokens must agree up to a near tie of the eager engine's own logits, while a
    replay of the wrong rows would move the logits by their own size."""
    from mopt.engine.prefill_graphs import MAX_SEQS, TOKEN_BUCKETS

    kw = dict(ENGINE, quantization="fp8-kv", max_model_len=320, max_num_seqs=MAX_SEQS + 8,
              max_num_batched_tokens=4096, tensor_parallel_size=TP)
    graphs, eager = LLM(_dense(), **kw), LLM(_dense(), **kw, enforce_eager=True)
    assert sorted(graphs.runner.prefill_graphs.graphs) == list(TOKEN_BUCKETS)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for prompts in ([[(5 * i + j) % 300 for j in range(3 + i)] for i in range(MAX_SEQS + 3)],
                    [[(3 * i + j) % 300 + 1 for j in range(300)] for i in range(8)]):  # 2400 tokens
        got = [o.token_ids for o in graphs.generate(prompts, params)]
        want = [o.token_ids for o in eager.generate(prompts, params)]
        if TP == 2:
            assert got == want
            continue
        gaps = [_first_divergence(eager, a, b, p) for p, a, b in zip(prompts, want, got)]
        print(f"{len(prompts)} prompts at TP={TP}: first divergence (step, eager logit gap): {gaps}")
        assert all(g is None or g[1] <= BF16_TOLERANCE["fp8-kv"][1] for g in gaps), gaps


def test_a_killed_worker_ends_the_run_with_an_error_naming_it():
    env = {**subprocess_env(), "PYTHONFAULTHANDLER": "1"}  # a hang is shown with every thread's stack
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "tp_child.py"), "generate", str(TP),
                              "cuda"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line, child.communicate(timeout=60)[1][-3000:]
        worker = int(__import__("json").loads(line)["1"])
        time.sleep(3)
        os.kill(worker, signal.SIGKILL)
        try:
            _, err = child.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)
            pytest.fail("rank 0 did not exit within 90 s of its worker's death:\n" + child.communicate(timeout=30)[1][-6000:])
    finally:
        child.kill()
    assert child.returncode == 1, err[-3000:]
    assert "tensor-parallel rank 1 was killed by signal SIGKILL" in err, err[-3000:]
    assert not pid_alive(worker)


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a child and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _capture_fault_child(fault: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    from mopt.engine.prefill_graphs import FAULT_ENV

    marker = f"MOPT_TEST_MARK={os.getpid()}-{time.monotonic_ns()}"
    env = {**subprocess_env(), "PYTHONFAULTHANDLER": "1", FAULT_ENV: fault, "MOPT_TEST_MARK": marker.split("=")[1],
           "MOPT_TEST_TP": str(TP)}
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "tp_child.py"), "capture-fault"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        out, err = child.communicate(timeout=30)
        pytest.fail(f"the child did not finish within 240 s:\n{err[-6000:]}")
    finally:
        child.kill()
    time.sleep(1)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err), _processes_with(marker)


def test_a_prefill_graph_failed_on_one_rank_is_left_out_on_every_rank():
    child, left = _capture_fault_child("1:128")
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"rank 0 captured {result['graphs']}, left out {result['failed']}")
    assert result["failed"] == {"128": "another rank failed it"}
    assert 32 in result["graphs"] and 64 in result["graphs"] and 128 not in result["graphs"]
    assert result["tokens"] == result["eager_tokens"]
    assert "128-token buckets run eagerly" in child.stderr, child.stderr[-4000:]
    assert not left


def test_a_warm_up_failed_on_one_rank_stops_every_rank_with_an_error_naming_it():
    """The other rank waits inside the warm-up's collectives on its GPU: no agreement can follow, so the
    failing rank stops the world, and rank 0's polled wait raises its error."""
    start = time.monotonic()
    child, left = _capture_fault_child("1:128:warm-up")
    print(f"exit {child.returncode} after {time.monotonic() - start:.0f} s: {child.stderr.strip().splitlines()[-1]}")
    assert child.returncode == 1, child.stderr[-4000:]
    assert "rank 1" in child.stderr and "the eager run before capturing the 128-token prefill graph failed" in \
        child.stderr, child.stderr[-4000:]
    assert not left, f"processes left running: {left}"
