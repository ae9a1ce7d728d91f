"""The engine end to end on the CPU: greedy output equal to Hugging Face's, the same under chunked
prefill, prefix caching and memory pressure; seeds, streaming, stop strings, and clear errors for bad requests."""

import gc
import os
import re
from pathlib import Path

import pytest
import torch

from helpers import TINY_DUMMY, TINY_HF, assert_engine_quiet, tiny_hf_model
from mini_infer.layers.sampler import Sampler, SamplingBatch
from mini_infer.llm import LLM
from mini_infer.memory.kv_cache import kv_block_bytes
from mini_infer.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colours are",
    "import torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):",
    "Water boils at a temperature of",
    "A haiku about the sea:\n",
    "Translate to French: I would like a cup of coffee, please.\nFrench:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smol):  # tests/conftest.py
    return smol


@pytest.fixture(scope="module")
def block_bytes(llm) -> int:
    """One KV block (16 tokens) of the embedded model in float32."""
    c = llm.engine.config
    return kv_block_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 16, torch.float32)


@pytest.fixture(scope="module")
def hf_model(hf_smol):  # tests/conftest.py
    return hf_smol


@pytest.fixture(scope="module")
def reference(llm, hf_model) -> list[list[int]]:
    """Hugging Face transformers' greedy tokens, one prompt at a time."""
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.get_tokenizer().encode(prompt)])
        gen = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.slow
