"""``mopt.LLM``: load a checkpoint, generate and chat with a paged KV cache and continuous batching."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from mopt.engine.args import check_engine_args
from mopt.engine.block_manager import BlockManager, blocks_needed
from mopt.engine.checkpoint import CheckpointError
from mopt.engine.loader import load_model
from mopt.engine.prefill_graphs import injected_faults
from mopt.engine.request import check_messages, is_int, prompt_batch, prompt_token_ids
from mopt.engine.runner import ModelRunner, PendingStep, kv_bytes_per_token
from mopt.engine.scheduler import Scheduler
from mopt.engine.sequence import Logprob, RequestOutput, SamplingParams, Sequence, SequenceStatus, TokenLogprobs
from mopt.errors import EngineArgumentError, RequestError
from mopt.jsonio import read_json_object

logger = logging.getLogger(__name__)

_PLACEHOLDER = -1  # stands for a token still on the device while the next step is queued

CPU_KV_CACHE_BYTES = 512 << 20
GPU_MEMORY_UTILIZATION = 0.85

Prompt = str | list[int]
Messages = list[dict[str, str]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """BF16 on GPUs; float32 on CPUs, where BF16 matmuls are several times slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _eos_token_ids(path: Path, config, tokenizer) -> set[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer; a malformed
    generation_config.json is an error (ignoring it would let generation run past EOS)."""
    sources = [("config.json eos_token_id", getattr(config, "eos_token_id", None))]
    gen = path / "generation_config.json"
    if gen.is_file():
        sources.append((f"{gen}: eos_token_id", read_json_object(gen, CheckpointError).get("eos_token_id")))
    if tokenizer is not None:
        sources.append(("the tokenizer's eos_token_id", tokenizer.eos_token_id))
    ids: set[int] = set()
    for where, value in sources:
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(is_int(v) and v >= 0 for v in values):
            raise CheckpointError(f"{where} must be a token id or a list of token ids, got {value!r}")
        ids.update(int(v) for v in values)
    return ids


class LLM:
    """Generate text from a Hugging Face checkpoint (ModelOpt-quantized or not).

    ``model``: a checkpoint folder; with ``load_format="dummy"`` also a preset name
    (``mopt.engine.dummy.preset_names()``) or a config object, built with random weights in the
    checkpoint layout of ``quantization`` (``bf16``, ``fp8``, ``fp8-kv``, ``nvfp4``, ...).
    ``kv_cache_dtype``: ``"auto"`` (FP8 when the checkpoint's quant config says so, else the model
    dtype) or ``"fp8"`` (also for checkpoints without KV scales: scale 1.0, with a warning).
    ``kv_cache_memory``: bytes for the paged cache (default: 512 MiB on CPU, 85% of the GPU's free
    memory after loading); ``max_model_len`` defaults to the model's context length, capped by
    what the cache holds. On GPUs decode steps replay CUDA graphs captured at start-up, one per
    batch-size bucket up to ``max_num_seqs``; ``enforce_eager=True`` runs them eagerly instead.
    ``async_scheduling`` (default: on for GPUs) queues each decode step before the tokens of the step
    before it reach the host, so the GPU does not wait for Python between steps; the tokens are the
    same either way. ``tokenizer``: a folder to load the tokenizer from instead of the checkpoint's
    (the only way a dummy model gets one).

    ``tensor_parallel_size=N`` shards the model over N ranks (one per GPU, or CPU processes with
    gloo): this process is rank 0 (scheduler and sampler) and starts the others, or, under torchrun,
    every process runs this same call and the ranks other than 0 serve rank 0 until it exits.
    ``enable_expert_parallel`` divides mixture-of-experts layers' experts among the ranks instead of
    splitting each expert. See ``mopt.engine.tp_runtime``.
    """

    def __init__(self, model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_model_len: int | None = None, kv_cache_dtype: str = "auto", *, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 kv_cache_memory: int | None = None, progress: bool = False, enforce_eager: bool = False,
                 load_format: str = "auto", quantization: str | None = None, seed: int = 0,
                 async_scheduling: bool | None = None, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, tokenizer: str | Path | None = None) -> None:
        check_engine_args(model=model, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                          max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
                          load_format=load_format, quantization=quantization, enforce_eager=enforce_eager,
                          async_scheduling=async_scheduling, tensor_parallel_size=tensor_parallel_size,
                          enable_expert_parallel=enable_expert_parallel, tokenizer=tokenizer)
        injected_faults(0)  # a malformed MOPT_TEST_FAIL_PREFILL_GRAPH fails here, not after loading
        self.device = torch.device(device) if device is not None else default_device()
        self.async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        self._pending: PendingStep | None = None  # a queued step whose tokens the host has not read
        self.dtype = dtype or default_dtype(self.device)
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size > 1:
            from mopt.engine.tp_runtime import load_tensor_parallel

            kind = "dummy" if load_format == "dummy" else "checkpoint"
            self.path = Path(model) if isinstance(model, (str, Path)) else Path("dummy")
            self.model = load_tensor_parallel(kind, model, self.device.type, self.dtype, kv_cache_dtype,
                                              tensor_parallel_size, enable_expert_parallel, quantization, seed,
                                              progress)
        elif load_format == "dummy":
            from mopt.engine.dummy import build_dummy_model, load_config

            config = load_config(model)
            self.path = Path(model) if isinstance(model, (str, Path)) else Path("dummy")
            self.model = build_dummy_model(config, quantization or "bf16", self.device, self.dtype, kv_cache_dtype,
                                           seed)
        else:
            self.path = Path(model)
            self.model = load_model(self.path, self.device, self.dtype, kv_cache_dtype, progress=progress)
        if tokenizer is not None:
            self.tokenizer = self._load_tokenizer(Path(tokenizer))
        else:
            self.tokenizer = None if load_format == "dummy" else self._load_tokenizer(self.path)
        self.config = self.model.config
        self.eos_token_ids = _eos_token_ids(self.path, self.config, self.tokenizer)
        self.vocab_size = self.config.vocab_size

        per_token = kv_bytes_per_token(self.model, self.dtype)
        budget = kv_cache_memory if kv_cache_memory is not None else self._default_cache_bytes()
        num_blocks = budget // (per_token * block_size)
        if tensor_parallel_size > 1:  # every rank holds its shard of the same blocks
            num_blocks = self.model.agree_kv_blocks(num_blocks, block_size, kv_cache_memory)
        capacity = num_blocks * block_size
        context = getattr(self.config, "max_position_embeddings", None) or capacity
        self.max_model_len = max_model_len or min(context, capacity)
        if self.max_model_len > capacity:
            raise EngineArgumentError(f"max_model_len {self.max_model_len} needs {self.max_model_len * per_token} "
                                      f"bytes of KV cache; the cache holds {capacity} tokens ({budget} bytes)")
        # Don't allocate more than max_num_seqs full-length sequences can use.
        num_blocks = min(num_blocks, max_num_seqs * blocks_needed(self.max_model_len, block_size))
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs,
                                   max_num_batched_tokens or max(self.max_model_len, 2048))

        def build(sync=None) -> ModelRunner:
            return ModelRunner(self.model, num_blocks, block_size, self.dtype, max_num_seqs, self.max_model_len,
                               enforce_eager=enforce_eager, progress=progress, sync=sync)

        if tensor_parallel_size > 1:
            self.runner = self.model.start_runner(num_blocks, block_size, max_num_seqs, self.max_model_len,
                                                  enforce_eager, build)
            self.runner.step_scope, self.runner.share_tokens = self.model.step_scope, self.model.share_tokens
            self.runner.wait_step = self.model.wait_step
        else:
            self.runner = build()
        logger.info("KV cache: %d blocks x %d tokens (%d bytes/token)", num_blocks, block_size, per_token)

    def _default_cache_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_MEMORY_UTILIZATION)
        return CPU_KV_CACHE_BYTES

    @property
    def fatal_error(self) -> BaseException | None:
        """Why this LLM can never run another step (its tensor-parallel world failed: a rank died, or a step
        broke the world), else None."""
        runtime = getattr(self.model, "runtime", None)
        return None if runtime is None else runtime.failure

    @staticmethod
    def _load_tokenizer(path: Path):
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            logger.warning("%s: no tokenizer; only token-id prompts work", path)
            return None
        from mopt.engine.tokenizer import load_tokenizer

        return load_tokenizer(path)

    # -- requests ---------------------------------------------------------------------------------

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RequestError(f"{self.path} has no tokenizer: pass token-id lists instead of text")
        return self.tokenizer

    def _make_sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """A validated request, not yet in the scheduler (a bad one raises ``RequestError``)."""
        ids, text = prompt_token_ids(prompt, self.tokenizer, self.vocab_size, str(self.path))
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                               "(prompt plus at least one generated token)", "prompt")
        return Sequence(ids, params, prompt=text)

    def _finish_check(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if p.stop and seq.finish_reason is None:
            hits = [(seq.text.find(s), s) for s in p.stop if s in seq.text]
            if hits:
                at, s = min(hits)
                seq.text, seq.finish_reason, seq.stop_reason = seq.text[:at], "stop", s
        if seq.finish_reason is None and (len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_model_len):
            seq.finish_reason = "length"

    def _step(self) -> list[Sequence]:
        """Queue one model step and take in the tokens of the one before it; returns the sequences
        that received a token. Without async scheduling each step's tokens are taken in at once."""
        pending, self._pending = self._pending, None
        if pending is not None and self._can_carry(pending):
            return self._carry(pending)
        done = self._take_tokens(pending) if pending is not None else []
        if not self.scheduler.has_unfinished():
            return done
        seqs, is_prefill = self.scheduler.schedule()
        step = self.runner.launch(seqs, is_prefill)
        if self.async_scheduling:
            self._pending = step
            return done
        return done + self._take_tokens(step)

    def _can_carry(self, pending: PendingStep) -> bool:
        """Whether the next step can be queued before ``pending``'s tokens are known: a decode step of
        the same running sequences, none of which can stop on length or is penalised (a penalty needs
        the previous token on the host), with a KV slot for each."""
        if not self.async_scheduling or self.scheduler.waiting:
            return False
        running, block_size = self.scheduler.running, self.scheduler.blocks.block_size
        if len(running) != len(pending.seqs) or any(a is not b for a, b in zip(running, pending.seqs)):
            return False
        need = 0
        for seq in running:
            if len(seq.output_token_ids) + 1 >= seq.params.max_tokens or len(seq) + 1 >= self.max_model_len \
                    or seq.params.penalized:
                return False
            need += len(seq.block_table) * block_size <= len(seq) + 1
        return need <= self.scheduler.blocks.num_free

    def _carry(self, pending: PendingStep) -> list[Sequence]:
        """Queue the next decode step on placeholders for ``pending``'s tokens (its input ids come
        from the device), then take ``pending``'s tokens in."""
        for seq in pending.seqs:
            seq.output_token_ids.append(_PLACEHOLDER)
        try:
            seqs, is_prefill = self.scheduler.schedule()
            assert not is_prefill and len(seqs) == len(pending.seqs), "checked by _can_carry"
            self._pending = self.runner.launch(seqs, False, carried=pending)
        except BaseException:
            for seq in pending.seqs:
                seq.output_token_ids.pop()
            raise
        return self._take_tokens(pending, placeholders=True)

    def _take_tokens(self, step: PendingStep, placeholders: bool = False) -> list[Sequence]:
        """Append ``step``'s token (and its logprobs, when asked) to each of its sequences
        (``placeholders``: fill in the placeholder that stood for it) and check whether it stops;
        sequences finished or aborted while the step was queued take nothing (their row was computed
        in vain)."""
        done = []
        tokens, logprobs = step.results()
        for row, (seq, token) in enumerate(zip(step.seqs, tokens)):
            if seq.status is SequenceStatus.FINISHED:
                continue
            if placeholders:
                seq.output_token_ids[-1] = token
            else:
                seq.output_token_ids.append(token)
            if seq.params.logprobs is not None:
                seq.output_logprobs.append(self._token_logprobs(token, *logprobs[row][:3], seq.params.logprobs))
            self._finish_check(seq, token)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            done.append(seq)
        return done

    def _token_logprobs(self, token: int, logprob: float, top_ids: list[int], top_logprobs: list[float],
                        k: int) -> TokenLogprobs:
        """One position's logprobs, each token with its text; the batch computed the largest k asked."""
        def named(t: int, value: float) -> Logprob:
            return Logprob(t, value, None if self.tokenizer is None else self.tokenizer.decode([t]))

        return TokenLogprobs(named(token, logprob), [named(t, v) for t, v in zip(top_ids[:k], top_logprobs[:k])])

    @staticmethod
    def _per_prompt(params, n: int) -> list[SamplingParams]:
        """One validated copy of the sampling parameters per prompt (re-checked: fields may have been
        changed since construction, and the request must not change if the caller's object does)."""
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [dataclasses.replace(params)] * n
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError(f"sampling_params must be a SamplingParams or a list of them, got "
                               f"{type(params).__name__}")
        if len(params) != n:
            raise RequestError(f"{len(params)} SamplingParams for {n} prompts")
        return [dataclasses.replace(p) for p in params]

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in prompt order. ``prompts``: a string, a token-id list, or a list of either.

        All-or-nothing: every prompt is validated before any enters the scheduler, and if the call
        fails midway (an error, a KeyboardInterrupt) its requests are aborted and their KV-cache
        blocks freed, so the engine stays usable.
        """
        batch = prompt_batch(prompts)
        seqs = [self._make_sequence(p, sp) for p, sp in zip(batch, self._per_prompt(sampling_params, len(batch)))]
        mine = set(map(id, seqs))
        for seq in seqs:
            self.scheduler.add(seq)
        bar = None
        try:
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(seqs), desc="generating", unit="req")
            while any(s.finish_reason is None for s in seqs):
                done = [s for s in self._step() if s.finish_reason is not None and id(s) in mine]
                if bar is not None:
                    bar.update(len(done))
        except BaseException:
            for seq in seqs:
                self.scheduler.abort(seq)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [s.output() for s in seqs]

    def chat_prompt(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, ready for the reply."""
        check_messages(messages)
        tok = self._require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{self.path}: the tokenizer has no chat template; use generate() with a plain prompt")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def chat(self, messages: Messages | Seq[Messages], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}``) or to a list of them."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise RequestError(f"messages must be a conversation or a list of them, got {type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        for conversation in conversations:  # all of them before any is templated or scheduled
            check_messages(conversation)
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request as tokens arrive; held back while they could be a stop string's
        beginning or an incomplete UTF-8 character.

        The request is validated here (``RequestError``) and enters the scheduler when iteration
        starts; if a step fails or the iterator is closed early, it is aborted and its blocks freed.
        """
        seq = self._make_sequence(prompt, self._per_prompt(sampling_params, 1)[0])
        return self._stream_deltas(seq)

    def _stream_deltas(self, seq: Sequence) -> Iterator[str]:
        self.scheduler.add(seq)
        sent = 0
        try:
            while seq.finish_reason is None:
                self._step()
                safe = seq.releasable_text_length(sent)
                if safe > sent:
                    yield seq.text[sent:safe]
                    sent = safe
            if len(seq.text) > sent:  # finished by another call's steps while this one waited
                yield seq.text[sent:]
        finally:
            self.scheduler.abort(seq)  # no-op once finished; frees it after an error or early close
        self.last_output = seq.output()
