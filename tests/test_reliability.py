"""Reliability (issue 8): a bad request fails alone, memory pressure loses nothing, aborts free their blocks
at once, a long run stays flat, greedy output is deterministic, and fuzzed input gives only results or
the documented errors. Most tests use a tiny random-weight model so that they run in seconds on a CPU."""

import gc
import itertools
import random
import re
import time
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TINY_DUMMY, assert_engine_quiet
from mini_infer.core.sequence import Sequence
from mini_infer.engine.input_processor import InputProcessor
from mini_infer.llm import LLM
from mini_infer.memory.kv_cache import kv_block_bytes
from mini_infer.sampling_params import SamplingParams

VOCAB, BLOCK = 512, 16
CONFIG = {**TINY_DUMMY, "vocab_size": VOCAB, "max_position_embeddings": 128}
BLOCK_BYTES = kv_block_bytes(
    num_layers=2, num_kv_heads=2, head_dim=16, block_size=BLOCK, dtype=torch.float32
)


def tiny(num_blocks: int = 64, max_model_len: int = 64, **engine_args) -> LLM:
    return LLM(
        CONFIG,
        load_format="dummy",
        device="cpu",
        dtype="float32",
        max_model_len=max_model_len,
        cpu_kv_bytes=num_blocks * BLOCK_BYTES,
        **engine_args,
    )


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llm() -> LLM:
    return tiny()


# --- a bad request is rejected on its own -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, params, error",
    [
        ([], greedy(4), "prompt is empty"),
        ([1, VOCAB], greedy(4), rf"token ids must be integers in \[0, {VOCAB}\)"),
        ([-1, 2], greedy(4), "token ids must be integers"),
        ([3, 2**70], greedy(4), "token ids must be integers"),
        ([1, True], greedy(4), "token ids must be integers"),
        (
            [1] * 64,
            greedy(1),
            r"prompt \(64 tokens\) leaves no room for output in max_model_len 64",
        ),
        ({"prompt_token_ids": [1], "text": "x"}, greedy(4), "a prompt dict has one key"),
        ("text", greedy(4), "no tokenizer"),
        (
            [1, 2],
            SamplingParams(stop_token_ids=[VOCAB], min_tokens=1),
            rf"stop_token_ids must be in \[0, {VOCAB}\)",
        ),
        (
            [1, 2],
            SamplingParams(allowed_token_ids=[3, VOCAB + 2]),
            rf"allowed_token_ids must be in \[0, {VOCAB}\): got \[{VOCAB + 2}\]",
        ),
        (
            [1, 2],
            SamplingParams(logit_bias={VOCAB: 1.0}),
            rf"logit_bias's token ids must be in \[0, {VOCAB}\)",
        ),
        (
            [1, 2],
            SamplingParams(allowed_token_ids=[3, 4], stop_token_ids=[4, 3], min_tokens=2),
            r"allowed_token_ids \[3, 4\] are all stop or end-of-sequence tokens, which min_tokens 2",
        ),
        ([{"role": "user", "content": "hi"}], greedy(4), "no tokenizer"),
    ],
)
def test_a_bad_request_fails_alone_and_the_others_finish(llm, bad, params, error):
    good = [[5, 6, 7], [9] * 20]
    alone = token_ids(llm.generate(good, greedy(8), use_tqdm=False))
    out = llm.generate([good[0], bad, good[1]], [greedy(8), params, greedy(8)], use_tqdm=False)
    assert token_ids([out[0], out[2]]) == alone
    assert [o.outputs[0].finish_reason for o in out] == ["length", "error", "length"]
    assert out[0].error is None and out[2].error is None
    assert out[1].outputs[0].token_ids == [] and out[1].finished
    assert re.search(error, out[1].error), out[1].error
    assert len({o.request_id for o in out}) == 3
    assert_engine_quiet(llm)


def test_min_tokens_with_only_end_tokens_allowed_is_refused_unless_eos_is_ignored():
    processor = InputProcessor(None, VOCAB, 64, eos_token_ids=(2,))
    with pytest.raises(ValueError, match=r"allowed_token_ids \[2\] are all stop or end-of-seq"):
        processor.check([1], SamplingParams(allowed_token_ids=[2], min_tokens=1))
    processor.check([1], SamplingParams(allowed_token_ids=[2], min_tokens=1, ignore_eos=True))
    processor.check([1], SamplingParams(allowed_token_ids=[2, 5], min_tokens=1))
    processor.check([1], SamplingParams(allowed_token_ids=[2]))


