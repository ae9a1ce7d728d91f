"""Speculative decoding (Chapter 10): greedy output token-identical with and without it (the embedded model,
and a tiny random model under memory pressure, preemption, chunked prefill and the prefix cache), the
rejection sampler's distribution, seeded reproducibility, the n-gram proposer against a full search, and
clear errors for bad configs."""

import warnings

import numpy as np
import pytest
import torch

from helpers import assert_engine_quiet, tiny_hf_model
from mini_infer.core.sequence import Sequence
from mini_infer.layers.rejection_sampler import RejectionSampler
from mini_infer.layers.sampler import Sampler
from mini_infer.llm import LLM
from mini_infer.memory.kv_cache import kv_block_bytes
from mini_infer.sampling_params import SamplingParams
from mini_infer.spec_decode.config import SpeculativeConfig
from mini_infer.spec_decode.ngram_proposer import NgramProposer

pytestmark = pytest.mark.usefixtures("one_thread")

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}
CODE = """def area(width, height):
    result = width * height
    return result

def perimeter(width, height):
    result = 2 * (width + height)
    return result
"""
REWRITE = [
    {"role": "user", "content": f"Repeat this code with `result` renamed to `value`:\n\n{CODE}"}
]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def spec_smol():
    return LLM(
        dtype="float32",
        device="cpu",
        max_model_len=512,
        cpu_kv_bytes=64 << 20,
        speculative_config=NGRAM,
    )


