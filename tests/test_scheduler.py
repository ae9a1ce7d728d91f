"""The scheduler over random workloads: nothing lost, limits kept, every request sees its own K/V."""

import pickle
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mini_infer.core.scheduler import Scheduler
from mini_infer.core.sequence import Sequence, SequenceStatus
from mini_infer.memory.block_manager import BlockManager
from mini_infer.sampling_params import SamplingParams
from mini_infer.testing.simulate import TokenPoolModel, run_to_completion

BLOCK = 4


def make_requests(rng: random.Random, n: int, shared_prefix: int) -> list[Sequence]:
    """Random prompts and lengths; with shared_prefix > 0 they start alike, to exercise the prefix cache."""
    prefix = [rng.randint(0, 50) for _ in range(shared_prefix)]
    return [
        Sequence(
            prefix + [rng.randint(0, 50) for _ in range(rng.randint(1, 30))],
            SamplingParams(max_tokens=rng.randint(1, 25), ignore_eos=True),
        )
        for _ in range(n)
    ]


def blocks_needed(seqs: list[Sequence]) -> int:
    return sum(-(-(s.num_prompt_tokens + s.params.max_tokens) // BLOCK) for s in seqs)


def tight_pool(seqs: list[Sequence], fraction: float) -> int:
    """A pool holding `fraction` of the workload's KV, but at least the largest single request."""
    longest = max(-(-(s.num_prompt_tokens + s.params.max_tokens) // BLOCK) for s in seqs)
    return max(longest, int(blocks_needed(seqs) * fraction))


def run(seqs, num_blocks, **kwargs):
    scheduler = Scheduler(BlockManager(num_blocks, block_size=BLOCK), **kwargs)
    for seq in seqs:
        scheduler.add(seq)
    batches = []
    # asserts every step that each request reads exactly its own tokens
    model = TokenPoolModel(scheduler)
    finished = run_to_completion(
        scheduler,
        model.step,
        on_step=lambda output: batches.append(list(output.num_scheduled_tokens.items())),
    )
    return scheduler, finished, batches


workloads = st.tuples(
    st.integers(0, 2**32),
    st.integers(1, 24),
    st.sampled_from([0, 0, 5, 12]),
    st.floats(0.05, 1.5),
    st.integers(1, 16),
    st.integers(8, 64),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads_finish_exactly_within_limits(w):
    seed, n, shared, memory, max_seqs, budget, static = w
    seqs = make_requests(random.Random(seed), n, shared)
    scheduler, finished, batches = run(
        seqs,
        tight_pool(seqs, memory),
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        static=static,
    )
    # none lost, none twice
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert all(
        s.num_output_tokens == s.params.max_tokens and s.finish_reason == "length" for s in seqs
    )
    assert all(s.status is SequenceStatus.FINISHED and not s.block_table for s in seqs)
    for batch in batches:
        assert 0 < sum(n for _, n in batch) <= budget
        assert len(batch) <= max_seqs and len({i for i, _ in batch}) == len(batch)
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.pool.blocks)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([0, 8]))
def test_outputs_under_memory_pressure_equal_an_unpressured_run(seed, shared):
    roomy, tight = (make_requests(random.Random(seed), 16, shared) for _ in range(2))
    run(roomy, blocks_needed(roomy), max_num_seqs=16, max_num_batched_tokens=64)
    run(tight, tight_pool(tight, 0.05), max_num_seqs=16, max_num_batched_tokens=64)
    assert [s.output_token_ids for s in tight] == [s.output_token_ids for s in roomy]


def test_a_tiny_pool_forces_preemption_and_everything_still_finishes():
    seqs = make_requests(random.Random(0), 20, 0)
    scheduler, finished, _ = run(
        seqs, tight_pool(seqs, 0.05), max_num_seqs=20, max_num_batched_tokens=64
    )
    assert scheduler.num_preemptions > 0 and len(finished) == 20


def test_static_batching_admits_only_when_the_batch_is_done():
    seqs = make_requests(random.Random(1), 12, 0)
    _, finished, batches = run(
        seqs, blocks_needed(seqs), max_num_seqs=4, max_num_batched_tokens=1000, static=True
    )
    first_batch = {i for i, _ in batches[0]}
    last_step_of_first = max(k for k, b in enumerate(batches) if first_batch & {i for i, _ in b})
    assert all(not ({i for i, _ in b} - first_batch) for b in batches[: last_step_of_first + 1])
    assert len(finished) == 12


def test_chunked_prefill_splits_a_long_prompt_and_keeps_decoding():
    decoder = Sequence([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    long = Sequence(list(range(100)), SamplingParams(max_tokens=1, ignore_eos=True))
    scheduler = Scheduler(BlockManager(64, block_size=BLOCK), max_num_batched_tokens=16)
    model = TokenPoolModel(scheduler)
    scheduler.add(decoder)
    scheduler.update(output := scheduler.schedule(), model.step(output))
    scheduler.add(long)
    chunks = []
    while not long.is_finished:
        output = scheduler.schedule()
        assert output.num_scheduled_tokens[decoder.seq_id] == 1
        chunks.append(output.num_scheduled_tokens[long.seq_id])
        scheduler.update(output, model.step(output))
    assert chunks == [15] * 6 + [10] and long.num_output_tokens == 1


def test_shared_prefix_is_served_from_the_cache():
    prompt = list(range(40))
    first, second = (
        Sequence(prompt, SamplingParams(max_tokens=2)),
        Sequence(prompt + [7], SamplingParams(max_tokens=2)),
    )
    scheduler = Scheduler(BlockManager(64, block_size=BLOCK))
    model = TokenPoolModel(scheduler)
    scheduler.add(first)
    run_to_completion(scheduler, model.step)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert second.num_cached_tokens == 40 and second.num_scheduled_tokens == 1
    scheduler.update(batch, model.step(batch))


def test_stop_tokens_and_eos_finish_a_request():
    scheduler = Scheduler(BlockManager(64, block_size=BLOCK), eos_token_ids=(9, 11))
    eos, stop, ignore = (
        Sequence([1, 2], SamplingParams(max_tokens=10, **kw))
        for kw in ({}, {"stop_token_ids": [5]}, {"ignore_eos": True})
    )
    for seq in (eos, stop, ignore):
        scheduler.add(seq)
    batch = scheduler.schedule()
    scheduler.update(batch, [9, 5, 9])
    assert (eos.finish_reason, stop.finish_reason, ignore.finish_reason) == ("stop", "stop", None)
    assert eos.output_token_ids == [9] and ignore.status is SequenceStatus.RUNNING


def test_max_model_len_must_fit_the_cache_and_ends_requests():
    with pytest.raises(ValueError, match="does not fit in the KV cache's 16 tokens"):
        Scheduler(BlockManager(4, block_size=BLOCK), max_model_len=20)
    # max_model_len: the whole cache, 16 tokens
    scheduler = Scheduler(BlockManager(4, block_size=BLOCK))
    unbounded, bounded = (
        Sequence([1, 2, 3], SamplingParams(max_tokens=m, ignore_eos=True)) for m in (None, 100)
    )
    model = TokenPoolModel(scheduler)
    for seq in (unbounded, bounded):
        scheduler.add(seq)
        run_to_completion(scheduler, model.step)
        assert seq.finish_reason == "length" and len(seq.token_ids) == 16


def test_abort_returns_blocks_at_once():
    scheduler = Scheduler(BlockManager(16, block_size=BLOCK))
    running, waiting = (
        Sequence(list(range(20)), SamplingParams(max_tokens=5)),
        Sequence([1], SamplingParams()),
    )
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    scheduler.abort(running)
    scheduler.abort(waiting)
    assert scheduler.block_manager.num_free_blocks == 16 and not scheduler.has_unfinished()
    assert running.finish_reason == waiting.finish_reason == "abort"


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"skip_special_tokens": 1}, "skip_special_tokens must be True or False"),
        ({"detokenize": "no"}, "detokenize must be True or False"),
        ({"detokenize": False, "stop": "x"}, "stop strings need detokenize=True"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2.0}, "truncate_prompt_tokens"),
        ({"stop_token_ids": "5"}, "stop_token_ids must be a list"),
        ({"stop": ""}, "stop must be a non-empty string"),
        ({"stop": ["\n", ""]}, "stop"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"logit_bias": [(1, 2.0)]}, "logit_bias must be a dict"),
        ({"logit_bias": {7: 1e39}}, "to finite float32 numbers, got \\[\\(7, 1e\\+39\\)\\]"),
        ({"logit_bias": {7: 10**400}}, "to finite float32 numbers"),
        ({"allowed_token_ids": list(range(-9, 0))}, r"got \[-9, -8, -7, -6, -5\] \.\.\.$"),
        ({"logit_bias": {-1: 2.0}}, "logit_bias must map non-negative integer token ids"),
        ({"logit_bias": {"7": 2.0}}, "logit_bias must map"),
        ({"logit_bias": {7: float("nan")}}, "to finite float32 numbers"),
        ({"logit_bias": {7: float("-inf")}}, "to finite float32 numbers"),
        ({"logit_bias": {7: True}}, "to finite float32 numbers"),
        ({"allowed_token_ids": []}, "allowed_token_ids must be None or a non-empty list"),
        ({"allowed_token_ids": 5}, "allowed_token_ids must be None or a non-empty list"),
        ({"allowed_token_ids": [3, -1]}, "allowed_token_ids must be non-negative integers"),
        ({"allowed_token_ids": [3, 2.0]}, "allowed_token_ids must be non-negative integers"),
    ],
)
def test_bad_sampling_params_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_logit_bias_and_allowed_token_ids_make_a_request_biased():
    assert not SamplingParams().biased and not SamplingParams(logit_bias={}).biased
    assert SamplingParams(logit_bias={3: -1.5}).biased
    params = SamplingParams(allowed_token_ids=(4, 2))
    assert params.biased and params.allowed_token_ids == [4, 2]
    # the params keep their own copy: a request in flight does not change with the caller's dict
    bias = {3: 1.0}
    params = SamplingParams(logit_bias=bias)
    bias[10**6] = 5.0
    assert params.logit_bias == {3: 1.0}


