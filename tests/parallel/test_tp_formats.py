"""Every ModelOpt format's layers under tensor and expert parallelism, in one process: each rank's shard
is built in its parallel state and run on a thread, with collectives at a barrier (tp_helpers.ThreadGroup),
so the layers' own all-reduces (the output sum, the MAX of per-token activation amaxes) run as they do
over gloo or NCCL. Every rank's output must equal the unsharded layer's to float32 rounding: relative L2
error <= 1e-6 (measured <= 1.5e-7 with the intermediate size split, where the ranks' partial sums are
added in another order than one GEMM adds them; 0 with expert parallelism). A per-token activation
scale taken over a rank's slice instead of the whole row is off by ~4e-3.

The MoE layers run twice: on the reference loop, and on the CUDA fused-MoE kernels through Triton's
interpreter (bound 1e-5 there: the kernels sum in another order).

Checkpoint tensors come from tests/layers/test_linear_loading.py's ``checkpoint_tensors`` (what ModelOpt
exports per projection, made with mopt's quantizers); a split that a format cannot take must fail when
the layer is built, naming it.
"""

from __future__ import annotations

import pytest
import torch

from mopt.engine.distributed import ParallelState, TensorParallelSplitError, parallel_state
from mopt.layers.fused_moe import FusedMoE
from mopt.layers.linear import RowParallelLinear
from tp_helpers import ThreadGroup, load_test_module, rel

linear_loading = load_test_module("layers", "test_linear_loading")

# The formats a FusedMoE layer takes (ModelOpt's AWQ and SVDQuant experts are not supported at all);
# "-dynamic": without the optional static input scale, so activations are quantized per token.
MOE_FORMATS = ["unquantized", "fp8", "nvfp4", "fp8-pcpt", "fp8-pb-wo", "int8-wo", "int8-sq", "mxfp8", "mxfp4",
               "w4a8-mxfp4-fp8", "w4a8-mxfp4-fp8-dynamic", "w4a16-nvfp4", "w4a8-nvfp4-fp8"]
# Whose activations are quantized per token: a rank's slice of a row must use the whole row's amax.
PER_TOKEN = ["fp8-pcpt", "w4a8-mxfp4-fp8-dynamic"]
ROUNDING = 1e-6


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("MOPT_BACKEND", "reference")


def _tensors(fmt: str, rows: int, cols: int, seed: int) -> dict[str, torch.Tensor]:
    tensors = linear_loading.checkpoint_tensors(fmt.removesuffix("-dynamic"), rows, cols, seed)
    if fmt.endswith("-dynamic"):
        tensors.pop("input_scale")
    return tensors


def _config(fmt: str):
    return linear_loading.qc(fmt.removesuffix("-dynamic"))


def _moe(fmt: str, num_experts: int = 4, hidden: int = 128, inter: int = 128) -> FusedMoE:
    layer = FusedMoE(num_experts, 2, hidden, inter, quant_config=_config(fmt), prefix="model.layers.0.mlp.experts")
    for e in range(num_experts):
        for proj, rows, cols in (("w1", inter, hidden), ("w3", inter, hidden), ("w2", hidden, inter)):
            for name, t in _tensors(fmt, rows, cols, 10 * e + len(proj) + rows % 7).items():
                if name == "weight" and fmt == "unquantized":
                    t = t.float()
                layer.weight_loader(getattr(layer, f"{'w2' if proj == 'w2' else 'w13'}_{name}"), t, (proj, e))
    layer.process_weights_after_loading()
    return layer


def _shards(build, size: int, expert_parallel: bool = False) -> tuple[ThreadGroup, list]:
    group = ThreadGroup(size)
    shards = []
    for rank in range(size):  # built one after the other: the parallel state is process-wide
        with parallel_state(ParallelState(rank, size, group.member(rank), expert_parallel)):
            shards.append(build())
    return group, shards


@pytest.mark.parametrize("fmt", MOE_FORMATS)
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["intermediate-split", "expert-parallel"])
def test_moe_ranks_equal_the_whole_layer(fmt, expert_parallel):
    inter = 256 if fmt == "fp8-pb-wo" else 128  # 128x128 blocks: 128 per rank keeps them whole
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _moe(fmt, inter=inter)(x, logits)
        group, shards = _shards(lambda: _moe(fmt, inter=inter), 2, expert_parallel)
        assert [s.num_experts for s in shards] == [2 if expert_parallel else 4] * 2
        got = group.run(lambda rank: shards[rank](x, logits))
    errors = [rel(y, want) for y in got]
    assert max(errors) <= ROUNDING, f"{fmt}: relative L2 error per rank {errors}"