def test_batched_greedy_equals_hugging_face(llm, reference):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    # prompts of different lengths
    assert len({len(llm.get_tokenizer().encode(p)) for p in PROMPTS}) >= 6
    assert token_ids(outputs) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert outputs[0].outputs[0].text.startswith(" Paris")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_engine_matches_hugging_face(reference, hf_model):
    # Triton kernels, the paged KV cache and CUDA graphs, in fp32: the same greedy tokens.
    gpu = LLM(dtype="float32", device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    assert gpu.engine.runner.graphs
    assert token_ids(gpu.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    del gpu
    # bf16 rounds differently from fp32, and a near-tie can tip either way (Hugging Face's own bf16 leaves
    # its fp32 tokens within 16 tokens on one of these prompts, measured on an H200). So, as vLLM checks its
    # models against Hugging Face: where our bf16 tokens first leave the fp32 reference, the token we chose
    # must be among Hugging Face's 3 most likely there.
    half = LLM(device="cuda", max_model_len=512, gpu_memory_utilization=0.3)
    assert half.engine.runner.dtype == torch.bfloat16
    outputs = token_ids(half.generate(PROMPTS, GREEDY, use_tqdm=False))
    for prompt, out, ref in zip(PROMPTS, outputs, reference):
        i = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
        if i is not None:
            ids = torch.tensor([half.get_tokenizer().encode(prompt) + ref[:i]])
            with torch.no_grad():
                top = hf_model(ids).logits[0, -1].topk(3).indices.tolist()
            assert out[i] in top, (
                f"{prompt!r}: token {i} is {out[i]}, Hugging Face's top 3 are {top}"
            )


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_async_scheduling_gives_the_same_tokens_as_sync():
    # Random weights of SmolLM2's shape in fp32, CUDA graphs, greedy and seeded sampling. All 48 requests
    # fit one batch, so both runs compute the same batches (random weights leave near-ties that a batch
    # of another size, rounding differently, could flip).
    config = Path(__file__).parents[1] / "benchmarks" / "models" / "smollm2-135m"
    prompts = [[(7 * i + j) % 4000 for j in range(5 + 13 * i)] for i in range(48)]
    params = [
        SamplingParams(temperature=0, max_tokens=20 + i, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=20 + i, ignore_eos=True)
        for i in range(48)
    ]
    runs = []
    for async_scheduling in (False, True):
        gc.collect()  # engines of earlier tests (held in reference cycles) give their GPU memory back
        llm = LLM(
            config,
            load_format="dummy",
            dtype="float32",
            max_model_len=1024,
            max_num_seqs=64,
            # A share of the whole card, minus what is in use: run after the test above, in pytest on two
            # H200 machines this engine found about 40 GB still in use and no room at 0.3, though a plain
            # script shows every engine giving its memory back (not explained yet).
            gpu_memory_utilization=0.6,
            async_scheduling=async_scheduling,
        )
        runs.append(token_ids(llm.generate(prompts, params, use_tqdm=False)))
        del llm
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_chunked_prefill_prefix_cache_and_preemption_keep_greedy_output(reference, block_bytes):
    # 12 blocks of 16 tokens for 8 requests that each grow to 3-4 blocks: preemption is certain; a token
    # budget of 16 splits the longer prompts; the repeated prompt hits the prefix cache.
    small = LLM(
        dtype="float32",
        device="cpu",
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        cpu_kv_bytes=12 * block_bytes,
    )
    assert small.engine.runner.num_blocks == 12
    outputs = small.generate(PROMPTS + PROMPTS[:1], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == reference + reference[:1]
    assert small.engine.scheduler.num_preemptions > 0
    assert_engine_quiet(small)  # every block came back


@pytest.mark.slow
def test_async_scheduling_keeps_greedy_output(reference, block_bytes):
    # The GPU default, forced on the CPU: each step is launched before the last one's tokens are recorded,
    # its inputs taken from the last step's output. Under preemption, chunked prefill and prefix hits.
    small = LLM(
        dtype="float32",
        device="cpu",
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        cpu_kv_bytes=12 * block_bytes,
        async_scheduling=True,
    )
    outputs = small.generate(PROMPTS[:5] + PROMPTS[:1], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == reference[:5] + reference[:1]
    assert small.engine.scheduler.num_preemptions > 0
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = small.chat(chat, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[
        0
    ]
    # a step past the stop token was void
    assert (out.text, out.finish_reason) == (
        "The capital of France is Paris.",
        "stop",
    )
    stream = small.stream(PROMPTS[2], GREEDY)
    next(stream)
    stream.close()
    assert_engine_quiet(small)


@pytest.mark.slow
def test_chat_messages_use_the_chat_template(llm):
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"  # at <|im_end|>, which the text does not show
    # the rendered conversation, as vLLM shows it, whose tokens are the prompt's
    assert out.prompt.endswith("<|im_start|>assistant\n") and chat[0]["content"] in out.prompt
    assert llm.get_tokenizer().encode(out.prompt) == out.prompt_token_ids


def test_special_tokens_in_the_text_and_no_text_at_all(llm):
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    greedy = dict(temperature=0, max_tokens=20, include_stop_str_in_output=True)
    plain, special = (
        llm.chat(chat, SamplingParams(**greedy, skip_special_tokens=skip), use_tqdm=False)[0]
        for skip in (True, False)
    )
    assert plain.outputs[0].text == "The capital of France is Paris."  # <|im_end|> is special
    assert special.outputs[0].text == "The capital of France is Paris.<|im_end|>"
    bare = llm.chat(chat, SamplingParams(**greedy, detokenize=False, logprobs=1), use_tqdm=False)[0]
    assert bare.outputs[0].text == "" and bare.outputs[0].token_ids == plain.outputs[0].token_ids
    assert all(p.decoded_token is None for step in bare.outputs[0].logprobs for p in step.values())


def test_outputs_say_how_many_prompt_tokens_the_prefix_cache_served(llm):
    ids = [(11 * i) % 3000 + 10 for i in range(70)]
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([ids], params, use_tqdm=False)[0]
    again, scored = llm.generate(
        [ids, ids], [params, SamplingParams(max_tokens=2, prompt_logprobs=0)], use_tqdm=False
    )
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 64  # the 4 whole 16-token blocks of the prompt
    assert scored.num_cached_tokens == 0  # a request that scores its prompt computes all of it
    rejected = llm.generate([[]], params, use_tqdm=False)[0]
    assert rejected.error and rejected.num_cached_tokens is None


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    ids = [(7 * i) % 3000 + 10 for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cut = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=12)
    short, truncated, whole = llm.generate(
        [ids[-12:], ids, ids[:8]], [params, cut, cut], use_tqdm=False
    )
    assert truncated.prompt_token_ids == ids[-12:] and whole.prompt_token_ids == ids[:8]
    assert truncated.outputs[0].token_ids == short.outputs[0].token_ids
    # -1: as many as fit, which leaves no room for output: rejected, as in vLLM
    too_long = list(range(10, 10 + llm.engine.max_model_len + 5))
    out = llm.generate(too_long, SamplingParams(truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert f"({llm.engine.max_model_len} tokens) leaves no room" in out.error


@pytest.mark.slow
def test_a_seed_makes_sampling_reproducible_whatever_the_batch(llm):
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=40, max_tokens=12, seed=7, ignore_eos=True
    )
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)
    crowded = llm.generate(
        PROMPTS[:4], [params] + [SamplingParams(temperature=1.0, max_tokens=12)] * 3, use_tqdm=False
    )
    assert token_ids(alone)[0] == token_ids(crowded)[0]


@pytest.mark.slow
def test_stream_yields_the_generated_text_and_frees_blocks_when_stopped(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0].text
    assert "".join(llm.stream(PROMPTS[2], params)) == full
    stream = llm.stream(PROMPTS[2], params)
    next(stream)
    stream.close()  # the consumer gives up: the request is aborted
    assert_engine_quiet(llm)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stop_string_ends_the_text_just_before_it_and_frees_the_request(
    llm, async_scheduling, monkeypatch
):
    # With async scheduling (the GPU default, forced here) the request's next step is already launched when
    # the stop string shows up: that step's token must be dropped.
    monkeypatch.setattr(llm.engine, "async_scheduling", async_scheduling)
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = [o.outputs[0] for o in llm.generate(PROMPTS[:2], plain, use_tqdm=False)]
    # from inside token 4 to inside token 5
    stop = llm.get_tokenizer().decode(full[0].token_ids[4:6])[1:-1]
    assert stop == "he answe" and full[0].text.count(stop) == 1  # of " Paris.\n\nThe answer is: 2"
    with_stop = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, stop=["never said", stop]
    )
    out = [o.outputs[0] for o in llm.generate(PROMPTS[:2], [with_stop, plain], use_tqdm=False)]
    assert (out[0].text, out[0].finish_reason) == (full[0].text[: full[0].text.index(stop)], "stop")
    # up to the token that completed the stop string
    assert out[0].token_ids == full[0].token_ids[:6]
    assert out[1] == full[1]  # its neighbour in the batch is unaffected
    assert "".join(llm.stream(PROMPTS[0], with_stop)) == out[0].text
    assert_engine_quiet(llm)


def completions(output) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason) for c in output.outputs]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_n_seeded_samples_differ_and_repeat_alone_or_in_a_batch(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    (out,) = llm.generate(PROMPTS[2], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished and out.error is None
    assert [len(c.token_ids) for c in out.outputs] == [6] * 3
    assert len({c.text for c in out.outputs}) == 3  # each sample has its own seed
    assert completions(llm.generate(PROMPTS[2], params, use_tqdm=False)[0]) == completions(out)
    others = [
        SamplingParams(temperature=1.0, max_tokens=6),
        SamplingParams(n=2, temperature=0, max_tokens=3),
    ]
    crowded = llm.generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [others[0], params, others[1]], use_tqdm=False
    )
    assert completions(crowded[1]) == completions(out)
    assert [len(o.outputs) for o in crowded] == [1, 3, 2]
    # sample 0 keeps the seed
    one = SamplingParams(temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    assert completions(llm.generate(PROMPTS[2], one, use_tqdm=False)[0]) == completions(out)[:1]
    assert_engine_quiet(llm)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_greedy_samples_are_all_the_greedy_text(llm):
    two = SamplingParams(n=2, temperature=0, max_tokens=6)
    (one,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert completions(llm.generate(PROMPTS[0], two, use_tqdm=False)[0]) == completions(one) * 2
    (chat,) = llm.chat([{"role": "user", "content": "Hi"}], two, use_tqdm=False)
    assert [c.index for c in chat.outputs] == [0, 1] and completions(chat)[0] == completions(chat)[
        1
    ]
    assert_engine_quiet(llm)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_each_sample_stops_at_its_own_stop_string(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    full = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs
    stop = full[1].text[4:6]  # in sample 1's text; the others may or may not meet it
    stopped = llm.generate(
        PROMPTS[2],
        SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True, stop=stop),
        use_tqdm=False,
    )[0].outputs
    for f, s in zip(full, stopped, strict=True):
        if stop in f.text:
            assert (s.text, s.finish_reason) == (f.text[: f.text.index(stop)], "stop")
            assert s.token_ids == f.token_ids[: len(s.token_ids)]
        else:
            assert s == f
    # one sample never meets it
    assert [s.finish_reason for s in stopped] == [
        "length",
        "stop",
        "stop",
    ]
    assert_engine_quiet(llm)


@pytest.mark.slow
def test_bad_n_requests_get_errors_and_stream_takes_one_sample(llm):
    too_long = [1] * 512
    out = llm.generate(
        [too_long, "hello"],
        [SamplingParams(n=2), SamplingParams(n=2, temperature=0, max_tokens=2)],
        use_tqdm=False,
    )
    assert "leaves no room for output in max_model_len 512" in out[0].error
    assert [(c.index, c.finish_reason, c.token_ids) for c in out[0].outputs] == [
        (0, "error", []),
        (1, "error", []),
    ]
    assert [c.finish_reason for c in out[1].outputs] == ["length", "length"] and out[
        1
    ].error is None
    with pytest.raises(ValueError, match=r"stream\(\) yields the text of one sample, got n=2"):
        next(llm.stream("hi", SamplingParams(n=2)))
    assert_engine_quiet(llm)


@pytest.mark.slow
def test_output_past_max_model_len_stops_there_with_length(llm):
    prompt = [1] * 500
    (out,) = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False
    )
    assert out.error is None and (len(out.outputs[0].token_ids), out.outputs[0].finish_reason) == (
        12,
        "length",
    )
    (out,) = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False
    )
    # None: up to the context
    assert (len(out.outputs[0].token_ids), out.outputs[0].finish_reason) == (
        12,
        "length",
    )
    assert_engine_quiet(llm)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, params, error",
    [
        ("", None, "prompt is empty"),
        ([[]], None, "prompt is empty"),
        ([1, 2, 10**6], None, r"token ids must be integers in \[0, 49152\)"),
        ([1] * 600, None, "prompt \\(600 tokens\\) leaves no room for output in max_model_len 512"),
        ({"prompt_token_ids": [1], "prompt": "x"}, None, "a prompt dict has one key"),
        ([{"role": "wizard", "content": "hi"}], None, "unknown chat role"),
    ],
)
def test_bad_requests_are_rejected_with_a_clear_error(llm, prompt, params, error):
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "error" and out.outputs[0].token_ids == []
    assert re.search(error, out.error), out.error
    assert_engine_quiet(llm)
    with pytest.raises(
        TypeError, match="a prompt is a string"
    ):  # an error of the call itself still raises
        llm.generate(3.5, params, use_tqdm=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_model_len=0),
        dict(max_model_len=-5),
        dict(max_model_len="1024"),
        dict(block_size=0),
        dict(max_num_batched_tokens=0),
        dict(max_num_seqs=-1),
    ],
)
def test_bad_engine_sizes_raise_before_loading(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
        LLM(TINY_DUMMY, device="cpu", **kwargs)


@pytest.mark.slow
def test_a_bad_prompt_in_a_batch_fails_alone(llm):
    out = llm.generate(
        ["fine", ""], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    assert out[0].error is None and len(out[0].outputs[0].token_ids) == 4
    assert out[1].outputs[0].finish_reason == "error" and "prompt is empty" in out[1].error
    assert_engine_quiet(llm)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_dummy_weights_generate_from_token_ids():
    llm = LLM(TINY_DUMMY, load_format="dummy", device="cpu", dtype="float32")
    out = llm.generate(
        [[1, 2, 3], [4, 5, 6, 7, 8]],
        SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True),
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in out] == [10, 10]
    assert out[0].outputs[0].text == "" and out[1].prompt_token_ids == [4, 5, 6, 7, 8]
    assert "no tokenizer" in llm.generate("text", use_tqdm=False)[0].error
    assert (
        "no tokenizer, and stop strings need one"
        in llm.generate([1, 2], SamplingParams(stop="."), use_tqdm=False)[0].error
    )


@pytest.mark.parametrize(
    "model_type, config",
    [
        pytest.param("qwen2", dict(tie_word_embeddings=True), id="qwen2"),
        pytest.param("mistral", dict(sliding_window=None), id="mistral"),
        pytest.param(
            "llama", dict(hidden_size=160, num_attention_heads=2, head_dim=80), id="head80"
        ),
        pytest.param(
            "qwen3",
            dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=96),
            id="head96",
        ),
    ],
)
def test_model_families_and_head_sizes_through_llm_equal_hugging_face(tmp_path, model_type, config):
    hf = tiny_hf_model(model_type, **config)
    hf.save_pretrained(tmp_path)
    llm = LLM(tmp_path, dtype="float32", device="cpu", max_model_len=128, cpu_kv_bytes=4 << 20)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (5, 19, 40)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ours = token_ids(llm.generate(prompts, params, use_tqdm=False))  # one batch: prefill + decode
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert tokens == expected[0, len(prompt) :].tolist()


