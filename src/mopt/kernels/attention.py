"""Paged-attention backends and their selector (the attention counterpart of ``kernels.linear``).

A backend does two things for an attention layer in a generation step: rotate the new queries and
keys and write keys and values into the paged cache (``rope_and_write``), then attend over the
cache (``attend``; decode steps and prefill/extend steps). Layouts are those of
``kernels.paged_attention``. Each backend says ``(ok, reason)`` for a device and for an
:class:`AttentionSpec`; the selector walks an ordered list and raises one error listing every reason
when nothing fits.

* ``triton`` (CUDA): ``kernels.triton_attention`` (decode) and ``kernels.triton_prefill_attention``;
* ``reference`` (any device): ``kernels.paged_attention`` in torch.

``MOPT_BACKEND=reference`` or ``triton`` (the linear layers' override) also picks the attention
backend; other values (``cpu``, ``cublas``) name no attention backend and leave the default order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mopt.kernels import paged_attention as reference
from mopt.kernels.linear import BACKEND_ENV, cuda_capability, first_fitting
from mopt.quant.formats import fp8


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None


class AttentionBackend:
    name: str = "abstract"

    @classmethod
    def is_supported(cls, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError  # abstract

    @classmethod
    def can_implement(cls, spec: AttentionSpec) -> tuple[bool, str]:
        raise NotImplementedError  # abstract

    def rope_and_write(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale,
                       v_scale, packed: reference.PackedKV | None = None) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
               k_scale: float, v_scale: float, sliding_window: int | None,
               fp8_scale: torch.Tensor | None = None, packed: reference.PackedKV | None = None) -> torch.Tensor:
        """``[N, H, D]`` in q's dtype, or E4M3 codes of it under ``fp8_scale`` (an FP8 ``o_proj``'s input scale).
        ``packed``: an NVFP4 cache's block scales (and NVFP4_AFFINE biases)."""
        raise NotImplementedError  # abstract

    def rope_write_attend(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, scale: float,
                          k_scale: float, v_scale: float, sliding_window: int | None,
                          fp8_scale: torch.Tensor | None = None,
                          packed: reference.PackedKV | None = None,
                          nvfp4_scale: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`rope_and_write` then :meth:`attend` (``q [N, H, D]``, ``k, v [N, Hkv, D]``, ``positions [N]``,
        slots from ``meta``), in one kernel where a backend has one. ``nvfp4_scale`` (an NVFP4 ``o_proj``'s
        ``nvfp4_input_scale``): a backend may return marked block values under it (``kernels.quantized_input``)
        instead of the output; the Triton decode kernel does."""
        q = self.rope_and_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping, k_scale,
                                v_scale, packed=packed)
        return self.attend(q, k_cache, v_cache, meta, scale, k_scale, v_scale, sliding_window, fp8_scale,
                           packed=packed)


class ReferenceAttention(AttentionBackend):
    name = "reference"

    @classmethod
    def is_supported(cls, device):
        return True, ""

    @classmethod
    def can_implement(cls, spec):
        return True, ""

    def rope_and_write(self, *args, packed=None):
        return reference.rope_and_write(*args, packed=packed)

    def attend(self, q, k_cache, v_cache, meta, scale, k_scale, v_scale, sliding_window, fp8_scale=None,
               packed=None):
        out = reference.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.query_start_loc, meta.max_query_len, scale, k_scale, v_scale,
                                        sliding_window=sliding_window, packed=packed)
        return out if fp8_scale is None else fp8.quantize(out, fp8_scale)


class TritonAttention(AttentionBackend):
    name = "triton"

    @classmethod
    def is_supported(cls, device):
        ok, why = cuda_capability(device, (8, 0), "Triton paged attention")
        if ok:
            try:
                import triton  # noqa: F401
            except ImportError:
                return False, "triton is not installed"
        return ok, why

    @classmethod
    def can_implement(cls, spec):
        d = spec.head_dim
        if d < 16 or d & (d - 1):
            return False, f"head_dim {d} is not a power of two >= 16"
        if spec.num_heads % spec.num_kv_heads:
            return False, f"{spec.num_heads} query heads do not split into {spec.num_kv_heads} KV heads"
        return True, ""

    def rope_and_write(self, *args, packed=None):
        from mopt.kernels import triton_attention

        return triton_attention.rope_and_write(*args, packed=packed)

    def attend(self, q, k_cache, v_cache, meta, scale, k_scale, v_scale, sliding_window, fp8_scale=None,
               packed=None):
        from mopt.kernels import triton_attention, triton_prefill_attention

        window = sliding_window or 0
        if meta.max_query_len == 1:
            return triton_attention.decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                           k_scale, v_scale, window, out_scale=fp8_scale, packed=packed)
        return triton_prefill_attention.prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                meta.query_start_loc, meta.max_query_len, scale, k_scale, v_scale,
                                                window, out_scale=fp8_scale, packed=packed)

    def rope_write_attend(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, scale, k_scale, v_scale,
                          sliding_window, fp8_scale=None, packed=None, nvfp4_scale=None):
        if meta.max_query_len != 1:
            return super().rope_write_attend(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta, scale,
                                             k_scale, v_scale, sliding_window, fp8_scale, packed)
        from mopt.kernels import triton_attention

        new = triton_attention.NewTokens(k, v, positions, cos_sin_cache, meta.slot_mapping)
        return triton_attention.decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, k_scale,
                                       v_scale, sliding_window or 0, out_scale=fp8_scale, packed=packed, new=new,
                                       nvfp4_scale=nvfp4_scale)


ATTENTION_BACKENDS: dict[str, list[type[AttentionBackend]]] = {
    "cuda": [TritonAttention, ReferenceAttention],
    "cpu": [ReferenceAttention],
}


def select_attention_backend(spec: AttentionSpec, device: torch.device,
                             override: str | None = None) -> AttentionBackend:
    """The first backend for ``device`` that implements ``spec`` (``override``: a backend name;
    default ``MOPT_BACKEND`` when it names an attention backend)."""
    candidates = ATTENTION_BACKENDS.get(device.type, [ReferenceAttention])
    names = {b.name for bs in ATTENTION_BACKENDS.values() for b in bs}
    if override is None:
        env = os.environ.get(BACKEND_ENV)
        override = env if env in names else None
    backend, reasons = first_fitting(candidates, device, spec, override, lambda b: b.name)
    if backend is not None:
        return backend()
    raise ValueError(f"no attention backend for {spec} on {device}:\n  " + "\n  ".join(reasons))
