"""Mini-Infer: a small, fast LLM inference engine, built chapter by chapter.

Every other module in this package is generated from a chapter in `chapters/` (its first line names
which); `__init__.py` files are the only hand-written ones.
"""
import os

import torch

__version__ = "0.1.0"

# On a machine without a GPU, Triton kernels run only through Triton's interpreter, which must be
# switched on before any kernel is defined. The package's CPU path uses PyTorch ops either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