def test_the_engine_on_the_cpu_takes_few_threads_unless_the_user_chose(monkeypatch):
    config = {"model_type": "llama", **TINY_HF}
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    try:
        torch.set_num_threads(16)  # PyTorch's start-up default on 16 cores
        LLM(config, load_format="dummy", device="cpu", cpu_kv_bytes=1 << 20)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "16")
        torch.set_num_threads(16)
        LLM(config, load_format="dummy", device="cpu", cpu_kv_bytes=1 << 20)
        assert torch.get_num_threads() == 16
    finally:
        torch.set_num_threads(threads)


def test_top_k_top_p_min_p_filter_keeps_the_right_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3 + [[0.25, 0.25, 0.25, 0.25]])
    kept = Sampler.filter_top_k_top_p_min_p(
        probs.log(),
        torch.tensor([4, 2, 4, 4]),
        torch.tensor([0.7, 1.0, 1.0, 0.3]),
        torch.tensor([0.0, 0.0, 0.5, 0.0]),
    ).isfinite()
    assert kept.tolist() == [
        [True, True, False, False],  # top-p 0.7
        [True, True, False, False],  # top-k 2
        [True, True, False, False],  # min-p 0.5: at least half as likely as the most likely
        [True, True, False, False],  # top-p 0.3 of a flat row
    ]


