"""Programs the process tests run in children: ``python tp_child.py MODE [ARG...]``.

* ``generate TP [DEVICE]``: a TP-rank engine (on the CPU unless DEVICE is given), prints the workers' pids as JSON, then generates until
  something fails, and exits like ``mopt`` does (``mopt: error: ...``, status 1);
* ``idle``: a 2-rank engine that prints its workers' pids and sleeps;
* ``worker-stuck FILE``: a 2-rank engine (pids printed) whose worker counts as a GPU's (it leaves on its own when
  orphaned, after 1 s here) and never returns from its first decode step (creating FILE when it gets there), as a GPU worker's host can block in
  the driver behind a GPU that waits on rank 0; rank 0 then waits in the step's collective until killed;
* ``stuck SECONDS``: a 2-rank engine (pids printed) whose world counts as a GPU's (wedged once a rank failed) and
  whose decode step, after a first generation, kills the worker and then never returns, as rank 0's host does
  when it blocks in the driver behind a GPU that waits on the dead rank; ``STUCK_STEP_EXIT_S`` = SECONDS;
* ``capture-fault``: a ``MOPT_TEST_TP``-rank (default 2) FP8 engine on as many GPUs (``MOPT_TEST_FAIL_PREFILL_GRAPH`` fails some prefill
  graph captures on purpose), then the same eagerly; prints rank 0's captured and failed buckets and
  both engines' greedy tokens for prompts that take a captured and a failed bucket, as JSON (or exits
  like ``mopt`` when the engine fails to start);
* ``serve-teardown ARG...``: ``mopt serve ARG...``, reporting on stderr how many models (``LLM``,
  ``ModelRunner``) are still alive when the tensor-parallel world's groups shut down, in whichever process
  holds the world (the server's, or its engine process);
* ``logits CHECKPOINT OUT``: full-sequence logits of ``load_model(CHECKPOINT, tensor_parallel_size=
  WORLD_SIZE)``, written by rank 0 to ``OUT`` (run under torchrun, or alone to test the rendezvous).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

IDS = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(3))


def tiny_config(heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=320, hidden_size=32 * heads, intermediate_size=64 * heads, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                       architectures=["LlamaForCausalLM"])


REPORT_TEARDOWN = "MOPT_TEST_REPORT_TEARDOWN"


def _report_teardown() -> None:
    """Report on stderr the models (``LLM``, ``ModelRunner``) alive when this process's tensor-parallel world's
    groups shut down."""
    import gc

    from mopt.engine import tp_runtime

    destroy_groups = tp_runtime.destroy_groups

    def reporting(world):
        gc.collect()
        alive = [type(o).__name__ for o in gc.get_objects() if type(o).__name__ in ("LLM", "ModelRunner")]
        print(f"models alive at the world's teardown: {len(alive)} {alive}", file=sys.stderr, flush=True)
        destroy_groups(world)

    tp_runtime.destroy_groups = reporting


if __name__ == "__mp_main__" and os.environ.get(REPORT_TEARDOWN):  # spawned by a process this file runs in
    _report_teardown()

WORKER_STUCK = "MOPT_TEST_WORKER_STUCK"

if __name__ == "__mp_main__" and os.environ.get(WORKER_STUCK):
    import threading

    from mopt.engine import tp_worker
    from mopt.engine.tp_protocol import Op

    tp_worker._needs_orphan_exit = lambda world: True
    tp_worker.ORPHAN_EXIT_S = 1.0
    _run = tp_worker._run

    def _stuck_in_decode(world, shards, op, *args):
        if op is not Op.DECODE:
            return _run(world, shards, op, *args)
        with open(os.environ[WORKER_STUCK], "w"):  # tells the test this rank is stuck now
            pass
        threading.Event().wait()

    tp_worker._run = _stuck_in_decode


def _engine(tp: int, device: str = "cpu"):
    from mopt import LLM
    from mopt.engine import tp_runtime

    llm = LLM(tiny_config(tp), device=device, load_format="dummy", quantization="fp8", kv_cache_memory=4 << 20,
              tensor_parallel_size=tp)
    pids = {rank: p.pid for rank, p in tp_runtime._RUNTIME.world.processes.items()}
    print(json.dumps(pids), flush=True)
    return llm


def main(mode: str, *args: str) -> int:
    from mopt import MoptError, SamplingParams

    if mode == "generate":
        llm = _engine(int(args[0]), *args[1:2])
        try:
            while True:
                llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=200, ignore_eos=True))
        except (MoptError, RuntimeError) as e:
            print(f"mopt: error: {e}", file=sys.stderr, flush=True)
            return 1
    if mode == "stuck":
        import signal
        import threading

        from mopt.engine import tp_runtime

        tp_runtime.STUCK_STEP_EXIT_S = float(args[0])
        tp_runtime.TensorParallelRuntime.wedged = property(lambda self: self.failed)
        llm = _engine(2)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
        worker = tp_runtime._RUNTIME.world.processes[1].pid

        def stuck(*args, **kw):
            os.kill(worker, signal.SIGKILL)
            threading.Event().wait()

        llm.runner.run_decode = stuck
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
        return 0
    if mode == "worker-stuck":
        os.environ[WORKER_STUCK] = args[0]  # a file the worker creates once it is stuck
        llm = _engine(2)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
        return 0
    if mode == "idle":
        _engine(2)
        time.sleep(600)
        return 0
    if mode == "capture-fault":
        from mopt import LLM

        prompts = [list(range(1, 21)), list(range(3, 103)), [7] * 50]  # the 32-, 128- and 64-token buckets
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        tp = int(os.environ.get("MOPT_TEST_TP", "2"))
        kw = dict(device="cuda", load_format="dummy", quantization="fp8", kv_cache_memory=16 << 20, tensor_parallel_size=tp)
        try:
            llm = LLM(tiny_config(tp), **kw)
        except (MoptError, RuntimeError) as e:
            print(f"mopt: error: {e}", file=sys.stderr, flush=True)
            return 1
        graphs = llm.runner.prefill_graphs
        result = {"graphs": sorted(graphs.graphs), "failed": graphs.failed,
                  "tokens": [o.token_ids for o in llm.generate(prompts, params)]}
        del llm, graphs
        eager = LLM(tiny_config(tp), **kw, enforce_eager=True)
        result["eager_tokens"] = [o.token_ids for o in eager.generate(prompts, params)]
        print(json.dumps(result), flush=True)
        return 0
    if mode == "serve-teardown":
        from mopt.cli import main as mopt_main

        os.environ[REPORT_TEARDOWN] = "1"  # the engine process imports this module too, and reports there
        _report_teardown()
        return mopt_main(["serve", *args])
    if mode == "logits":
        from mopt import load_model

        model = load_model(args[0], tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
        with torch.no_grad():
            logits = model(IDS)
        torch.save(logits, args[1])  # only rank 0 gets here: the others serve it until it exits
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
