"""What the ``mopt`` subcommands share: the model argument, option types, engine construction."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2"


def _model_path(arg: str | None, fmt: str, verbose: bool = False) -> Path:
    """A checkpoint folder, or the embedded default model: ``None`` (in ``fmt``), ``smollm2`` or
    ``smollm2:FORMAT`` (built on first use, with a status line per step)."""
    if arg and arg.split(":")[0] != DEFAULT_MODEL_NAME:
        path = Path(arg)
        if not path.is_dir():
            raise FileNotFoundError(f"{arg}: no such checkpoint folder "
                                    f"(or say {DEFAULT_MODEL_NAME}[:FORMAT] for the embedded default model)")
        return path
    from mopt.console import quiet_libraries
    from mopt.engine.default_model import build_default_model

    if arg and ":" in arg:
        fmt = arg.split(":", 1)[1]
    with quiet_libraries(verbose):
        return build_default_model(fmt, progress=True)


def _number(kind: type, ok, expected: str):
    """An argparse type: ``kind(text)`` that satisfies ``ok`` (argparse names the option in its error)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_temperature = _number(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """``--tensor-parallel-size/-tp N`` and ``--enable-expert-parallel``: for every command that loads a
    model (pass ``parallel_kwargs(args)`` on to ``LLM`` or ``load_model``)."""
    p.add_argument("-tp", "--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                   help="shard the model over N GPUs of this node (or N CPU processes); under torchrun, "
                        "N must be its WORLD_SIZE (default: %(default)s)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with tensor parallelism, give each rank whole MoE experts instead of a slice of every expert")


def parallel_kwargs(args) -> dict:
    """The ``LLM``/``load_model`` keyword arguments of ``add_parallel_args``' options."""
    return dict(tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                enable_expert_parallel=getattr(args, "enable_expert_parallel", False))


def _torch_dtype(name: str | None):
    import torch

    return {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def _make_llm(args, path: Path | None = None):
    """The engine of ``args`` on ``path`` (default: ``args.model`` resolved by ``_model_path``)."""
    from mopt.console import quiet_libraries

    if args.backend:
        os.environ["MOPT_BACKEND"] = args.backend
    path = path or _model_path(args.model, args.format, args.verbose)
    with quiet_libraries(args.verbose):
        from mopt.engine.llm import LLM

        return LLM(path, device=args.device, dtype=_torch_dtype(args.dtype), max_model_len=args.max_model_len,
                   kv_cache_dtype=args.kv_cache_dtype, progress=True, **parallel_kwargs(args))


def _sampling(args):
    from mopt.engine.sequence import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values