def test_sampler_greedy_rows_and_sampled_rows_share_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.5, seed=3),
    ]
    batch = SamplingBatch(params, [1, 1, 1], [1, 1, 1], [None] * 3)
    tokens = Sampler()(logits, batch).token_ids
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] == logits[1].argmax()
    again = Sampler()(logits, batch).token_ids
    assert again[2] == tokens[2]  # same seed and position, fresh sampler: same draw


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: `replay()` runs the captured forward again, eagerly, on the
    inputs it was captured with (views of the runner's step buffer), under the attention metadata it was
    captured with."""

    replayed: list[int] = []  # the token count of each replayed graph
    decode: list[bool] = []  # and whether it was a decode graph

    def __init__(self, runner, input_ids, positions):
        self.runner, self.input_ids, self.positions = runner, input_ids, positions
        self.metadata = runner.attn.metadata

    def pool(self):
        return None

    def replay(self):
        r, tokens = self.runner, self.input_ids.shape[0]
        r.attn.metadata = self.metadata
        r.graph_output[:tokens] = r.model(self.input_ids, self.positions, r.attn)
        EagerGraph.replayed.append(tokens)
        EagerGraph.decode.append(self.metadata.is_decode)


def stand_in_graphs(llm, monkeypatch, max_num_batched_tokens: int = 48):
    """Give a CPU engine's runner EagerGraph stand-ins for every graph a GPU would capture; return the
    runner and a list that collects the SchedulerOutput of every step it executes from now on."""
    from mini_infer.worker.model_runner import ModelRunner

    monkeypatch.setattr(
        ModelRunner, "_capture", lambda self, ids, positions, pool: EagerGraph(self, ids, positions)
    )
    runner = llm.engine.runner
    runner._capture_graphs(max_num_batched_tokens)
    EagerGraph.replayed, EagerGraph.decode = [], []
    steps = []
    execute = runner.execute_model
    monkeypatch.setattr(runner, "execute_model", lambda out: steps.append(out) or execute(out))
    return runner, steps


def test_graph_replays_with_padding_give_the_eager_tokens(monkeypatch):
    """What a GPU does with CUDA graphs, checked on the CPU: the step buffer's views, the choice of a
    decode or a mixed graph, and the padding of tokens and sequences. Every step replays a graph (chunked
    prompts beside decoding requests, then pure decode), and the tokens equal the eager run's."""
    config = TINY_DUMMY
    generator = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 19, 40, 70, 3)
    ]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    args = dict(load_format="dummy", device="cpu", dtype="float32", max_model_len=192)
    eager = LLM(config, max_num_seqs=4, max_num_batched_tokens=48, seed=0, **args)
    expected = token_ids(eager.generate(prompts, params, use_tqdm=False))
    graphed = LLM(config, max_num_seqs=4, max_num_batched_tokens=48, seed=0, **args)
    runner, steps = stand_in_graphs(graphed, monkeypatch)
    assert sorted(runner.graphs) == [1, 2, 4] and sorted(runner.mixed_graphs) == [16, 32, 48]
    assert token_ids(graphed.generate(prompts, params, use_tqdm=False)) == expected
    # every step replayed the smallest graph that holds it: none ran eagerly
    mixed = [s.total_num_scheduled_tokens > len(s.num_scheduled_tokens) for s in steps]
    assert sum(mixed) >= 4
    assert EagerGraph.replayed == [
        min(n for n in (16, 32, 48) if n >= s.total_num_scheduled_tokens)
        if is_mixed
        else min(n for n in (1, 2, 4) if n >= len(s.num_scheduled_tokens))
        for s, is_mixed in zip(steps, mixed)
    ]


