"""Requests and engine arguments refused by name, and requests that fail without poisoning the engine.

Issue 15's request classes: SamplingParams of the wrong type or range, prompts that are not token
ids or valid text, engine arguments that crashed deep inside, and a failed generate/stream whose
sequences stayed in the scheduler and ran again in the next call.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.checkpoint import CheckpointError
from mopt.errors import EngineArgumentError, MoptError, RequestError

PROMPT = [5, 17, 33, 2, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (vocab 320) with a byte-level tokenizer (ids 0..256)."""
    from conftest import tiny_llama
    from tiny_tokenizer import save_byte_tokenizer

    path = tmp_path_factory.mktemp("llama-tok")
    tiny_llama(256).save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def small_llm(path, **kw) -> LLM:
    return LLM(path, device="cpu", block_size=4, kv_cache_memory=kw.pop("kv_cache_memory", 2 << 20),
               max_model_len=kw.pop("max_model_len", 64), **kw)


@pytest.fixture(scope="module")
def llm(model_dir):
    return small_llm(model_dir)


def assert_idle(llm) -> None:
    """Nothing left in the scheduler and every KV-cache block free."""
    assert not llm.scheduler.waiting and not llm.scheduler.running
    assert llm.scheduler.blocks.num_free == llm.scheduler.blocks.num_blocks


# -- SamplingParams -------------------------------------------------------------------------------

