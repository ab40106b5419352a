#!/usr/bin/env python3
"""Runs the mopt CLI with a thread that takes the GIL as an event loop serving SSE would:
BURN_CHUNKS pieces of BURN_CHUNK_US of Python each, a GIL-releasing write between them, every BURN_PERIOD_MS."""
import os, sys, threading, time

def burn(chunks, chunk_s, period_s, log):
    fd = os.open(os.devnull, os.O_WRONLY)
    n = 0; held = 0.0; t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(chunks):
            t = time.perf_counter()
            while time.perf_counter() - t < chunk_s:
                pass
            os.write(fd, b"x")
        t1 = time.perf_counter(); held += t1 - t0; n += 1
        if n % 500 == 0:
            print(f"burn: {n} periods, {held / n * 1e3:.2f} ms busy a period, wall {(t1 - t_start) / n * 1e3:.2f} ms", file=log, flush=True)
        rest = period_s - (t1 - t0)
        if rest > 0:
            time.sleep(rest)

if __name__ == "__main__":
    chunks = int(os.environ.get("BURN_CHUNKS", "0"))
    if chunks:
        threading.Thread(target=burn, args=(chunks, float(os.environ["BURN_CHUNK_US"]) / 1e6,
                                            float(os.environ["BURN_PERIOD_MS"]) / 1e3, sys.stderr), daemon=True).start()
    from mopt.cli import main
    sys.exit(main(sys.argv[1:]))
