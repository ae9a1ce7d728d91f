"""Paged attention kernels (chapter 4) against their PyTorch references: under Triton's interpreter on the
CPU (fp32, fp16), and on CUDA when present (also bf16). Small shapes: the interpreter runs each program
in Python. Head shapes include head_dim 80 and 96 (padded to 128 inside the kernels) and GQA ratios 3 and 5."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mini_infer.kernels  # noqa: F401  (switches on the interpreter before the kernels are defined)
from mini_infer.kernels.attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    prefill_attention_ref,
    prefill_attention_triton,
    store_kvcache_ref,
    store_kvcache_triton,
)

BLOCK_SIZE, NUM_BLOCKS = 16, 48
# Triton runs on CPU tensors only through the interpreter (on by default without a GPU).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)
# (query heads, kv heads, head_dim): GQA ratios 1, 3, 5 and 3; head_dims that are not powers of two
HEADS = [(2, 2, 64), (6, 2, 64), (10, 2, 80), (9, 3, 96)]
HEAD_IDS = [f"{hq}q{hkv}kv-d{d}" for hq, hkv, d in HEADS]
# (new tokens, context) per sequence: a 32-token cached prefix, a prompt over one query tile, exactly one
# block, one token after a prefix, and a 130-token prefix under 100 new tokens (several unmasked key tiles)
PREFILL_Q_LENS, PREFILL_CONTEXTS = [5, 70, 16, 1, 100], [37, 70, 16, 20, 230]


def cases():
    for device in DEVICES:
        for dtype in [torch.float32, torch.float16] + (
            [torch.bfloat16] if device == "cuda" else []
        ):
            yield pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}")


def tolerance(device, dtype):
    if dtype == torch.float32:  # on a GPU, tl.dot rounds fp32 operands to tf32
        return dict(atol=1e-2, rtol=1e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
    return dict(atol=2e-3, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-2, rtol=2e-2)


def setup(context_lens, num_kv_heads, head_dim, dtype, device, seed=0, block_size=BLOCK_SIZE):
    """A random pool (never zeros) and block tables drawn from it in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = NUM_BLOCKS * BLOCK_SIZE // block_size
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    order = torch.randperm(num_blocks, generator=g)
    width = max(-(-n // block_size) for n in context_lens) + 1  # one spare column: never read
    tables = torch.randint(
        0, num_blocks, (len(context_lens), width), generator=g, dtype=torch.int32
    )
    used = 0
    for i, n in enumerate(context_lens):
        k = -(-n // block_size)
        tables[i, :k] = order[used : used + k]
        used += k
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, tables.to(device), lens.to(device), g


def cu_seqlens(q_lens, device):
    return torch.tensor(
        [0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device
    )


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("device, dtype", cases())
def test_store_kvcache(device, dtype, heads):
    _, hkv, d = heads
    k_cache, v_cache, tables, _, g = setup([40], hkv, d, dtype, device)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:21].to(torch.int32)
    slots[[3, 20]] = -1  # padding tokens
    # k and v as slices of one fused projection: rows are strided, heads within a row contiguous
    kv = torch.randn(21, 3 * hkv * d, generator=g).to(device, dtype)
    k = kv[:, : hkv * d].view(21, hkv, d)
    v = kv[:, 2 * hkv * d :].view(21, hkv, d)
    expected = (k_cache.clone(), v_cache.clone())
    store_kvcache_ref(k, v, *expected, slots.to(device))
    store_kvcache_triton(k, v, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache, expected[0]) and torch.equal(v_cache, expected[1])


def check_decode(device, dtype, heads, seed=0, **knobs):
    hq, hkv, d = heads
    # within, at, across block boundaries; several key tiles
    context_lens = [
        1,
        15,
        16,
        17,
        45,
        130,
    ]
    k_cache, v_cache, tables, lens, g = setup(context_lens, hkv, d, dtype, device, seed=seed)
    q = torch.randn(len(context_lens), hq, d, generator=g).to(device, dtype)
    scale = d**-0.5
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, **knobs)
    torch.testing.assert_close(
        out,
        paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale),
        **tolerance(device, dtype),
    )


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("device, dtype", cases())
def test_paged_decode(device, dtype, heads):
    # several splits per sequence, some empty for short ones
    check_decode(device, dtype, heads, num_splits=3)


# one program per (sequence, KV head); the heuristic
@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("device, dtype", cases())
def test_paged_decode_splits(device, dtype, num_splits):
    check_decode(device, dtype, HEADS[2], seed=3, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 5, None])