BAD_PARAMS = [
    # (kwargs, message)
    (dict(top_p=None), r"top_p must be a number in \(0, 1\], got NoneType None"),
    (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    (dict(seed="1"), r"seed must be an integer in \[0, 18446744073709551616\), got str '1'"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 18446744073709551616\)"),
    (dict(seed=-1), r"seed must be an integer in"),
    (dict(seed=1.0), r"seed must be an integer"),
    (dict(stop=5), r"stop must be a string or a list of strings, got int 5"),
    (dict(stop=[1]), r"stop\[0\] must be a string, got int 1"),
    (dict(stop=["ok", ""]), r"stop strings must not be empty"),
    (dict(stop=["\ud800"]), r"stop\[0\] is not valid Unicode: surrogates not allowed"),
    (dict(max_tokens="5"), r"max_tokens must be an integer >= 1, got str '5'"),
    (dict(max_tokens=True), r"max_tokens must be an integer >= 1, got bool True"),
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1"),
    (dict(max_tokens=2.0), r"max_tokens must be an integer >= 1, got float 2.0"),
    (dict(top_k=True), r"top_k must be an integer >= 0, got bool True"),
    (dict(top_k=-1), r"top_k must be an integer >= 0"),
    (dict(temperature=True), r"temperature must be a finite number >= 0, got bool True"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
    (dict(temperature="0.5"), r"temperature must be a finite number >= 0, got str"),
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0"),
    (dict(stop_token_ids=5), r"stop_token_ids must be a list of token ids, got int 5"),
    (dict(stop_token_ids=[True]), r"stop_token_ids\[0\] must be an integer >= 0, got bool True"),
    (dict(stop_token_ids=["2"]), r"stop_token_ids\[0\] must be an integer >= 0"),
    (dict(ignore_eos="yes"), r"ignore_eos must be True or False, got str 'yes'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PARAMS, ids=[str(k) for k, _ in BAD_PARAMS])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_numbers():
    p = SamplingParams(max_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(4), seed=2**64 - 1,
                       stop=("a", "b"), stop_token_ids=(np.int64(7),), ignore_eos=np.bool_(True))
    assert (p.max_tokens, p.temperature, p.top_k, p.stop, p.stop_token_ids, p.ignore_eos) == (3, 0.5, 4, ["a", "b"], [7], True)
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.ignore_eos) is bool


@pytest.mark.parametrize("temperature,greedy", [(0.0, True), (1e-45, True), (9.9e-6, True), (1e-5, False), (0.7, False)])
def test_tiny_temperatures_are_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_tiny_temperature_generates_the_greedy_tokens(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    tiny = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=1e-45, seed=3, ignore_eos=True))[0]
    assert tiny.token_ids == greedy


def test_params_changed_after_construction_are_checked_again(llm):
    params = SamplingParams(max_tokens=4)
    params.stop = [1]  # the poisoning example: it raised mid-run, then every later call did
    with pytest.raises(RequestError, match=r"stop\[0\] must be a string"):
        llm.generate(PROMPT, params)
    assert_idle(llm)
    assert len(llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


@pytest.mark.parametrize("params,message", [
    ({"max_tokens": 4}, r"sampling_params must be a SamplingParams or a list of them, got dict"),
    ([SamplingParams()] * 2, r"2 SamplingParams for 1 prompts"),
])
def test_bad_sampling_params_argument(llm, params, message):
    with pytest.raises(RequestError, match=message):
        llm.generate([PROMPT], params)


# -- prompts -------------------------------------------------------------------------------------

BAD_PROMPTS = [
    # (name, prompts argument of generate, message)
    ("float token", [[1, float("-inf")]], r"prompt token 1 must be an integer token id, got float -inf"),
    ("NaN token", [[float("nan")]], r"prompt token 0 must be an integer token id, got float nan"),
    ("string token", [[1, "a"]], r"prompt token 1 must be an integer token id, got str 'a'"),
    ("bool token", [[1, True]], r"prompt token 1 must be an integer token id, got bool True"),
    ("nested token list", [[1, [2]]], r"prompt token 1 must be an integer token id, got list"),
    ("float array", np.array([1.0, 2.0]), r"must be 1-D of integers, got ndarray of shape \(2,\) and dtype float64"),
    ("2-D array", np.array([[1, 2]]), r"must be 1-D of integers, got ndarray of shape \(1, 2\)"),
    ("float tensor", torch.tensor([1.0, 2.0]), r"must be 1-D of integers, got Tensor of shape \(2,\)"),
    ("bool tensor", torch.tensor([True]), r"must be 1-D of integers"),
    ("lone surrogate", "caf\udce9", r"prompt is not valid Unicode: surrogates not allowed at index 3"),
    ("an int", 5, r"prompts must be a string, a list of token ids, or a list of those; got int 5"),
    ("None", None, r"prompts must be a string, a list of token ids"),
    ("a dict", [{"role": "user"}], r"a prompt must be a string or a list of token ids, got dict"),
    ("empty prompt", [[]], r"empty prompt"),
    ("empty text", "", r"empty prompt"),
    ("negative id", [[1, -1]], r"prompt token ids \[-1\] outside the vocabulary \[0, 320\)"),
    ("id past the vocabulary", [[1, 2, 320]], r"prompt token ids \[320\] outside the vocabulary"),
    ("too long", [list(range(64))], r"prompt has 64 tokens; max_model_len is 64"),
]


@pytest.mark.parametrize("prompts,message", [pytest.param(*row[1:], id=row[0]) for row in BAD_PROMPTS])
def test_bad_prompts(llm, prompts, message):
    with pytest.raises(RequestError, match=message):
        llm.generate(prompts, SamplingParams(max_tokens=2))
    prompt = prompts[0] if isinstance(prompts, list) and prompts and isinstance(prompts[0], (list, dict)) else prompts
    with pytest.raises(RequestError, match="prompt"):  # stream takes one prompt: same checks, its own wording
        llm.stream(prompt, SamplingParams(max_tokens=2))
    assert_idle(llm)


@pytest.mark.parametrize("prompt", [np.array(PROMPT), torch.tensor(PROMPT, dtype=torch.int32),
                                    [np.int64(t) for t in PROMPT], tuple(PROMPT)],
                         ids=["numpy array", "int32 tensor", "numpy ints", "tuple"])
def test_integer_arrays_are_token_prompts(llm, prompt):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    want = llm.generate(PROMPT, params)[0]
    got = llm.generate(prompt, params)
    assert len(got) == 1 and got[0].token_ids == want.token_ids and got[0].prompt_token_ids == PROMPT


def test_text_prompts_go_through_the_tokenizer(llm):
    out = llm.generate("héllo", SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.prompt == "héllo" and out.prompt_token_ids == llm.tokenizer("héllo")["input_ids"]


@pytest.mark.parametrize("messages,message", [
    (5, r"messages must be a conversation or a list of them, got int"),
    ([], r"messages must be a conversation or a list of them, got list"),
    ([{"role": "user"}], r"messages\[0\] must have a string 'role' and 'content'"),
    ([{"role": "user", "content": "caf\udce9"}], r"messages\[0\].content is not valid Unicode"),
    ([[{"role": "user", "content": "hi"}], [5]], r"messages\[0\] must have a string 'role' and 'content', got int 5"),
], ids=["an int", "empty", "no content", "lone surrogate", "bad second conversation"])
def test_bad_chat_messages(llm, messages, message):
    with pytest.raises(RequestError, match=message):
        llm.chat(messages)
    assert_idle(llm)


# -- engine arguments and generation_config.json ----------------------------------------------

BAD_ARGS = [
    # (kwargs, message)
    (dict(block_size=0), r"block_size must be an integer >= 1, got 0"),
    (dict(block_size=True), r"block_size must be an integer >= 1, got True"),
    (dict(block_size=2.5), r"block_size must be an integer >= 1, got 2.5"),
    (dict(max_num_seqs=0), r"max_num_seqs must be an integer >= 1"),
    (dict(max_model_len=-5), r"max_model_len must be an integer >= 1 or None, got -5"),
    (dict(max_model_len="64"), r"max_model_len must be an integer >= 1 or None"),
    (dict(kv_cache_memory=-1), r"kv_cache_memory must be an integer >= 1 or None"),
    (dict(max_num_batched_tokens=0), r"max_num_batched_tokens must be an integer >= 1 or None"),
    (dict(kv_cache_dtype="fp16"), r"kv_cache_dtype must be one of \['auto', 'fp8'\], got 'fp16'"),
    (dict(kv_cache_dtype=None), r"kv_cache_dtype must be one of"),
    (dict(dtype="float32"), r"dtype must be one of \['torch.float32', 'torch.bfloat16', 'torch.float16'\] or None"),
    (dict(dtype=torch.int8), r"dtype must be one of"),
    (dict(device="gpu"), r"device 'gpu' is not a device name"),
    (dict(device="meta"), r"device type 'meta' is not supported; use 'cpu' or 'cuda'"),
    (dict(device=0), r"device must be a string such as 'cpu' or 'cuda', got int"),
    (dict(model=None), r"model must be a checkpoint folder path, got NoneType"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS, ids=[str(k) for k, _ in BAD_ARGS])
def test_bad_engine_arguments_fail_before_loading(tmp_path, kwargs, message):
    """The path does not exist: an argument error proves the check ran before any loading."""
    kwargs = {"model": tmp_path / "no-such-checkpoint", **kwargs}
    with pytest.raises(EngineArgumentError, match=message):
        LLM(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(path=None), r"model must be a checkpoint folder path, got NoneType"),
    (dict(dtype=torch.int64), r"dtype must be one of"),
    (dict(kv_cache_dtype="int8"), r"kv_cache_dtype must be one of"),
    (dict(device="vulkan"), r"device type 'vulkan' is not supported"),
], ids=["path", "dtype", "kv_cache_dtype", "device"])
def test_bad_load_model_arguments(tmp_path, kwargs, message):
    from mopt import load_model

    with pytest.raises(EngineArgumentError, match=message):
        load_model(**{"path": tmp_path / "no-such-checkpoint", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_cuda_on_a_cpu_machine(tmp_path):
    with pytest.raises(EngineArgumentError, match=r"device 'cuda': no CUDA GPU is available.*use device='cpu'"):
        LLM(tmp_path, device="cuda")


def test_cache_too_small_for_one_block(model_dir):
    with pytest.raises(EngineArgumentError, match=r"KV cache"):
        LLM(model_dir, device="cpu", kv_cache_memory=64)


@pytest.mark.parametrize("content,message", [
    ("[2]", r"generation_config.json: expected a JSON object, got list"),
    ('{"eos_token_id": "2"}', r"generation_config.json: eos_token_id must be a token id or a list of token ids, got '2'"),
    ('{"eos_token_id": [2, null]}', r"eos_token_id must be a token id or a list of token ids"),
    ("{not json", r"generation_config.json: not valid JSON"),
])
def test_bad_generation_config(model_dir, tmp_path, content, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    (ckpt / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        small_llm(ckpt)


# -- a failed request leaves the engine as it was -----------------------------------------------

class Fail(Exception):
    pass


def failing_after(llm, steps: int, error: BaseException):
    """Make ``llm.runner.launch`` (every model step goes through it) raise ``error`` on call
    ``steps + 1``; returns the undo."""
    original, calls = llm.runner.launch, [0]

    def launch(*args, **kw):
        calls[0] += 1
        if calls[0] > steps:
            raise error
        return original(*args, **kw)

    llm.runner.launch = launch
    return lambda: setattr(llm.runner, "launch", original)


@pytest.fixture(scope="module")
def fresh_outputs(model_dir):
    """What an untouched engine generates for two prompts."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    return [o.token_ids for o in small_llm(model_dir).generate([PROMPT, [7, 7, 7]], params)]


@pytest.mark.parametrize("error", [Fail("boom"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("steps", [0, 2], ids=["in prefill", "in decode"])
def test_generate_failure_mid_run_frees_everything(model_dir, fresh_outputs, error, steps):
    llm = small_llm(model_dir)
    undo = failing_after(llm, steps, error)
    with pytest.raises(type(error)):
        llm.generate([PROMPT, [7, 7, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    undo()
    assert_idle(llm)
    again = llm.generate([PROMPT, [7, 7, 7]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in again] == fresh_outputs


def test_generate_validates_every_prompt_before_adding_any(model_dir, fresh_outputs):
    llm = small_llm(model_dir)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([PROMPT, [7, 7, 7], [999]], SamplingParams(max_tokens=6, ignore_eos=True))
    assert_idle(llm)
    assert [o.token_ids for o in llm.generate([PROMPT, [7, 7, 7]], SamplingParams(max_tokens=6, ignore_eos=True))] \
        == fresh_outputs


@pytest.mark.parametrize("error", [Fail("boom"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
def test_stream_failure_mid_run_frees_everything(model_dir, fresh_outputs, error):
    llm = small_llm(model_dir)
    undo = failing_after(llm, 2, error)
    with pytest.raises(type(error)):
        list(llm.stream(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True)))
    undo()
    assert_idle(llm)
    assert llm.generate([PROMPT, [7, 7, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids \
        == fresh_outputs[0]


def test_stream_closed_early_is_aborted(model_dir, fresh_outputs):
    llm = small_llm(model_dir)
    stream = llm.stream(PROMPT, SamplingParams(max_tokens=30, ignore_eos=True))
    next(stream)  # the byte tokenizer gives text from the first decoded token on
    assert llm.scheduler.running
    stream.close()
    assert_idle(llm)
    assert llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids == fresh_outputs[0]


def test_stream_never_started_holds_nothing(llm):
    stream = llm.stream(PROMPT, SamplingParams(max_tokens=3))
    assert_idle(llm)
    del stream
    assert_idle(llm)


def test_generate_while_a_stream_is_open(model_dir, fresh_outputs):
    """A generate call between two reads of a stream runs its own requests to the end and leaves the
    stream's to the stream, which still returns the whole text."""
    llm = small_llm(model_dir)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = "".join(small_llm(model_dir).stream(PROMPT, params))
    stream = llm.stream(PROMPT, params)
    first = next(stream)
    assert llm.generate([7, 7, 7], params)[0].token_ids == fresh_outputs[1]
    assert first + "".join(stream) == alone
    assert llm.last_output.token_ids == fresh_outputs[0]
    assert_idle(llm)


def test_abort_is_idempotent_for_waiting_running_and_finished(llm):
    from mopt.engine.sequence import Sequence

    params = SamplingParams(max_tokens=2)
    waiting, running = Sequence(list(PROMPT), params), Sequence(list(PROMPT), params)
    llm.scheduler.add(waiting)
    llm.scheduler.add(running)
    llm.scheduler.schedule()  # admits both: they hold blocks now
    llm.scheduler.add(Sequence(list(PROMPT), params))
    extra = llm.scheduler.waiting[-1]
    for seq in (waiting, running, extra, running):
        llm.scheduler.abort(seq)
        assert seq.finish_reason == "abort" and not seq.block_table
    assert_idle(llm)


def test_all_errors_are_mopt_value_errors():
    import mopt

    for name in ("CheckpointError", "EngineArgumentError", "ModelConfigError", "QuantConfigError", "RequestError",
                 "UnsupportedArchitectureError", "WeightLoadError"):
        cls = getattr(mopt, name)
        assert issubclass(cls, MoptError) and issubclass(cls, ValueError), name


def test_json_reads_of_generation_config_use_the_hardened_reader(model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    (ckpt / "generation_config.json").write_bytes(json.dumps({"eos_token_id": 2}).encode("utf-16"))
    with pytest.raises(CheckpointError, match=r"generation_config.json: not UTF-8 text"):
        small_llm(ckpt)