def test_verification_steps_replay_the_mixed_graphs(monkeypatch):
    """Chapter 10's verification steps (a request's newest token and its drafts) replay the graphs of mixed
    steps, and give the eager run's greedy tokens."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    prompts = [list(range(10, 20)) * 3 + [10, 11], [5, 6, 7, 8] * 6, [40, 41, 42] * 5 + [40]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    args = dict(load_format="dummy", device="cpu", dtype="float32", max_model_len=192, seed=0)
    args.update(max_num_seqs=4, max_num_batched_tokens=48, speculative_config=spec)
    expected = token_ids(LLM(TINY_DUMMY, **args).generate(prompts, params, use_tqdm=False))
    graphed = LLM(TINY_DUMMY, **args)
    _, steps = stand_in_graphs(graphed, monkeypatch)
    assert token_ids(graphed.generate(prompts, params, use_tqdm=False)) == expected
    assert graphed.llm_engine.spec_decode_metrics.num_accepted_tokens > 0
    # every step, verification included, replayed a graph
    assert len(EagerGraph.replayed) == len(steps)


def test_step_buffer_packs_aligned_views_in_one_copy_and_raises_when_full():
    """The runner's StepBuffer: what comes back equals what went in (int64 and int32, an array smaller than
    its place in its first rows and columns), every place starts at a multiple of 16 bytes, the same
    layout gives the same addresses (what a CUDA graph relies on) whichever host buffer packed it, and a
    layout that does not fit is a clear error."""
    import numpy as np

    from mini_infer.worker.model_runner import StepBuffer, step_layout

    rng = np.random.default_rng(0)
    layout = step_layout(tokens=7, seqs=3, width=5, mixed=True)
    buffer = StepBuffer(StepBuffer.size(layout), torch.device("cpu"))
    addresses = []
    for b in (3, 2, 1):  # the two host buffers take turns; fewer sequences fill fewer rows
        arrays = {
            name: rng.integers(0, 2**31 - 1, shape).astype(dtype)
            for name, dtype, shape in layout
            if name != "block_tables"
        }
        arrays["block_tables"] = rng.integers(0, 2**31 - 1, (b, 4)).astype(np.int32)
        views = buffer.pack(arrays, layout)
        for name, a in arrays.items():
            corner = views[name][tuple(slice(0, n) for n in a.shape)]
            assert torch.equal(corner, torch.from_numpy(a)), name
            assert views[name].data_ptr() % StepBuffer.ALIGN == 0
        assert views["block_tables"].shape == (3, 5)
        addresses.append([v.data_ptr() for v in views.values()])
    assert addresses[0] == addresses[1] == addresses[2]
    with pytest.raises(RuntimeError, match="more than the runner's"):
        buffer.pack({}, step_layout(tokens=9, seqs=3, width=5, mixed=True))


def test_prompt_logprobs_of_a_one_token_chunk_replay_a_decode_graph(monkeypatch):
    """A step whose every request runs one token is a decode step even when a prompt's chunk is that token
    (here every chunk is one token: one request at a time, max_num_batched_tokens=1): it replays the
    decode graph, and the prompt logprobs read from the graph's output equal those of an engine without
    graphs."""
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    prompt = [5, 17, 80, 3, 41]
    args = dict(load_format="dummy", device="cpu", dtype="float32", max_model_len=64, seed=0)
    args.update(max_num_seqs=1, max_num_batched_tokens=1)
    expected = LLM(TINY_DUMMY, **args).generate([prompt], params, use_tqdm=False)[0]
    graphed = LLM(TINY_DUMMY, **args)
    _, steps = stand_in_graphs(graphed, monkeypatch, max_num_batched_tokens=1)
    out = graphed.generate([prompt], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for got, want in zip(out.prompt_logprobs[1:], expected.prompt_logprobs[1:]):
        assert got.keys() == want.keys()
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-5 for t in got)
    # one token a step, prompt chunks included: every step replayed the decode graph of 1
    assert all(s.total_num_scheduled_tokens == 1 for s in steps)
    assert EagerGraph.replayed == [1] * len(steps) and len(steps) == len(prompt) + 2
    assert all(EagerGraph.decode)
