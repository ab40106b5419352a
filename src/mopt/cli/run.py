"""``mopt generate``, ``mopt chat`` and ``mopt eval``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mopt.cli.common import _make_llm, _model_path, _sampling, _torch_dtype, parallel_kwargs


def _use_chat_template(llm, args) -> bool:
    if args.raw:
        return False
    has_template = llm.tokenizer is not None and bool(getattr(llm.tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise ValueError(f"{llm.path}: --chat needs a tokenizer with a chat template")
    return has_template


def _require_chat_template_first(args) -> Path:
    """Chatting needs the tokenizer's chat template: look for it before the model loads (which, with
    ``-tp N``, starts N - 1 processes too), and return the model's folder for that load. Folders without
    tokenizer files are left to the engine."""
    path = _model_path(args.model, args.format, args.verbose)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return path
    from mopt.console import quiet_libraries
    from mopt.engine.tokenizer import load_tokenizer

    with quiet_libraries(args.verbose):
        tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{path}: --chat needs a tokenizer with a chat template")
    return path


def cmd_generate(args) -> int:
    from mopt.console import quiet_libraries

    params = _sampling(args)  # a bad option fails here, before any model loads
    llm = _make_llm(args, _require_chat_template_first(args) if args.chat else None)
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
    llm = _make_llm(args, _require_chat_template_first(args))
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
        from mopt.engine.evaluate import evaluate
        from mopt.engine.llm import default_device, default_dtype
        from mopt.engine.loader import load_model
        from mopt.engine.tokenizer import load_tokenizer

        device = torch.device(args.device) if args.device else default_device()
        dtype = _torch_dtype(args.dtype) or default_dtype(device)
        ids = load_tokenizer(path)(text)["input_ids"]
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
