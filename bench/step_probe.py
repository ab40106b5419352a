"""Run any ``mopt`` command with rank 0's model steps timed: a step whose launch takes over 100 ms, or that takes
over 250 ms from launch to its tokens, is printed to stderr as ``[probe SECONDS]`` with what it ran (prefill or
decode, sequences, tokens). A diagnostic for serving stalls (Triton compiling inside a request, a slow eager step).
Usage: PYTHONPATH=src python3 bench/step_probe.py serve --dummy llama3-8b --format fp8-kv -tp 2
"""
import sys, time
from mopt.engine import runner as R

T0 = time.monotonic()
_launch = R.ModelRunner.launch
_results = R.PendingStep.results
_info = {}


def launch(self, seqs, is_prefill, carried=None):
    t = time.monotonic()
    step = _launch(self, seqs, is_prefill, carried)
    dt = time.monotonic() - t
    toks = sum(len(s) for s in seqs) if is_prefill else len(seqs)
    _info[id(step)] = (t, is_prefill, len(seqs), toks)
    if dt > 0.1:
        print(f"[probe {t - T0:8.3f}] slow launch {dt * 1e3:.0f} ms prefill={is_prefill} seqs={len(seqs)} tokens~{toks}", file=sys.stderr, flush=True)
    return step


def results(self):
    t = time.monotonic()
    out = _results(self)
    dt = time.monotonic() - t
    t0, pre, n, toks = _info.pop(id(self), (t, None, len(self.seqs), -1))
    if dt > 0.1 or time.monotonic() - t0 > 0.25:
        print(f"[probe {t - T0:8.3f}] slow step: wait {dt * 1e3:.0f} ms, launch->done {(time.monotonic() - t0) * 1e3:.0f} ms "
              f"prefill={pre} seqs={n} tokens~{toks}", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":  # spawned tensor-parallel workers import this module too
    R.ModelRunner.launch = launch
    R.PendingStep.results = results
    from mopt.cli import main
    sys.exit(main(sys.argv[1:]))
