"""``mopt bench generate``: end-to-end generation throughput of a checkpoint or a dummy preset.

For each batch size, ``batch`` prompts of ``prompt_len`` tokens (distinct tokens, so nothing can
be shared) generate ``tokens`` tokens each with ``ignore_eos``, after a warm-up run. Reported:
time to first token (the prefill step of the whole batch), prefill tokens/s, decode tokens/s
(generated tokens after the first over the remaining time) and the decode step time.

On GPUs also the share of the HBM roofline: the bytes one decode step must read (every weight
once, the embedding rows it looks up, the experts a batch of that size touches on average under
uniform routing, and the KV cache of every sequence at its mean context length) over the
device-to-device copy bandwidth measured in the same run, against the measured step time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mopt.engine.llm import LLM
from mopt.engine.sequence import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written (median of ``repeats``)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:])


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_weight_bytes(model: torch.nn.Module, batch: int) -> float:
    """Weight bytes one decode step of ``batch`` sequences reads (see the module docstring)."""
    from mopt.layers.basic import VocabEmbedding
    from mopt.layers.fused_moe import FusedMoE

    total = 0.0
    for module in model.modules():
        own = sum(_tensor_bytes(p) for p in module.parameters(recurse=False))
        if isinstance(module, VocabEmbedding):
            total += min(batch, module.weight.shape[0]) * _tensor_bytes(module.weight[0])
        elif isinstance(module, FusedMoE):
            e, k = module.num_experts, module.top_k
            touched = e * (1 - (1 - k / e) ** batch)
            total += own * touched / e
        else:
            total += own
    return total


@dataclass
class Row:
    label: str
    batch: int
    prompt_len: int
    tokens: int
    ttft_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    step_ms: float | None
    bytes_per_step: float | None = None
    roofline_pct: float | None = None
    cuda_graphs: bool | None = None


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    return [[(b * 7919 + i * 31 + 1) % vocab for i in range(prompt_len)] for b in range(batch)]


def bench_generate(llm: LLM, batch_sizes: list[int], prompt_len: int, tokens: int, label: str = "",
                   bandwidth: float | None = None) -> list[Row]:
    from mopt.engine.runner import kv_bytes_per_token

    rows = []
    for batch in batch_sizes:
        prompts = _prompts(batch, prompt_len, llm.vocab_size)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up
        seqs = [llm._make_sequence(p, params) for p in prompts]
        for s in seqs:
            llm.scheduler.add(s)
        _sync(llm.device)
        start = time.perf_counter()
        llm._step()  # prefill of the whole batch: its first tokens
        _sync(llm.device)
        prefill = time.perf_counter() - start
        while llm.scheduler.has_unfinished():
            llm._step()
        _sync(llm.device)
        steps = tokens - 1  # decode steps (async scheduling takes one more call to read the last tokens)
        decode = time.perf_counter() - start - prefill
        row = Row(label, batch, prompt_len, tokens, 1e3 * prefill, batch * prompt_len / prefill,
                  batch * (tokens - 1) / decode if steps else None, 1e3 * decode / steps if steps else None,
                  cuda_graphs=bool(llm.runner.graphs.graphs) if llm.device.type == "cuda" else None)
        if bandwidth and steps:
            mean_context = prompt_len + tokens / 2
            row.bytes_per_step = (decode_weight_bytes(llm.model, batch)
                                  + batch * mean_context * kv_bytes_per_token(llm.model, llm.dtype))
            row.roofline_pct = 100 * (row.bytes_per_step / bandwidth) / (decode / steps)
        rows.append(row)
    return rows


def bench_hf_generate(config, batch_sizes: list[int], prompt_len: int, tokens: int, device: torch.device,
                      dtype: torch.dtype = torch.bfloat16) -> list[Row]:
    """transformers' ``generate`` (eager, its own random init of ``config``) on the same prompts."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).eval()
    rows = []
    for batch in batch_sizes:
        ids = torch.tensor(_prompts(batch, prompt_len, config.vocab_size), device=device)
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, **kw)  # warm-up
        times = {}
        for n in (1, tokens):
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            _sync(device)
            times[n] = time.perf_counter() - start
        decode = times[tokens] - times[1]
        rows.append(Row("hf-transformers bf16 eager", batch, prompt_len, tokens, 1e3 * times[1],
                        batch * prompt_len / times[1], batch * (tokens - 1) / decode, 1e3 * decode / (tokens - 1)))
    del model
    return rows


