"""Triton kernels, each beside its PyTorch reference (generated from the chapters).

On a machine without a GPU, Triton kernels run only through Triton's interpreter, which must be switched
on before any kernel is defined: this package does it when it is first imported (the kernels' modules
live here, so nothing else in mini_infer needs to know). The package's CPU path uses the PyTorch
references either way; the interpreter serves the chapters and tests that run a kernel on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
