"""Tensor parallelism on the CPU with gloo and 2 processes: each parallel layer against its unsharded
version, a sharded model against the whole one, and the engine's greedy tokens with tensor_parallel_size
2 against 1. The same end-to-end check runs with NCCL when 2 GPUs are visible."""

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mini_infer.config import ModelConfig
from mini_infer.llm import LLM
from mini_infer.loader import empty_model, load_model
from mini_infer.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_model,
)
from mini_infer.sampling_params import SamplingParams

WORLD = 2
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 301,
    "max_position_embeddings": 256,
}
VARIANTS = {  # tied embeddings (as SmolLM2), an untied head with attention biases, Qwen3's q/k norms
    "llama-tied": {**TINY, "tie_word_embeddings": True},
    "llama-bias-untied": {**TINY, "attention_bias": True, "tie_word_embeddings": False},
    "qwen3": {**TINY, "model_type": "qwen3", "num_key_value_heads": 4, "vocab_size": 300},
}


def run_on_ranks(fn, tmp_path, *args) -> None:
    """Run fn(rank, *args) in WORLD processes joined in a gloo group; a failure in any rank fails the test."""
    mp.spawn(_init_and_run, args=(f"file://{tmp_path}/store", fn, args), nprocs=WORLD)


def _init_and_run(rank: int, init_method: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        with torch.no_grad():
            fn(rank, *args)
    finally:
        dist.destroy_process_group()


def sharded(layer, **full):
    """The layer holding its rank's slice of each full tensor."""
    for name, tensor in full.items():
        getattr(layer, name).copy_(layer.shard(name, tensor))
    return layer


def _check_layers(rank: int) -> None:
    torch.manual_seed(0)  # the same full weights and inputs on every rank
    for tokens, hidden, sizes in [(1, 32, [64, 32, 32]), (7, 48, [96, 96]), (33, 16, [8, 4, 4])]:
        x = torch.randn(tokens, hidden)
        w, b = torch.randn(sum(sizes), hidden), torch.randn(sum(sizes))
        col = sharded(
            ColumnParallelLinear(hidden, sizes, True, rank, WORLD, like=w), weight=w, bias=b
        )
        mine = torch.cat(
            [part.chunk(WORLD, dim=-1)[rank] for part in F.linear(x, w, b).split(sizes, dim=-1)], -1
        )
        torch.testing.assert_close(col(x), mine)
        assert col.sizes == [s // WORLD for s in sizes]

        w_row, b_row = torch.randn(hidden, sum(sizes)), torch.randn(hidden)
        row = sharded(
            RowParallelLinear(sum(sizes), hidden, True, rank, WORLD, like=w),
            weight=w_row,
            bias=b_row,
        )
        torch.testing.assert_close(
            row(F.linear(x, w).chunk(WORLD, dim=-1)[rank]),
            F.linear(F.linear(x, w), w_row, b_row),
            rtol=1e-5,
            atol=1e-4,
        )
    for vocab in (64, 301):  # 301: the last shard is padded
        table, ids, h = torch.randn(vocab, 24), torch.randint(0, vocab, (50,)), torch.randn(9, 24)
        emb = sharded(VocabParallelEmbedding(vocab, 24, rank, WORLD, like=table), weight=table)
        torch.testing.assert_close(emb(ids), F.embedding(ids, table))
        head = sharded(ParallelLMHead(vocab, 24, rank, WORLD, like=table), weight=table)
        torch.testing.assert_close(head(h), F.linear(h, table), rtol=1e-5, atol=1e-5)


def test_parallel_layers_equal_unsharded(tmp_path):
    run_on_ranks(_check_layers, tmp_path)


def causal_attention(layer_idx, q, k, v):
    """One sequence, no cache: every token sees those before it (grouped-query heads shared)."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1)


def _check_sharded_model(rank: int) -> None:
    for hf_config in VARIANTS.values():
        model = load_model(
            hf_config, dtype="float32", device="cpu", load_format="dummy"
        ).model  # seeded
        ids = torch.randint(
            0, hf_config["vocab_size"], (21,), generator=torch.Generator().manual_seed(1)
        )
        positions = torch.arange(len(ids))
        whole = model.compute_logits(model(ids, positions, causal_attention))
        shard_model(model, rank, WORLD)
        assert model.config.num_key_value_heads == hf_config["num_key_value_heads"] // WORLD
        torch.testing.assert_close(
            model.compute_logits(model(ids, positions, causal_attention)),
            whole,
            rtol=1e-5,
            atol=1e-6,
        )


def test_sharded_model_equals_whole_model(tmp_path):
    run_on_ranks(_check_sharded_model, tmp_path)


def test_heads_that_do_not_split_are_a_clear_error():
    model = empty_model(ModelConfig.from_hf(TINY), torch.float32, "meta")
    with pytest.raises(
        ValueError, match="tensor_parallel_size 3 must divide the number of attention heads"
    ):
        shard_model(model, 0, 3)


def engine_args(**more) -> dict:
    return dict(
        load_format="dummy",
        dtype="float32",
        max_model_len=160,
        max_num_batched_tokens=64,
        cpu_kv_bytes=1 << 20,
        **more,
    )


rng = random.Random(0)
PROMPTS = [[rng.randrange(TINY["vocab_size"]) for _ in range(n)] for n in (1, 6, 17, 40, 90)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)


def generate(llm, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference() -> dict:
    llm = LLM(TINY, device="cpu", **engine_args())
    return {"greedy": generate(llm, GREEDY), "seeded": generate(llm, SEEDED)}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_tensor_parallel_engine_gives_the_same_tokens(reference, async_scheduling):
    """Prompts of 1 to 90 tokens, prefill in chunks of 64; async scheduling sends not-yet-seen tokens as
    placeholders, which the workers fill from the tokens rank 0 broadcast."""
    llm = LLM(
        TINY,
        device="cpu",
        tensor_parallel_size=2,
        async_scheduling=async_scheduling,
        **engine_args(),
    )
    runner = llm.engine.runner
    assert len({t for tokens in reference["greedy"] for t in tokens}) > 20  # not one token repeated
    assert generate(llm, GREEDY) == reference["greedy"]
    assert generate(llm, SEEDED) == reference["seeded"]
    workers = runner.workers
    runner.close()
    assert not any(w.is_alive() for w in workers) and not dist.is_initialized()


def test_tensor_parallel_size_that_does_not_split_the_heads_raises():
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        LLM(TINY, device="cpu", tensor_parallel_size=3, **engine_args())
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_tensor_parallel_on_two_gpus_gives_the_same_greedy_tokens():
    args = engine_args(gpu_memory_utilization=0.3)
    one = generate(LLM(TINY, device="cuda", **args), GREEDY)
    llm = LLM(TINY, device="cuda", tensor_parallel_size=2, **args)
    assert generate(llm, GREEDY) == one
    llm.engine.runner.close()