@pytest.mark.parametrize("n", [0, -2, 2.0, True, "3", None])
def test_n_is_a_positive_integer(n):
    with pytest.raises(ValueError, match=r"n \(the number of samples\) must be a positive integer"):
        SamplingParams(n=n)


def test_each_sample_gets_one_sample_and_its_own_seed():
    params = SamplingParams(n=3, temperature=0.7, seed=5, stop=".")
    assert [(p.n, p.seed, p.temperature, p.stop) for p in map(params.for_sample, range(3))] == [
        (1, 5, 0.7, ["."]),
        (1, 6, 0.7, ["."]),
        (1, 7, 0.7, ["."]),
    ]
    assert SamplingParams(n=2).for_sample(1).seed is None  # unseeded samples draw their own noise
    assert params.n == 3 and params.seed == 5  # the request's params are left as they were


def test_stop_is_a_list_of_strings():
    assert SamplingParams().stop == SamplingParams(stop=None).stop == []
    assert SamplingParams(stop="\n").stop == ["\n"]  # one string, as vLLM takes it
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []  # as vLLM takes it
    assert SamplingParams(stop_token_ids=(7, 9)).stop_token_ids == [7, 9]


def test_scheduler_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(4), max_num_seqs=0)


def test_sequence_reports_its_state():
    seq = Sequence([1, 2, 3], SamplingParams(temperature=0))
    assert seq.params.greedy and seq.num_tokens == 3 and "waiting" in repr(seq)


