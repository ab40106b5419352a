"""The one-shot all-reduce's rules, on CPUs (the kernel itself runs on 2 GPUs: bench/tp_allreduce.py
compares its sums with NCCL's bit for bit, and tests/parallel/test_tp_gpu.py runs models through it).

* which sums take the path: decided by shape and dtype alone, so every rank (same shapes) decides alike;
* the environment switches, with errors naming the variable;
* mopt's group as c10d knows it by name lives as long as mopt holds it (c10d keeps it weakly: losing
  it made torch's rendezvous fail on the GPUs with "has already been destroyed");
* ``Group.all_reduce`` routes small sums there and everything else (MAX, large, other dtypes) to the backend;
* ``Group.fused_rms_norm`` offers the fused all-reduce + RMSNorm only where it is set up and fits;
* a decode GEMV may push a row-parallel layer's partial sums itself exactly where that norm takes them,
  the next norm call skips its own push, and a layer's output other than the kernel's is an error.
"""

from __future__ import annotations

import datetime
import gc
import types

import pytest
import torch

from mopt.engine import one_shot
from mopt.engine.distributed import Group, TensorParallelError


def _op(max_bytes: int = 1024) -> one_shot.OneShotAllReduce:
    return one_shot.OneShotAllReduce("test", torch.empty(max_bytes, dtype=torch.uint8), max_bytes, None)


@pytest.mark.parametrize("dtype,shape,fits", [
    (torch.bfloat16, (1, 8), True),          # 16 bytes
    (torch.bfloat16, (1, 512), True),        # 1024 bytes: the limit itself
    (torch.bfloat16, (1, 520), False),       # over the limit
    (torch.bfloat16, (3,), False),           # 6 bytes: the kernel moves 16 at a time
    (torch.float32, (4, 4), True),
    (torch.float16, (8,), False),            # torch's kernel is built for float32 and bfloat16 only
    (torch.int32, (8,), False),
    (torch.bfloat16, (0, 8), False),
])
def test_which_sums_take_the_one_shot_path(dtype, shape, fits):
    assert _op().fits(torch.zeros(shape, dtype=dtype)) is fits


