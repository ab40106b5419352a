"""Speed-ups of tensor parallelism from ``mopt bench generate --json`` files: ``python bench/tp_speedup.py
[--tp N] OUT.json NAME=TP1.json:TPN.json [NAME=...]`` (N, default 2, names the second file's size). Rows are matched by (model label, batch); a missing or
unreadable file is reported, not fatal. Prints a table and writes it as JSON to OUT.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(path: str) -> dict[tuple[str, int], dict] | str:
    try:
        data = json.loads(Path(path).read_text())
        return {(r["label"], r["batch"]): r for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: {type(e).__name__}: {e}"


def _ratio(a, b) -> float | None:
    return b / a if a and b else None


def compare(name: str, one: str, two: str, size: int = 2) -> tuple[list[dict], list[str]]:
    base, tp = _rows(one), _rows(two)
    problems = [r for r in (base, tp) if isinstance(r, str)]
    if problems:
        return [], [f"{name}: {p}" for p in problems]
    out = []
    for key in sorted(set(base) & set(tp)):
        b, t = base[key], tp[key]
        out.append(dict(name=name, label=key[0], batch=key[1], tp1_decode_tok_s=b["decode_tokens_per_s"],
                        tp=size, tpn_decode_tok_s=t["decode_tokens_per_s"],
                        decode_speedup=_ratio(b["decode_tokens_per_s"], t["decode_tokens_per_s"]),
                        tp1_ttft_ms=b["ttft_ms"], tpn_ttft_ms=t["ttft_ms"],
                        ttft_speedup=_ratio(t["ttft_ms"], b["ttft_ms"])))
    missing = sorted(set(base) ^ set(tp))
    return out, [f"{name}: rows in one file only: {missing}"] if missing else []


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    tp = 2
    if argv[:1] == ["--tp"] and len(argv) > 1 and argv[1].isdigit():
        tp, argv = int(argv[1]), argv[2:]
    if len(argv) < 2 or any("=" not in a or ":" not in a.split("=", 1)[1] for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    rows, problems = [], []
    for arg in argv[1:]:
        name, files = arg.split("=", 1)
        got, bad = compare(name, *files.split(":", 1), size=tp)
        rows += got
        problems += bad
    print(f"{'model':>28} {'batch':>5} {'TP1 tok/s':>10} {f'TP{tp} tok/s':>10} {'decode x':>8} {'TP1 TTFT':>9} "
          f"{f'TP{tp} TTFT':>9} {'TTFT x':>7}")
    for r in rows:
        print(f"{r['label']:>28} {r['batch']:>5} {_fmt(r['tp1_decode_tok_s'], '10.1f')} "
              f"{_fmt(r['tpn_decode_tok_s'], '10.1f')} {_fmt(r['decode_speedup'], '8.2f')} "
              f"{_fmt(r['tp1_ttft_ms'], '9.1f')} {_fmt(r['tpn_ttft_ms'], '9.1f')} {_fmt(r['ttft_speedup'], '7.2f')}")
    for p in problems:
        print(f"missing: {p}")
    Path(argv[0]).write_text(json.dumps(dict(rows=rows, problems=problems), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
