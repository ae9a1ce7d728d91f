"""What a vLLM user asks of SamplingParams and LLM (issue 16), on the embedded model on the CPU: logprobs,
penalties, allowed_token_ids and logit_bias checked against Hugging Face transformers on the same
weights, min_tokens, min_p, top_k 0, stop tokens' text, extreme temperatures, async scheduling, the
engine's seed and argument errors."""

import pytest
import torch

from helpers import assert_engine_quiet
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

PROMPT = "The capital of France is"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def hf(hf_smol):  # tests/conftest.py
    return hf_smol


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """Hugging Face's logits for the token after ids, in float32."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1]


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, **processors) -> list[int]:
    """Hugging Face's greedy tokens after prompt, never stopping early, with its logits processors."""
    ids = torch.tensor([prompt])
    return hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        **processors,
    )[0, len(prompt) :].tolist()


def test_logprobs_are_the_log_softmax_of_hugging_faces_logits(smol, hf):
    prompt = smol.get_tokenizer().encode(PROMPT)
    (out,) = smol.generate(
        prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False
    )
    c = out.outputs[0]
    assert len(c.logprobs) == 6
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        ref = hf_logits(hf, prompt + c.token_ids[:i]).log_softmax(-1)
        top = ref.topk(3)
        assert list(entry) == top.indices.tolist()  # greedy: the sampled token is the most likely
        assert [e.rank for e in entry.values()] == [1, 2, 3]
        torch.testing.assert_close(
            torch.tensor([e.logprob for e in entry.values()]), top.values, atol=1e-4, rtol=0
        )
        assert entry[token].decoded_token == smol.get_tokenizer().decode([token])
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids))
    )
    # a sampled token outside the top k still gets its own entry, with its rank; no logprobs: none
    sampled = SamplingParams(temperature=5.0, max_tokens=8, logprobs=0, seed=3)
    (out,) = smol.generate(prompt, sampled, use_tqdm=False)
    assert all(
        len(e) == 1 and e[t].rank >= 1
        for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)
    )
    assert any(e[t].rank > 1 for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids))
    assert (
        smol.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].logprobs
        is None
    )


def test_repetition_penalty_greedy_equals_hugging_face(smol, hf):
    prompt = smol.get_tokenizer().encode(PROMPT)
    for penalty in (1.3, 0.8):
        ref = hf_greedy(hf, prompt, 16, repetition_penalty=penalty)
        params = SamplingParams(
            temperature=0, max_tokens=16, repetition_penalty=penalty, ignore_eos=True
        )
        assert smol.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == ref


def test_presence_and_frequency_penalties_follow_openais_formula(smol, hf):
    prompt = smol.get_tokenizer().encode(PROMPT)
    params = SamplingParams(
        temperature=0, max_tokens=10, presence_penalty=0.8, frequency_penalty=0.6, ignore_eos=True
    )
    out = smol.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    for i, token in enumerate(out):
        logits = hf_logits(hf, prompt + out[:i])
        counts = torch.bincount(
            torch.tensor(out[:i], dtype=torch.long), minlength=logits.numel()
        ).float()
        # over the output only, not the prompt
        penalized = logits - 0.8 * (counts > 0) - 0.6 * counts
        assert token == int(penalized.argmax())
    plain = smol.generate(
        prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    assert out != plain[0].outputs[0].token_ids  # the penalties did something


def test_allowed_token_ids_and_logit_bias_greedy_equal_hugging_face(smol, hf):
    prompt = smol.get_tokenizer().encode(PROMPT)
    top = hf_logits(hf, prompt).topk(40).indices.tolist()
    allowed = top[5:]  # the model's five favourites left out
    bias = {top[7]: 2.0, top[9]: -1.5, top[0]: 5.0}  # top[0] is not allowed: its bias does nothing
    ref = hf_greedy(
        hf,
        prompt,
        12,
        sequence_bias={(t,): b for t, b in bias.items()},
        prefix_allowed_tokens_fn=lambda batch, so_far: allowed,
    )
    params = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed, logit_bias=bias
    )
    out = smol.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == ref and set(out) <= set(allowed)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_penalties_see_the_token_still_in_flight(smol, async_scheduling, monkeypatch):
    # One step ahead, the newest output is not on the host yet: penalties must count it all the same.
    monkeypatch.setattr(smol.engine, "async_scheduling", async_scheduling)
    params = SamplingParams(
        temperature=0, max_tokens=12, repetition_penalty=1.4, frequency_penalty=0.5, ignore_eos=True
    )
    outs = [
        o.outputs[0].token_ids
        for o in smol.generate([PROMPT, "Once upon a time"], params, use_tqdm=False)
    ]
    monkeypatch.setattr(smol.engine, "async_scheduling", not async_scheduling)
    assert [
        o.outputs[0].token_ids
        for o in smol.generate([PROMPT, "Once upon a time"], params, use_tqdm=False)
    ] == outs
    assert_engine_quiet(smol)


