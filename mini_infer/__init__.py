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

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    """`from mini_infer import LLM, SamplingParams`, as with vLLM; imported on first use, so that a bare
    `import mini_infer` stays light."""
    if name == "LLM":
        from mini_infer.llm import LLM
        return LLM
    if name == "SamplingParams":
        from mini_infer.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'mini_infer' has no attribute {name!r}")
