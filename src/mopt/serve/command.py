"""``mopt serve`` on the command line, and the engine options it shares with ``mopt bench serve``.

Every argument is checked before the model loads (a taken port included: the socket is bound
first). Imports of the ``serve`` extra happen only when a server is started.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

API_KEY_ENV = "MOPT_API_KEY"
DEFAULT_MAX_QUEUE = 512


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine options beyond the common model options (model, --format, --device, --dtype,
    --kv-cache-dtype, --backend), for ``serve`` and ``bench serve``."""
    from mopt.cli.common import _positive_int  # argparse types: a bad value names its option before anything loads

    p.add_argument("--dummy", metavar="PRESET",
                   help="random weights of a preset's shape (llama3-8b, llama3-1b, qwen3-8b, ...) in --format; "
                        "no tokenizer unless --tokenizer: then only token-id prompts work")
    p.add_argument("--tokenizer", metavar="DIR", help="load the tokenizer from this folder")
    p.add_argument("--max-model-len", type=_positive_int, help="context length (default: the model's, capped by the cache)")
    p.add_argument("--max-num-seqs", type=_positive_int, help="most sequences in a batch (default: 64)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own, so the HTTP front never holds the GIL the engine "
                        "needs to start each step (default: on; --no-engine-process: a thread of the server's process)")
    for action in p._actions:
        if action.dest == "format":
            action.choices = None
            action.help = ("the default model's format; with --dummy the dummy weights' format (bf16, fp8, fp8-kv, "
                           "fp8-pcpt, fp8-pb-wo, nvfp4, nvfp4-kv) (default: %(default)s)")


def check_engine_options(args: argparse.Namespace) -> None:
    """Refuse bad engine options by name, before anything loads."""
    from mopt.engine.args import check_device

    if args.dummy:
        from mopt.engine.dummy import DUMMY_FORMATS, load_config

        if args.model:
            raise ValueError(f"give a MODEL or --dummy PRESET, not both (got {args.model!r} and {args.dummy!r})")
        if args.format not in DUMMY_FORMATS:
            raise ValueError(f"--format {args.format}: dummy formats are {', '.join(DUMMY_FORMATS)}")
        load_config(args.dummy)
    else:
        from mopt.engine.default_model import default_formats

        if args.format not in default_formats():
            raise ValueError(f"--format {args.format}: the default model's formats are {', '.join(default_formats())}")
        default_name = args.model is None or args.model.split(":")[0] == "smollm2"
        if not default_name and not Path(args.model).is_dir():
            raise ValueError(f"{args.model}: no such checkpoint folder (or say smollm2[:FORMAT] for the default model)")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such folder")
    check_device(args.device)


def make_llm(args: argparse.Namespace):
    """The engine the options describe (the default model is built on first use)."""
    from mopt.cli.common import _model_path, _torch_dtype, parallel_kwargs
    from mopt.console import quiet_libraries

    if args.backend:
        os.environ["MOPT_BACKEND"] = args.backend
    path = None if args.dummy else _model_path(args.model, args.format, args.verbose)
    kwargs = dict(device=args.device, dtype=_torch_dtype(args.dtype), max_model_len=args.max_model_len,
                  kv_cache_dtype=args.kv_cache_dtype, enforce_eager=args.enforce_eager, tokenizer=args.tokenizer,
                  progress=True, **parallel_kwargs(args))
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    with quiet_libraries(args.verbose):
        from mopt.engine.llm import LLM

        if args.dummy:
            return LLM(args.dummy, load_format="dummy", quantization=args.format, **kwargs)
        return LLM(path, **kwargs)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that give another ``mopt`` command the same engine."""
    flags = [args.model] if args.model else []
    flags += ["--format", args.format, "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype]
    for option in ("device", "backend", "dummy", "tokenizer", "max_model_len", "max_num_seqs"):
        value = getattr(args, option)
        if value is not None:
            flags += [f"--{option.replace('_', '-')}", str(value)]
    if getattr(args, "tensor_parallel_size", 1) > 1:
        flags += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    for option in ("enforce_eager", "enable_expert_parallel"):
        if getattr(args, option, False):
            flags.append(f"--{option.replace('_', '-')}")
    if not getattr(args, "engine_process", True):
        flags.append("--no-engine-process")
    return flags


def served_model_name(args: argparse.Namespace) -> str:
    return getattr(args, "served_model_name", None) or args.dummy or args.model or "smollm2"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from mopt.cli.common import _number, _positive_int

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_number(int, lambda v: 0 <= v <= 65535, "a port in [0, 65535]"), default=8000, help="port (0: any free one; default: %(default)s)")
    p.add_argument("--served-model-name", help="the model name clients give (default: MODEL as given, the "
                   "preset with --dummy, or smollm2)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=_positive_int, default=DEFAULT_MAX_QUEUE,
                   help="most requests waiting for a batch slot; beyond it requests get 429 (default: %(default)s)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: %(default)s)")


def api_key(args: argparse.Namespace) -> str | None:
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("--api-key must not be empty")
    return key


def torchrun_follower() -> bool:
    """Whether this process is a torchrun rank other than 0: it serves rank 0's commands inside
    ``make_llm`` until rank 0 ends (a ``SystemExit``), so it needs no engine process."""
    from mopt.engine.tp_launch import torchrun_env

    env = torchrun_env()
    return env is not None and int(env["WORLD_SIZE"]) > 1 and int(env["RANK"]) != 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mopt.serve import require_serve_extra

    require_serve_extra()
    check_engine_options(args)
    key = api_key(args)
    from mopt.engine.async_engine import AsyncEngine
    from mopt.engine.process_client import EngineProcessClient
    from mopt.serve.server import bind_socket, serve

    sock = bind_socket(args.host, args.port)
    engine = None
    try:
        if args.engine_process and not torchrun_follower():
            engine = EngineProcessClient(functools.partial(make_llm, args), args.max_queue)
        else:
            engine = AsyncEngine(make_llm(args), args.max_queue)
        serve(engine, sock, served_model_name(args), key, args.log_level)
    finally:
        sock.close()
        if engine is not None:
            engine.release()
    return 0
