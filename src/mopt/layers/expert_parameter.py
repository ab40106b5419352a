"""Parameters of mixture-of-experts layers: tensors stacked over experts, loaded one expert and
projection at a time, with their tensor- and expert-parallel slicing (see ``mopt.layers.fused_moe``)."""

from __future__ import annotations

import torch

from mopt.layers.parameter import BaseParameter, ShardSpec, WeightLoadError, take_slice


class ExpertParameter(BaseParameter):
    """A tensor stacked over experts, ``[E, ...]``, loaded one expert and projection at a time.

    ``kind="w13"``: the fused gate/up projection; a weight-like slot holds w1's rows then w3's
    (``[E, 2I, ...]``), a scalar slot one value per projection (``[E, 2]``). ``kind="w2"``: the down
    projection, one slot per expert (``[E, ...]`` or ``[E]``). Missing experts are reported by name.
    """

    # Tensor parallelism over the intermediate dimension (set by the layer): w13 takes this rank's rows
    # of each projection, w2 its columns (in the tensor's own units: values, packed bytes or blocks).
    tp_rank: int = 0
    tp_size: int = 1
    expert_offset: int = 0  # expert parallelism: global id of local expert 0 (for messages)
    # Expert parallelism: a small tensor every rank holds for all experts (FP8 input scales, reduced over
    # the experts after loading), indexed by global expert id.
    global_experts: bool = False

    def __init__(self, data: torch.Tensor, kind: str, weight_loader=None, per_row: bool = False,
                 per_input: bool = False) -> None:
        super().__init__(data, weight_loader)
        self.kind = kind
        self.per_row = per_row  # [E, 2I] / [E, H]: one value per output row (per-channel scales)
        self.per_input = per_input  # [E, 2H] / [E, I]: one value per input column (pre_quant_scale)
        self.loaded_mask = torch.zeros(data.shape[0], 2 if kind == "w13" else 1, dtype=torch.bool)

    @property
    def is_scalar(self) -> bool:
        return not (self.per_row or self.per_input) and self.data.dim() == (2 if self.kind == "w13" else 1)

    def split_dim(self, target: torch.Tensor) -> int | None:
        """The dim of one expert's slot that a tensor-parallel rank slices (None: the rank holds it all):
        w13's output rows, w2's input columns; per-row values of w2 and per-input values of w13 are whole."""
        if self.is_scalar or (self.per_row and self.kind == "w2") or (self.per_input and self.kind == "w13"):
            return None
        return 0 if self.kind == "w13" else target.dim() - 1

    def load_expert(self, loaded: torch.Tensor, shard: str, expert: int) -> None:
        num_experts = self.data.shape[0]
        if not 0 <= expert < num_experts:
            raise WeightLoadError(f"{self.mopt_name}: expert {expert} out of range (the layer has {num_experts})")
        if (shard == "w2") != (self.kind == "w2"):
            raise WeightLoadError(f"{self.mopt_name}: cannot load projection {shard} into {self.kind}")
        half = 1 if shard == "w3" else 0
        if self.is_scalar:
            if loaded.numel() != 1:
                raise WeightLoadError(f"{self.mopt_name}: expert {expert + self.expert_offset} {shard}: expected a "
                                      f"scalar, got shape {tuple(loaded.shape)}")
            target = self.data[expert, half] if self.kind == "w13" else self.data[expert]
            loaded = loaded.reshape(())
        elif self.kind == "w13":
            rows = self.data.shape[1] // 2
            target = self.data[expert, half * rows:(half + 1) * rows]
        else:
            target = self.data[expert]
        dim = self.split_dim(target)
        if self.tp_size > 1 and dim is not None:
            split = ShardSpec(split="output" if self.kind == "w13" else "input", slice_index=self.tp_rank,
                              num_slices=self.tp_size)
            loaded = take_slice(loaded, dim, split, target.shape[dim],
                                 f"{self.mopt_name} (expert {expert + self.expert_offset} {shard})")
        self.check_and_copy(target, loaded)
        self.loaded_mask[expert, half] = True

    @property
    def loaded(self) -> bool:
        return bool(self.loaded_mask.all())

    def missing(self) -> list[str]:
        names = ("w1", "w3") if self.kind == "w13" else ("w2",)
        return [f"expert {e + self.expert_offset} {names[h]}" for e, h in (~self.loaded_mask).nonzero().tolist()]


class ExpertBlockScaleParameter(ExpertParameter):
    """128x128-block weight scales of stacked experts, held one row per output row: ``[E, 2I, Kb]`` /
    ``[E, H, Kb]`` (as :class:`RowBlockScaleParameter` for a dense layer). Each expert's checkpoint
    tensor is ``[nb, 1, Kb, 1]``, ``[nb, Kb]``, or ``[]`` for a projection that is a single block.
    Under tensor parallelism the checkpoint's blocks cover the whole projection: w13's row blocks are
    expanded before this rank's rows are taken, w2's column blocks split in whole blocks."""

    def __init__(self, data: torch.Tensor, kind: str, weight_loader=None, block_n: int = 128) -> None:
        super().__init__(data, kind, weight_loader)
        self.block_n = block_n

    def load_expert(self, loaded: torch.Tensor, shard: str, expert: int) -> None:
        if loaded.dim() == 4 and loaded.shape[1] == 1 and loaded.shape[3] == 1:
            loaded = loaded[:, 0, :, 0]
        if loaded.dim() == 0:
            loaded = loaded.reshape(1, 1)
        rows = self.data.shape[1] // (2 if self.kind == "w13" else 1)
        if self.kind == "w13":
            rows *= self.tp_size
        cols = self.data.shape[2] * (self.tp_size if self.kind == "w2" else 1)
        want = (-(-rows // self.block_n), cols)
        if tuple(loaded.shape) != want:
            raise WeightLoadError(f"{self.mopt_name}: expert {expert + self.expert_offset} {shard}: block scale has "
                                  f"shape {tuple(loaded.shape)}, expected {want} (or [{want[0]}, 1, {want[1]}, 1])")
        super().load_expert(loaded.repeat_interleave(self.block_n, dim=0)[:rows], shard, expert)