@pytest.mark.parametrize("env,expected", [
    ({}, one_shot.DEFAULT_MAX_BYTES),
    ({"MOPT_TP_ALLREDUCE": "nccl"}, 0),
    ({"MOPT_TP_ALLREDUCE": "NCCL", "MOPT_TP_ONE_SHOT_BYTES": "4096"}, 0),
    ({"MOPT_TP_ONE_SHOT_BYTES": "100"}, 96),  # whole 16-byte units
    ({"MOPT_TP_ONE_SHOT_BYTES": "0"}, 0),
])
def test_environment_switches(monkeypatch, env, expected):
    for name in ("MOPT_TP_ALLREDUCE", "MOPT_TP_ONE_SHOT_BYTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert one_shot.max_bytes_from_env() == expected


def test_a_bad_size_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOPT_TP_ONE_SHOT_BYTES", "1MB")
    with pytest.raises(TensorParallelError, match="MOPT_TP_ONE_SHOT_BYTES.*'1MB'"):
        one_shot.max_bytes_from_env()


def test_the_registered_group_lives_as_long_as_it_is_held():
    import torch.distributed as dist
    from torch._C._distributed_c10d import _resolve_process_group

    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    backend = dist.ProcessGroupGloo(dist.PrefixStore("b", store), 0, 1, datetime.timedelta(seconds=10))
    held = one_shot.register_process_group("mopt-test-held", store, 0, 1, backend, torch.device("cpu"))
    one_shot.register_process_group("mopt-test-dropped", store, 0, 1, backend, torch.device("cpu"))
    gc.collect()
    assert _resolve_process_group("mopt-test-held") is held
    with pytest.raises(RuntimeError, match="destroyed"):
        _resolve_process_group("mopt-test-dropped")
    one_shot.unregister_process_group("mopt-test-held")
    one_shot.unregister_process_group("mopt-test-dropped")
    one_shot.unregister_process_group("never-registered")  # quiet
    with pytest.raises(RuntimeError):
        _resolve_process_group("mopt-test-held")


def test_no_one_shot_path_off_gpus():
    world = types.SimpleNamespace(device=torch.device("cpu"), size=2)
    assert one_shot.set_up(world, agree=lambda ok: pytest.fail("a CPU world needs no agreement")) is None


class _Backend:
    def __init__(self):
        self.calls = []

    def allreduce(self, tensors, opts):
        self.calls.append(opts.reduceOp)
        return types.SimpleNamespace(wait=lambda: None)


class _FakeOneShot:
    def __init__(self):
        self.calls = 0

    def fits(self, x):
        return _op(64).fits(x)

    def __call__(self, x):
        self.calls += 1
        return x * 2  # a new tensor, as the real one returns


@pytest.mark.parametrize("shape,op,to_one_shot", [
    ((1, 8), "sum", True),
    ((1, 8), "max", False),     # per-token amaxes: NCCL
    ((64, 8), "sum", False),    # 1 KiB > the 64 bytes allowed here: NCCL
])
def test_group_routes_sums(shape, op, to_one_shot):
    backend, fast = _Backend(), _FakeOneShot()
    group = Group(backend, 0, 2, "model")
    group.one_shot = fast
    x = torch.ones(shape, dtype=torch.bfloat16)
    y = group.all_reduce(x, op)
    assert (fast.calls, len(backend.calls)) == ((1, 0) if to_one_shot else (0, 1))
    assert (y is x) is not to_one_shot  # callers must use the result


@pytest.mark.parametrize("variable,value", [("MOPT_TP_ONE_SHOT_BYTES", "lots"), ("MOPT_TP_FUSED_NORM", "on"),
                                            ("MOPT_TP_GEMV_PUSH", "true"), ("MOPT_TP_TWO_SHOT_ROWS", "-4"),
                                            ("MOPT_TP_PEER_AMAX", "off")])
def test_a_bad_setting_fails_before_any_process_starts(monkeypatch, variable, value):
    from mopt.engine import tp_runtime
    from mopt.engine.dummy import tiny_preset_config

    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(tp_runtime, "runtime", lambda *a: pytest.fail("a world was started"))
    with pytest.raises(TensorParallelError, match=variable):
        tp_runtime.load_tensor_parallel("dummy", tiny_preset_config(), "cpu", torch.float32, "auto", 2, False)


class _FakeNorm:
    def fits(self, x):
        return x.shape[0] <= 2


@pytest.mark.parametrize("rows,has_norm,fused", [(1, True, True), (3, True, False), (1, False, False)])
def test_group_offers_the_fused_norm_where_it_fits(rows, has_norm, fused):
    group = Group(_Backend(), 0, 2, "model")
    assert group.fused_rms_norm(torch.ones(rows, 8)) is None  # no one-shot path at all
    group.one_shot = _FakeOneShot()
    norm = _FakeNorm()
    group.one_shot.norm = norm if has_norm else None
    assert (group.fused_rms_norm(torch.ones(rows, 8)) is norm) is fused


SWITCHES = {"MOPT_TP_FUSED_NORM": one_shot.fused_norm_from_env, "MOPT_TP_GEMV_PUSH": one_shot.producer_push_from_env,
            "MOPT_TP_PEER_AMAX": one_shot.peer_amax_from_env}


@pytest.mark.parametrize("variable", list(SWITCHES))
@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False)])
def test_switches(monkeypatch, variable, value, expected):
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    assert SWITCHES[variable]() is expected


@pytest.mark.parametrize("variable", list(SWITCHES))
def test_a_bad_switch_names_the_variable(monkeypatch, variable):
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(TensorParallelError, match=f"{variable} must be 0 or 1, got 'yes'"):
        SWITCHES[variable]()


def _norm(producer_push: bool = True, two_shot_rows: int = 0, peer_amax: bool = True) -> one_shot.OneShotRMSNorm:
    tan = pytest.importorskip("mopt.kernels.triton_allreduce_norm")
    buffer = torch.empty(tan.buffer_bytes(2), dtype=torch.uint8)
    handle = types.SimpleNamespace(buffer_ptrs=[buffer.data_ptr(), buffer.data_ptr() + (1 << 20)])
    return one_shot.OneShotRMSNorm(buffer, handle, 1, 2, one_shot.DEFAULT_MAX_BYTES, producer_push, two_shot_rows,
                                   peer_amax)


