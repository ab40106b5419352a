"""``mopt inspect`` and ``mopt quantize``."""

from __future__ import annotations

from pathlib import Path

from mopt.cli.common import _model_path


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