@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_in_a_table_as_wide_as_a_cuda_graph(device, num_splits):
    """A CUDA graph's block table is as wide as the longest sequence the engine allows (here 1,024
    tokens, most columns never read): each sequence splits its own context, short ones into fewer
    splits, and every key is still counted once."""
    hq, hkv, d = HEADS[1]
    context_lens = [1, 40, 130, 257]
    k_cache, v_cache, tables, lens, g = setup(context_lens, hkv, d, torch.float32, device, seed=5)
    unread = torch.randint(0, NUM_BLOCKS, (len(context_lens), 64 - tables.shape[1]), generator=g)
    wide = torch.cat([tables, unread.to(device, torch.int32)], dim=1)
    q = torch.randn(len(context_lens), hq, d, generator=g).to(device)
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, wide, lens, d**-0.5, num_splits=num_splits
    )
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, d**-0.5)
    torch.testing.assert_close(out, expected, **tolerance(device, torch.float32))


# block_n 16 and 64 read whole pages of 16; over pages of 32, block_n 16 looks up each key's page
@pytest.mark.parametrize("block_n, block_size", [(16, 16), (64, 16), (16, 32)])
@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_knobs(device, block_n, block_size):
    hq, hkv, d = 10, 2, 80
    context_lens = [3, 31, 32, 33, 150]
    k_cache, v_cache, tables, lens, g = setup(
        context_lens, hkv, d, torch.float16, device, seed=1, block_size=block_size
    )
    q = torch.randn(len(context_lens), hq, d, generator=g).to(device, torch.float16)
    out = paged_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        0.1,
        num_splits=2,
        block_n=block_n,
        num_warps=2,
        num_stages=2,
    )
    torch.testing.assert_close(
        out,
        paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.1),
        **tolerance(device, torch.float16),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "num_splits", [1, 2]
)  # 1: large batches, where the output is written directly
def test_paged_decode_padding_rows(device, num_splits):
    """A CUDA-graph batch pads with rows of context length 0: they get zeros, the others are unaffected."""
    k_cache, v_cache, tables, lens, g = setup([33, 0, 7], 2, 64, torch.float32, device)
    q = torch.randn(3, 6, 64, generator=g).to(device)
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2], device=device)
    expected = paged_decode_attention_ref(
        q[keep], k_cache, v_cache, tables[keep], lens[keep], 0.125
    )
    torch.testing.assert_close(out[keep], expected, **tolerance(device, torch.float32))


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("heads", HEADS[1:], ids=HEAD_IDS[1:])
@pytest.mark.parametrize("device, dtype", cases())
def test_paged_decode_stores_the_new_kv(device, dtype, heads, num_splits):
    """With new_kv, the decode kernel writes this step's K/V (each sequence's last key) into the pools and
    attends over them: the pools equal store_kvcache_ref's, the output the reference's after that store.
    k and v are strided slices of one fused projection; a padding row (slot -1, no context) stores nothing."""
    hq, hkv, d = heads
    context_lens = [1, 16, 17, 0, 70, 129]
    k_cache, v_cache, tables, lens, g = setup(context_lens, hkv, d, dtype, device, seed=7)
    last = (lens - 1).clamp(min=0).cpu()
    slots = (
        tables.cpu()[torch.arange(len(lens)), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    )
    slots[lens.cpu() == 0] = -1
    kv = torch.randn(len(lens), 3 * hkv * d, generator=g).to(device, dtype)
    k, v = kv[:, : hkv * d].view(-1, hkv, d), kv[:, 2 * hkv * d :].view(-1, hkv, d)
    q = torch.randn(len(lens), hq, d, generator=g).to(device, dtype)
    slots = slots.to(device, torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(k, v, want_k, want_v, slots)
    expected = paged_decode_attention_ref(q, want_k, want_v, tables, lens, d**-0.5)
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, tables, lens, d**-0.5, (k, v, slots), num_splits=num_splits
    )
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    torch.testing.assert_close(out, expected, **tolerance(device, dtype))
    with pytest.raises(ValueError, match="contiguous"):  # [Hkv, D] rows strided
        strided = kv[:, : 2 * hkv * d].view(-1, hkv, 2 * d)[..., :d]
        paged_decode_attention_triton(
            q, k_cache, v_cache, tables, lens, d**-0.5, (strided, v, slots)
        )
    for wrong in (
        (k[:3], v, slots),
        (k, v.float() if dtype != torch.float32 else v.half(), slots),
        (k, v, slots[:2]),
    ):
        with pytest.raises(ValueError, match="new_kv's k and v of shape"):
            paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, d**-0.5, wrong)


