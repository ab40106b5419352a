"""The ``mopt`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
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


def _make_llm(args):
    from mopt.console import quiet_libraries

    if args.backend:
        os.environ["MOPT_BACKEND"] = args.backend
    path = _model_path(args.model, args.format, args.verbose)
    with quiet_libraries(args.verbose):
        from mopt.engine.llm import LLM

        return LLM(path, device=args.device, dtype=_torch_dtype(args.dtype), max_model_len=args.max_model_len,
                   kv_cache_dtype=args.kv_cache_dtype, progress=True, **parallel_kwargs(args))


def _sampling(args):
    from mopt.engine.sequence import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _use_chat_template(llm, args) -> bool:
    if args.raw:
        return False
    has_template = llm.tokenizer is not None and bool(getattr(llm.tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise ValueError(f"{llm.path}: --chat needs a tokenizer with a chat template")
    return has_template


def cmd_generate(args) -> int:
    from mopt.console import quiet_libraries

    params = _sampling(args)  # a bad option fails here, before any model loads
    llm = _make_llm(args)
    chat = _use_chat_template(llm, args)
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) if chat else p for p in args.prompt]
    start = time.perf_counter()
    with quiet_libraries(args.verbose):
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    seconds = time.perf_counter() - start
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {args.prompt[i]!r} ({out.finish_reason})")
        print(out.text)
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"[{generated} tokens in {seconds:.2f} s, {generated / seconds:.1f} tokens/s, "
          f"{llm.device.type}, {str(llm.dtype).removeprefix('torch.')}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _make_llm(args)
    _use_chat_template(llm, argparse.Namespace(raw=False, chat=True))
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chatting with", llm.path.name, "- /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for delta in llm.stream(llm.chat_prompt(history), params):
            reply.append(delta)
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_eval(args) -> int:
    from mopt.console import quiet_libraries
    from mopt.engine.evaluate import EVAL_TEXT

    text_file = Path(args.text) if args.text else EVAL_TEXT
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--text {text_file}: cannot read the evaluation text ({e})") from None
    if args.backend:
        os.environ["MOPT_BACKEND"] = args.backend
    path = _model_path(args.model, args.format, args.verbose)
    ref_path = _model_path(args.reference, args.format, args.verbose) if args.reference else None
    with quiet_libraries(args.verbose):
        import torch
        from transformers import AutoTokenizer

        from mopt.engine.evaluate import evaluate
        from mopt.engine.llm import default_device, default_dtype
        from mopt.engine.loader import load_model

        device = torch.device(args.device) if args.device else default_device()
        dtype = _torch_dtype(args.dtype) or default_dtype(device)
        ids = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
        model = load_model(path, device, dtype, args.kv_cache_dtype, progress=True, **parallel_kwargs(args))
        reference = load_model(ref_path, device, dtype, "auto", progress=True, **parallel_kwargs(args)) \
            if ref_path else None
        result = evaluate(model, ids, args.context, reference, progress=True)
    rows = [("model", str(path)), ("text", f"{text_file} ({result.tokens} predicted tokens, "
                                           f"{result.windows} windows of <= {args.context})"),
            ("perplexity", f"{result.perplexity:.4f}")]
    if reference is not None:
        rows += [("reference", str(ref_path)), ("reference perplexity", f"{result.reference_perplexity:.4f}"),
                 ("mean KL(reference || model)", f"{result.mean_kl:.6f}"),
                 ("top-1 agreement", f"{100 * result.top1_agreement:.2f}%")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(result.to_dict(), model=str(path), text=str(text_file)), indent=2))
    return 0


def cmd_inspect(args) -> int:
    from mopt.engine.inspect import format_inspection, inspect_checkpoint

    path = _model_path(args.model, args.format, args.verbose)
    print(format_inspection(inspect_checkpoint(path), args.max_layers))
    if args.tensor_parallel_size > 1:
        from mopt.console import quiet_libraries
        from mopt.engine.loader import read_model_spec
        from mopt.engine.tp_plan import format_plan, shard_plan

        with quiet_libraries(args.verbose):
            _, config, quant, _, _ = read_model_spec(path)
            plan = shard_plan(config, quant, args.tensor_parallel_size, args.enable_expert_parallel)
        print(format_plan(plan, args.max_layers))
    return 0


def cmd_quantize(args) -> int:
    from mopt.console import quiet_libraries, status

    if not Path(args.hf_model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{args.hf_model_dir}: no config.json (a Hugging Face model folder is expected)")
    with quiet_libraries(args.verbose):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mopt.engine.default_model import calibration_batches
        from mopt.quantize import export_checkpoint, quantize_model

        with status(f"reading {args.hf_model_dir}"):
            tokenizer = AutoTokenizer.from_pretrained(args.hf_model_dir)
            model = AutoModelForCausalLM.from_pretrained(args.hf_model_dir, dtype=torch.float32).eval()
        with status(f"quantizing with NVIDIA ModelOpt ({args.format})"):
            quantize_model(model, args.format, calibration_batches(tokenizer), progress=True)
        with status(f"exporting to {args.output}"):
            out = export_checkpoint(model, args.output, save_extra=lambda d: tokenizer.save_pretrained(d))
    print(out)
    return 0


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


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
    title = (f"mopt bench generate on {where}, torch {torch.__version__}, {torch_threads()} CPU threads, "
             f"python {platform.python_version()}"
             + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""))
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
                                                   rows=bench.rows_to_dicts(rows), prefill=prefills), indent=2))
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
    from mopt.bench.moe import CONFIGS, FORMATS, TOKENS, bench_moe, format_rows

    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
    formats = args.formats.split(",") if args.formats else FORMATS
    return _run_gpu_bench("moe", args, lambda save: bench_moe(CONFIGS, tokens, formats=formats), format_rows)


def torch_device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    from mopt.bench.kernel_formats import FORMATS as BENCH_FORMATS
    from mopt.engine.default_model import default_formats
    from mopt.quantize import FORMATS

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show what libraries print and warn, and info logs (on stderr)")
    parser = argparse.ArgumentParser(prog="mopt", description="Run NVIDIA ModelOpt checkpoints.", parents=[verbose])
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[verbose], **k)
    p = sub.add_parser("inspect", help="quant config, per-layer methods, bytes by dtype")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded SmolLM2 model)")
    p.add_argument("--format", default="fp8-kv", choices=default_formats(), help="default model's format")
    p.add_argument("--max-layers", type=_positive_int, default=40,
                   help="rows of the per-layer table to print (default: %(default)s)")
    add_parallel_args(p)
    p.set_defaults(func=cmd_inspect)

    def model_args(p, default_format="fp8-kv"):
        p.add_argument("model", nargs="?", help="checkpoint folder, or smollm2[:FORMAT] "
                       "(default: the embedded SmolLM2 model in --format)")
        p.add_argument("--format", default=default_format, choices=default_formats(),
                       help="the default model's format (default: %(default)s)")
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="activation dtype (default: bfloat16 on GPU, float32 on CPU)")
        p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                       help="auto: FP8 when the checkpoint has KV-cache scales")
        p.add_argument("--backend", choices=["reference", "cpu", "triton", "cublas"],
                       help="force a kernel backend (same as MOPT_BACKEND)")
        add_parallel_args(p)

    def sampling_args(p, max_tokens):
        p.add_argument("--max-tokens", type=_positive_int, default=max_tokens,
                       help="tokens to generate at most (default: %(default)s)")
        p.add_argument("--max-model-len", type=_positive_int, help="context length (default: the model's)")
        p.add_argument("--temperature", type=_temperature, default=0.0, help="0 is greedy (default)")
        p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (default: 1, off)")
        p.add_argument("--top-k", type=_nonnegative_int, default=0, help="sample among the k likeliest (0: off)")
        p.add_argument("--seed", type=_nonnegative_int, help="seed of the request's own random stream")
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--ignore-eos", action="store_true")

    p = sub.add_parser("generate", help="complete prompts (through the chat template when the model has one)")
    model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="require the chat template")
    mode.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    sampling_args(p, 256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    model_args(p)
    p.add_argument("--system", help="system message")
    sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="perplexity on a text; with --reference also KL divergence and top-1 agreement")
    model_args(p)
    p.add_argument("--text", help="UTF-8 text file (default: the English text mopt ships)")
    p.add_argument("--reference", help="reference checkpoint folder or smollm2[:FORMAT]")
    p.add_argument("--context", type=_positive_int, default=512, help="window length in tokens (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    from mopt.serve.command import add_engine_arguments, add_serve_arguments, cmd_serve

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra)")
    model_args(p)
    add_engine_arguments(p)
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks (generation throughput; serving; GPU kernels)")
    bench = p.add_subparsers(dest="bench", required=True)
    _add_bench_parser = bench.add_parser
    bench.add_parser = lambda *a, **k: _add_bench_parser(*a, parents=[verbose], **k)
    p = bench.add_parser("generate", help="prefill and decode tokens/s of a checkpoint or a dummy preset")
    model_args(p)
    p.set_defaults(format="fp8-kv")
    for action in p._actions:
        if action.dest == "format":
            action.choices = None
            action.help = ("the default model's format; with --dummy a comma list of bf16, fp8, fp8-kv, fp8-pcpt, "
                           "fp8-pb-wo, nvfp4, nvfp4-kv (default: %(default)s)")
    p.add_argument("--dummy", metavar="PRESET",
                   help="random weights of a preset's shape (llama3-8b, llama3-1b, qwen3-8b, qwen3-30b-a3b, "
                        "mixtral-8x7b) or of a checkpoint folder's config, in each --format")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", type=_positive_int, default=64, help="prompt tokens (default: %(default)s)")
    p.add_argument("--tokens", type=_positive_int, default=64, help="tokens generated per sequence (default: %(default)s)")
    p.add_argument("--max-model-len", type=_positive_int, help="default: prompt length + tokens + 16")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="read each step's tokens before queuing the next (the default on GPUs overlaps them)")
    p.add_argument("--baseline", choices=["hf"], help="also run transformers' generate (BF16, eager) in the same run")
    p.add_argument("--prefill", metavar="BxT", type=lambda v: v.replace("x", ","),
                   help="also time one prefill of B prompts of T tokens against cuBLAS on the same GEMMs (e.g. 8x1024)")
    p.add_argument("--profile", metavar="FILE", help="write torch.profiler tables of decode steps (per row) to FILE")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench_generate)

    from mopt.bench.serve_command import add_arguments as add_bench_serve_arguments, cmd_bench_serve

    p = bench.add_parser("serve", help="load on an OpenAI-compatible server (started here, or --url): output "
                         "tok/s, TTFT, TPOT; --offline-baseline compares with LLM.generate")
    model_args(p)
    add_engine_arguments(p)
    add_bench_serve_arguments(p)
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("kernels", help="GPU linear kernels of every format vs BF16 cuBLAS and _scaled_mm, one run")
    p.add_argument("--formats", help=f"comma list of linear formats (default: all: {', '.join(BENCH_FORMATS)})")
    p.add_argument("--shapes", help="NxK list, e.g. 4096x4096,28672x4096 (default: Llama-3-8B layers)")
    p.add_argument("--tokens", help="M list, e.g. 1,16,128 (default: 1,16,128,2048,8192)")
    p.add_argument("--iters", type=_positive_int, default=20, help="calls per CUDA graph (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="graph replays; the median is reported (default: %(default)s)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench_kernels)

    p = bench.add_parser("moe", help="fused-MoE layers (Qwen3-30B-A3B, Mixtral-8x7B shapes), BF16, FP8, NVFP4")
    p.add_argument("--tokens", help="token counts, e.g. 1,16 (default: 1,16,256,4096)")
    p.add_argument("--formats", help="comma list of bf16,fp8,nvfp4 (default: all)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench_moe)

    p = sub.add_parser("quantize", help="quantize a Hugging Face model with NVIDIA ModelOpt and export it")
    p.add_argument("hf_model_dir")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_quantize)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
