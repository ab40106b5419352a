"""The ``mopt`` argument parser. Each subcommand's module imports only the standard library at the top,
so that building the parser (and ``mopt --help``) loads no torch."""

from __future__ import annotations

import argparse

from mopt.cli.bench import cmd_bench_generate, cmd_bench_kernels, cmd_bench_moe
from mopt.cli.checkpoint import cmd_inspect, cmd_quantize
from mopt.cli.common import _nonnegative_int, _positive_int, _probability, _temperature, add_parallel_args
from mopt.cli.run import cmd_chat, cmd_eval, cmd_generate


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

    p = bench.add_parser("moe", help="fused-MoE layers (Qwen3-30B-A3B, Mixtral-8x7B shapes) in each expert format")
    p.add_argument("--tokens", help="token counts, e.g. 1,16 (default: 1,16,256,4096)")
    p.add_argument("--formats", help="comma list of expert formats (default: bf16,fp8,fp8-pcpt,nvfp4; also "
                                     "fp8-pb-wo, w4a16-nvfp4, w4a8-nvfp4-fp8, int8-wo, int8-sq, mxfp8, mxfp4, "
                                     "mxfp4-wo, w4a8-mxfp4-fp8)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench_moe)

    p = sub.add_parser("quantize", help="quantize a Hugging Face model with NVIDIA ModelOpt and export it")
    p.add_argument("hf_model_dir")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_quantize)
    return parser
