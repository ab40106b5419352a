"""Four gloo ranks against one process, on real tiny ModelOpt exports (the 2-rank suite,
test_tp_logits.py, covers every format; ``MOPT_TEST_TP=4`` runs all of it at 4 ranks, where the
exports whose blocks or groups are wider than a quarter of a layer are skipped as unsplittable).

Past 2 ranks a split meets what 2 ranks never do: KV heads replicated (2 KV heads over 4 ranks), one
attention head a rank, a vocabulary of 320 in quarters, MoE experts' intermediate sizes in quarters and
two experts a rank with expert parallelism, and partial sums added from 4 ranks. Tolerances as there.
"""

from __future__ import annotations

import pytest

from test_tp_logits import _check, _token_errors
from tp_helpers import moe_export, tp_world_per_module  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tp_world_per_module")]


@pytest.mark.parametrize("fmt,arch", [("fp8-kv", "llama"), ("nvfp4", "qwen3"), ("int8-sq", "llama"),
                                      ("fp8-pcpt", "qwen3")])
def test_dense_tp4_logits_equal_tp1(export_factory, fmt, arch):
    _check(_token_errors(export_factory(fmt, 256, arch).path, tp=4), True, f"{fmt} {arch} at 4 ranks")


@pytest.mark.parametrize("fmt,arch,expert_parallel", [("fp8", "qwen3_moe", False), ("nvfp4", "qwen3_moe", True)])
def test_moe_tp4_logits_equal_tp1(tmp_path_factory, fmt, arch, expert_parallel):
    errors = _token_errors(moe_export(tmp_path_factory, fmt, arch), expert_parallel, tp=4)
    _check(errors, True, f"{fmt} {arch} expert_parallel={expert_parallel} at 4 ranks")