@pytest.mark.parametrize("rows,dtype,on_gpu,peer_amax,kernel", [
    (64, torch.bfloat16, True, True, True),
    (128, torch.float16, True, True, True),
    (129, torch.bfloat16, True, True, False),   # more rows than its region holds: the MAX all-reduce
    (4, torch.float32, True, True, False),      # 32-bit amaxes do not fit its 16-bit words
    (4, torch.bfloat16, False, True, False),    # CPU tensors (gloo worlds never set it up; still refused)
    (4, torch.bfloat16, True, False, False),    # MOPT_TP_PEER_AMAX=0
])
def test_per_token_fp8_takes_the_peer_kernel_where_it_fits(monkeypatch, rows, dtype, on_gpu, peer_amax, kernel):
    """``OneShotRMSNorm.per_token_fp8`` (and ``Group.per_token_fp8`` through it): the peer-memory kernel where it
    takes the rows, else None, which leaves the row-parallel layer to the MAX all-reduce."""
    norm = _norm(peer_amax=peer_amax)
    calls = []
    monkeypatch.setattr(norm.amax_kernel, "per_token_fp8_over_peers", lambda x2, peers: calls.append(peers) or "q")
    x2 = torch.zeros(rows, 64, dtype=dtype)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: on_gpu))
    group = Group(_Backend(), 1, 2, "model")
    assert group.per_token_fp8(x2) is None  # no peer memory at all
    group.one_shot = _FakeOneShot()
    group.one_shot.norm = norm
    assert (group.per_token_fp8(x2) == "q") is kernel
    assert calls == ([norm.peers] if kernel else [])


