"""The ``mopt`` command: one module per group of subcommands (``run``: generate, chat, eval;
``checkpoint``: inspect, quantize; ``bench``), the parser in ``parser``, shared helpers in ``common``."""

from __future__ import annotations

import logging
import sys

from mopt.cli.common import DEFAULT_MODEL_NAME, _model_path, add_parallel_args, parallel_kwargs  # noqa: F401
from mopt.cli.parser import build_parser

__all__ = ["DEFAULT_MODEL_NAME", "add_parallel_args", "build_parser", "main", "parallel_kwargs"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"mopt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mopt: interrupted", file=sys.stderr)
        return 130
