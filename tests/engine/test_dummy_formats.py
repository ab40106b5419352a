"""Every ``--dummy`` format builds a model that loads and runs (``mopt bench generate --format F``), dense and
mixture-of-experts (where ModelOpt can export experts in it; elsewhere a clear error naming the layer).

A format whose layer scheme has no exporter used to fall back to the model dtype, which the loader then
refused (``fp8-pb-wo``: "checkpoint tensor has dtype torch.float32, expected torch.float8_e4m3fn").
"""

from __future__ import annotations

import pytest
import torch

from mopt.engine.dummy import build_dummy_model, tiny_moe_preset_config, tiny_preset_config
from mopt.engine.presets import DUMMY_FORMATS
from mopt.quant.validate import QuantConfigError


NO_EXPERTS = ("int4-awq", "w4a8-awq", "nvfp4-awq", "nvfp4-svdquant")  # ModelOpt cannot export these formats' experts


@pytest.mark.parametrize("fmt", sorted(DUMMY_FORMATS))
@pytest.mark.parametrize("make_config", [tiny_preset_config, tiny_moe_preset_config], ids=["dense", "moe"])
def test_every_dummy_format_builds_and_runs(fmt, make_config):
    torch.manual_seed(0)
    if make_config is tiny_moe_preset_config and fmt in NO_EXPERTS:
        with pytest.raises(QuantConfigError, match="model.layers.0.mlp.experts: .*mixture-of-experts layers are not "
                                                   "supported"):
            build_dummy_model(make_config(), fmt)
        return
    model = build_dummy_model(make_config(), fmt)
    with torch.no_grad():
        logits = model(torch.arange(5)[None])
    assert logits.shape == (1, 5, 320) and torch.isfinite(logits).all()