@pytest.mark.slow
def test_greedy_speculation_on_the_embedded_model_gives_the_same_tokens_and_text(smol, spec_smol):
    # the rewrite copies much of its prompt, so drafts get accepted; stop strings and max_tokens may fall
    # in the middle of a step's accepted tokens
    params = [
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0, max_tokens=37, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=48, stop=["* height"]),
        SamplingParams(temperature=0, max_tokens=20, logprobs=2),  # does not speculate
    ]
    expected = smol.chat([REWRITE] * 4, params, use_tqdm=False)
    got = spec_smol.chat([REWRITE] * 4, params, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    assert [o.outputs[0].finish_reason for o in got] == [
        o.outputs[0].finish_reason for o in expected
    ]
    for ours, theirs in zip(got[3].outputs[0].logprobs, expected[3].outputs[0].logprobs):
        assert ours.keys() == theirs.keys()  # values within rounding: other batches, other shapes
        assert all(abs(ours[t].logprob - theirs[t].logprob) < 1e-4 for t in ours)
    metrics = spec_smol.llm_engine.spec_decode_metrics
    assert metrics.num_accepted_tokens > 0 and metrics.mean_acceptance_length > 1.5
    assert sum(metrics.num_accepted_tokens_per_pos) == metrics.num_accepted_tokens
    assert_engine_quiet(spec_smol)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama").save_pretrained(path)
    return path


def tiny_llm(path, num_blocks=None, max_model_len=128, **kwargs):
    block = kv_block_bytes(2, 2, 16, 16, torch.float32)
    return LLM(
        path,
        dtype="float32",
        device="cpu",
        max_model_len=max_model_len,
        cpu_kv_bytes=(num_blocks or 200) * block,
        **kwargs,
    )


def tiny_prompts():
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(10):  # repeated motifs, so that prompt lookup finds matches
        motif = rng.integers(0, 300, 3 + i % 4).tolist()
        prompts.append(motif * (2 + i % 3) + rng.integers(0, 300, i).tolist())
    return prompts + prompts[:2]  # two repeats: prefix cache hits


def test_greedy_speculation_under_memory_pressure_and_preemption_on_a_tiny_model(tiny_path):
    params = [SamplingParams(temperature=0, max_tokens=40 + i, ignore_eos=True) for i in range(12)]
    params[1] = SamplingParams(
        temperature=0, max_tokens=30, repetition_penalty=1.3
    )  # no speculation
    params[2] = SamplingParams(temperature=0, max_tokens=30, min_tokens=10, stop_token_ids=[7, 8])
    even = list(range(0, 300, 2))  # drafts copied from the prompts are often odd: none may pass
    params[3] = SamplingParams(
        temperature=0, max_tokens=30, allowed_token_ids=even, logit_bias={4: 2.5}
    )  # no speculation
    expected = token_ids(tiny_llm(tiny_path).generate(tiny_prompts(), params, use_tqdm=False))
    assert set(expected[3]) <= set(even)
    for async_scheduling in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # 12 blocks for 12 requests of 3-6 blocks each; a budget of 16 tokens chunks the prompts
            small = tiny_llm(
                tiny_path,
                num_blocks=12,
                max_num_seqs=12,
                max_num_batched_tokens=16,
                async_scheduling=async_scheduling,
                speculative_config=NGRAM,
            )
        assert any("synchronous" in str(w.message) for w in caught) == async_scheduling
        assert not small.engine.async_scheduling
        assert token_ids(small.generate(tiny_prompts(), params, use_tqdm=False)) == expected
        assert small.engine.scheduler.num_preemptions > 0
        assert small.llm_engine.spec_decode_metrics.num_accepted_tokens > 0
        assert_engine_quiet(small)


def test_speculation_switches_off_above_its_batch_size(tiny_path):
    llm = tiny_llm(tiny_path, speculative_config={**NGRAM, "disable_by_batch_size": 4})
    params = [
        SamplingParams(temperature=0, max_tokens=5 + 5 * i, ignore_eos=True) for i in range(12)
    ]
    expected = token_ids(tiny_llm(tiny_path).generate(tiny_prompts(), params, use_tqdm=False))
    assert token_ids(llm.generate(tiny_prompts(), params, use_tqdm=False)) == expected
    metrics = llm.llm_engine.spec_decode_metrics
    assert metrics.num_steps_over_batch_size > 0 and metrics.num_drafts > 0  # on while few are left


def test_seeded_sampling_with_speculation_repeats_alone_or_in_a_batch(tiny_path):
    llm = tiny_llm(tiny_path, speculative_config=NGRAM)
    # a low temperature: the tiny random model's logits are nearly flat, and a draft needs a likely token
    seeded = SamplingParams(temperature=0.002, top_p=0.95, seed=3, max_tokens=40, ignore_eos=True)
    prompts = tiny_prompts()
    alone = token_ids(llm.generate(prompts[0], seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 5
    crowded = token_ids(llm.generate(prompts[:6], [seeded] + others, use_tqdm=False))[0]
    assert alone == crowded
    assert llm.llm_engine.spec_decode_metrics.num_accepted_tokens > 0


CHI2_5DF_999 = 20.515  # chi-square's 99.9th percentile at 5 degrees of freedom


def chi_square(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(p)).double()
    expected = p.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", [5, 3])  # p's least and most likely token at position 0
def test_rejection_sampling_keeps_the_target_distribution(draft):
    # Pearson's chi-square over a 6-token vocabulary (5 degrees of freedom) for the first output token, and
    # for the second among requests whose first draft was accepted; a correct sampler exceeds 20.515 with
    # probability 0.001 per check: a false-alarm rate of 0.1% per check over seeds (the seed here is fixed).
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0], [0.0, 1.5, 0.3, -0.2, 1.0, 0.5]])
    params = SamplingParams(
        temperature=0.8, top_k=5
    )  # top-k 5 drops p's least likely at each position
    filtered = logits.clone()
    filtered[0, 5] = filtered[1, 3] = float("-inf")
    p = (filtered / 0.8).softmax(dim=-1)
    n = 12_000
    rows = torch.cat([logits, logits[1:]]).repeat(n, 1)
    out = RejectionSampler(Sampler(seed=2))(rows, [[draft, 1]] * n, [params] * n, [0] * n)
    first = out[:, 0]
    keep = p[0] > 0
    counts = torch.bincount(first, minlength=6)
    assert counts[~keep].sum() == 0  # never a token top-k dropped, even as the rejected draft
    assert chi_square(first, p[0].where(keep, torch.tensor(1e-12))) < CHI2_5DF_999
    second = out[first == draft, 1]
    assert len(second) > 1000 or draft == 5
    if draft == 3:
        assert torch.bincount(second, minlength=6)[3] == 0
        assert chi_square(second, p[1].where(p[1] > 0, torch.tensor(1e-12))) < CHI2_5DF_999


def test_greedy_verification_keeps_drafts_while_they_are_the_argmax():
    logits = torch.full((7, 6), -5.0)
    logits[torch.arange(7), torch.tensor([3, 1, 0, 4, 2, 2, 5])] = 5.0
    out = RejectionSampler(Sampler())(
        logits, [[3, 1, 2], [2, 2]], [SamplingParams(temperature=0)] * 2, [10, 20]
    )
    assert out.tolist() == [[3, 1, 0, -1], [2, 2, 5, -1]]


