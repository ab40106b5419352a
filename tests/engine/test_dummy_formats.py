"""Every ``--dummy`` format builds a model that loads and runs (``mopt bench generate --format F``).

A format whose layer scheme has no exporter used to fall back to the model dtype, which the loader then
refused (``fp8-pb-wo``: "checkpoint tensor has dtype torch.float32, expected torch.float8_e4m3fn").
"""

from __future__ import annotations

import pytest
import torch

from mopt.engine.dummy import build_dummy_model, tiny_moe_preset_config, tiny_preset_config
from mopt.engine.presets import DUMMY_FORMATS


@pytest.mark.parametrize("fmt", sorted(DUMMY_FORMATS))
@pytest.mark.parametrize("make_config", [tiny_preset_config, tiny_moe_preset_config], ids=["dense", "moe"])
def test_every_dummy_format_builds_and_runs(fmt, make_config):
    torch.manual_seed(0)
    model = build_dummy_model(make_config(), fmt)
    with torch.no_grad():
        logits = model(torch.arange(5)[None])
    assert logits.shape == (1, 5, 320) and torch.isfinite(logits).all()