@pytest.mark.parametrize("fmt", PER_TOKEN)
def test_per_token_activations_of_a_row_parallel_layer_use_the_whole_row(fmt):
    """Each rank quantizes its slice of a token under the whole row's amax (``reduce_token_amax``, a MAX
    all-reduce), so its output after the sum is the unsharded layer's; without that MAX it is not."""
    k, n = 256, 64
    tensors = _tensors(fmt, n, k, 3)

    def layer(tp_rank=None, tp_size=None):
        lin = RowParallelLinear(k, n, quant_config=_config(fmt), prefix="down", params_dtype=torch.float32,
                                tp_rank=tp_rank, tp_size=tp_size)
        return linear_loading.load(lin, {None: tensors})

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    x[:, :k // 2] *= 10  # the two halves of each row have very different amaxes
    part = [x[:, :k // 2], x[:, k // 2:]]
    with torch.no_grad():
        want = layer()(x)
        group, shards = _shards(layer, 2)
        got = group.run(lambda rank: shards[rank](part[rank]))
        unreduced = sum(layer(r, 2)(part[r]) for r in range(2))  # no group: each rank's own amax
    errors = [rel(y, want) for y in got]
    assert max(errors) <= ROUNDING, errors
    assert rel(unreduced, want) > 100 * ROUNDING  # what the MAX all-reduce prevents


# (format, what is split, the error): blocks and packing that a split would cut.
UNSPLITTABLE = [
    ("fp8-pb-wo", "moe", r"experts: expert intermediate size \(128\) splits into 64 per rank over tensor_parallel_size "
                         r"2; each rank needs a multiple of 128 \(whole 128x128 weight blocks\)"),
    ("mxfp8", "moe", r"experts: expert intermediate size \(64\) splits into 16 per rank over tensor_parallel_size 4; "
                     r"each rank needs a multiple of 32 \(whole 32-element blocks\)"),
    ("int4-awq", "row", r"down: input size 256 splits into 64 per rank over tensor_parallel_size 4; "
                        r"ModelOptInt4AwqLinearMethod needs a multiple of 128 per rank \(whole 128-element INT4 groups\)"),
    ("int8-wo", "row", r"down: input size 96 splits into 48 per rank over tensor_parallel_size 2; "
                       r"ModelOptInt8WeightOnlyLinearMethod needs a multiple of 32 per rank \(the Triton weight-decoding"),
    ("mxfp4", "row", r"down: input size 192 splits into 48 per rank over tensor_parallel_size 4; ModelOptMxFp4LinearMethod "
                     r"needs a multiple of 32 per rank \(whole 32-element MX blocks\)"),
    ("w4a16-nvfp4", "row", r"down: input size 96 splits into 48 per rank over tensor_parallel_size 2; "
                           r"ModelOptNvFp4W4A16LinearMethod needs a multiple of 32 per rank"),
    ("int4-awq", "column", r"gate_up: output sizes split into \[3, 3\] per rank over tensor_parallel_size 2; "
                           r"ModelOptInt4AwqLinearMethod needs multiples of 2 \(INT4 rows are packed in pairs\)"),
]


@pytest.mark.parametrize("fmt,what,message", UNSPLITTABLE)
def test_splits_a_format_cannot_take_fail_when_the_layer_is_built(fmt, what, message):
    from mopt.layers.linear import MergedColumnParallelLinear

    sizes = {"fp8-pb-wo": (128, 2), "mxfp8": (64, 4), "int4-awq": (256, 4), "mxfp4": (192, 4)}
    size, tp = sizes.get(fmt, (96, 2)) if what != "column" else (6, 2)
    if what == "moe":
        build = lambda: FusedMoE(4, 2, 128, size, quant_config=_config(fmt), prefix="m.experts")  # noqa: E731
    elif what == "row":
        build = lambda: RowParallelLinear(size, 64, quant_config=_config(fmt), prefix="down")  # noqa: E731
    else:
        build = lambda: MergedColumnParallelLinear(256, [size, size], quant_config=_config(fmt),  # noqa: E731
                                                   prefix="gate_up")
    with pytest.raises(TensorParallelSplitError, match=message):
        with parallel_state(ParallelState(0, tp, None)):
            build()


@pytest.mark.parametrize("fmt", MOE_FORMATS)
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["intermediate-split", "expert-parallel"])
def test_fused_moe_kernels_on_ranks_equal_the_whole_layer(fmt, expert_parallel, monkeypatch):
    """The CUDA MoE kernels, run on the CPU through Triton's interpreter (selected as on a GPU), on each rank's
    shard: the down GEMM's per-token FP8 input takes the whole row's amax through the layer's MAX all-reduce,
    MX blocks stay within a rank's slice, expert parallelism's foreign pairs contribute nothing. Each rank's
    output equals the whole layer's through the reference loop, to float32 rounding (bound 1e-5: the kernels
    sum in another order)."""
    import threading

    from triton.runtime.interpreter import InterpretedFunction

    from mopt.kernels import moe as moe_kernels

    load_test_module("kernels", "triton_device").triton_device(False)  # skips unless TRITON_INTERPRET=1
    lock, launch = threading.Lock(), InterpretedFunction.run

    def one_launch_at_a_time(self, *args, **kwargs):  # the interpreter patches triton.language while it runs
        with lock:
            return launch(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", one_launch_at_a_time)
    inter = 256 if fmt == "fp8-pb-wo" else 128
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _moe(fmt, inter=inter)(x, logits)
        monkeypatch.setenv("MOPT_BACKEND", "auto")
        monkeypatch.setattr(moe_kernels, "cuda_capability", lambda device, capability, what: (True, ""))
        group, shards = _shards(lambda: _moe(fmt, inter=inter), 2, expert_parallel)
        assert all(s.quant_method.kernel.name.startswith("triton") for s in shards), shards[0].quant_method.kernel
        got = group.run(lambda rank: shards[rank](x, logits))
    errors = [rel(y, want) for y in got]
    assert max(errors) <= 1e-5, f"{fmt}: relative L2 error per rank {errors}"
