"""Worlds of processes in children: a rank that dies mid-run, a rank 0 that goes away, a rendezvous
that times out, two torchrun "nodes" on loopback, and Ctrl-C on ``mopt serve`` / ``mopt generate``. Each
ends with every process gone."""

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

from mopt.engine.loader import load_model
from tp_child import IDS, tiny_config
from tp_helpers import free_port, pid_alive, rel, subprocess_env

pytestmark = pytest.mark.slow

CHILD = str(Path(__file__).resolve().parent / "tp_child.py")


def _start(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(**env))


def _worker_pids(child: subprocess.Popen) -> dict[int, int]:
    line = child.stdout.readline()
    assert line, f"the engine did not start: {child.communicate(timeout=60)[1][-3000:]}"
    return {int(rank): pid for rank, pid in json.loads(line).items()}


def _gone(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_a_worker_killed_mid_run_ends_every_process_with_an_error_naming_it():
    child = _start("generate", "3")
    try:
        pids = _worker_pids(child)
        time.sleep(3)  # well into generating
        os.kill(pids[2], signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1, err[-3000:]
    assert "mopt: error: tensor-parallel rank 2 was killed by signal SIGKILL" in err, err[-3000:]
    assert _gone(pids.values(), 10), "a worker outlived rank 0"


def test_a_rank_0_stuck_in_a_step_after_a_worker_died_leaves_with_the_error():
    """On GPUs rank 0's step may never return once a worker died: its GPU waits on the dead rank in the one-shot
    all-reduce, and the host can block behind it inside the driver (seen on 2x H200). Rather than hang, the
    process leaves with the error naming the rank (simulated here: see ``tp_child.py stuck``)."""
    child = _start("stuck", "2")
    try:
        pids = _worker_pids(child)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 1, err[-3000:]
    assert ("mopt: error: tensor-parallel rank 1 was killed by signal SIGKILL (rank 0 is stuck in a step on its GPU: "
            "exiting)") in err, err[-3000:]
    assert _gone(pids.values(), 10), "a worker outlived rank 0"


def test_a_gpu_worker_stuck_in_a_step_leaves_when_rank_0_goes_away(tmp_path):
    """A GPU worker's host can block in the driver behind a GPU that waits on rank 0, where its main thread never
    notices rank 0 is gone; it leaves by itself all the same (simulated here: see ``tp_child.py worker-stuck``)."""
    stuck = tmp_path / "stuck"
    child = _start("worker-stuck", str(stuck))
    try:
        pids = _worker_pids(child)
        deadline = time.monotonic() + 60  # rank 0 waits in the decode step's collective, the worker in its stuck step
        while not stuck.exists():
            assert time.monotonic() < deadline and child.poll() is None, "the worker never reached its decode step"
            time.sleep(0.1)
        time.sleep(0.5)  # rank 0 into the step's collective too
        os.kill(child.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=60)  # the worker shares rank 0's stderr: EOF once it is gone
    finally:
        child.kill()
    assert _gone(pids.values(), 10), "the worker outlived rank 0"
    assert "mopt tensor-parallel rank 1: rank 0's process exited, and this rank is stuck in a step on its GPU; " \
           "exiting" in err, err[-3000:]


def _url_once_listening(server: subprocess.Popen) -> str:
    """The URL ``mopt serve`` announces on stderr once it listens (fails with its output if it exits first)."""
    lines = []
    while not lines or "listening on" not in lines[-1]:
        lines.append(server.stderr.readline())
        assert lines[-1], f"the server did not start: {''.join(lines)[-3000:]}"
    return lines[-1].split("listening on ")[1].strip()


def _tp_worker(group: int) -> int:
    """The one spawned rank of process group ``group``: a multiprocessing child with no child of its own (the
    engine process, when there is one, has the worker)."""
    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")

    def has_children(pid: int) -> bool:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())

    workers = [pid for pid in _group_pids(group) if "spawn_main" in cmdline(pid) and not has_children(pid)]
    assert len(workers) == 1, workers
    return workers[0]


@pytest.mark.parametrize("engine,streaming", [("--engine-process", True), ("--no-engine-process", True),
                                              ("--engine-process", False)], ids=["process", "thread", "process-idle"])
def test_a_worker_killed_while_serving_stops_the_server_with_an_error_naming_it(tmp_path, engine, streaming):
    """A world that lost a rank can never step again: the stream in flight ends with an error event, and the
    server shuts itself down and exits 1 naming the rank, leaving no process (rather than answering /health and
    failing every request from then on). An idle server notices within a second or so, with no request."""
    import httpx

    from mopt.engine.dummy import tiny_preset_config

    tiny_preset_config().save_pretrained(tmp_path)
    config = str(tmp_path / "config.json")
    child = subprocess.Popen([sys.executable, "-m", "mopt.cli", "serve", "--dummy", config, "--device", "cpu", "-tp",
                              "2", "--port", "0", engine], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(), start_new_session=True)
    try:
        url = _url_once_listening(child)
        worker = _tp_worker(child.pid)
        body = dict(model=config, prompt=[5, 17, 33], max_tokens=500, temperature=0, ignore_eos=True, stream=True,
                    return_token_ids=True)  # a chunk per token (the dummy model has no tokenizer, so no text)
        rest = []
        if streaming:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                events = response.iter_lines()
                next(line for line in events if line.startswith("data: {"))
                os.kill(worker, signal.SIGKILL)
                rest = [line for line in events if line]
        else:
            os.kill(worker, signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    if streaming:
        assert len(rest) >= 2 and rest[-1] == "data: [DONE]", (rest[-3:], err[-3000:])
        assert "tensor-parallel rank 1 was killed by signal SIGKILL" in rest[-2], (rest[-3:], err[-3000:])
    assert child.returncode == 1, err[-3000:]
    assert "tensor-parallel rank 1 was killed by signal SIGKILL" in err.splitlines()[-1], err[-3000:]
    assert _gone(_group_pids(child.pid), 10), "a process outlived the server"


def test_workers_leave_when_rank_0_goes_away():
    child = _start("idle")
    try:
        pids = _worker_pids(child)
        child.kill()  # SIGKILL: no clean shutdown, no atexit
        child.wait(10)
        assert _gone(pids.values(), 15), "a worker outlived rank 0"
    finally:
        child.kill()


def test_a_rendezvous_that_times_out_names_the_missing_rank(export_factory):
    port = free_port()
    child = _start("logits", str(export_factory("fp8", 256).path), "unused.pt", RANK="0", WORLD_SIZE="2",
                   LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOPT_TP_INIT_TIMEOUT="3")
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0
    assert (f"tensor-parallel rendezvous at 127.0.0.1:{port} timed out after 3 s: rank(s) [1] of 2 did not join"
            in err), err[-3000:]


def test_a_script_without_a_main_guard_is_told_why_its_workers_died(tmp_path):
    """Spawned workers import the main module; one that builds a model at import time fails there."""
    script = tmp_path / "unguarded.py"
    script.write_text("from mopt import LLM\nfrom mopt.engine.dummy import tiny_preset_config\n"
                      "LLM(tiny_preset_config(), device='cpu', load_format='dummy', tensor_parallel_size=2)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                          env=subprocess_env())
    assert proc.returncode != 0
    assert "tensor-parallel rank 1 exited with code 1 before joining" in proc.stderr, proc.stderr[-3000:]
    assert 'under `if __name__ == "__main__":`' in proc.stderr, proc.stderr[-3000:]


def test_two_torchrun_nodes_on_loopback_give_the_same_logits(export_factory, tmp_path):
    path = export_factory("fp8-kv", 256).path
    port, out = free_port(), tmp_path / "logits.pt"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               CHILD, "logits", str(path), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    with torch.no_grad():
        want = load_model(path)(IDS)
    assert rel(torch.load(out), want) <= 2e-6  # the tolerance of test_tp_logits.py, for the same reason


def test_two_torchrun_nodes_serve_as_one_process(tmp_path):
    """``mopt serve`` under torchrun on two "nodes" on loopback: rank 0 serves over HTTP and the other
    node's rank follows it; greedy tokens equal one process's, and stopping rank 0's node stops both."""
    import httpx

    from mopt import LLM, SamplingParams
    from mopt.engine.dummy import tiny_preset_config

    tiny_preset_config().save_pretrained(tmp_path)
    config, port = str(tmp_path / "config.json"), free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "mopt.cli", "serve", "--dummy", config, "--device", "cpu", "-tp", "2", "--port",
                               "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                              start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
             for rank in (0, 1)]
    prompt = [5, 17, 33, 2, 9]
    try:
        url = _url_once_listening(nodes[0])
        body = dict(model=config, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True, return_token_ids=True)
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        got = reply.json()["choices"][0]["token_ids"]
        os.killpg(nodes[0].pid, signal.SIGINT)
        results = [node.communicate(timeout=60) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    # torchrun's agents log their own tracebacks (node 0's was interrupted; node 1's exit barrier lost
    # node 0's store); no mopt code may appear in one, and node 1's rank must leave cleanly.
    assert nodes[1].returncode == 0, results[1][1][-3000:]
    for _, err in results:
        assert "/mopt/" not in err, err[-3000:]
    assert _gone(_group_pids(nodes[0].pid) + _group_pids(nodes[1].pid), 10), "a rank outlived its node"
    one = LLM(config, device="cpu", load_format="dummy", kv_cache_memory=4 << 20)
    assert got == one.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids


def _group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (rank 0 and the workers it spawned)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def _stream_until_closed(url: str, model: str, done: list) -> None:
    """A long streamed completion from ``url``, read until the server ends it; ``done`` gets its bytes."""
    import httpx

    body = dict(model=model, prompt="Hello", max_tokens=4000, temperature=0, stream=True, ignore_eos=True)
    received = 0
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for chunk in response.iter_bytes():
                received += len(chunk)
    except httpx.HTTPError:
        pass  # the server went away mid-stream: what this test does to it
    done.append(received)


@pytest.mark.parametrize("command,code,says", [
    (["serve", "--port", "0"], 0, ""),
    (["generate", "--prompt", "hi", "--max-tokens", "8000", "--ignore-eos"], 130, "mopt: interrupted"),
], ids=["serve-mid-stream", "generate"])
def test_ctrl_c_ends_every_rank_quietly(command, code, says, tmp_path):
    """Ctrl-C reaches the terminal's whole process group: rank 0 stops its command (a server shuts down
    gracefully, here while a streamed completion is being generated; a generation reports the
    interruption) and stops the workers, which must neither print a traceback of their own nor outlive it."""
    import threading

    from tiny_tokenizer import save_byte_tokenizer
    from transformers import LlamaForCausalLM

    config = tiny_config(2)
    config.max_position_embeddings = 8192  # room for a generation that outlasts the test's wait
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    save_byte_tokenizer(tmp_path)
    # A terminal's default disposition: a shell that starts pytest in the background has it ignore SIGINT,
    # and so would the child.
    child = subprocess.Popen([sys.executable, "-m", "mopt.cli", *command, str(tmp_path), "--device", "cpu", "-tp", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    streamed, stream = [], None
    try:
        if command[0] == "serve":
            url = _url_once_listening(child)
            stream = threading.Thread(target=_stream_until_closed, args=(url, str(tmp_path), streamed), daemon=True)
            stream.start()
            time.sleep(3)  # well into streaming
        else:
            deadline = time.monotonic() + 60
            while len(_group_pids(child.pid)) < 2 and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.2)
            time.sleep(4)  # well into generating
        assert child.poll() is None, child.communicate()[1][-3000:]
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == code, err[-3000:]
    assert says in err and "Traceback" not in err, err[-3000:]
    # Nor a worker's account of the collective rank 0 left, nor the resource tracker's leak warning (tqdm's
    # semaphore in a worker that rank 0 terminated).
    assert "tensor-parallel rank" not in err and "leaked" not in err, err[-3000:]
    assert _gone(_group_pids(child.pid), 10), "a worker outlived rank 0"
    if stream is not None:
        stream.join(10)
        assert streamed and streamed[0] > 0, "the stream never started or never ended"


@pytest.mark.parametrize("engine", ["--engine-process", "--no-engine-process"])
def test_a_stopped_server_frees_its_model_before_the_world_shuts_down(tmp_path, engine):
    """FastAPI caches the routes' endpoint functions (closures over the engine) for the process's life;
    unless ``mopt serve`` lets go of the model, its CUDA graphs, which hold NCCL collectives, outlive the
    server, and on 2 GPUs every exit then waited out NCCL's 30 s shutdown bound (2x H200). The GPU's wait
    cannot happen here; the model still alive at the world's teardown can (in the engine process, rank 0,
    when it has one; the worker reports too)."""
    import httpx

    from mopt.engine.dummy import tiny_preset_config

    tiny_preset_config().save_pretrained(tmp_path)
    config = str(tmp_path / "config.json")
    child = subprocess.Popen([sys.executable, CHILD, "serve-teardown", "--dummy", config, "--device", "cpu", "-tp", "2",
                              "--port", "0", engine], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(), start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = _url_once_listening(child)
        reply = httpx.post(f"{url}/v1/completions", json=dict(model=config, prompt=[1, 2, 3], max_tokens=4), timeout=60)
        assert reply.status_code == 200, reply.text
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 0, err[-3000:]
    reports = [line for line in err.splitlines() if line.startswith("models alive at the world's teardown")]
    assert reports and all(line.endswith(": 0 []") for line in reports), err[-3000:]
    assert _gone(_group_pids(child.pid), 10), "a worker outlived rank 0"
