"""Mini-Infer: a small, fast LLM inference engine, built chapter by chapter.

Every other module in this package is generated from a chapter in `chapters/` (its first line names
which); `__init__.py` files are the only hand-written ones. Importing the package imports nothing
heavy: `LLM` and `SamplingParams` load on first use.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    """`from mini_infer import LLM, SamplingParams`, as with vLLM; imported on first use."""
    if name == "LLM":
        from mini_infer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from mini_infer.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'mini_infer' has no attribute {name!r}")
