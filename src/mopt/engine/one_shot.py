"""One-shot all-reduce over NVLink peer memory for the small sums of decoding (torch symmetric memory).

A decode step of a tensor-parallel model sums a few kilobytes per row-parallel layer (batch x hidden
BF16 values), 65 times per step for a Llama-3-8B. NCCL's ring all-reduce takes 6-7 us for such a
message on two H200s; a one-shot all-reduce, where every rank reads every peer's partial sums directly
from the peer's memory and adds them, needs one round of signals instead of a ring's steps. The
peers use the same idea (vLLM's and TensorRT-LLM's custom all-reduce); mopt takes the kernel from
torch.distributed's symmetric memory (``torch.ops.symm_mem.one_shot_all_reduce_copy``): each rank
copies its partial sums into its slot of a buffer mapped on every GPU of the node, the ranks signal
each other, and each adds all slots in rank order (so every rank gets the same bits) and signals
again before the buffer is reused. No NVLink multicast is involved.

Larger messages (prefill), other reductions (the MAX of per-token amaxes beyond the fused kernels), several
nodes, and hosts where the set-up fails use NCCL. The kernel waits on its peers without a time
limit, so a rank that dies leaves the others' GPUs spinning: rank 0 polls its steps (see
``TensorParallelModel.wait_step``) and reports the rank instead of hanging. ``MOPT_TP_ALLREDUCE=nccl``
turns this path off; ``MOPT_TP_ONE_SHOT_BYTES`` sets the largest message it takes (default 1 MiB).

After a row-parallel layer the model adds the residual and normalizes; those sums go through
:class:`OneShotRMSNorm` instead, which does the all-reduce, the residual add and the RMSNorm in one
kernel (``mopt.kernels.triton_allreduce_norm``: each rank pushes its rows into its peers' memory and
the data is its own signal, so there are no flags, fences or a separate norm launch; 4.1 us against
10.4 us for the one-shot sum and the norm kernel at one 4096-wide row on 2 H100s).
``MOPT_TP_FUSED_NORM=0`` leaves those sums to the one-shot all-reduce and the norm kernel.
Where a decode GEMV computes the partial sums it sends them to the peers from its own epilogue;
``MOPT_TP_GEMV_PUSH=0`` leaves the sending to the fused kernel. ``MOPT_TP_TWO_SHOT_ROWS=N`` (off unless set)
sums calls of N rows or more in two shots instead (``kernels.triton_two_shot_norm``: each row reduced by one
owner and its result gathered, so the bytes per rank stop growing with the ranks). The same buffer carries the
per-token amaxes of per-token FP8 layers' row-parallel inputs (``kernels.triton_peer_amax``, instead of a MAX
all-reduce through NCCL); ``MOPT_TP_PEER_AMAX=0`` leaves them to NCCL.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
DTYPES = (torch.bfloat16, torch.float32)  # what torch's kernel is built for


class OneShotAllReduce:
    """Sums of at most ``max_bytes`` over the ranks of ``name`` through ``buffer`` (symmetric memory)."""

    norm: "OneShotRMSNorm | None" = None  # the fused all-reduce + RMSNorm beside it, where set up

    def __init__(self, name: str, buffer: torch.Tensor, max_bytes: int, process_group) -> None:
        self.name, self.buffer, self.max_bytes = name, buffer, max_bytes
        self.process_group = process_group  # c10d's registry holds it weakly: kept alive here

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes this path; it depends on the shape and dtype alone, so every rank, which
        holds the same shape, decides alike."""
        nbytes = x.numel() * x.element_size()
        return x.dtype in DTYPES and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, a new tensor (``x`` is left as it was)."""
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()  # the kernel moves 16 bytes at a time, from the buffer and from x alike
        slot = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.name)


class OneShotRMSNorm:
    """All-reduce, residual add and RMSNorm in one kernel over a peer-mapped ``buffer`` whose address on
    every rank's GPU, as mapped on this one, is in ``handle.buffer_ptrs`` (see ``kernels.triton_allreduce_norm``).

    A decode GEMV that computes the partial sums may send them to the peers itself, from its epilogue
    (``producer_push``): the layer names this norm as its output's destination, the kernel asks
    :meth:`push_peers` where to send and reports :meth:`pushed`, and the next call, which must take that
    output, skips its own push. Whether a kernel pushes depends on the shapes alone, so every rank agrees."""

    def __init__(self, buffer: torch.Tensor, handle, rank: int, world: int, max_bytes: int,
                 producer_push: bool = True, two_shot_rows: int = 0, peer_amax: bool = True) -> None:
        from mopt.kernels import triton_allreduce_norm, triton_peer_amax, triton_two_shot_norm  # Triton: a GPU world

        self.kernel, self.two_shot_kernel = triton_allreduce_norm, triton_two_shot_norm
        self.amax_kernel = triton_peer_amax
        self.two_shot_rows = two_shot_rows  # 0: never
        self.buffer, self.handle = buffer, handle  # the mapping lives as long as both
        bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=buffer.device)
        self.peers = triton_allreduce_norm.PeerRows.of(buffer, bases, rank, world)
        self.rank, self.world, self.max_bytes = rank, world, max_bytes
        self.producer_push = producer_push
        self.peer_amax = peer_amax
        self._pushed: tuple[int, int] | None = None  # (address, size) of partial sums already sent

    def fits_rows(self, rows: int, n: int, dtype: torch.dtype) -> bool:
        return rows * n * dtype.itemsize <= self.max_bytes and self.kernel.supports_rows(rows, n, dtype, self.world)[0]

    def fits(self, x: torch.Tensor) -> bool:
        n = x.shape[-1]
        return x.is_cuda and self.fits_rows(x.numel() // max(n, 1), n, x.dtype)

    def per_token_fp8(self, x2: torch.Tensor):
        """Per-token FP8 of this rank's slice ``x2`` of each row under the whole row's amax
        (``kernels.triton_peer_amax``), or None where that kernel does not take ``x2`` (a MAX all-reduce then)."""
        if not (self.peer_amax and x2.is_cuda and self.amax_kernel.supports(x2, self.world)[0]):
            return None
        return self.amax_kernel.per_token_fp8_over_peers(x2, self.peers)

    def push_peers(self, rows: int, n: int, dtype: torch.dtype):
        """Where a kernel computing ``rows x n`` partial sums in ``dtype`` for this norm sends them
        (``triton_allreduce_norm.PeerRows``), or None where the norm will send them itself."""
        if (not self.producer_push or self._pushed is not None or not self.fits_rows(rows, n, dtype)
                or self.two_shot(rows)):
            return None
        return self.peers

    def two_shot(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows sums in two shots (shapes alone decide, so every rank agrees)."""
        return 0 < self.two_shot_rows <= rows

    def pushed(self, y: torch.Tensor) -> None:
        """A kernel sent ``y``'s rows through :meth:`push_peers`; the next call takes ``y``."""
        self._pushed = (y.data_ptr(), y.numel())

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 fp8_scale: torch.Tensor | None = None,
                 nvfp4_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed, sum of x over the ranks + residual)``, as ``rms_norm(all_reduce(x), ..., residual)``
        (without ``residual``: ``(rms_norm(s), s)`` for ``s = all_reduce(x)``)."""
        pushed, self._pushed = self._pushed, None
        if pushed is not None and pushed != (x.data_ptr(), x.numel()):
            # The peers hold rows this call would not sum: continuing would corrupt every rank's result.
            raise RuntimeError("fused all-reduce + RMSNorm: the partial sums a kernel already sent to the peers "
                               "are not the ones this norm was given (a layer changed its kernel's output)")
        if pushed is None and self.two_shot(x.numel() // max(x.shape[-1], 1)):
            return self.two_shot_kernel.two_shot_rms_norm(x, residual, weight, eps, fp8_scale, self.peers,
                                                          nvfp4_scale=nvfp4_scale)
        return self.kernel.all_reduce_rms_norm(x, residual, weight, eps, fp8_scale, self.peers, pushed is not None,
                                               nvfp4_scale=nvfp4_scale)


def _switch(name: str) -> bool:
    """An on/off environment switch, on unless set to 0."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        from mopt.engine.distributed import TensorParallelError

        raise TensorParallelError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def producer_push_from_env() -> bool:
    return _switch("MOPT_TP_GEMV_PUSH")


