"""The Triton RoPE kernel against its PyTorch reference; the cos/sin cache against Hugging Face."""

import os

import pytest
import torch

import mini_infer.kernels  # noqa: F401  (switches on Triton's interpreter when there is no GPU)
from mini_infer.kernels.rmsnorm import rms_norm_triton
from mini_infer.kernels.rope import (
    apply_rope,
    apply_rope_ref,
    apply_rope_triton,
    rope_cos_sin_cache,
)

# Triton runs on CPU tensors only through the interpreter (on by default without a GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, q heads, kv heads, head_dim): decode and packed prefill sizes, GQA and MHA, SmolLM2 and Llama heads,
# head_dims that are not powers of two (half of 80 and 96 is padded to 64) with GQA ratios 5 and 3
SHAPES = [
    (1, 32, 8, 128),
    (7, 9, 3, 64),
    (33, 4, 4, 64),
    (5, 16, 2, 128),
    (3, 2, 1, 96),
    (4, 10, 2, 80),
    (6, 15, 5, 96),
]
MAX_POS = 8192
# normed heads against the PyTorch reference: a bf16 head normed and weighted holds values up to ~5,
# where one rounding step is 1/32 and the two paths may round differently twice
NORM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1e-1}


def fused_qkv(tokens, n_q, n_kv, head_dim, dtype, device, seed):
    """q and k as non-contiguous views into one fused qkv projection output, like the model makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (n_q + 2 * n_kv) * head_dim, generator=g).to(dtype).to(device)
    q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
    k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=g).to(device)
    return qkv, q, k, positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,n_q,n_kv,head_dim", SHAPES)
def test_triton_matches_reference(tokens, n_q, n_kv, head_dim, dtype, device):
    cache = rope_cos_sin_cache(head_dim, MAX_POS, 500_000.0, device=device)
    qkv, q, k, positions = fused_qkv(
        tokens, n_q, n_kv, head_dim, dtype, device, seed=tokens * head_dim
    )
    v_before = qkv[:, (n_q + n_kv) * head_dim :].clone()
    q_ref, k_ref = apply_rope_ref(q, k, positions, cache)
    q_out, k_out = apply_rope_triton(q, k, positions, cache)
    assert q_out is q and k_out is k  # rotated in place
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    assert torch.equal(qkv[:, (n_q + n_kv) * head_dim :], v_before)  # v, beside them, untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,n_q,n_kv,head_dim", SHAPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32], ids=str)
def test_norm_in_the_kernel_matches_reference(
    tokens, n_q, n_kv, head_dim, dtype, device, weight_dtype
):
    # Qwen3's q_norm/k_norm in the rotation's kernel: against the reference's norm-then-rotate, and
    # against the two kernels one after the other (Chapter 2's norm, then the rotation)
    cache = rope_cos_sin_cache(head_dim, MAX_POS, 1_000_000.0, device=device)
    qkv, q, k, positions = fused_qkv(tokens, n_q, n_kv, head_dim, dtype, device, seed=tokens + 7)
    g = torch.Generator().manual_seed(head_dim)
    # the model's dtype, or float32 norm weights beside half-precision activations
    w_dtype = dtype if weight_dtype == "same" else weight_dtype
    weights = [(torch.rand(head_dim, generator=g) + 0.5).to(w_dtype).to(device) for _ in "qk"]
    norm = (*weights, 1e-6)
    v_before = qkv[:, (n_q + n_kv) * head_dim :].clone()
    q_ref, k_ref = apply_rope_ref(q, k, positions, cache, norm)
    q_two, k_two = apply_rope_triton(
        rms_norm_triton(q, weights[0], 1e-6), rms_norm_triton(k, weights[1], 1e-6), positions, cache
    )
    q_out, k_out = apply_rope_triton(q, k, positions, cache, norm)
    assert q_out is q and k_out is k
    for got, ref, two in ((q, q_ref, q_two), (k, k_ref, k_two)):
        # the same roundings; only the order of the sum of squares differs
        torch.testing.assert_close(got, two)
        torch.testing.assert_close(got, ref, rtol=NORM_TOL[dtype], atol=NORM_TOL[dtype])
    assert torch.equal(qkv[:, (n_q + n_kv) * head_dim :], v_before)


def test_norm_reference_matches_hugging_face_qwen3():
    # Qwen3's attention: q_norm / k_norm (Qwen3RMSNorm over each head), then apply_rotary_pos_emb
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    head_dim, theta, eps = 64, 1_000_000.0, 1e-6
    cache = rope_cos_sin_cache(head_dim, MAX_POS, theta)
    _, q, k, positions = fused_qkv(4, 9, 3, head_dim, torch.float32, "cpu", seed=3)
    norms = [Qwen3RMSNorm(head_dim, eps) for _ in "qk"]
    with torch.no_grad():
        for n in norms:
            n.weight.uniform_(0.5, 1.5)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([positions[:, None].float() * inv_freq] * 2, dim=-1)
    with torch.no_grad():
        q_hf, k_hf = apply_rotary_pos_emb(
            norms[0](q).transpose(0, 1)[None],
            norms[1](k).transpose(0, 1)[None],
            angles.cos()[None],
            angles.sin()[None],
        )
    norm = (norms[0].weight.detach(), norms[1].weight.detach(), eps)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cache, norm)
    torch.testing.assert_close(q_ref, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_ref, k_hf[0].transpose(0, 1))


def test_norm_weights_must_match_the_head():
    _, q, k, positions = fused_qkv(2, 4, 2, 64, torch.float32, "cpu", seed=4)
    with pytest.raises(ValueError, match="norm weights of 32 and 64 elements for heads of 64"):
        apply_rope_triton(
            q,
            k,
            positions,
            rope_cos_sin_cache(64, MAX_POS, 1e4),
            (torch.ones(32), torch.ones(64), 1e-6),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dispatch_on_cpu_is_the_reference(dtype):
    cache = rope_cos_sin_cache(64, MAX_POS, 100_000.0)
    _, q, k, positions = fused_qkv(6, 9, 3, 64, dtype, "cpu", seed=1)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cache)
    q_out, k_out = apply_rope(q, k, positions, cache)
    assert q_out is q and k_out is k
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_reference_matches_hugging_face():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, theta = 64, 100_000.0
    cache = rope_cos_sin_cache(head_dim, MAX_POS, theta)
    _, q, k, positions = fused_qkv(7, 9, 3, head_dim, torch.float32, "cpu", seed=2)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([positions[:, None].float() * inv_freq] * 2, dim=-1)  # HF's emb, [T, D]
    # HF wants [batch, heads, T, D]; our tokens are its sequence.
    q_hf, k_hf = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], angles.cos()[None], angles.sin()[None]
    )
    q_ref, k_ref = apply_rope_ref(q, k, positions, cache)
    torch.testing.assert_close(q_ref, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_ref, k_hf[0].transpose(0, 1))


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_cache_matches_hugging_face(rope_type):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": rope_type, "rope_theta": 500_000.0}
    if rope_type == "llama3":
        scaling |= {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters=scaling,
    )
    positions = torch.tensor([[0, 1, 100, 8191, 20000, 131071]])
    # [1, T, D], each half repeated
    cos, sin = LlamaRotaryEmbedding(config)(torch.randn(1, 6, 128), positions)
    cache = rope_cos_sin_cache(128, 131072, 500_000.0, rope_scaling=scaling)
    torch.testing.assert_close(
        cache[positions[0]], torch.cat([cos[0, :, :64], sin[0, :, :64]], dim=-1)
    )


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        rope_cos_sin_cache(64, 16, 10_000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_rotation_depends_only_on_position_difference():
    cache = rope_cos_sin_cache(64, 4096, 10_000.0)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)

    def score(m, n):
        q_rot, _ = apply_rope_ref(q, q, torch.tensor([m]), cache)
        k_rot, _ = apply_rope_ref(k, k, torch.tensor([n]), cache)
        return (q_rot * k_rot).sum().item()

    # fp32 angles near 1000 radians carry ~1e-4 error
    assert score(10, 3) == pytest.approx(score(1007, 1000), rel=1e-3)