def test_errors_of_the_call_itself_still_raise_and_queue_nothing(llm):
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate([[1], [2]], [greedy(2)], use_tqdm=False)
    with pytest.raises(
        TypeError, match="a prompt is a string, a list of token ids, a list of chat messages"
    ):
        llm.generate([[1, 2], 3.5], greedy(2), use_tqdm=False)
    with pytest.raises(TypeError, match="sampling params must be a SamplingParams"):
        llm.generate([[1, 2]], {"temperature": 0}, use_tqdm=False)
    assert_engine_quiet(llm)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
    ],
)
def test_invalid_sampling_values_name_the_field_and_range(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        SamplingParams(**kwargs)
    assert any(word in str(error.value) for word in ("must be", "in (0, 1]", ">= 0", "positive"))


def test_an_engine_whose_cache_cannot_hold_max_model_len_refuses_to_start():
    # every request that passes the input checks can then run, alone if need be: none waits forever
    with pytest.raises(
        ValueError, match="fewer than max_model_len 64: raise cpu_kv_bytes or lower"
    ):
        tiny(num_blocks=2, max_model_len=64)


def test_a_request_may_ask_for_more_than_max_model_len_and_stops_there(llm):
    out = llm.generate(
        [[1, 2, 3], [4] * 60],
        [greedy(100), SamplingParams(max_tokens=None, ignore_eos=True)],
        use_tqdm=False,
    )
    assert [(len(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in out] == [
        (61, "length"),
        (4, "length"),
    ]
    assert_engine_quiet(llm)


# --- memory pressure ------------------------------------------------------------------------------------


def test_a_thousand_requests_through_a_pool_of_five_percent_of_their_need():
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 16))] for _ in range(1000)]
    params = [greedy(rng.randint(1, 32)) for _ in range(1000)]
    need = sum(-(-(len(p) + sp.max_tokens) // BLOCK) for p, sp in zip(prompts, params))
    num_blocks = max(need // 20, 3)  # 5% of the total, and at least the largest request (48 tokens)
    roomy = tiny(num_blocks=need, max_model_len=48, max_num_seqs=32)
    pressed = tiny(num_blocks=num_blocks, max_model_len=48)
    assert pressed.engine.runner.num_blocks == num_blocks < need / 19
    reference = roomy.generate(prompts, params, use_tqdm=False)
    outputs = pressed.generate(prompts, params, use_tqdm=False)
    assert pressed.engine.scheduler.num_preemptions > 0
    assert [len(o.outputs[0].token_ids) for o in outputs] == [sp.max_tokens for sp in params]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert token_ids(outputs) == token_ids(reference)
    assert_engine_quiet(pressed)


def test_n_samples_that_do_not_fit_together_run_as_memory_allows(llm):
    # Each sample needs its own blocks: 20 + 40 tokens take all 4 blocks of the pool, so the 3 samples
    # cannot run together; they are preempted and recomputed, and still draw what they draw with room.
    params = SamplingParams(n=3, temperature=0.9, max_tokens=40, seed=5, ignore_eos=True)
    pressed = tiny(num_blocks=4)
    (out,) = pressed.generate([[7] * 20], params, use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [40] * 3 and out.error is None
    assert out.outputs == llm.generate([[7] * 20], params, use_tqdm=False)[0].outputs
    assert pressed.engine.scheduler.num_preemptions > 0
    assert_engine_quiet(pressed)


# --- aborts ---------------------------------------------------------------------------------------------


def sequences(engine, request_id: str) -> list[Sequence]:
    """The engine's sequences of a running request (one per sample)."""
    return [
        engine.scheduler.requests[seq_id]
        for seq_id in engine.output_processor.requests[request_id].samples
    ]


def run_engine(engine) -> dict[str, object]:
    """Step until nothing is unfinished; the last output of each request."""
    last = {}
    while engine.has_unfinished_requests():
        last.update((o.request_id, o) for o in engine.step())
    return last


def test_aborting_a_waiting_and_a_running_request_frees_their_blocks_and_the_others_finish():
    llm = tiny(max_num_seqs=2)
    engine, bm = llm.engine, llm.engine.scheduler.block_manager
    prompts = [[1, 2, 3] * 7, [4, 5] * 9, [6, 7, 8, 9] * 5, [10] * 17]
    alone = token_ids(llm.generate(prompts, greedy(20), use_tqdm=False))
    for i, p in enumerate(prompts):
        engine.add_request(
            f"r{i}",
            p,
            SamplingParams(
                temperature=1.0 if i == 1 else 0, seed=3, max_tokens=20, ignore_eos=True
            ),
        )
    for _ in range(3):
        engine.step()
    (running,), (waiting,) = sequences(engine, "r1"), sequences(engine, "r2")
    assert running in engine.scheduler.running and waiting in engine.scheduler.waiting
    held = len(running.block_table)
    free = bm.num_free_blocks
    aborted = engine.abort_request("r1")
    assert bm.num_free_blocks == free + held and held > 0  # at once, not at the next step
    assert (
        aborted.finished
        and aborted.outputs[0].finish_reason == "abort"
        and 0 < len(aborted.outputs[0].token_ids) < 20
    )
    engine.abort_request("r2")
    last = run_engine(engine)
    assert sorted(last) == ["r0", "r3"] and [
        last["r0"].outputs[0].token_ids,
        last["r3"].outputs[0].token_ids,
    ] == [alone[0], alone[3]]
    assert (running.finish_reason, waiting.finish_reason, waiting.num_output_tokens) == (
        "abort",
        "abort",
        0,
    )
    assert engine.abort_request("r0") is None  # finished already: nothing to abort
    assert_engine_quiet(llm)


# --- a long run stays flat --------------------------------------------------------------------------------


def count_sequences() -> int:
    gc.collect()
    return sum(type(o) is Sequence for o in gc.get_objects())


def test_a_soak_run_keeps_memory_flat():
    llm = tiny(num_blocks=24, max_num_seqs=8)
    engine, rng, ids = llm.engine, random.Random(1), itertools.count()

    def round_of_requests():
        request_ids = [str(next(ids)) for _ in range(rng.randint(1, 12))]
        for request_id in request_ids:
            engine.add_request(
                request_id,
                [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))],
                SamplingParams(
                    temperature=rng.choice([0, 0.8]),
                    seed=rng.choice([None, 5]),
                    max_tokens=rng.randint(1, 20),
                    ignore_eos=True,
                ),
            )
        doomed = rng.sample(request_ids, len(request_ids) // 4)
        for step in range(1000):
            if not engine.has_unfinished_requests():
                break
            engine.step()
            if step == 2:
                for request_id in doomed:
                    engine.abort_request(request_id)
        assert_engine_quiet(llm)

    for _ in range(5):  # warm up: fill the prefix cache and the allocator's pools
        round_of_requests()
    baseline, rounds, deadline = count_sequences(), 0, time.monotonic() + 3
    while time.monotonic() < deadline:  # keep adding, aborting and finishing requests
        round_of_requests()
        rounds += 1
    assert rounds >= 5 and count_sequences() <= baseline
    tracemalloc.start()  # Python memory over a few more rounds (tracing slows them down)
    round_of_requests()
    gc.collect()
    start_bytes = tracemalloc.get_traced_memory()[0]
    for _ in range(3):
        round_of_requests()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - start_bytes
    tracemalloc.stop()
    assert grown < 64 << 10, f"{grown} bytes more after 3 rounds"


# --- determinism ------------------------------------------------------------------------------------------


def test_greedy_is_the_same_across_runs_and_batch_compositions(llm):
    rng = random.Random(2)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    batched = token_ids(llm.generate(prompts, greedy(12), use_tqdm=False))
    one_by_one = [token_ids(llm.generate([p], greedy(12), use_tqdm=False))[0] for p in prompts[:4]]
    assert one_by_one == batched[:4]
    # fresh engine, other batches and prompt chunks
    other = tiny(max_num_seqs=3, max_num_batched_tokens=8)
    assert token_ids(other.generate(prompts[::-1], greedy(12), use_tqdm=False)) == batched[::-1]


def test_a_seed_gives_the_same_samples_in_a_fresh_engine(llm):
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=11, ignore_eos=True
    )
    prompts = [[1, 2, 3], [7] * 9, [300, 200, 100]]
    first = token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert token_ids(tiny().generate(prompts, params, use_tqdm=False)) == first
    assert token_ids(llm.generate(prompts[:1], params, use_tqdm=False))[0] == first[0]  # and alone
    assert_engine_quiet(llm)


# --- fuzzing the public API -------------------------------------------------------------------------------

token_lists = st.lists(
    st.one_of(st.integers(0, VOCAB - 1), st.integers(-(2**70), 2**70), st.booleans()), max_size=70
)
chats = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "wizard", ""]),
            "content": st.text(max_size=20),
        }
    ),
    min_size=1,
    max_size=3,
)
prompts = st.one_of(token_lists, st.text(max_size=20), chats, st.none(), st.floats(), st.integers())
param_values = st.fixed_dictionaries(
    {
        "temperature": st.one_of(st.just(0.0), st.floats(-1, 3), st.just(float("nan"))),
        "top_k": st.one_of(st.just(-1), st.integers(-3, VOCAB + 10)),
        "top_p": st.floats(-0.5, 1.5),
        "max_tokens": st.one_of(st.integers(1, 6), st.integers(-2, 0), st.just(10**9)),
        "seed": st.one_of(st.none(), st.integers(0, 2**32)),
        "n": st.integers(0, 3),
    }
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(prompts, min_size=1, max_size=4),
    values=st.lists(param_values, min_size=1, max_size=4),
)
def test_fuzzed_requests_give_results_or_documented_errors(llm, batch, values):
    try:
        params = [SamplingParams(ignore_eos=True, **v) for v in values]
    except ValueError as e:
        assert str(e)
        return
    try:
        outputs = llm.generate(batch, params if len(params) > 1 else params[0], use_tqdm=False)
    except (ValueError, TypeError) as e:
        assert str(e)
        assert_engine_quiet(llm)
        return
    assert len(outputs) >= 1
    for out, sp in zip(outputs, params * len(outputs) if len(params) == 1 else params):
        assert [c.index for c in out.outputs] == list(range(sp.n))
        for completion in out.outputs:
            if completion.finish_reason == "error":
                assert out.error and completion.token_ids == []
            else:  # a request may ask for more than max_model_len (64) leaves room for: it stops there
                room = 64 - len(out.prompt_token_ids)
                assert completion.finish_reason == "length" and len(completion.token_ids) == min(
                    sp.max_tokens, room
                )
                assert all(0 <= t < VOCAB for t in completion.token_ids)
    assert_engine_quiet(llm)


