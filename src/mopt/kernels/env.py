"""Kernel switches read from the environment, parsed without importing Triton (so the engine can refuse a
bad value before it loads anything)."""

from __future__ import annotations

import os

PDL_ENV = "MOPT_PDL"


def pdl_setting() -> bool:
    """``MOPT_PDL``: unset or 1 -> programmatic dependent launch where the GPU supports it, 0 -> off."""
    value = os.environ.get(PDL_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}={value!r}: expected 0 (off) or 1 (on where the GPU supports it)")
    return value == "1"
