"""Names that dummy-weight models are built from, without importing torch: the config presets under
``mopt/data/presets/`` and the formats dummy weights come in (as ``mopt quantize`` names them), each
with the ``quantization`` section of a ModelOpt export in that format."""

from __future__ import annotations

from pathlib import Path

from mopt.quant.synthetic import QUANTIZATION

PRESETS_DIR = Path(__file__).resolve().parent.parent / "data" / "presets"

DUMMY_FORMATS: dict[str, dict | None] = {
    "bf16": None,
    "fp8": {"quant_algo": "FP8"},
    "fp8-kv": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
    "fp8-pcpt": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
    "fp8-pb-wo": {"quant_algo": "FP8_PB_WO"},
    "nvfp4": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": None},
    "nvfp4-kv": {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8"},
    "fp8-nvfp4-kv": {"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"},
    "fp8-nvfp4-affine-kv": {"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4_AFFINE"},
    "fp8-int8-kv": {"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"},
}
# Every other format, with the checkpoint tensors of ``mopt.quant.synthetic`` (as ``mopt bench kernels`` makes
# them). mopt has no AWQ or SVDQuant experts (ModelOpt cannot export them), so mixture-of-experts presets refuse
# those.
SYNTHETIC_FORMATS = ("fp8-pb-real", "int8-wo", "int8-sq", "int4-awq", "w4a8-awq", "w4a16-nvfp4", "w4a8-nvfp4-fp8",
                     "nvfp4-awq", "nvfp4-svdquant", "mxfp8", "mxfp4", "w4a8-mxfp4-fp8")
DUMMY_FORMATS.update({name: QUANTIZATION[name] for name in SYNTHETIC_FORMATS})


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