def run_one_step_behind(scheduler: Scheduler, model: TokenPoolModel) -> list[Sequence]:
    """The engine's async scheduling: each step is launched before the last one's tokens are recorded."""
    finished, in_flight = [], None
    while scheduler.has_unfinished():
        output, launched = scheduler.schedule(), None
        if output.num_scheduled_tokens:
            tokens = model.step(output)
            launched = (output, scheduler.advance(output), tokens)
        assert output.num_scheduled_tokens or in_flight, (
            "nothing to run although requests are unfinished"
        )
        if in_flight:
            finished += [seq for seq in scheduler.record(*in_flight) if seq.is_finished]
        in_flight = launched
    return finished


def twin_schedulers(seed, memory, max_seqs, budget, shared=0, stop_rate=0.5):
    """Two schedulers over the same pool size, each given its own copy of 12 seeded requests (with a
    shared prefix of `shared` tokens; some stop at token 7): for runs whose outputs must agree."""

    def requests():
        rng = random.Random(seed)
        prefix = [rng.randint(0, 50) for _ in range(shared)]
        return [
            Sequence(
                prefix + [rng.randint(0, 50) for _ in range(rng.randint(1, 30))],
                SamplingParams(
                    max_tokens=rng.randint(1, 25),
                    ignore_eos=True,
                    stop_token_ids=[7] if rng.random() < stop_rate else [],
                ),
            )
            for _ in range(12)
        ]

    twins = requests(), requests()
    pool = tight_pool(twins[0], memory)
    schedulers = [
        Scheduler(
            BlockManager(pool, block_size=BLOCK),
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget,
        )
        for _ in range(2)
    ]
    for scheduler, seqs in zip(schedulers, twins):
        for seq in seqs:
            scheduler.add(seq)
    return schedulers, twins


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.floats(0.05, 1.5), st.integers(1, 16), st.integers(8, 64))
def test_recording_one_step_behind_gives_the_same_outputs(seed, memory, max_seqs, budget):
    schedulers, (synced, behind) = twin_schedulers(seed, memory, max_seqs, budget)
    # a small vocabulary, so that the stop token 7 comes up; the model checks every step's description
    run_to_completion(schedulers[0], TokenPoolModel(schedulers[0], vocab_size=50).step)
    finished = run_one_step_behind(schedulers[1], TokenPoolModel(schedulers[1], vocab_size=50))
    # none lost, none twice
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in behind)
    assert [(s.output_token_ids, s.finish_reason) for s in behind] == [
        (s.output_token_ids, s.finish_reason) for s in synced
    ]
    assert all(s.num_pending_tokens == 0 for s in behind)
    bm = schedulers[1].block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.pool.blocks)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32),
    st.floats(0.05, 1.5),
    st.integers(1, 16),
    st.integers(8, 64),
    st.booleans(),
)
def test_speculative_tokens_keep_outputs_under_preemption_and_give_back_blocks(
    seed, memory, max_seqs, budget, shared
):
    # Chapter 10's verification with the model stand-in: guesses that are right, then maybe wrong; outputs
    # must equal a run without guesses, under preemption, chunked prefill, prefix hits and stop tokens.
    schedulers, (plain, spec) = twin_schedulers(
        seed, memory, max_seqs, budget, shared=8 if shared else 0, stop_rate=0.3
    )
    run_to_completion(schedulers[0], TokenPoolModel(schedulers[0], vocab_size=50).step)
    model, rng, verified = TokenPoolModel(schedulers[1], vocab_size=50), random.Random(seed), []

    def propose(seq):
        drafts = model.drafts(seq.token_ids, rng.randint(0, 6))
        if drafts and rng.random() < 0.5:  # one wrong guess
            drafts[rng.randrange(len(drafts))] += 1
        return drafts

    finished = run_to_completion(
        schedulers[1],
        model.step,
        propose=propose,
        on_step=lambda out: verified.extend(map(len, out.scheduled_spec_decode_tokens.values())),
    )
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in spec)
    assert [(s.output_token_ids, s.finish_reason) for s in spec] == [
        (s.output_token_ids, s.finish_reason) for s in plain
    ]
    assert sum(verified) > 0
    assert all(s.num_output_tokens <= s.params.max_tokens for s in spec)
    bm = schedulers[1].block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.pool.blocks)


