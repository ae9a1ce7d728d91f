"""The paged KV pool (chapter 4): block sizes, the block count from a budget, per-layer views."""

import torch

from mini_infer.memory.kv_cache import KVCache, kv_block_bytes, num_kv_blocks


def test_block_bytes_and_count():
    smol = kv_block_bytes(
        num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16
    )
    assert smol == 2 * 30 * 16 * 3 * 64 * 2 == 368_640
    assert num_kv_blocks(smol, "cpu", cpu_kv_bytes=2 << 30) == (2 << 30) // smol
    assert num_kv_blocks(smol, "cpu", cpu_kv_bytes=smol - 1) == 0


def test_layers_are_views_of_one_pool():
    cache = KVCache(
        num_layers=2, num_blocks=5, num_kv_heads=3, head_dim=8, block_size=4, dtype=torch.float16
    )
    k, v = cache.layer(1)
    assert cache.num_blocks == 5 and k.shape == v.shape == (5, 4, 3, 8) and k.is_contiguous()
    k.fill_(1.0)
    v.fill_(2.0)
    assert cache.kv[0, 1].eq(1).all() and cache.kv[1, 1].eq(2).all()
    assert k.view(-1, 3, 8).data_ptr() == k.data_ptr()  # slot s is row s of the flat view
