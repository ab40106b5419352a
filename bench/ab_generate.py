"""``mopt bench generate`` in this process with one decode change undone, for same-run A/B measurements.

Usage: PYTHONPATH=src python3 bench/ab_generate.py VARIANT bench generate --dummy llama3-8b ... (one GPU;
tensor-parallel workers are spawned processes, which the undoing does not reach). Run it alternately with
``current`` (nothing undone) and the variant, so that both see the same card, clocks and host.

Variants:
  current        the tree as it is
  gemv-1k-rows   the one-token GEMV reading 1 KiB of each weight row a step (before 75227ef; now 2 KiB)
  rope-unfused   decode's RoPE + KV-cache write as their own kernel before attention (before c7434da)
"""

from __future__ import annotations

import sys


def _gemv_1k_rows() -> None:
    from mopt.kernels import triton_gemv

    tiles = triton_gemv.gemv_tiles

    def one_kib_rows(m: int, n: int, k: int, itemsize: int = 1) -> triton_gemv.GemvTiles:
        if m == 1:
            return triton_gemv.GemvTiles(block_n=8, block_k=1024 // itemsize, num_warps=8, num_stages=5, dot=False)
        return tiles(m, n, k, itemsize)

    triton_gemv.gemv_tiles = one_kib_rows


def _rope_unfused() -> None:
    from mopt.kernels import attention

    attention.TritonAttention.rope_write_attend = attention.AttentionBackend.rope_write_attend


VARIANTS = {"current": lambda: None, "gemv-1k-rows": _gemv_1k_rows, "rope-unfused": _rope_unfused}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        print(f"usage: ab_generate.py {{{','.join(VARIANTS)}}} bench generate ...", file=sys.stderr)
        return 2
    VARIANTS[sys.argv[1]]()
    from mopt.cli import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