def test_drafts_fit_the_budget_and_max_tokens_and_rejected_blocks_go_back():
    scheduler = Scheduler(BlockManager(16, block_size=BLOCK), max_num_batched_tokens=4)
    seq = Sequence([1, 2], SamplingParams(max_tokens=6, ignore_eos=True))
    scheduler.add(seq)
    model = TokenPoolModel(scheduler)
    scheduler.update(out := scheduler.schedule(), model.step(out))  # the prompt, and a first token
    seq.spec_token_ids = [9, 9, 9, 9, 9, 9]  # all wrong
    out = scheduler.schedule()
    # the budget of 4 leaves 3 guesses, at positions 3-5: a second block
    assert out.scheduled_spec_decode_tokens[seq.seq_id] == [9, 9, 9]
    assert out.num_scheduled_tokens[seq.seq_id] == 4 and len(seq.block_table) == 2
    scheduler.update(out, model.step(out))
    # none accepted: one new token, and the block only the guesses used went back
    assert (seq.num_output_tokens, seq.num_new_tokens, len(seq.block_table)) == (2, 1, 1)
    seq.spec_token_ids = model.drafts(
        seq.token_ids, 6
    )  # all right, but max_tokens leaves room for 3
    out = scheduler.schedule()
    assert out.num_kept_blocks == {seq.seq_id: 1}
    assert len(out.scheduled_spec_decode_tokens[seq.seq_id]) == 3
    scheduler.update(out, model.step(out))
    assert (seq.num_output_tokens, seq.finish_reason, seq.num_new_tokens) == (6, "length", 4)
    assert scheduler.block_manager.num_free_blocks == 16