@pytest.mark.parametrize("value,expected", [(None, 0), ("0", 0), ("16", 16)])
def test_two_shot_rows_setting(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MOPT_TP_TWO_SHOT_ROWS", raising=False)
    else:
        monkeypatch.setenv("MOPT_TP_TWO_SHOT_ROWS", value)
    assert one_shot.two_shot_rows_from_env() == expected


def test_a_bad_two_shot_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOPT_TP_TWO_SHOT_ROWS", "many")
    with pytest.raises(TensorParallelError, match="MOPT_TP_TWO_SHOT_ROWS must be a whole number of rows"):
        one_shot.two_shot_rows_from_env()


def test_calls_of_enough_rows_sum_in_two_shots_and_get_no_push(monkeypatch):
    """From ``two_shot_rows`` rows the norm runs the two-shot kernel, and no GEMV pushes to it (the two-shot
    kernel sends each row to its owner only); below, and for rows a GEMV already pushed, the one-shot kernel."""
    norm = _norm(two_shot_rows=16)
    calls = []
    monkeypatch.setattr(norm.kernel, "all_reduce_rms_norm", lambda *a, **k: calls.append("one") or (None, None))
    monkeypatch.setattr(norm.two_shot_kernel, "two_shot_rms_norm", lambda *a, **k: calls.append("two") or (None, None))
    assert norm.push_peers(16, 64, torch.bfloat16) is None
    assert norm.push_peers(8, 64, torch.bfloat16) is norm.peers
    big, small = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    norm(big.view(2, 8, 64), big, torch.ones(64), 1e-5)
    norm(small, small, torch.ones(64), 1e-5)
    norm.pushed(small)
    norm(small, small, torch.ones(64), 1e-5)
    assert calls == ["two", "one", "one"]
    assert not _norm().two_shot(128)  # off unless set


@pytest.mark.parametrize("rows,n,dtype,producer_push,offered", [
    (1, 4096, torch.bfloat16, True, True),
    (64, 4096, torch.float16, True, True),
    (128, 4096, torch.bfloat16, True, True),
    (129, 4096, torch.bfloat16, True, False),   # more rows than the buffer holds: the norm does not fuse
    (1, 16384, torch.bfloat16, True, False),    # wider than its rows
    (1, 4096, torch.float32, True, False),
    (1, 4096, torch.bfloat16, False, False),    # MOPT_TP_GEMV_PUSH=0
])
def test_a_gemv_pushes_exactly_where_the_norm_fuses(rows, n, dtype, producer_push, offered):
    norm = _norm(producer_push)
    peers = norm.push_peers(rows, n, dtype)
    assert (peers is norm.peers) is offered
    if producer_push:  # the norm after it takes the same sums fused, so it is the one that skips its push
        assert norm.fits_rows(rows, n, dtype) is offered
    assert (norm.peers.rank, norm.peers.world, norm.peers.slots.dtype, norm.peers.slots.numel()) == \
        (1, 2, torch.int32, 128 * 4)  # a counter per row and per program it may be split over


def test_the_next_norm_call_takes_the_pushed_rows(monkeypatch):
    norm = _norm()
    calls = []
    monkeypatch.setattr(norm.kernel, "all_reduce_rms_norm", lambda *args, **kwargs: calls.append(args[-2:]) or (None, None))
    y = torch.zeros(2, 64, dtype=torch.bfloat16)
    norm.pushed(y)
    assert norm.push_peers(2, 64, torch.bfloat16) is None  # one push at a time
    norm(y.view(1, 2, 64), y, torch.ones(64), 1e-5)  # the layer's reshaped output: the same sums
    norm(y, y, torch.ones(64), 1e-5)
    assert calls == [(norm.peers, True), (norm.peers, False)]


def test_other_sums_than_those_pushed_are_an_error_not_a_wrong_result(monkeypatch):
    norm = _norm()
    monkeypatch.setattr(norm.kernel, "all_reduce_rms_norm", lambda *args: pytest.fail("the kernel ran"))
    y = torch.zeros(2, 64, dtype=torch.bfloat16)
    norm.pushed(y)
    with pytest.raises(RuntimeError, match="not the ones this norm was given"):
        norm(y + 1, y, torch.ones(64), 1e-5)


@pytest.mark.parametrize("reduce,returns_kernel_output,group_has_norm,named", [
    (False, True, True, True),
    (False, False, True, False),   # SVDQuant: the low-rank branch joins after the kernel
    (False, True, False, False),   # a group without the fused norm (NCCL, CPUs, several nodes)
])
def test_a_row_parallel_layer_names_the_norm_to_its_kernel(reduce, returns_kernel_output, group_has_norm, named):
    from mopt.layers.linear import RowParallelLinear

    layer = RowParallelLinear(64, 32, tp_rank=0, tp_size=1)
    norm, seen = object(), []

    class Method:
        def apply(self, layer, x, bias):
            seen.append(layer.partials_to)
            return x[..., :32]

    method = Method()
    method.returns_kernel_output = returns_kernel_output
    layer.quant_method = method
    layer.tp_group = types.SimpleNamespace(partial_sums_norm=lambda: norm if group_has_norm else None)
    layer(torch.ones(1, 64), reduce=reduce)
    assert seen == [norm if named else None]
    assert layer.partials_to is None  # only for the call


@pytest.mark.parametrize("op,reason,want", [
    (None, None, "NCCL all-reduces"),
    (None, "the ranks run on 2 hosts", "NCCL all-reduces (the ranks run on 2 hosts)"),
    (types.SimpleNamespace(max_bytes=1 << 20, norm=None), "no fused all-reduce + RMSNorm: x",
     "one-shot all-reduces over peer memory up to 1024 KiB, NCCL above (no fused all-reduce + RMSNorm: x)"),
    (types.SimpleNamespace(max_bytes=1 << 20, norm=types.SimpleNamespace(producer_push=True, two_shot_rows=0,
                                                                         peer_amax=True)), None,
     "all-reduce fused with RMSNorm over peer memory up to 1024 KiB, sent from the GEMVs, NCCL above"),
    (types.SimpleNamespace(max_bytes=1 << 20, norm=types.SimpleNamespace(producer_push=False, two_shot_rows=0,
                                                                         peer_amax=True)), None,
     "all-reduce fused with RMSNorm over peer memory up to 1024 KiB, NCCL above"),
    (types.SimpleNamespace(max_bytes=1 << 20, norm=types.SimpleNamespace(producer_push=True, two_shot_rows=16,
                                                                         peer_amax=True)), None,
     "all-reduce fused with RMSNorm over peer memory up to 1024 KiB, sent from the GEMVs, in two shots from 16 rows, "
     "NCCL above"),
    (types.SimpleNamespace(max_bytes=1 << 20, norm=types.SimpleNamespace(producer_push=True, two_shot_rows=0,
                                                                         peer_amax=False)), None,
     "all-reduce fused with RMSNorm over peer memory up to 1024 KiB, sent from the GEMVs, NCCL above; per-token FP8 "
     "amaxes through NCCL"),
])
def test_the_benchmark_title_names_the_path_the_sums_take(monkeypatch, op, reason, want):
    monkeypatch.setattr(one_shot, "unavailable_reason", reason)
    assert one_shot.describe(types.SimpleNamespace(one_shot=op)) == want