def fused_norm_from_env() -> bool:
    return _switch("MOPT_TP_FUSED_NORM")


def peer_amax_from_env() -> bool:
    return _switch("MOPT_TP_PEER_AMAX")


def two_shot_rows_from_env() -> int:
    """``MOPT_TP_TWO_SHOT_ROWS``: the fewest rows a fused all-reduce + RMSNorm sums in two shots (0 or unset: never)."""
    value = os.environ.get("MOPT_TP_TWO_SHOT_ROWS", "0")
    if not value.isdigit():
        from mopt.engine.distributed import TensorParallelError

        raise TensorParallelError(f"MOPT_TP_TWO_SHOT_ROWS must be a whole number of rows (0: never), got {value!r}")
    return int(value)


def max_bytes_from_env() -> int:
    if os.environ.get("MOPT_TP_ALLREDUCE", "auto").lower() == "nccl":
        return 0
    value = os.environ.get("MOPT_TP_ONE_SHOT_BYTES")
    if value is None:
        return DEFAULT_MAX_BYTES
    try:
        size = int(value)
    except ValueError:
        from mopt.engine.distributed import TensorParallelError

        raise TensorParallelError(f"MOPT_TP_ONE_SHOT_BYTES must be a whole number of bytes, got {value!r}") from None
    return max(0, size // 16 * 16)


def register_process_group(name: str, store, rank: int, size: int, backend, device: torch.device):
    """Make ``backend`` (mopt's own NCCL or gloo group) known to c10d by ``name``, which is how torch's
    symmetric memory finds the ranks and the store of a rendezvous. It does not become
    torch.distributed's default group: other code in the process still sees none."""
    from torch._C._distributed_c10d import ProcessGroup, _register_process_group

    group = ProcessGroup(store, rank, size)
    kind = ProcessGroup.BackendType.NCCL if device.type == "cuda" else ProcessGroup.BackendType.GLOO
    group._register_backend(torch.device(device.type), kind, backend)
    group._set_group_name(name)
    _register_process_group(name, group)
    return group  # c10d's registry holds it weakly: the caller keeps it


def unregister_process_group(name: str) -> None:
    from torch._C._distributed_c10d import _unregister_process_group

    try:
        _unregister_process_group(name)
    except Exception as e:  # not registered (the set-up failed before)
        logger.debug("unregistering %s: %s", name, e)


def set_up(world, agree) -> OneShotAllReduce | None:
    """The one-shot all-reduce of ``world``'s model group, or None where NCCL must do every sum.

    Collective: every rank calls it after the groups exist. ``agree(ok) -> bool`` is True when every
    rank passes ``ok`` True (a MIN over the control group), so that either all ranks use the path or
    none does, and no rank enters the buffer's rendezvous alone."""
    global unavailable_reason
    unavailable_reason = None
    max_bytes = max_bytes_from_env()
    if world.device.type != "cuda" or world.size < 2 or max_bytes == 0:
        return None
    problem = None
    host = socket.gethostname()
    world.store.set(f"host/{world.rank}", host)
    hosts = {world.store.get(f"host/{r}").decode() for r in range(world.size)}
    if len(hosts) > 1:
        problem = f"the ranks run on {len(hosts)} hosts"  # peer memory is one node's
    buffer = name = process_group = None
    if problem is None:
        try:
            import torch.distributed as dist
            import torch.distributed._symmetric_memory as symm_mem
            from torch._C._distributed_c10d import _SymmetricMemory

            name = f"mopt-tp-{world.store_address[0]}:{world.store_address[1]}"
            store = dist.PrefixStore("symm", world.store)
            process_group = register_process_group(name, store, world.rank, world.size, world.group.backend,
                                                   world.device)
            try:  # torch releases that look groups up by name in their own table rather than c10d's
                _SymmetricMemory.set_group_info(name, world.rank, world.size, store)
            except Exception as e:
                logger.debug("symmetric memory group info: %s", e)
            try:
                symm_mem.set_backend("CUDA")  # peer mappings of cudaMalloc'd memory (not NVSHMEM)
            except Exception as e:  # set already, or this torch has one backend only
                logger.debug("symmetric memory backend: %s", e)
            buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=world.device)
        except Exception as e:  # no symmetric memory in this torch or on this host: NCCL does it all
            problem = _describe(e)
    if not agree(problem is None):
        return _unavailable(name, problem or "another rank cannot map its peers' memory")
    try:
        symm_mem.rendezvous(buffer, name)
        op = OneShotAllReduce(name, buffer, max_bytes, process_group)
    except Exception as e:
        problem = _describe(e)
    if not agree(problem is None):
        return _unavailable(name, problem or "the rendezvous failed on another rank")
    probe = torch.full((8,), float(world.rank + 1), device=world.device)
    expected = world.size * (world.size + 1) / 2
    try:
        good = bool((op(probe) == expected).all().item())
        problem = None if good else "a probe sum came out wrong"
    except Exception as e:
        problem = _describe(e)
    if not agree(problem is None):
        return _unavailable(name, f"its probe failed ({problem or 'on another rank'})")
    if fused_norm_from_env():
        op.norm = _set_up_norm(world, agree, name, op)
    return op


