"""The exported Llama model (Chapter 1) against Hugging Face transformers.

The embedded SmolLM2 GGUF, loaded by both, in float32 on the CPU: prompt logits and greedy tokens. Tiny
random models of every family (Llama, Mistral, Qwen2, Qwen3, a head size of 80), saved by transformers
and loaded through our safetensors path: logits and greedy tokens; sliding windows.
The contiguous KV cache: prefill in chunks equals prefill at once.
"""

import pytest
import torch
import transformers

from helpers import TINY_HF as TINY
from helpers import tiny_hf_model
from mini_infer.contiguous_cache import ContiguousKVCache, generate_greedy
from mini_infer.loader import embedded_gguf_path, load_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning "
    "rowed out before dawn. One day, far from the shore, his net came up heavy, and inside it he found",
]
CHAT = "What is the capital of France? Answer in one sentence."
NEW_TOKENS = 32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def prompt_logits(model, ids: list[int]) -> torch.Tensor:
    cache = ContiguousKVCache(model.config, len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), cache))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ours():
    return load_model(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf():
    path = embedded_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def prompts(ours) -> list[list[int]]:
    tokenizer = ours.tokenizer
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT}], add_generation_prompt=True
    )["input_ids"]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS] + [list(chat)]
    assert len({len(i) for i in ids}) == len(ids)  # four different lengths
    return ids


@pytest.mark.slow
def test_embedded_config(ours):
    c = ours.config
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        "llama",
        576,
        1536,
        30,
    )
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (
        9,
        3,
        64,
        49152,
    )
    assert (c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings) == (
        100000.0,
        8192,
        True,
    )
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(PROMPTS) + 1))
def test_prompt_logits_match_hf(ours, hf, prompts, i):
    ids = prompts[i]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert relative_error(prompt_logits(ours.model, ids), expected) < 1e-4


@pytest.mark.slow
def test_greedy_tokens_match_hf_generate(ours, hf, prompts):
    eos = list(ours.config.eos_token_ids)
    for ids in prompts:
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        assert generate_greedy(ours.model, ids, NEW_TOKENS, eos) == expected[0, len(ids) :].tolist()


@pytest.mark.slow
def test_greedy_answers(ours, prompts):
    tokenizer = ours.tokenizer
    assert tokenizer.decode(generate_greedy(ours.model, prompts[0], 2)) == " Paris."
    answer = generate_greedy(ours.model, prompts[-1], NEW_TOKENS, ours.config.eos_token_ids)
    assert answer[-1] == 2  # stopped at <|im_end|>
    assert tokenizer.decode(answer, skip_special_tokens=True) == "The capital of France is Paris."


FAMILIES = [
    pytest.param(
        "llama", dict(attention_bias=True, tie_word_embeddings=True, rope_theta=5000.0), id="llama"
    ),
    pytest.param("qwen3", dict(head_dim=32, tie_word_embeddings=False), id="qwen3"),
    pytest.param("qwen2", dict(tie_word_embeddings=True), id="qwen2"),  # q/k/v biases, o without
    pytest.param("mistral", dict(sliding_window=None), id="mistral"),
    # a window as long as max_position_embeddings never hides a token: full attention is exact
    pytest.param("mistral", dict(sliding_window=128), id="mistral-window"),
    pytest.param(
        "qwen2",
        dict(use_sliding_window=True, sliding_window=16, max_window_layers=2),
        id="qwen2-window-unused",  # no layer from max_window_layers (2) on: no layer slides
    ),
    pytest.param("llama", dict(hidden_size=160, num_attention_heads=2, head_dim=80), id="head80"),
]


@pytest.mark.parametrize("model_type, config", FAMILIES)
def test_tiny_random_model_matches_hf_through_safetensors(tmp_path, model_type, config):
    hf_model = tiny_hf_model(model_type, **config)
    hf_model.save_pretrained(tmp_path)
    model, tokenizer, ours = load_model(tmp_path, dtype="float32", device="cpu")
    assert tokenizer is None and ours.model_type == model_type
    ids = torch.randint(
        0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    assert relative_error(prompt_logits(model, ids), expected) < 1e-5
    with torch.no_grad():
        hf_tokens = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, 20, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert generate_greedy(model, ids, 10) == hf_tokens[0, 20:].tolist()


@pytest.mark.parametrize(
    "model_type, config",
    [
        ("mistral", dict(sliding_window=32)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)),
    ],
)
def test_a_sliding_window_runs_exactly_up_to_its_length_and_is_refused_beyond(
    tmp_path, model_type, config
):
    hf_model = tiny_hf_model(model_type, **config)
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding window of 32 tokens.*max_model_len <= 32"):
        load_model(tmp_path, dtype="float32", device="cpu")  # max_model_len: 128 positions
    model = load_model(tmp_path, dtype="float32", device="cpu", max_model_len=32).model
    ids = torch.randint(0, TINY["vocab_size"], (22,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_tokens = hf_model.generate(
            ids[None],
            attention_mask=torch.ones(1, 22, dtype=torch.long),
            max_new_tokens=11,  # the last query, at position 31, sees the whole window of 32 tokens
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert generate_greedy(model, ids.tolist(), 11) == hf_tokens[0, 22:].tolist()


def test_prefill_in_chunks_equals_prefill_at_once():
    # Chunks after cached tokens use the shifted causal mask; one-token chunks are decode steps.
    model, _, config = load_model(
        {"model_type": "llama", **TINY}, dtype="float32", device="cpu", load_format="dummy"
    )
    ids = torch.randint(0, TINY["vocab_size"], (16,), generator=torch.Generator().manual_seed(2))
    whole = prompt_logits(model, ids.tolist())
    cache, outputs, start = ContiguousKVCache(config, 16), [], 0
    with torch.inference_mode():
        for n in [5, 3, 1, 6, 1]:
            outputs.append(
                model.compute_logits(
                    model(ids[start : start + n], torch.arange(start, start + n), cache)
                )
            )
            start += n
    assert cache.length == 16
    assert relative_error(torch.cat(outputs), whole) < 1e-5


def test_cache_overflow_is_an_error():
    model, _, config = load_model(
        {"model_type": "llama", **TINY}, dtype="float32", device="cpu", load_format="dummy"
    )
    cache = ContiguousKVCache(config, 4)
    with pytest.raises(ValueError, match="KV cache full"), torch.inference_mode():
        model(torch.arange(5), torch.arange(5), cache)


def test_generate_greedy_stops_at_eos_and_at_max_new_tokens():
    model, _, _ = load_model(
        {"model_type": "llama", **TINY}, dtype="float32", device="cpu", load_format="dummy"
    )
    free = generate_greedy(model, [1, 2, 3], 8)
    assert len(free) == 8
    assert (
        generate_greedy(model, [1, 2, 3], 8, eos_token_id=free[2])
        == free[: free.index(free[2]) + 1]
    )
    assert generate_greedy(model, [1, 2, 3], 0) == []