# --- text and chat prompts with the embedded model ---------------------------------------------------------


def test_text_and_chat_prompts_fail_alone_with_the_embedded_model(smol):
    batch = [
        "The capital of France is",
        "",
        "héllo wörld 🌍 ∑ \x00",
        "word " * 600,
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": "Hi"}],
    ]
    out = smol.generate(
        batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    reasons = [o.outputs[0].finish_reason for o in out]
    assert reasons == ["length", "error", "length", "error", "error", "error", "length"]
    assert "prompt is empty" in out[1].error
    assert "leaves no room for output in max_model_len 512" in out[3].error
    assert "unknown chat role ['wizard']" in out[4].error
    assert "'content'" in out[5].error
    assert out[0].outputs[0].text.startswith(" Paris")
    with pytest.raises(ValueError, match="prompt is empty"):
        list(smol.stream("", SamplingParams(max_tokens=2)))
    assert_engine_quiet(smol)


def test_a_stopped_stream_leaves_the_other_requests_running(smol):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    other_prompt = smol.get_tokenizer().encode("Once upon a time")
    expected = smol.generate([other_prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    smol.engine.add_request("other", other_prompt, params)
    stream = smol.stream("The three primary colours are", params)
    next(stream)
    stream.close()  # the consumer stops: that request is aborted, "other" is untouched
    last = run_engine(smol.engine)
    assert list(last) == ["other"] and last["other"].outputs[0].token_ids == expected
    assert last["other"].outputs[0].finish_reason == "length"
    assert_engine_quiet(smol)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_streams_and_generate_interleaved_lose_no_text(smol, async_scheduling, monkeypatch):
    # A stream paused while another consumer steps the engine (another stream read in turn, a generate
    # call) must still deliver all its text, also when its request finishes meanwhile.
    monkeypatch.setattr(smol.engine, "async_scheduling", async_scheduling)
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 9, 14)]
    expected = [o.outputs[0].text for o in smol.generate(prompts, params, use_tqdm=False)]
    streams = [smol.stream(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    texts = [next(streams[0]), next(streams[1])]
    # runs both streams out
    assert smol.generate(prompts[2], params[2], use_tqdm=False)[0].outputs[0].text == expected[2]
    texts[1] += "".join(streams[1])
    texts[0] += "".join(streams[0])
    assert texts == expected[:2]
    assert_engine_quiet(smol)


def test_a_generate_call_that_is_interrupted_leaves_nothing_running(llm, monkeypatch):
    step, calls = llm.engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5]], greedy(20), use_tqdm=False)
    monkeypatch.undo()
    assert_engine_quiet(llm)  # its requests were aborted, their blocks free
    assert token_ids(llm.generate([[1, 2, 3]], greedy(3), use_tqdm=False))[
        0
    ]  # and the engine still works


def test_top_k_beyond_the_vocabulary_is_off(llm):
    sampled = SamplingParams(
        temperature=0.8, top_k=2**70, top_p=0.9, max_tokens=4, seed=1, ignore_eos=True
    )
    off = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, seed=1, ignore_eos=True)
    assert token_ids(llm.generate([[1, 2, 3]], sampled, use_tqdm=False)) == token_ids(
        llm.generate([[1, 2, 3]], off, use_tqdm=False)
    )