def test_the_step_description_sends_only_what_changed():
    scheduler = Scheduler(BlockManager(16, block_size=BLOCK), max_num_seqs=1)
    first, second = (
        Sequence([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)) for _ in range(2)
    )
    scheduler.add(first)
    scheduler.add(second)
    model = TokenPoolModel(scheduler)
    output = scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    assert (new.req_id, new.prompt_token_ids, new.block_ids, new.num_computed_tokens) == (
        first.seq_id,
        [1, 2, 3],
        [0],
        0,
    )
    assert output.num_scheduled_tokens == {first.seq_id: 3} and not output.finished_req_ids
    scheduler.update(output, model.step(output))
    output = scheduler.schedule()  # the sampled token fills block 0; no new block yet
    cached = output.scheduled_cached_reqs
    assert not output.scheduled_new_reqs and cached.req_ids == [first.seq_id]
    assert cached.new_token_ids == [first.token_ids[3:]] and cached.new_block_ids == [[]]
    # plain data: it can travel to other processes
    assert pickle.loads(pickle.dumps(output)) == output
    scheduler.update(output, model.step(output))
    output = scheduler.schedule()  # token 5 needs a second block
    assert output.scheduled_cached_reqs.new_block_ids == [[1]]
    scheduler.update(output, model.step(output))
    assert first.is_finished
    output = scheduler.schedule()  # the runner hears once that the first request left
    assert output.finished_req_ids == {first.seq_id} and [
        r.req_id for r in output.scheduled_new_reqs
    ] == [second.seq_id]
    scheduler.update(output, model.step(output))
    assert not scheduler.schedule().finished_req_ids


@pytest.mark.parametrize(
    "module",
    [
        "mini_infer",
        "mini_infer.core.scheduler",
        "mini_infer.core.sequence",
        "mini_infer.core.scheduler_output",
        "mini_infer.memory.block_manager",
        "mini_infer.sampling_params",
        "mini_infer.outputs",
        "mini_infer.testing.simulate",
        "mini_infer.spec_decode.config",
        "mini_infer.spec_decode.ngram_proposer",
    ],
)
def test_the_scheduling_side_imports_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
