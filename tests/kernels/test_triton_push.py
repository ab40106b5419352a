"""Decode GEMVs that send a row-parallel layer's partial sums to the fused all-reduce's peers themselves.

A row-parallel layer names the fused all-reduce + RMSNorm its output goes to (``layer.partials_to``);
its decode GEMV (BF16/FP16, FP8, NVFP4's GEMV and MMA kernel) then writes each output row, as stored, into every
peer's buffer at the slot the row's counter names, with negative zeros made positive
(``triton_allreduce_norm.push_rows``), and the fused kernel that follows skips its own push
(``PUSHED``). Through the interpreter the ranks' buffers are CPU tensors of this process and the
ranks run one after another; the results must equal, bit for bit, those of the fused kernel pushing
itself. Two GPUs run the path end to end in ``tests/parallel/test_tp_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from canonical import S, canonical_layer
from peer_buffers import DTYPE, Buffers
from triton_device import triton_device

tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
triton_linear = pytest.importorskip("mopt.kernels.triton_linear")
triton_gemv = pytest.importorskip("mopt.kernels.triton_gemv")
triton_gemm = pytest.importorskip("mopt.kernels.triton_gemm")


class _Norm:
    """The producer's side of ``one_shot.OneShotRMSNorm``: where to push, and what was pushed."""

    def __init__(self, peers) -> None:
        self.peers, self.sent = peers, []

    def push_peers(self, rows, n, dtype):
        return self.peers if tan.supports_rows(rows, n, dtype, self.peers.world)[0] else None

    def pushed(self, y):
        self.sent.append(y)


def _layer(kernel: str, n: int, k: int) -> tuple[torch.nn.Module, object]:
    if kernel == "gemv":
        layer = torch.nn.Module()
        g = torch.Generator().manual_seed(n + k)
        layer.weight = (torch.randn(n, k, generator=g) / k**0.5).to(DTYPE)
        return layer, triton_linear.TritonGemvKernel()
    scheme = {"fp8": S.FP8_TENSOR, "nvfp4": S.NVFP4}[kernel]
    layer = canonical_layer(scheme, n, k)
    layer.params_dtype = DTYPE
    cls = triton_linear.TritonFp8Kernel if kernel == "fp8" else triton_linear.TritonNvfp4Kernel
    kernel = cls()
    kernel.process_weights(layer)
    return layer, kernel


def _wire(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, 0.0, x).to(x.dtype)  # what travels: -0.0 as +0.0


# (kernel, tokens, K): every kernel that pushes; the FP8 and BF16 kernels' both inner loops (one token: FMA,
# more: tensor cores); NVFP4's one-token GEMV and its MMA kernel, whole and with K split 4 ways (the last
# program of each tile pushes it)
CASES = [("gemv", 1, 256), ("gemv", 3, 256), ("fp8", 1, 256), ("fp8", 5, 256), ("nvfp4", 1, 256), ("nvfp4", 5, 256),
         ("nvfp4", 5, 1024)]


