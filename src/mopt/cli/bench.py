"""``mopt bench generate``, ``mopt bench kernels`` and ``mopt bench moe`` (``mopt bench serve`` lives in
``mopt.bench.serve_command``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mopt.cli.common import _model_path, _positive_ints, _torch_dtype, parallel_kwargs


def cmd_bench_generate(args) -> int:
    from mopt.engine.presets import DUMMY_FORMATS

    batches = _positive_ints(args.batch, "--batch")
    prefill = _positive_ints(args.prefill, "--prefill") if args.prefill else None
    if args.dummy:
        formats = args.format.split(",")
        bad = [f for f in formats if f not in DUMMY_FORMATS]
        if bad:
            raise ValueError(f"--format {','.join(bad)}: dummy formats are {', '.join(DUMMY_FORMATS)}")
    elif "," in args.format or args.format not in _default_formats():
        raise ValueError(f"--format {args.format}: one of {', '.join(_default_formats())} (several formats need --dummy)")
    if args.baseline == "hf" and not args.dummy:
        raise ValueError("--baseline hf needs --dummy PRESET (it runs transformers on the same config)")
    import gc
    import platform

    import torch

    from mopt.bench import generate as bench
    from mopt.console import quiet_libraries, status
    from mopt.engine import tp_runtime

    if args.dummy:
        from mopt.engine.dummy import load_config

        config = load_config(args.dummy)
    device = torch.device(args.device) if args.device else None
    if args.backend:
        os.environ["MOPT_BACKEND"] = args.backend
    max_len = args.max_model_len or args.prompt_len + args.tokens + 16
    if prefill:
        max_len = max(max_len, prefill[1] + 16)
    rows, prefills, profiles = [], [], {}
    bandwidth = None

    def measure(llm, label):
        nonlocal bandwidth
        if llm.device.type == "cuda" and bandwidth is None:
            bandwidth = bench.copy_bandwidth(llm.device)
        with status(f"benchmarking {label}"):
            rows.extend(bench.bench_generate(llm, batches, args.prompt_len, args.tokens, label, bandwidth))
            if prefill:
                prefills.append(dict(bench.bench_prefill(llm, prefill[0], prefill[1]), label=label))
            if args.profile:
                for b in batches:
                    profiles[f"{label} batch {b}"] = bench.profile_decode(llm, b, args.prompt_len)

    batched_tokens = max([max(batches) * args.prompt_len] + ([prefill[0] * prefill[1]] if prefill else []))
    engine = dict(device=device, dtype=_torch_dtype(args.dtype), max_model_len=max_len,
                  kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=max(batches + ([prefill[0]] if prefill else [])),
                  max_num_batched_tokens=max(batched_tokens, max_len), enforce_eager=args.enforce_eager,
                  async_scheduling=False if args.no_async_scheduling else None, progress=True,
                  **parallel_kwargs(args))
    if args.dummy:
        for fmt in formats:
            with status(f"building {args.dummy} with {fmt} dummy weights"), quiet_libraries(args.verbose):
                llm = _make_engine(args.dummy, dict(engine, load_format="dummy", quantization=fmt))
            with quiet_libraries(args.verbose):
                measure(llm, f"{args.dummy} {fmt}")
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    else:
        path = _model_path(args.model, args.format, args.verbose)
        with quiet_libraries(args.verbose):
            llm = _make_engine(path, engine)
            measure(llm, llm.path.name)
        del llm
        gc.collect()
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if args.baseline == "hf":
        with status("benchmarking transformers generate"), quiet_libraries(args.verbose):
            rows.extend(bench.bench_hf_generate(config, batches, args.prompt_len, args.tokens, device))
    where = torch_device_name(device)
    collectives = tp_runtime.describe_collectives()
    title = (f"mopt bench generate on {where}, torch {torch.__version__}, {torch_threads()} CPU threads, "
             f"python {platform.python_version()}"
             + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else "")
             + (f"; tensor parallel: {collectives}" if collectives else ""))
    print(bench.format_rows(rows, title))
    for p in prefills:
        if "gemm_share" not in p:
            print(f"prefill {p['label']}: {p['batch']}x{p['prompt_len']} tokens in {p['prefill_ms']:.1f} ms")
            continue
        print(f"prefill {p['label']}: {p['batch']}x{p['prompt_len']} tokens in {p['prefill_ms']:.1f} ms, "
              f"{p['gemm_tflops']:.0f} GEMM TFLOP/s; cuBLAS on the same GEMMs {p['cublas_gemm_ms']:.1f} ms "
              f"({p['cublas_tflops']:.0f} TFLOP/s): {100 * p['gemm_share']:.0f}% of cuBLAS's rate")
    if args.profile:
        Path(args.profile).write_text("".join(f"=== {name}\n{table}\n" for name, table in profiles.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=where, torch=torch.__version__, copy_bandwidth=bandwidth,
                                                   tensor_parallel=collectives, rows=bench.rows_to_dicts(rows),
                                                   prefill=prefills), indent=2))
    return 0


def _make_engine(model, engine: dict):
    from mopt.engine.llm import LLM

    return LLM(model, **engine)


def _default_formats() -> list[str]:
    from mopt.engine.default_model import default_formats

    return default_formats()


def _run_gpu_bench(what: str, args, run, format_rows) -> int:
    """Runs ``run(save) -> rows`` on the GPU, prints the table and writes ``--json`` if asked; ``run`` may
    call ``save(rows so far)`` to write partial results (a run cut short keeps them)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"mopt bench {what} needs a CUDA GPU (torch {torch.__version__} sees none)")
    name = torch.cuda.get_device_name()
    saved: list[dict] = []

    def save(rows: list[dict]) -> None:
        saved[:] = rows
        if args.json:
            Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows), indent=2))

    try:
        rows = run(save)
    except KeyboardInterrupt:  # e.g. a timeout's SIGINT: the rows measured so far, then stop
        if saved:
            print(format_rows(saved, name + " (interrupted)"))
        raise
    print(format_rows(rows, name))
    save(rows)
    return 0


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes: expected comma-separated NxK (e.g. 4096x4096,28672x4096), got {text!r}")
    return shapes


def cmd_bench_kernels(args) -> int:
    from mopt.bench.kernel_formats import parse_formats

    try:
        formats = parse_formats(args.formats)
    except ValueError as e:
        raise ValueError(f"--formats: {e}") from None
    shapes = _shapes(args.shapes) if args.shapes else None
    tokens = _positive_ints(args.tokens, "--tokens") if args.tokens else None
    from mopt.bench.kernels import SHAPES, TOKENS, bench_kernels, format_rows

    def progress(rows: list[dict], save) -> None:
        last = rows[-1]
        done = (f"error: {last['error']}" if "error" in last
                else f"{last['kernel']}, {last['vs_bf16']:.2f}x BF16 at M={last['m']}")
        print(f"bench kernels: {last['n']}x{last['k']} {last['format']}: {done}", file=sys.stderr, flush=True)
        save(rows)

    return _run_gpu_bench("kernels", args, lambda save: bench_kernels(
        shapes or SHAPES, tokens or TOKENS, formats, args.iters, args.repeats, on_rows=lambda r: progress(r, save)),
        format_rows)


def cmd_bench_moe(args) -> int:
    from mopt.bench.moe import CONFIGS, FORMATS, TOKENS, bench_moe, check_formats, format_rows

    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
    formats = args.formats.split(",") if args.formats else FORMATS
    check_formats(formats)
    return _run_gpu_bench("moe", args, lambda save: bench_moe(CONFIGS, tokens, formats=formats, on_rows=save),
                          format_rows)


def torch_device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