def _set_up_norm(world, agree, name: str, op: OneShotAllReduce) -> OneShotRMSNorm | None:
    """The fused all-reduce + RMSNorm, or None (every rank alike) where its buffer or probe fails."""
    global unavailable_reason
    problem = buffer = norm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        from mopt.kernels import triton_allreduce_norm

        if world.size > triton_allreduce_norm.MAX_WORLD:
            raise ValueError(f"{world.size} ranks; its buffer has room for {triton_allreduce_norm.MAX_WORLD}")
        buffer = symm_mem.empty(triton_allreduce_norm.buffer_bytes(world.size), dtype=torch.uint8,
                                device=world.device)
        triton_allreduce_norm.init_buffer(buffer, world.size)  # on every rank before any peer writes (agree)
        torch.cuda.synchronize(world.device)
    except Exception as e:
        problem = _describe(e)
    if agree(problem is None):
        try:
            norm = OneShotRMSNorm(buffer, symm_mem.rendezvous(buffer, name), world.rank, world.size, op.max_bytes,
                                  producer_push_from_env(), two_shot_rows_from_env(), peer_amax_from_env())
        except Exception as e:
            problem = _describe(e)
        if agree(problem is None):
            try:
                problem = _probe_norm(norm, op, world)
            except Exception as e:
                problem = _describe(e)
            if agree(problem is None):
                return norm
    unavailable_reason = f"no fused all-reduce + RMSNorm: {problem or 'it failed on another rank'}"
    logger.info("tensor parallelism: %s", unavailable_reason)
    return None


