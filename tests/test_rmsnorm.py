"""The Triton RMSNorm (plain and fused with the residual add) against its PyTorch reference."""

import os

import pytest
import torch

import mini_infer.kernels  # noqa: F401  (switches on Triton's interpreter when there is no GPU)
from mini_infer.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_triton

# Triton runs on CPU tensors only through the interpreter (on by default without a GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Rounding the normalised value before the weight (as Hugging Face does) can put the two results a couple
# of units in the last place apart in half precision.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# (leading shape, hidden): odd token counts, non-power-of-two hidden sizes, several rows per program; 80 and
# 96 as in a per-head q/k norm (Qwen3) over heads of those sizes
SHAPES = [
    ((1,), 4096),
    ((3,), 576),
    ((2, 5), 1536),
    ((13,), 2048),
    ((4,), 8192),
    ((33,), 576),
    ((6,), 100),
    ((5,), 1000),
    ((7, 10), 80),
    ((3, 9), 96),
]


def inputs(lead, hidden, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g).mul(3).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype).to(device)
    residual = torch.randn(*lead, hidden, generator=g).to(dtype).to(device)
    return x, weight, residual


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_triton_matches_reference(lead, hidden, dtype, device):
    x, weight, _ = inputs(lead, hidden, dtype, device, seed=hidden)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,hidden", SHAPES[:4])
def test_fused_residual_updates_in_place(lead, hidden, dtype, device):
    x, weight, residual = inputs(lead, hidden, dtype, device, seed=hidden + 1)
    expected_sum = residual + x
    expected = rms_norm_ref(x, weight, 1e-5, residual.clone())[0]
    out, res = rms_norm_triton(x, weight, 1e-5, residual)
    assert res is residual  # the same tensor, updated in place
    # On the GPU the sum rounds like PyTorch's; the interpreter truncates fp32 -> bf16 instead (one unit off).
    sum_tol = 2**-7 if (dtype, device) == (torch.bfloat16, "cpu") else 0.0
    torch.testing.assert_close(residual, expected_sum, rtol=sum_tol, atol=0)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_rows(device):
    # Rows of a wider tensor (a row stride larger than the hidden size) read in place.
    wide = torch.randn(5, 1000, device=device)
    x, weight = wide[:, :576], torch.randn(576, device=device)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dispatch_on_cpu_is_the_reference(dtype):
    x, weight, residual = inputs((4, 3), 576, dtype, "cpu", seed=7)
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    ref_res = residual.clone()
    expected, _ = rms_norm_ref(x, weight, 1e-5, ref_res)
    out, res = rms_norm(x, weight, 1e-5, residual)
    assert res is residual and torch.equal(residual, ref_res) and torch.equal(out, expected)


def test_reference_matches_hugging_face():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(576))
    x = torch.randn(3, 4, 576).to(torch.bfloat16)
    assert torch.equal(rms_norm_ref(x, hf.weight.detach(), 1e-5), hf(x).detach())


def test_too_large_hidden_is_refused():
    with pytest.raises(ValueError, match="hidden sizes up to"):
        # refused before any launch
        rms_norm_triton(torch.randn(1, 2**17), torch.randn(2**17), 1e-5)


def test_non_contiguous_residual_is_refused():
    # The in-place update must land in the caller's tensor: a strided residual would need a copy.
    residual = torch.randn(4, 1152)[:, :576]
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm_triton(torch.randn(4, 576), torch.randn(576), 1e-5, residual)


def test_use_pdl_only_on_hopper_and_newer_unless_switched_off(monkeypatch):
    """Programmatic dependent launch (Chapter 7.3.4): on CUDA devices of compute capability 9.0 and up,
    never on the CPU or an older GPU (a T4 is 7.5), and not with MINI_INFER_PDL=0."""
    import mini_infer.kernels as kernels

    capability = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(kernels, "_capability", lambda index: capability[index])
    monkeypatch.delenv("MINI_INFER_PDL", raising=False)
    assert kernels.use_pdl(torch.device("cuda", 0))
    assert not kernels.use_pdl(torch.device("cuda", 1))
    assert not kernels.use_pdl(torch.device("cpu"))
    monkeypatch.setenv("MINI_INFER_PDL", "0")
    assert not kernels.use_pdl(torch.device("cuda", 0))