def bench_prefill(llm: LLM, batch: int, prompt_len: int, repeats: int = 5) -> dict:
    """One prefill step of ``batch`` prompts of ``prompt_len`` tokens against cuBLAS on the model's GEMM
    shapes at the same token count (BF16 ``F.linear``; ``_scaled_mm`` per-tensor for FP8 layers), timed
    in the same run. ``gemm_share``: cuBLAS's GEMM time over mopt's whole prefill step."""
    from mopt.layers.linear import LinearBase

    prompts = _prompts(batch, prompt_len, llm.vocab_size)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate(prompts, one)  # warm-up
    times = []
    for _ in range(repeats):
        seqs = [llm._make_sequence(p, one) for p in prompts]
        for s in seqs:
            llm.scheduler.add(s)
        _sync(llm.device)
        start = time.perf_counter()
        llm._step()
        _sync(llm.device)
        times.append(time.perf_counter() - start)
    ours = statistics.median(times)
    result = dict(batch=batch, prompt_len=prompt_len, prefill_ms=1e3 * ours)
    if llm.device.type != "cuda":
        return result
    shapes: dict[tuple[int, int, bool, int], int] = {}
    for name, m in llm.model.named_modules():
        if isinstance(m, LinearBase):
            fp8_weights = m.weight.dtype == torch.float8_e4m3fn
            tokens = batch if name.endswith("lm_head") else batch * prompt_len
            key = (m.output_size_per_partition, m.input_size_per_partition, fp8_weights, tokens)
            shapes[key] = shapes.get(key, 0) + 1
    cublas, flops = 0.0, 0.0
    for (n, k, fp8_weights, tokens), count in shapes.items():
        cublas += count * _cublas_gemm_seconds(tokens, n, k, fp8_weights, llm.device)
        flops += count * 2.0 * tokens * n * k
    return dict(result, cublas_gemm_ms=1e3 * cublas, gemm_tflops=flops / ours / 1e12,
                cublas_tflops=flops / cublas / 1e12, gemm_share=cublas / ours)


def _cublas_gemm_seconds(m: int, n: int, k: int, fp8_weights: bool, device: torch.device, repeats: int = 10) -> float:
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    if fp8_weights:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        run = lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        run = lambda: torch.nn.functional.linear(a, b)
    run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def profile_decode(llm: LLM, batch: int, prompt_len: int, steps: int = 8) -> str:
    """torch.profiler table of ``steps`` decode steps of ``batch`` sequences (kernels by CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    prompts = _prompts(batch, prompt_len, llm.vocab_size)
    seqs = [llm._make_sequence(p, SamplingParams(max_tokens=steps + 4, ignore_eos=True)) for p in prompts]
    for s in seqs:
        llm.scheduler.add(s)
    llm._step()
    llm._step()
    _sync(llm.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if llm.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            llm._step()
        _sync(llm.device)
    wall = time.perf_counter() - start
    while llm.scheduler.has_unfinished():
        llm._step()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    head = (f"{steps} decode steps of batch {batch}: wall {1e3 * wall / steps:.3f} ms/step, GPU kernels "
            f"{gpu_us / 1e3 / steps:.3f} ms/step\n")
    return head + events.table(sort_by="self_device_time_total" if llm.device.type == "cuda" else "self_cpu_time_total",
                               row_limit=40)


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def format_rows(rows: list[Row], title: str) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [title, f"{'model':>28} {'batch':>5} {'prompt':>6} {'tokens':>6} {'TTFT ms':>9} {'prefill tok/s':>13} "
                    f"{'decode tok/s':>12} {'step ms':>8} {'GB/step':>8} {'%HBM':>5} {'graphs':>6}"]
    for r in rows:
        gb = None if r.bytes_per_step is None else r.bytes_per_step / 1e9
        graphs = "-" if r.cuda_graphs is None else ("on" if r.cuda_graphs else "off")
        lines.append(f"{r.label[-28:]:>28} {r.batch:>5} {r.prompt_len:>6} {r.tokens:>6} {r.ttft_ms:>9.1f} "
                     f"{r.prefill_tokens_per_s:>13.0f} {num(r.decode_tokens_per_s, '12.1f')} "
                     f"{num(r.step_ms, '8.2f')} {num(gb, '8.2f')} {num(r.roofline_pct, '5.0f')} {graphs:>6}")
    return "\n".join(lines)