def test_paged_decode_dispatcher_stores_the_new_kv_on_the_cpu():
    """Off the GPU, paged_decode_attention(new_kv=...) is store_kvcache_ref then the reference."""
    k_cache, v_cache, tables, lens, g = setup([5, 33], 2, 64, torch.float32, "cpu", seed=2)
    slots = torch.tensor([int(tables[0, 0]) * BLOCK_SIZE + 4, int(tables[1, 2]) * BLOCK_SIZE])
    k, v, q = (torch.randn(2, h, 64, generator=g) for h in (2, 2, 6))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(k, v, want_k, want_v, slots)
    expected = paged_decode_attention_ref(q, want_k, want_v, tables, lens, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, new_kv=(k, v, slots))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("device, dtype", cases())
def test_prefill(device, dtype, heads):
    hq, hkv, d = heads
    k_cache, v_cache, tables, lens, g = setup(PREFILL_CONTEXTS, hkv, d, dtype, device)
    cu_seqlens_q = cu_seqlens(PREFILL_Q_LENS, device)
    q = torch.randn(sum(PREFILL_Q_LENS), hq, d, generator=g).to(device, dtype)
    scale = d**-0.5
    out = prefill_attention_triton(q, k_cache, v_cache, tables, lens, cu_seqlens_q, scale)
    expected = prefill_attention_ref(q, k_cache, v_cache, tables, lens, cu_seqlens_q, scale)
    torch.testing.assert_close(out, expected, **tolerance(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_padded_like_a_cuda_graph(device):
    """A CUDA graph of a mixed step is captured for T tokens and B sequences and replayed for fewer: the
    rows past the real tokens belong to no sequence, and padding sequences have no queries and context
    length 0. The real rows must equal the unpadded result; one-token (decode) rows mix with prompts."""
    hq, hkv, d = 6, 2, 64
    q_lens, contexts = [1, 37, 1, 5], [40, 37, 9, 29]
    k_cache, v_cache, tables, lens, g = setup(contexts, hkv, d, torch.float32, device)
    n = sum(q_lens)
    q = torch.randn(n, hq, d, generator=g).to(device)
    expected = prefill_attention_ref(
        q, k_cache, v_cache, tables, lens, cu_seqlens(q_lens, device), 0.125
    )
    pad_tokens, pad_seqs = 19, 3
    q_padded = torch.cat([q, torch.randn(pad_tokens, hq, d, generator=g).to(device)])
    tables_padded = torch.cat([tables, torch.zeros_like(tables[:pad_seqs])])
    lens_padded = torch.cat([lens, torch.zeros(pad_seqs, dtype=lens.dtype, device=device)])
    cu_padded = cu_seqlens(q_lens + [0] * pad_seqs, device)
    out = prefill_attention_triton(
        q_padded, k_cache, v_cache, tables_padded, lens_padded, cu_padded, 0.125
    )
    torch.testing.assert_close(out[:n], expected, **tolerance(device, torch.float32))


# Small tiles, so that the prefixes span several unmasked key tiles; each program's own query heads or one
# head each; the causal mask on every tile (the simple way); pages of 32 under tiles of 16 keys.
KNOBS = [
    dict(block_m=32, block_n=16),
    dict(block_m=32, block_n=16, pack_gqa=False),
    dict(block_m=32, block_n=32, mask_all_tiles=True),
    dict(block_m=64, block_n=16, block_size=32),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()))
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_knobs(device, knobs):
    knobs = dict(knobs)
    hq, hkv, d = 6, 2, 80
    k_cache, v_cache, tables, lens, g = setup(
        PREFILL_CONTEXTS,
        hkv,
        d,
        torch.float16,
        device,
        seed=2,
        block_size=knobs.pop("block_size", BLOCK_SIZE),
    )
    cu_seqlens_q = cu_seqlens(PREFILL_Q_LENS, device)
    q = torch.randn(sum(PREFILL_Q_LENS), hq, d, generator=g).to(device, torch.float16)
    out = prefill_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        cu_seqlens_q,
        0.1,
        num_warps=4,
        num_stages=2,
        **knobs,
    )
    expected = prefill_attention_ref(q, k_cache, v_cache, tables, lens, cu_seqlens_q, 0.1)
    torch.testing.assert_close(out, expected, **tolerance(device, torch.float16))


