"""The ``mopt`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _model_path(arg: str | None, fmt: str) -> Path:
    if arg:
        return Path(arg)
    from mopt.engine.default_model import build_default_model

    return build_default_model(fmt, progress=lambda m: print(m, file=sys.stderr))


def cmd_inspect(args) -> int:
    from mopt.engine.inspect import format_inspection, inspect_checkpoint

    print(format_inspection(inspect_checkpoint(_model_path(args.model, args.format)), args.max_layers))
    return 0


def cmd_quantize(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mopt.engine.default_model import calibration_batches
    from mopt.quantize import export_checkpoint, quantize_model

    tokenizer = AutoTokenizer.from_pretrained(args.hf_model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_model_dir, dtype=torch.float32).eval()
    print(f"quantizing {args.hf_model_dir} to {args.format} ...", file=sys.stderr)
    quantize_model(model, args.format, calibration_batches(tokenizer))
    out = export_checkpoint(model, args.output, save_extra=lambda d: tokenizer.save_pretrained(d))
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mopt.quantize import FORMATS

    parser = argparse.ArgumentParser(prog="mopt", description="Run NVIDIA ModelOpt checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="quant config, per-layer methods, bytes by dtype")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded SmolLM2 model)")
    p.add_argument("--format", default="fp8-kv", choices=sorted(FORMATS), help="default model's format")
    p.add_argument("--max-layers", type=int, default=40)
    p.set_defaults(func=cmd_inspect)
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


if __name__ == "__main__":
    sys.exit(main())
