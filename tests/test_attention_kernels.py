"""Paged attention kernels (chapter 4) against their PyTorch references: under Triton's interpreter on the
CPU (fp32, fp16), and on CUDA when present (also bf16). Small shapes: the interpreter runs each program
in Python."""
import os

import pytest
import torch
import torch.nn.functional as F

import mini_infer  # noqa: F401  (switches on the interpreter before the kernels are defined)
from mini_infer.kernels.attention import (
    paged_decode_attention_ref, paged_decode_attention_triton, prefill_attention_ref, prefill_attention_triton,
    store_kvcache_ref, store_kvcache_triton,
)

BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 16, 64, 48
# Triton runs on CPU tensors only through the interpreter (on by default without a GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
HEADS = [(2, 2), (6, 2)]  # (query heads, kv heads): GQA ratios 1 and 3


def cases():
    for device in DEVICES:
        for dtype in [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else []):
            yield pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}")


def tolerance(device, dtype):
    if dtype == torch.float32:  # on a GPU, tl.dot rounds fp32 operands to tf32
        return dict(atol=1e-2, rtol=1e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
    return dict(atol=2e-3, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-2, rtol=2e-2)


def setup(context_lens, num_kv_heads, dtype, device, seed=0):
    """A random pool (never zeros) and block tables drawn from it in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    order = torch.randperm(NUM_BLOCKS, generator=g)
    width = max(-(-n // BLOCK_SIZE) for n in context_lens) + 1  # one spare column: never read
    tables = torch.randint(0, NUM_BLOCKS, (len(context_lens), width), generator=g, dtype=torch.int32)
    used = 0
    for i, n in enumerate(context_lens):
        k = -(-n // BLOCK_SIZE)
        tables[i, :k] = order[used:used + k]
        used += k
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, tables.to(device), lens.to(device), g


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("device, dtype", cases())
def test_store_kvcache(device, dtype, heads):
    _, hkv = heads
    k_cache, v_cache, tables, _, g = setup([40], hkv, dtype, device)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:21].to(torch.int32)
    slots[[3, 20]] = -1  # padding tokens
    # k and v as slices of one fused projection: rows are strided, heads within a row contiguous
    kv = torch.randn(21, 3 * hkv * HEAD_DIM, generator=g).to(device, dtype)
    k = kv[:, :hkv * HEAD_DIM].view(21, hkv, HEAD_DIM)
    v = kv[:, 2 * hkv * HEAD_DIM:].view(21, hkv, HEAD_DIM)
    expected = (k_cache.clone(), v_cache.clone())
    store_kvcache_ref(k, v, *expected, slots.to(device))
    store_kvcache_triton(k, v, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("device, dtype", cases())
def test_paged_decode(device, dtype, heads, num_splits):
    hq, hkv = heads
    context_lens = [1, 15, 16, 17, 45, 130]  # within, at, across block boundaries; several key tiles
    k_cache, v_cache, tables, lens, g = setup(context_lens, hkv, dtype, device)
    q = torch.randn(len(context_lens), hq, HEAD_DIM, generator=g).to(device, dtype)
    scale = HEAD_DIM ** -0.5
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale),
                               **tolerance(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_padding_rows(device):
    """A CUDA-graph batch pads with rows of context length 0: they get zeros, the others are unaffected."""
    k_cache, v_cache, tables, lens, g = setup([33, 0, 7], 2, torch.float32, device)
    q = torch.randn(3, 6, HEAD_DIM, generator=g).to(device)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.125, num_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2], device=device)
    expected = paged_decode_attention_ref(q[keep], k_cache, v_cache, tables[keep], lens[keep], 0.125)
    torch.testing.assert_close(out[keep], expected, **tolerance(device, torch.float32))


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("device, dtype", cases())
def test_prefill(device, dtype, heads):
    hq, hkv = heads
    # (new tokens, context): a 32-token cached prefix, a prompt over one query tile, one block, one token
    q_lens, context_lens = [5, 70, 16, 1], [37, 70, 16, 20]
    k_cache, v_cache, tables, lens, g = setup(context_lens, hkv, dtype, device)
    cu_seqlens_q = torch.tensor([0, 5, 75, 91, 92], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), hq, HEAD_DIM, generator=g).to(device, dtype)
    scale = HEAD_DIM ** -0.5
    out = prefill_attention_triton(q, k_cache, v_cache, tables, lens, cu_seqlens_q, max(q_lens), scale)
    expected = prefill_attention_ref(q, k_cache, v_cache, tables, lens, cu_seqlens_q, scale)
    torch.testing.assert_close(out, expected, **tolerance(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_store_then_prefill_is_causal_attention(device):
    """The engine's prefill step (store the prompt's K/V, attend through the pool) equals PyTorch's
    causal SDPA on the contiguous tensors: an independent check of the reference itself."""
    hq, hkv, n = 6, 2, 40
    k_cache, v_cache, tables, lens, g = setup([n], hkv, torch.float32, device)
    q, k, v = (torch.randn(n, h, HEAD_DIM, generator=g).to(device) for h in (hq, hkv, hkv))
    positions = torch.arange(n, device=device)
    slots = (tables[0, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE).to(torch.int32)
    store_kvcache_triton(k, v, k_cache, v_cache, slots)
    cu_seqlens_q = torch.tensor([0, n], dtype=torch.int32, device=device)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True, enable_gqa=True).transpose(0, 1)
    ref = prefill_attention_ref(q, k_cache, v_cache, tables, lens, cu_seqlens_q, HEAD_DIM ** -0.5)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    out = prefill_attention_triton(q, k_cache, v_cache, tables, lens, cu_seqlens_q, n, HEAD_DIM ** -0.5)
    torch.testing.assert_close(out, expected, **tolerance(device, torch.float32))
