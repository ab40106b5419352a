"""Arguments of ``mopt.LLM(...)`` and ``mopt.load_model(...)``, checked before anything is loaded."""

from __future__ import annotations

import os
from typing import Any

import torch

from mopt.errors import EngineArgumentError
from mopt.kernels.env import pdl_setting

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KV_CACHE_DTYPES = ("auto", "fp8")
LOAD_FORMATS = ("auto", "dummy")


def check_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` mopt can run on (``None`` stays ``None``: the default)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise EngineArgumentError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise EngineArgumentError(f"device {device!r} is not a device name ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise EngineArgumentError(f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise EngineArgumentError(f"device {device!r}: no CUDA GPU is available (torch {torch.__version__}, "
                                  f"{build}); use device='cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EngineArgumentError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype in DTYPES:
        return dtype
    raise EngineArgumentError(f"dtype must be one of {[str(d) for d in DTYPES]} or None, got {dtype!r}")


def check_kv_cache_dtype(kv_cache_dtype: Any) -> str:
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in KV_CACHE_DTYPES:
        return kv_cache_dtype
    raise EngineArgumentError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if type(value) is not int or value < 1:
        shown = "an integer >= 1" + (" or None" if optional else "")
        raise EngineArgumentError(f"{name} must be {shown}, got {value!r}")


def check_model_path(model: Any) -> None:
    if not isinstance(model, (str, os.PathLike)):
        raise EngineArgumentError(f"model must be a checkpoint folder path, got {type(model).__name__}")


def check_load_format(model: Any, load_format: Any, quantization: Any) -> None:
    """A checkpoint (``"auto"``) brings its own format; dummy weights (``"dummy"``) take ``quantization``."""
    if load_format not in LOAD_FORMATS:
        raise EngineArgumentError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    if load_format == "auto":
        check_model_path(model)
        if quantization is not None:
            raise EngineArgumentError("quantization chooses the format of dummy weights; a checkpoint brings its own "
                                      "(pass load_format='dummy')")
        return
    from mopt.engine.dummy import DUMMY_FORMATS

    if quantization is not None and quantization not in DUMMY_FORMATS:
        raise EngineArgumentError(f"quantization must be one of {list(DUMMY_FORMATS)} or None, got {quantization!r}")


def check_parallel_args(tensor_parallel_size: Any, enable_expert_parallel: Any, device: Any) -> None:
    """``tensor_parallel_size`` ranks, one per GPU of this node (or per torchrun process), or CPU processes."""
    check_positive_int("tensor_parallel_size", tensor_parallel_size)
    if not isinstance(enable_expert_parallel, bool):
        raise EngineArgumentError(f"enable_expert_parallel must be True or False, got {enable_expert_parallel!r}")
    if tensor_parallel_size == 1:
        return
    dev = check_device(device)
    if dev is not None and dev.index is not None:
        raise EngineArgumentError(f"device {device!r}: with tensor_parallel_size {tensor_parallel_size} rank r runs on "
                                  "cuda:LOCAL_RANK; pass device='cuda' (select GPUs with CUDA_VISIBLE_DEVICES)")
    world = os.environ.get("WORLD_SIZE")
    if "RANK" in os.environ and world is not None and world != "1":
        if world != str(tensor_parallel_size):
            raise EngineArgumentError(f"tensor_parallel_size is {tensor_parallel_size} but this process runs under "
                                      f"torchrun with WORLD_SIZE={world}: they must be equal")
        return
    cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < tensor_parallel_size:
        raise EngineArgumentError(f"tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} GPUs on "
                                  f"this node, there are {torch.cuda.device_count()} (use torchrun across nodes)")


def check_engine_args(*, model: Any, device: Any, dtype: Any, kv_cache_dtype: Any, max_model_len: Any,
                      block_size: Any, max_num_seqs: Any, max_num_batched_tokens: Any,
                      kv_cache_memory: Any, load_format: Any = "auto", quantization: Any = None,
                      enforce_eager: Any = False, async_scheduling: Any = None, tensor_parallel_size: Any = 1,
                      enable_expert_parallel: Any = False, tokenizer: Any = None) -> None:
    """Raise :class:`EngineArgumentError` naming the first argument of ``LLM(...)`` that is invalid."""
    check_load_format(model, load_format, quantization)
    if not isinstance(enforce_eager, bool):
        raise EngineArgumentError(f"enforce_eager must be True or False, got {enforce_eager!r}")
    if async_scheduling is not None and not isinstance(async_scheduling, bool):
        raise EngineArgumentError(f"async_scheduling must be True, False or None, got {async_scheduling!r}")
    check_device(device)
    check_dtype(dtype)
    check_kv_cache_dtype(kv_cache_dtype)
    for name, value, optional in (("max_model_len", max_model_len, True), ("block_size", block_size, False),
                                  ("max_num_seqs", max_num_seqs, False),
                                  ("max_num_batched_tokens", max_num_batched_tokens, True),
                                  ("kv_cache_memory", kv_cache_memory, True)):
        check_positive_int(name, value, optional)
    check_parallel_args(tensor_parallel_size, enable_expert_parallel, device)
    try:
        pdl_setting()
    except ValueError as e:
        raise EngineArgumentError(str(e)) from None
    if tokenizer is not None and (not isinstance(tokenizer, (str, os.PathLike)) or not os.path.isdir(tokenizer)):
        raise EngineArgumentError(f"tokenizer must be a folder with tokenizer files, got {tokenizer!r}")
