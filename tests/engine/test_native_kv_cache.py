"""Native NVFP4 / NVFP4_AFFINE / INT8 paged KV caches on the CPU reference path.

The paged cache stores each format's codes (``Attention.kv_storage``); the emulation it replaces
(keys and values rounded by ``round_kv``, then kept in the model dtype) still runs when a layer is
given a model-dtype cache, and is exactly what a real cache returns. So generation with the native
cache must equal the emulated one bit for bit: same tokens and identical float32 logprobs (no
tolerance: both dequantize the same codes with the same float32 operations).
"""

from __future__ import annotations

import pytest
import torch

from mopt import LLM, SamplingParams
from mopt.engine.dummy import tiny_preset_config
from mopt.engine.runner import attention_layers, kv_bytes_per_token
from mopt.quant.formats import fp8

HEAD_DIM, KV_HEADS, LAYERS = 64, 2, 2  # tiny_preset_config
# dummy format -> (algo, code dtype, code width, block-scale width or None, bytes per token per layer)
CASES = {
    "fp8-nvfp4-kv": ("NVFP4", torch.uint8, 32, 4, 2 * KV_HEADS * (32 + 4)),
    "fp8-nvfp4-affine-kv": ("NVFP4_AFFINE", torch.uint8, 32, 4, 2 * KV_HEADS * (32 + 4)),
    "fp8-int8-kv": ("INT8", torch.int8, 64, None, 2 * KV_HEADS * 64),
}
PROMPTS = [[5, 17, 33], list(range(40, 62)), [7] * 9]


def _llm(fmt: str) -> LLM:
    return LLM(tiny_preset_config(), device="cpu", dtype=torch.float32, load_format="dummy", quantization=fmt,
               block_size=4, kv_cache_memory=1 << 20, seed=3)


def _emulated(llm: LLM) -> LLM:
    """The same engine with model-dtype caches: the layers round keys and values (the old emulation)."""
    for layer in attention_layers(llm.model):
        shape = (*layer.k_cache.shape[:3], layer.head_dim)
        layer.attach_kv_cache(torch.zeros(shape), torch.zeros(shape))
        assert not layer.kv_native
    return llm


def _generate(llm: LLM):
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, params)
    return [(o.token_ids, [(lp.chosen.logprob, [t.logprob for t in lp.top]) for lp in o.logprobs]) for o in outs]


@pytest.mark.parametrize("fmt", list(CASES))
def test_cache_stores_the_format(fmt):
    algo, dtype, width, scale_width, per_layer = CASES[fmt]
    llm = _llm(fmt)
    assert kv_bytes_per_token(llm.model, torch.float32) == LAYERS * per_layer
    for layer in attention_layers(llm.model):
        assert layer.kv_cache_algo == algo and layer.kv_native
        for cache in (layer.k_cache, layer.v_cache):
            assert cache.dtype == dtype and cache.shape[2:] == (KV_HEADS, width)
        if scale_width is None:
            assert layer.kv_packed is None
        else:
            for scales in (layer.kv_packed.k_block_scales, layer.kv_packed.v_block_scales):
                assert scales.dtype == fp8.FP8_DTYPE and scales.shape == (*layer.k_cache.shape[:3], scale_width)
            assert (layer.kv_packed.k_bias is not None) == (algo == "NVFP4_AFFINE")


def test_bytes_per_token_before_and_after():
    """Against the model-dtype cache the emulation used (float32 here: 4 bytes an element)."""
    unquantized = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    assert kv_bytes_per_token(_llm("bf16").model, torch.float32) == unquantized
    assert kv_bytes_per_token(_llm("fp8-kv").model, torch.float32) == unquantized // 4


@pytest.mark.parametrize("fmt", list(CASES))
def test_native_generation_equals_emulation(fmt):
    native = _generate(_llm(fmt))
    assert native == _generate(_emulated(_llm(fmt)))


@pytest.mark.parametrize("fmt", list(CASES))
def test_paged_generation_equals_cache_free(fmt):
    """Greedy tokens of the native paged cache equal greedy decoding without a cache (which rounds
    keys and values through the KV method)."""
    llm = _llm(fmt)
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=5, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt):]


# -- GPU ------------------------------------------------------------------------------------------


def _gpu_llm(fmt: str, dtype: torch.dtype, enforce_eager: bool) -> LLM:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return LLM(tiny_preset_config(), device="cuda", dtype=dtype, load_format="dummy", quantization=fmt,
               block_size=16, kv_cache_memory=8 << 20, max_num_seqs=8, seed=3, enforce_eager=enforce_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_generation_equals_emulation_gpu(fmt, dtype):
    """Triton kernels, decode in CUDA graphs, native cache against the emulation (eager: its caches are
    swapped in after start-up). Same tokens; logprobs within 1e-4: both read the same dequantized values,
    except that the GPU may contract NVFP4_AFFINE's ``value * scale + bias`` into one FMA (a last-bit
    difference before the value is rounded to the model dtype)."""
    llm = _gpu_llm(fmt, dtype, enforce_eager=False)
    assert all(layer.k_cache.dtype == CASES[fmt][1] for layer in attention_layers(llm.model))
    native = _generate(llm)
    emulated = _generate(_emulated_gpu(_gpu_llm(fmt, dtype, enforce_eager=True)))
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(native, emulated):
        assert tokens == want_tokens
        got = torch.tensor([[c, *top] for c, top in logprobs])
        want = torch.tensor([[c, *top] for c, top in want_logprobs])
        assert torch.allclose(got, want, atol=1e-4, rtol=0)


def _emulated_gpu(llm: LLM) -> LLM:
    for layer in attention_layers(llm.model):
        shape = (*layer.k_cache.shape[:3], layer.head_dim)
        zeros = dict(dtype=llm.dtype, device=layer.k_cache.device)
        layer.attach_kv_cache(torch.zeros(shape, **zeros), torch.zeros(shape, **zeros))
    return llm