@pytest.mark.parametrize("kernel,m,k", CASES)
def test_gemv_sends_its_rows_where_the_counters_say(kernel, m, k):
    device = triton_device(False)
    n = 48
    layer, impl = _layer(kernel, n, k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(DTYPE)
    x[0, :3] = 0  # outputs of exactly zero are unlikely; -0.0 handling is covered by the norm's tests
    plain = impl.apply(layer, x, None)
    buffers = Buffers(2, device)
    counters = [(r * 2 + 1) % 3 for r in range(m)]  # rows at different slots
    buffers.counters(1)[:m] = torch.tensor(counters, dtype=torch.int32)[:, None]
    layer.partials_to = norm = _Norm(buffers.peers(1))
    y = impl.apply(layer, x, None)
    assert torch.equal(y, plain)  # pushing changes nothing the layer returns
    assert len(norm.sent) == 1 and norm.sent[0].data_ptr() == y.data_ptr()
    _check_sent(buffers, counters, y, m, n)


def _check_sent(buffers: Buffers, counters: list[int], y: torch.Tensor, m: int, n: int) -> None:
    """Rank 1's rows of ``y`` sit in rank 0's buffer at the slots ``counters`` name, and nowhere else."""
    sentinel = torch.full((n,), tan.SENTINEL_BITS, dtype=torch.int16)
    for r in range(m):
        for slot in range(3):
            got = buffers.row(0, slot, 1, r, n)
            if slot == counters[r]:
                assert torch.equal(got.view(torch.int16), _wire(y[r]).view(torch.int16)), (r, slot)
            else:
                assert torch.equal(got.view(torch.int16), sentinel), (r, slot)
        for slot in range(3):  # nothing into the rank's own buffer
            assert torch.equal(buffers.row(1, slot, 0, r, n).view(torch.int16), sentinel)
    assert buffers.next_slot(1, 0) == counters[0]  # the counters are the fused kernel's to move


@pytest.mark.parametrize("m,k,split", [(5, 512, 4), (20, 384, 4)])  # K tiles 8 over 4 programs; 3 over 4 (one empty)
def test_a_split_k_gemv_pushes_each_row_from_the_last_program_of_its_tile(m, k, split):
    """With K split across programs (``GemvTiles.split_k``) the program that finishes a tile pushes it, once."""
    from mopt.quant.formats import fp8

    device = triton_device(False)
    n = 48
    g = torch.Generator().manual_seed(m + k)
    wq, ws = fp8.quantize_per_tensor(torch.randn(n, k, generator=g))
    xq, xs = fp8.quantize_per_tensor(torch.randn(m, k, generator=g))
    args = (xq.to(device), wq.to(device), xs.reshape(1), ws.reshape(1), None, DTYPE,
            triton_gemv.GemvTiles(16, 128, 4, 2, dot=True, split_k=split))
    plain = triton_gemv.fp8_gemv(*args)
    buffers = Buffers(2, device)
    counters = [(r * 2 + 1) % 3 for r in range(m)]
    buffers.counters(1)[:m] = torch.tensor(counters, dtype=torch.int32)[:, None]
    y = triton_gemv.fp8_gemv(*args, push=buffers.peers(1))
    assert torch.equal(y, plain)
    _check_sent(buffers, counters, y, m, n)


@pytest.mark.parametrize("kernel,m", [("gemv", 2), ("fp8", 1), ("nvfp4", 1), ("nvfp4", 3)])
@pytest.mark.parametrize("fp8_out", [False, True])
def test_pushed_rows_reduce_as_the_fused_kernel_pushing_them(kernel, m, fp8_out):
    """Two ranks: each GEMV pushes, then each fused kernel runs with ``PUSHED``; against the same
    partial sums reduced by the fused kernel pushing them itself, over fresh buffers."""
    device = triton_device(False)
    n, k = 64, 256
    layers = [_layer(kernel, n, k) for _ in range(2)]
    g = torch.Generator().manual_seed(7)
    xs = [(torch.randn(m, k, generator=g) * 2).to(DTYPE) for _ in range(2)]
    residual = torch.randn(m, n, generator=g).to(DTYPE)
    weight = 1 + torch.randn(n, generator=g) * 0.1
    scale = torch.tensor(0.03) if fp8_out else None

    plain = Buffers(2, device)
    partials = [impl.apply(layer, x, None) for (layer, impl), x in zip(layers, xs)]
    for rank in range(2):  # the peer's row put in place as its fused kernel would have pushed it
        plain.send(1 - rank, rank, 0, partials[1 - rank])
    want = [tan.all_reduce_rms_norm(partials[r], residual, weight, 1e-5, scale, plain.peers(r)) for r in range(2)]

    pushed = Buffers(2, device)
    ys = []
    for rank, ((layer, impl), x) in enumerate(zip(layers, xs)):
        layer.partials_to = _Norm(pushed.peers(rank))
        ys.append(impl.apply(layer, x, None))
    for rank in range(2):
        # A fused kernel that pushed again would refill the peer's slot just emptied here.
        peer_slot = [pushed.row(1 - rank, 0, rank, r, n) for r in range(m)]
        kept = [s.clone() for s in peer_slot]
        for s in peer_slot:
            s.view(torch.int16).fill_(tan.SENTINEL_BITS)
        got = tan.all_reduce_rms_norm(ys[rank], residual, weight, 1e-5, scale, pushed.peers(rank), pushed=True)
        for s, value in zip(peer_slot, kept):
            assert (s.view(torch.int16) == tan.SENTINEL_BITS).all()
            s.copy_(value)
        for a, b in zip(got, want[rank]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert [pushed.next_slot(rank, r) for r in range(m)] == [1] * m


def test_pushes_the_kernels_cannot_make_are_refused():
    peers = Buffers(2, "cpu").peers(0)
    a = torch.zeros(2, 64, dtype=DTYPE)
    w = torch.zeros(128, 64, dtype=DTYPE)
    with pytest.raises(ValueError, match="only a plain output"):
        triton_gemv._launch(a, w, torch.ones(1), torch.ones(1), None, DTYPE, None, gated=True, push=peers)
    with pytest.raises(ValueError, match="push to the fused all-reduce: activations are torch.float32"):
        triton_gemv.gemv(a.float(), w.float(), push=peers)
    packed = torch.zeros(64, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"only one token's output, written once, can be pushed \(M=2\)"):
        triton_gemm.nvfp4_gemm(torch.zeros(2, 64, dtype=torch.bfloat16), packed, torch.zeros(64, 4),
                               torch.ones(()), torch.ones(64), None, DTYPE, push=peers)
