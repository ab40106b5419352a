"""Programmatic dependent launch (PDL, compute capability >= 9.0) for the decode path's Triton kernels.

A decode step is a chain of short kernels, each reading the one before's output. Launched with PDL
(``launch_pdl=True``), a kernel may start while its predecessor still runs: its programs are scheduled
and set up, then stop in ``griddepcontrol.wait`` until the predecessor has finished and its writes are
visible. So the launch latency and prologue of one kernel hide under the tail of the one before. Each
kernel that takes part calls :func:`pdl_prologue` first, before it touches any global memory, so no
read or write can race its predecessor; and it lets its own dependents launch from there on.

The decode GEMVs split the prologue (:func:`pdl_launch_dependents`, then :func:`pdl_wait`) around
their first weight tile: weights are written by no kernel of a decode step, so those loads may run
while the predecessor finishes, and the first bytes of the GEMV's stream arrive before it may start.

Kernels that are not launched with PDL (cuBLAS, torch) keep the stream's ordinary ordering on both
sides. Captured CUDA graphs keep the dependencies as programmatic edges.

``MOPT_PDL=0`` turns it off; it is on where the GPU and Triton support it and Triton is not interpreted.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mopt.kernels.env import pdl_setting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:  # an older Triton: never enabled, the constexpr branch below is never compiled
    HAVE_GDC = False
    gdc_launch_dependents = gdc_wait = None

_ENABLED: dict[int, bool] = {}


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (decided once per device)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    on = _ENABLED.get(index)
    if on is None:
        on = _ENABLED[index] = (HAVE_GDC and os.environ.get("TRITON_INTERPRET") != "1" and pdl_setting()
                                and torch.cuda.get_device_capability(index) >= (9, 0))
    return on


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: ``PDL`` (the kernel's constexpr) and Triton's ``launch_pdl``."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel launch (its programs then wait in their own :func:`pdl_wait`)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible. Only loads of memory that
    no kernel of the step writes (weights) may come before it."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's writes. First in a kernel's body."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