def test_min_tokens_holds_back_the_end_and_stop_strings(smol):
    chat = [{"role": "user", "content": "Say hi."}]
    short = smol.chat(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[
        0
    ].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 30
    held = smol.chat(
        chat,
        SamplingParams(temperature=0, max_tokens=40, min_tokens=len(short.token_ids) + 5),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(held.token_ids) >= len(short.token_ids) + 5
    # a stop string in the first min_tokens tokens' text does not end the request
    stop = short.text[:3]
    early = smol.chat(
        chat, SamplingParams(temperature=0, max_tokens=40, stop=stop), use_tqdm=False
    )[0].outputs[0]
    late = smol.chat(
        chat, SamplingParams(temperature=0, max_tokens=40, stop=stop, min_tokens=3), use_tqdm=False
    )
    assert early.text == "" and late[0].outputs[0].text.startswith(short.text[:3])


def test_min_p_top_k_zero_and_tiny_temperatures(smol):
    greedy = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[
        0
    ].outputs[0]
    for params in (
        SamplingParams(temperature=1.0, min_p=1.0, max_tokens=12, seed=1),  # only the most likely
        SamplingParams(temperature=1e-38, max_tokens=12),
        SamplingParams(temperature=1e-40, max_tokens=12),
        SamplingParams(temperature=1e-6, top_k=0, max_tokens=12, seed=2),
    ):
        assert (
            smol.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
            == greedy.token_ids
        ), params
    assert SamplingParams(top_k=0).top_k == SamplingParams(top_k=-1).top_k == -1
    for bad, field in (
        ({"temperature": float("inf")}, "temperature"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot' \\(str\\)"),
        ({"top_p": None}, "top_p must be a number"),
        ({"max_tokens": "8"}, "max_tokens must be a positive integer or None, got '8'"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_a_stop_token_stays_in_the_token_ids_but_not_in_the_text(smol):
    full = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[
        0
    ].outputs[0]
    stop = full.token_ids[1]  # "."
    for kind in ("final", "stream"):
        params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop])
        if kind == "final":
            c = smol.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
            assert (c.token_ids, c.finish_reason, c.stop_reason) == (
                full.token_ids[:2],
                "stop",
                stop,
            )
            text = c.text
        else:
            text = "".join(smol.stream(PROMPT, params))
        assert text == smol.get_tokenizer().decode(full.token_ids[:1])
    kept = SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[stop], include_stop_str_in_output=True
    )
    assert smol.generate(PROMPT, kept, use_tqdm=False)[0].outputs[
        0
    ].text == smol.get_tokenizer().decode(full.token_ids[:2])
    by_string = SamplingParams(
        temperature=0, max_tokens=8, stop=".", include_stop_str_in_output=True
    )
    c = smol.generate(PROMPT, by_string, use_tqdm=False)[0].outputs[0]
    assert (c.text, c.stop_reason) == (" Paris.", ".")


def test_the_engines_seed_repeats_unseeded_sampling():
    def run(seed):
        llm = LLM(
            dtype="float32", device="cpu", max_model_len=128, cpu_kv_bytes=16 << 20, seed=seed
        )
        params = SamplingParams(temperature=1.0, max_tokens=8)
        return [
            o.outputs[0].token_ids for o in llm.generate([PROMPT, "Hello"], params, use_tqdm=False)
        ]

    assert run(7) == run(7) != run(8)


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ("What is the capital of France?", TypeError, "use generate\\(\\) for a plain prompt"),
        ([], ValueError, "at least one message"),
        ([[]], ValueError, "at least one message"),
        ([1, 2, 3], TypeError, "takes a conversation"),
    ],
)
def test_chat_takes_conversations_only(smol, messages, error, match):
    with pytest.raises(error, match=match):
        smol.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)


def test_an_unknown_engine_argument_names_llm():
    with pytest.raises(
        TypeError, match=r"LLM\(\) got an unexpected keyword argument 'tensor_parallel'"
    ):
        LLM(tensor_parallel=2)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_are_the_log_softmax_of_hugging_faces_logits(
    smol, hf, async_scheduling, monkeypatch
):
    monkeypatch.setattr(smol.engine, "async_scheduling", async_scheduling)
    monkeypatch.setattr(smol.engine.scheduler, "max_num_batched_tokens", 5)  # the prompt in chunks
    prompt = smol.get_tokenizer().encode(
        "The capital of France is Paris, and the capital of Italy is"
    )
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    for _ in range(2):  # the second time its prefix is cached, and must be computed all the same
        out, other = smol.generate(
            [prompt, "Hello"], [params, SamplingParams(max_tokens=3)], use_tqdm=False
        )
        assert other.prompt_logprobs is None and out.prompt_logprobs[0] is None
        with torch.no_grad():
            ref = (
                hf(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
            )  # position p scores token p + 1
        for p, entry in enumerate(out.prompt_logprobs[1:]):
            token = prompt[p + 1]
            top = ref[p].topk(2)
            assert entry[token].logprob == pytest.approx(float(ref[p, token]), abs=1e-4)
            assert entry[token].rank == int((ref[p] > ref[p, token]).sum()) + 1
            best = sorted(
                (t for t, lp in entry.items() if lp.rank <= 2), key=lambda t: entry[t].rank
            )
            assert best == top.indices.tolist()
    assert_engine_quiet(smol)
