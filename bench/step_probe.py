"""Run any ``mopt`` command with rank 0's model steps timed: a step whose launch takes over 100 ms, or that takes
over 250 ms from launch to its tokens, is printed to stderr as ``[probe SECONDS]`` with what it ran (prefill or
decode, sequences, tokens). A diagnostic for serving stalls (Triton compiling inside a request, a slow eager step).
Usage: PYTHONPATH=src python3 bench/step_probe.py serve --dummy llama3-8b --format fp8-kv -tp 2

With MOPT_PROBE_STEPS=FILE every step is also logged to FILE as ``done prefill seqs tokens`` (monotonic seconds
at its tokens' arrival); ``python3 bench/step_probe.py --summary FILE [FROM TO]`` then splits the wall time
between consecutive arrivals (from FROM to TO, monotonic seconds: ``time.monotonic()`` of any process) by the kind of
step that arrived (where a server's time goes: prefills stalling
decodes, or decode steps slower than offline ones).
"""
import os, sys, time
from mopt.engine import runner as R

T0 = time.monotonic()
_launch = R.ModelRunner.launch
_results = R.PendingStep.results
_info = {}
_log = open(os.environ["MOPT_PROBE_STEPS"], "w", buffering=1) if os.environ.get("MOPT_PROBE_STEPS") else None


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
    if _log is not None:
        _log.write(f"{time.monotonic():.6f} {int(bool(pre))} {n} {toks}\n")
    if dt > 0.1 or time.monotonic() - t0 > 0.25:
        print(f"[probe {t - T0:8.3f}] slow step: wait {dt * 1e3:.0f} ms, launch->done {(time.monotonic() - t0) * 1e3:.0f} ms "
              f"prefill={pre} seqs={n} tokens~{toks}", file=sys.stderr, flush=True)
    return out


def summary(path: str, start: float = 0.0, end: float = float("inf")) -> None:
    """Per kind of step (prefill or decode): how many arrived, and the wall time since the arrival before each,
    for the intervals within [start, end] (monotonic seconds)."""
    rows = [(float(t), int(p), int(n), int(k)) for t, p, n, k in (line.split() for line in open(path))]
    kinds = {}
    for (before, *_), (t, pre, n, toks) in zip(rows, rows[1:]):
        if start <= before and t <= end:  # whole intervals only: not the idle time before a run's first step
            c = kinds.setdefault("prefill" if pre else "decode", [0, 0.0, 0, 0])
            c[0] += 1; c[1] += t - before; c[2] += n; c[3] += toks
    wall = sum(c[1] for c in kinds.values())
    for kind, (count, secs, seqs, toks) in sorted(kinds.items()):
        print(f"{kind:8s} {count:6d} steps {secs * 1e3:9.1f} ms ({secs / wall:6.1%}) {secs / count * 1e3:7.2f} ms/step, "
              f"{seqs / count:5.1f} seqs and {toks / count:7.1f} tokens a step")


if __name__ == "__main__" and sys.argv[1:2] == ["--summary"]:
    summary(sys.argv[2], *map(float, sys.argv[3:5]))
elif __name__ == "__main__":  # spawned tensor-parallel workers import this module too
    R.ModelRunner.launch = launch
    R.PendingStep.results = results
    from mopt.cli import main
    sys.exit(main(sys.argv[1:]))
