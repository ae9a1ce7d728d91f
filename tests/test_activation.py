"""The Triton SiLU-and-multiply (SwiGLU's activation) against its PyTorch reference."""

import os

import pytest
import torch

import mini_infer.kernels  # noqa: F401  (switches on Triton's interpreter when there is no GPU)
from mini_infer.kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton

# Triton runs on CPU tensors only through the interpreter (on by default without a GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# SiLU in float32 then rounded, as PyTorch does; exp may differ in the last float32 bit, which can move a
# half-precision result by one unit in the last place (and the interpreter rounds to bf16 by truncation).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (leading shape, intermediate size): SmolLM2's, Qwen3-0.6B's, a TP shard of Llama-3-8B's, odd sizes
SHAPES = [((1,), 1536), ((3,), 3072), ((2, 5), 7168), ((13,), 100), ((7,), 1000), ((33,), 48)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,inter", SHAPES)
def test_triton_matches_reference(lead, inter, dtype, device):
    g = torch.Generator().manual_seed(inter)
    x = torch.randn(*lead, 2 * inter, generator=g).mul(3).to(dtype).to(device)
    out = silu_and_mul_triton(x)
    assert out.shape == (*lead, inter) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_ref(x), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_no_tokens(device):
    # a view with a longer row stride (every other row of a bigger tensor), and an empty batch
    x = torch.randn(10, 2 * 96, device=device)[::2]
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x))
    assert silu_and_mul_triton(torch.randn(0, 64, device=device)).shape == (0, 32)


def test_odd_width_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="even last dimension"):
        silu_and_mul_triton(torch.randn(2, 7))


def test_dispatch_uses_the_reference_on_the_cpu():
    x = torch.randn(4, 2 * 50)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_on_the_gpu_equals_pytorch_on_nearly_every_element():
    """Rounding where PyTorch rounds: on the GPU the kernel gives PyTorch's bf16 result almost exactly."""
    x = torch.randn(256, 2 * 14336, device="cuda", dtype=torch.bfloat16) * 3
    same = (silu_and_mul_triton(x) == silu_and_mul_ref(x)).float().mean().item()
    assert same > 0.999, same
