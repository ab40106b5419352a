"""Where a process's time goes, from py-spy's raw (collapsed) stacks: ``python3 bench/pyspy_summary.py RAW MARK [TOP]``.

Takes the stacks that pass through a frame containing MARK (e.g. ``"bench_generate (mopt/bench/generate.py"``
for the decode loop of ``mopt bench generate``, or ``receive_command`` for a tensor-parallel worker's waits),
and prints each function's inclusive share of those samples (line numbers merged), then the leaves. py-spy's
raw files of a whole multi-process run are too large to bring back from the GPU machine; this summary is not.
Record waits too with ``py-spy record --idle -f raw --subprocesses``.
"""

from __future__ import annotations

import collections
import re
import sys


def summarize(raw: str, mark: str, top: int = 45) -> str:
    inclusive, leaves, total = collections.Counter(), collections.Counter(), 0
    with open(raw, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit() or mark not in stack:
                continue
            frames = [re.sub(r":\d+\)", ")", frame) for frame in stack.split(";")]
            frames = frames[next(k for k, frame in enumerate(frames) if mark in frame):]
            total += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
            leaves[frames[-1]] += int(count)
    lines = [f"{raw}: {total} samples through {mark}"]
    lines += [f"{100 * n / total:6.1f}%  {frame[:150]}" for frame, n in inclusive.most_common(top)]
    lines.append("-- leaves")
    lines += [f"{100 * n / total:6.1f}%  {frame[:150]}" for frame, n in leaves.most_common(20)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(summarize(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 45))