def _probe_norm(norm: OneShotRMSNorm, op: OneShotAllReduce, world) -> str | None:
    """None if the fused kernel gives the same bits as the one-shot sum followed by the norm kernel, on
    sums that are exact in BF16 (small integers), twice (the second call uses each row's next slot); and the
    per-token FP8 kernel (``peer_amax``) those of quantizing under the MAX of the ranks' amaxes."""
    from mopt.kernels.triton_glue import rms_norm

    g = torch.Generator().manual_seed(0)
    base = torch.randint(-8, 9, (3, 512), generator=g).to(world.device, torch.bfloat16)
    residual = torch.randn(3, 512, generator=g).to(world.device, torch.bfloat16)
    weight = (1 + torch.randn(512, generator=g) * 0.1).to(world.device)
    for scale in (None, torch.tensor(0.05, device=world.device)):
        x = base * (world.rank + 1)
        got = norm(x, residual, weight, 1e-5, scale)
        want = rms_norm(op(x), weight, 1e-5, residual, scale)
        if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)):
            return "its probe differed from the one-shot sum and the norm kernel"
        if norm.peer_amax:  # each rank's slice is the base times rank + 1: the largest amax is the last rank's
            from mopt.kernels.linear import per_token_fp8

            whole = base.abs().amax(dim=-1, keepdim=True) * world.size
            q, s = norm.per_token_fp8(x)
            want_q, want_s = per_token_fp8(x, lambda _: whole)
            if not (torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)):
                return "its per-token FP8 probe differed from quantizing under the MAX of the ranks' amaxes"
        if norm.two_shot_rows:  # these seeded sums hold no negative zero, which the two-shot gather makes positive
            got = norm.two_shot_kernel.two_shot_rms_norm(x, residual, weight, 1e-5, scale, norm.peers)
            if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)):
                return "its two-shot probe differed from the one-shot sum and the norm kernel"
    return None


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"


unavailable_reason: str | None = None  # why the last set-up fell back to NCCL (for benchmarks and logs)


def describe(group) -> str:
    """How ``group`` (a ``distributed.ProcessGroup``) sums a decode step's partial sums, for benchmark titles."""
    op = getattr(group, "one_shot", None)
    if op is None:
        return f"NCCL all-reduces ({unavailable_reason})" if unavailable_reason else "NCCL all-reduces"
    if op.norm is None:
        return (f"one-shot all-reduces over peer memory up to {op.max_bytes >> 10} KiB, NCCL above"
                + (f" ({unavailable_reason})" if unavailable_reason else ""))
    return (f"all-reduce fused with RMSNorm over peer memory up to {op.max_bytes >> 10} KiB"
            + (", sent from the GEMVs" if op.norm.producer_push else "")
            + (f", in two shots from {op.norm.two_shot_rows} rows" if op.norm.two_shot_rows else "") + ", NCCL above"
            + ("" if op.norm.peer_amax else "; per-token FP8 amaxes through NCCL"))


def _unavailable(name: str | None, reason: str) -> None:
    global unavailable_reason
    unavailable_reason = reason
    logger.info("tensor parallelism: NCCL does every all-reduce (no one-shot all-reduce: %s)", reason)
    if name is not None:
        unregister_process_group(name)
    return None
