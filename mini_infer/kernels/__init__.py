"""Triton kernels, each beside its PyTorch reference (generated from the chapters).

On a machine without a GPU, Triton kernels run only through Triton's interpreter, which must be switched
on before any kernel is defined: this package does it when it is first imported (the kernels' modules
live here, so nothing else in mini_infer needs to know). The package's CPU path uses the PyTorch
references either way; the interpreter serves the chapters and tests that run a kernel on the CPU.
"""

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (Hopper and newer; Chapter
    7.3.4): the GPU may start a kernel while the one before it still runs; the kernel waits inside itself
    (`gdc_wait()`) until that one is done before it reads what that one may write, then lets the next one
    launch (`gdc_launch_dependents()`). True on CUDA devices of compute capability 9.0 and up, unless the
    environment sets MINI_INFER_PDL=0."""
    if device.type != "cuda" or os.environ.get("MINI_INFER_PDL", "1") == "0":
        return False
    return _capability(
        device.index if device.index is not None else torch.cuda.current_device()
    ) >= (9, 0)


def pdl_launch(device: torch.device) -> dict:
    """A kernel launch's PDL arguments, one decision for both: the `PDL` constexpr (the kernel waits with
    `gdc_wait()` and lets the next launch) and Triton's `launch_pdl` (the GPU may start it early)."""
    pdl = use_pdl(device)
    return {"PDL": pdl, "launch_pdl": pdl}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