def test_kernels_refuse_what_they_cannot_run():
    k_cache, v_cache, tables, lens, g = setup([20], 1, 64, torch.float32, "cpu")
    q, cu = torch.randn(20, 8, 64, generator=g), cu_seqlens([20], "cpu")
    with pytest.raises(ValueError, match="smaller than the 8 query heads"):
        prefill_attention_triton(q, k_cache, v_cache, tables, lens, cu, 0.125, block_m=4)
    small = setup([20], 1, 8, torch.float32, "cpu")[:4]
    with pytest.raises(ValueError, match="head_dim 16 to 256"):
        prefill_attention_triton(torch.randn(20, 1, 8), *small, cu, 0.3)
    with pytest.raises(ValueError, match="head_dim 16 to 256"):
        paged_decode_attention_triton(torch.randn(1, 1, 8), *small, 0.3)
    with pytest.raises(ValueError, match="contiguous pools"):
        prefill_attention_triton(q, k_cache[:, :8], v_cache, tables, lens, cu, 0.125)


@pytest.mark.parametrize("device", DEVICES)
def test_store_then_prefill_is_causal_attention(device):
    """The engine's prefill step (store the prompt's K/V, attend through the pool) equals PyTorch's
    causal SDPA on the contiguous tensors: an independent check of the reference itself."""
    hq, hkv, n, d = 6, 2, 40, 64
    k_cache, v_cache, tables, lens, g = setup([n], hkv, d, torch.float32, device)
    q, k, v = (torch.randn(n, h, d, generator=g).to(device) for h in (hq, hkv, hkv))
    positions = torch.arange(n, device=device)
    slots = (tables[0, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE).to(
        torch.int32
    )
    store_kvcache_triton(k, v, k_cache, v_cache, slots)
    cu_seqlens_q = torch.tensor([0, n], dtype=torch.int32, device=device)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    ref = prefill_attention_ref(q, k_cache, v_cache, tables, lens, cu_seqlens_q, d**-0.5)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    out = prefill_attention_triton(q, k_cache, v_cache, tables, lens, cu_seqlens_q, d**-0.5)
    torch.testing.assert_close(out, expected, **tolerance(device, torch.float32))


def test_attention_sweep_checks_run_on_the_cpu():
    """benchmarks/attention_sweep.py runs once on a GPU machine: its checks (every launch variant against the
    references) must not die there on a typo. Here, one model shape under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the sweep's CPU checks run under Triton's interpreter")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention_sweep

    shape = {"smollm2-135m": attention_sweep.MODELS["smollm2-135m"]}
    checks = attention_sweep.check_all(torch.device("cpu"), torch.float16, tiny=True, shapes=shape)
    assert not checks.failed and not checks.unsupported
    assert {r["what"] for r in checks.rows} == {
        "smollm2-135m, prefill",
        "smollm2-135m, decode",
        "smollm2-135m, store",
        "smollm2-135m, sdpa-flash",
        "smollm2-135m, sdpa-flash-gqa",
    }