def brute_force(tokens, k, n_max, n_min):
    for n in range(n_max, n_min - 1, -1):
        for end in range(len(tokens) - 1, n - 1, -1):
            if len(tokens) > n and tokens[end - n : end] == tokens[-n:]:
                return tokens[end : end + k]
    return []


def test_the_ngram_proposer_finds_the_latest_longest_match():
    config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        proposer, seq = NgramProposer(config), Sequence(rng.integers(0, 5, 3).tolist())
        for _ in range(15):
            seq.token_ids.append(int(rng.integers(0, 5)))
            assert proposer.propose(seq) == brute_force(seq.token_ids, 3, 3, 1)


@pytest.mark.parametrize(
    "config, error",
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' is not implemented"),
        ({"method": "ngram"}, "needs 'method' and 'num_speculative_tokens'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
            "prompt_lookup_min",
        ),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 3,
                "prompt_lookup_max": 2,
            },
            "must not exceed prompt_lookup_max",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "n": 3}, "unknown key"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by",
        ),
        ("ngram", "must be a dict"),
    ],
)
def test_bad_speculative_configs_raise_a_clear_error(config, error):
    with pytest.raises(ValueError, match=error):
        LLM(speculative_config=config)


def test_prompt_lookup_defaults_follow_vllm():
    one = SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    )
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (4, 4)
    none = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (none.prompt_lookup_min, none.prompt_lookup_max) == (5, 5)


def test_sampled_tokens_after_verification_follow_the_tiny_models_distribution(tmp_path):
    # The engine end to end: 1,600 samples of one prompt (top-k 4, temperature 1). The first token comes
    # from the prefill; the second from a verification step, of a draft that a stand-in proposer makes a
    # likely token (the second most likely after that first token), so that it is accepted about a quarter
    # of the time and rejected otherwise. Among the samples whose first token is the most common one, the
    # second must follow the model's probabilities there (Hugging Face's forward): Pearson's chi-square over
    # 4 tokens (3 degrees of freedom) exceeds 16.27 with probability 0.001 when it does: a false-alarm rate
    # of 0.1% over seeds (the engine's seed here is fixed). A sampler that drew the replacement of a rejected
    # draft from p itself (the draft not removed) gives that draft 0.44 instead of 0.25: chi-square ~100.
    hf = tiny_hf_model("llama", max_position_embeddings=512)
    hf.save_pretrained(tmp_path)
    llm = tiny_llm(
        tmp_path,
        num_blocks=800,
        max_model_len=512,
        seed=0,
        max_num_seqs=256,
        speculative_config={**NGRAM, "disable_by_batch_size": None},
    )
    prompt = np.random.default_rng(1).permutation(300)[:250].tolist()
    with torch.no_grad():
        firsts = hf(torch.tensor([prompt])).logits[0, -1].topk(4).indices.tolist()
        after = {t: hf(torch.tensor([prompt + [t]])).logits[0, -1].topk(4) for t in firsts}

    class SecondMostLikely:  # the proposer's stand-in: one draft, after the first token
        def propose(self, seq):
            return [int(after[seq.token_ids[-1]].indices[1])] if seq.num_output_tokens == 1 else []

    llm.llm_engine.proposer = SecondMostLikely()
    # max_tokens 3: room for one draft after the first token
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True)
    outs = token_ids(llm.generate([prompt] * 1600, params, use_tqdm=False))
    metrics = llm.llm_engine.spec_decode_metrics
    assert metrics.num_drafts == 1600 and 250 < metrics.num_accepted_tokens < 600
    mode = int(torch.tensor([o[0] for o in outs]).mode().values)
    seconds = [o[1] for o in outs if o[0] == mode]
    top = after[mode]
    index = {t: i for i, t in enumerate(top.indices.tolist())}
    assert set(seconds) <= set(index)
    counts = torch.bincount(torch.tensor([index[t] for t in seconds]), minlength=4)
    expected = top.values.softmax(dim=-1) * len(seconds)
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.266


def test_speculation_with_tensor_parallelism_is_refused_clearly():
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        LLM(speculative_config=NGRAM, tensor_parallel_size=2)
