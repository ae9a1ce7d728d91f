"""Check and tune chapter 4's paged attention kernels on one GPU, against PyTorch's FlashAttention.

    PYTHONPATH=. python benchmarks/attention_sweep.py               # GPU: checks, then timings (about 3 min)
    PYTHONPATH=. python benchmarks/attention_sweep.py --cpu-check   # no GPU needed: the checks alone, on tiny
                                                                    # shapes, under Triton's interpreter

1. Checks, before any timing. Every launch variant below, at the three model shapes (and the defaults at
   head_dim 80 and 96), against the PyTorch references on fresh random inputs: bf16 on the GPU (fp16 under the
   interpreter, whose bf16 tl.dot is broken). A check passes when ||out - ref|| / ||ref|| < 1e-2, nothing is
   NaN (the caching allocator is handed NaN-filled memory before each call, so unwritten outputs show) and, for
   store_kvcache, the pools are bit-identical. The SDPA baselines are checked against the same reference. A
   variant that fails is printed at once, left out of the timings and listed again at the end; the exit
   status is then 1.
2. Prefill: Triton paged prefill (every variant) against SDPA's FlashAttention backend on contiguous
   [B, H, S, D] tensors (no paging), 512 to 4096 new tokens, one sequence and a batch of 8192 tokens, without
   and with a cached prefix. SDPA without a prefix runs with is_causal=True; with a prefix it gets
   causal_lower_right(new, context), which PyTorch runs as the flash kernel with is_causal, whose causal mask
   is aligned bottom-right when there are more keys than queries (the check above confirms it). Two SDPA
   forms, K/V repeated to every query head and enable_gqa=True; the faster one is the baseline.
   TFLOP/s count 4 * head_dim * Hq FLOPs per visible (query, key) pair.
3. Decode: every decode variant at batch 1, 64, 256 and context 600 and 4096; GB/s of K/V read against a
   2 GiB device-to-device copy measured in the same run (bytes read plus bytes written).

Every call is captured in a CUDA graph and its replay timed with triton.testing.do_bench (median; it clears
the L2 cache before each replay), so launch overhead stays out. The timings stop at --budget-s (what was
skipped is counted). Results: JSON in $OUT when set, else benchmarks/results/attention_sweep_<gpu>.json;
a compact table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common
import torch
import torch.nn.functional as F
import triton

import mini_infer.kernels  # noqa: F401  (switches on Triton's interpreter when there is no GPU)
from mini_infer.kernels.attention import (
    PREFILL_LAUNCH,
    decode_num_splits,
    gather_kv_ref,
    num_sms,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    prefill_attention_ref,
    prefill_attention_triton,
    prefill_launch_params,
    store_kvcache_ref,
    store_kvcache_triton,
)

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16
MODELS = {
    "smollm2-135m": (9, 3, 64),
    "qwen3-0.6b": (16, 8, 128),
    "llama3-8b": (32, 8, 128),
}  # (Hq, Hkv, D)
ODD_HEADS = {
    "head_dim 80, GQA 5": (10, 2, 80),
    "head_dim 96, GQA 3": (12, 4, 96),
}  # checked, not timed
MAX_REL_ERR = 1e-2  # bf16 operands land between 1e-3 and 1e-2
# (sequences, new tokens, cached tokens): one sequence, or a batch of 8192 new tokens; with and without a cached
# prefix. In the order they are timed: if the budget runs out, the cases at the end are the ones skipped.
PREFILL_CASES = [
    (1, 4096, 0),
    (1, 1024, 0),
    (8, 1024, 0),
    (1, 1024, 1024),
    (4, 1024, 1024),
    (1, 512, 0),
    (16, 512, 0),
    (1, 2048, 0),
    (4, 2048, 0),
    (2, 4096, 0),
    (1, 1024, 3072),
]
# (batch, context)
DECODE_CASES = [
    (64, 4096),
    (256, 600),
    (1, 4096),
    (256, 4096),
    (64, 600),
    (1, 600),
]


def prefill_variants(head_dim: int) -> dict[str, dict]:
    """Launch variants of prefill_attention_triton: the defaults; each design choice undone alone; "before", the
    earlier kernel's choices (64 x 64 tiles, 4 warps, a program per query head, every tile masked; on today's
    code, which keeps the whole-page loads, the folded scale and the reversed tile order); other tiles."""
    variants = {
        "default": {},
        "per-head": dict(pack_gqa=False),
        "mask-all": dict(mask_all_tiles=True),
        "before": dict(
            block_m=64, block_n=64, num_warps=4, num_stages=3, pack_gqa=False, mask_all_tiles=True
        ),
    }
    default = prefill_launch_params(head_dim)
    tiles = [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 3)]
    for m, n, w, s in tiles:
        if (m, n, w, s) != default and not (
            head_dim > 64 and (m, w) == (128, 4)
        ):  # 128 rows on 4 warps spill at D=128
            variants[f"{m}x{n}w{w}s{s}"] = dict(block_m=m, block_n=n, num_warps=w, num_stages=s)
    return variants


def decode_variants(splits: int) -> dict[str, dict]:
    """Launch variants of paged_decode_attention_triton around its defaults; splits is the heuristic's count."""
    return {
        "default": {},
        "bn16": dict(block_n=16),
        "bn64": dict(block_n=64),
        "w2": dict(num_warps=2),
        "w4": dict(num_warps=4),
        "w8": dict(num_warps=8),
        "s2": dict(num_stages=2),
        "splits*2": dict(num_splits=2 * splits),
        "splits/2": dict(num_splits=max(1, splits // 2)),
    }


def auto_splits(batch: int, hkv: int, table_width: int, device) -> int:
    return decode_num_splits(batch, hkv, table_width * BLOCK_SIZE, num_sms(device))


# ---------------------------------------------------------------------------------------------- inputs


def paged_batch(shape, new_lens, contexts, dtype, device, seed):
    """Random pools (never zeros) twice as large as needed, block tables drawn from them in shuffled order, packed
    queries for new_lens. The tables are views of wider ones whose row stride is a multiple of 16, so every batch
    runs the same compiled kernels (Triton specializes integer arguments on divisibility by 16)."""
    hq, hkv, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    need = [-(-c // BLOCK_SIZE) for c in contexts]
    num_blocks = 2 * sum(need) + 1
    k_cache, v_cache = (
        torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=g, device=device, dtype=dtype)
        for _ in range(2)
    )
    width = -(-max(need) // 16) * 16
    tables = torch.randint(
        0, num_blocks, (len(contexts), width), generator=g, device=device, dtype=torch.int32
    )
    order, used = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32), 0
    for i, n in enumerate(need):
        tables[i, :n] = order[used : used + n]
        used += n
    return SimpleNamespace(
        shape=shape,
        k_cache=k_cache,
        v_cache=v_cache,
        tables=tables[:, : max(need)],
        lens=torch.tensor(contexts, dtype=torch.int32, device=device),
        cu=torch.tensor([0, *itertools.accumulate(new_lens)], dtype=torch.int32, device=device),
        max_q=max(new_lens),
        scale=d**-0.5,
        q=torch.randn(sum(new_lens), hq, d, generator=g, device=device, dtype=dtype),
    )


def contiguous_qkv(b):
    """The same queries, keys and values as [B, H, S, D] tensors for SDPA (equal lengths only)."""
    num_seqs, context, new = len(b.lens), int(b.lens[0]), b.max_q
    q4 = b.q.view(num_seqs, new, *b.q.shape[1:]).transpose(1, 2).contiguous()
    k4, v4 = (
        torch.stack([gather_kv_ref(pool, b.tables[i], context) for i in range(num_seqs)])
        .transpose(1, 2)
        .contiguous()
        for pool in (b.k_cache, b.v_cache)
    )
    return q4, k4, v4


def sdpa_call(q4, k4, v4, gqa: bool, flash_only: bool):
    """SDPA on contiguous tensors, causal (bottom-right aligned when there are cached keys); gqa=False repeats K/V
    to every query head first. flash_only forbids every backend but FlashAttention, so nothing falls back quietly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    new, context = q4.shape[2], k4.shape[2]
    if not gqa:
        group = q4.shape[1] // k4.shape[1]
        k4, v4 = k4.repeat_interleave(group, dim=1), v4.repeat_interleave(group, dim=1)
    mask = (
        dict(is_causal=True) if new == context else dict(attn_mask=causal_lower_right(new, context))
    )

    def call():
        if not flash_only:
            return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=gqa, **mask)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=gqa, **mask)

    return call


def visible_pairs(new: int, cached: int) -> int:
    return new * cached + new * (new + 1) // 2


# ---------------------------------------------------------------------------------------------- checks


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm()) if not out.isnan().any() else math.nan


class Checks:
    """Results by (what, variant); `failed` holds the pairs to leave out of the timings, `unsupported` the SDPA
    forms that PyTorch refused here (not a failure of ours)."""

    def __init__(self):
        self.rows, self.failed, self.unsupported = [], set(), set()

    def record(self, what: str, variant: str, err: float, ok: bool | None = None):
        ok = (err < MAX_REL_ERR) if ok is None else ok  # NaN fails: nan < x is False
        self.rows.append(
            {
                "what": what,
                "variant": variant,
                "rel_err": None if math.isnan(err) else err,
                "ok": ok,
            }
        )
        if not ok:
            self.failed.add((what, variant))
            print(f"  CHECK FAILED: {what}, {variant}: rel err {err:.2e}", flush=True)

    def run(self, what, variant, fn, ref, may_refuse=False):
        """fn() against ref. Before the call the caching allocator gets back a NaN-filled block of the output's
        size, and each output is NaN-filled after its check, so a later variant that reuses the memory and
        leaves elements unwritten shows NaN, not an earlier variant's right answer."""
        torch.full_like(ref, math.nan)
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (a compile error fails this variant, not the run)
            print(f"  {what}, {variant}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if may_refuse:
                self.unsupported.add((what, variant))
                self.rows.append(
                    {
                        "what": what,
                        "variant": variant,
                        "rel_err": None,
                        "ok": None,
                        "error": f"{type(e).__name__}: {str(e)[:300]}",
                    }
                )
                return
            out = None
        self.record(what, variant, math.nan if out is None else rel_err(out, ref))
        if out is not None:
            out.fill_(math.nan)


def check_all(device, dtype, tiny: bool, shapes: dict) -> Checks:
    """Every variant against the references at the shapes of MODELS among `shapes`, the defaults at the others;
    also store_kvcache, and the SDPA baselines at the MODELS shapes."""
    checks = Checks()
    if tiny:  # the interpreter runs each program in Python: a few short sequences
        new_lens, contexts, decode_contexts, sdpa_case = (
            [1, 37, 20, 1],
            [1, 37, 70, 40],
            [1, 15, 17, 90],
            (2, 24, 16),
        )
    else:  # non-powers of two, block boundaries, a cached prefix under a long prompt, single tokens after one
        new_lens, contexts = [1, 77, 300, 129, 1000, 1], [1, 77, 300, 684, 1037, 600]
        decode_contexts, sdpa_case = [1, 15, 16, 17, 600, 1000, 2049], (2, 300, 200)
    for seed, (name, shape) in enumerate(shapes.items()):
        timed = name in MODELS  # every variant at the timed shapes; the defaults elsewhere
        b = paged_batch(shape, new_lens, contexts, dtype, device, seed)
        ref = prefill_attention_ref(b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.cu, b.scale)
        variants = (
            prefill_variants(shape[2])
            if timed
            else {"default": {}, "per-head": dict(pack_gqa=False)}
        )
        for variant, knobs in variants.items():
            checks.run(
                f"{name}, prefill",
                variant,
                lambda: prefill_attention_triton(  # noqa: B023 (called at once)
                    b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.cu, b.scale, **knobs
                ),
                ref,
            )

        d = paged_batch(
            shape, [1] * len(decode_contexts), decode_contexts, dtype, device, seed + 100
        )
        ref = paged_decode_attention_ref(d.q, d.k_cache, d.v_cache, d.tables, d.lens, d.scale)
        splits = auto_splits(len(decode_contexts), shape[1], d.tables.shape[1], device)
        for variant, knobs in (decode_variants(splits) if timed else {"default": {}}).items():
            checks.run(
                f"{name}, decode",
                variant,
                lambda: paged_decode_attention_triton(  # noqa: B023
                    d.q, d.k_cache, d.v_cache, d.tables, d.lens, d.scale, **knobs
                ),
                ref,
            )

        # store: 40 tokens (two of them padding) into random slots of fresh pools, against the reference
        slots = torch.randperm(d.k_cache.shape[0] * BLOCK_SIZE, device=device)[:40].to(torch.int32)
        slots[[5, 39]] = -1
        k, v = (torch.randn(40, *d.k_cache.shape[2:], device=device, dtype=dtype) for _ in range(2))
        want, got = (d.k_cache.clone(), d.v_cache.clone()), (d.k_cache.clone(), d.v_cache.clone())
        store_kvcache_ref(k, v, *want, slots)
        store_kvcache_triton(k, v, *got, slots)
        same = all(torch.equal(w, g) for w, g in zip(want, got))
        checks.record(f"{name}, store", "default", 0.0 if same else math.nan, ok=same)

    # The baselines compute the same function: SDPA (flash only on a GPU) against the paged reference, without
    # and with a cached prefix, with K/V repeated and with enable_gqa
    num_seqs, new, cached = sdpa_case
    for seed, (name, shape) in enumerate((n, s) for n, s in shapes.items() if n in MODELS):
        for prefix in (0, cached):
            # CPU SDPA: the math backend, in fp32
            sdpa_dtype = dtype if device.type == "cuda" else torch.float32
            b = paged_batch(
                shape, [new] * num_seqs, [new + prefix] * num_seqs, sdpa_dtype, device, seed + 200
            )
            q4, k4, v4 = contiguous_qkv(b)
            ref = prefill_attention_ref(b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.cu, b.scale)
            ref4 = ref.view(num_seqs, new, *ref.shape[1:]).transpose(1, 2)
            for gqa in (False, True):
                checks.run(
                    f"{name}, {sdpa_name(gqa)}",
                    "prefix" if prefix else "causal",
                    sdpa_call(q4, k4, v4, gqa, flash_only=device.type == "cuda"),
                    ref4,
                    may_refuse=True,
                )
    return checks


def sdpa_name(gqa: bool) -> str:
    return "sdpa-flash-gqa" if gqa else "sdpa-flash"


def sdpa_kernels(device, dtype) -> dict:
    """The GPU kernels each SDPA form launches, without and with a cached prefix, read off PyTorch's profiler:
    evidence that the baseline is FlashAttention."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for gqa, prefix in itertools.product((False, True), (0, 256)):
        b = paged_batch(MODELS["llama3-8b"], [512], [512 + prefix], dtype, device, seed=300)
        call = sdpa_call(*contiguous_qkv(b), gqa, flash_only=True)
        key = f"{sdpa_name(gqa)}, {'prefix' if prefix else 'causal'}"
        try:
            call()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            found[key] = sorted(
                {
                    e.key[:80]
                    for e in prof.key_averages()
                    if getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                    > 0
                }
            )
        except Exception as e:  # noqa: BLE001 (refused forms are recorded by the checks)
            found[key] = f"{type(e).__name__}: {str(e)[:120]}"
    return found


# ---------------------------------------------------------------------------------------------- timings


def time_graph(fn, quick: bool) -> float:
    """Median microseconds of fn, captured in a CUDA graph and replayed (after a call that compiles)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return (
            do_bench(
                graph.replay,
                warmup=5 if quick else 10,
                rep=15 if quick else 40,
                return_mode="median",
            )
            * 1e3
        )
    finally:
        graph.reset()  # give the graph's memory back before the next one


class Timer:
    """Times one call at a time until the deadline; leaves out what the checks failed or PyTorch refused."""

    def __init__(self, deadline: float, checks: Checks, quick: bool):
        self.deadline, self.excluded, self.quick, self.skipped = (
            deadline,
            checks.failed | checks.unsupported,
            quick,
            0,
        )

    def __call__(self, fn, what, variant) -> float | None:
        label = f"{what}, {variant}"
        if (what, variant) in self.excluded:
            return None
        if time.time() > self.deadline:
            self.skipped += 1
            return None
        try:
            return time_graph(fn, self.quick)
        except Exception as e:  # noqa: BLE001 (one variant failing must not end the run)
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return None


def time_prefill(timer: Timer, rows: list, device, dtype):
    for seed, ((num_seqs, new, cached), (model, shape)) in enumerate(
        itertools.product(PREFILL_CASES, MODELS.items())
    ):
        hq, hkv, d = shape
        b = paged_batch(
            shape, [new] * num_seqs, [new + cached] * num_seqs, dtype, device, 1000 + seed
        )
        flops = 4 * d * hq * visible_pairs(new, cached) * num_seqs
        base = dict(model=model, shape=list(shape), num_seqs=num_seqs, new=new, cached=cached)
        q4, k4, v4 = contiguous_qkv(b)
        for gqa in (False, True):
            us = timer(
                sdpa_call(q4, k4, v4, gqa, flash_only=True),
                f"{model}, {sdpa_name(gqa)}",
                "prefix" if cached else "causal",
            )
            rows.append(
                {
                    **base,
                    "impl": sdpa_name(gqa),
                    "variant": "",
                    "knobs": {},
                    "us": us,
                    "tflops": None if us is None else round(flops / us / 1e6, 1),
                }
            )
        del q4, k4, v4
        for variant, knobs in prefill_variants(d).items():
            us = timer(
                lambda: prefill_attention_triton(
                    b.q,
                    b.k_cache,
                    b.v_cache,
                    b.tables,
                    b.lens,
                    b.cu,  # noqa: B023
                    b.scale,
                    **knobs,
                ),
                f"{model}, prefill",
                variant,
            )
            rows.append(
                {
                    **base,
                    "impl": "triton-paged",
                    "variant": variant,
                    "knobs": knobs,
                    "us": us,
                    "tflops": None if us is None else round(flops / us / 1e6, 1),
                }
            )
        print(f"  prefill {model} {num_seqs}x{new}+{cached}: done", flush=True)


def time_decode(timer: Timer, rows: list, device, dtype, copy: float):
    for seed, ((batch, context), (model, shape)) in enumerate(
        itertools.product(DECODE_CASES, MODELS.items())
    ):
        hq, hkv, d = shape
        b = paged_batch(shape, [1] * batch, [context] * batch, dtype, device, 2000 + seed)
        kv_bytes = 2 * batch * context * hkv * d * b.k_cache.element_size()
        splits = auto_splits(batch, hkv, b.tables.shape[1], device)
        for variant, knobs in decode_variants(splits).items():
            us = timer(
                lambda b=b, knobs=knobs: paged_decode_attention_triton(
                    b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.scale, **knobs
                ),
                f"{model}, decode",
                variant,
            )
            gbps = None if us is None else kv_bytes / us / 1e3
            rows.append(
                dict(
                    model=model,
                    shape=list(shape),
                    batch=batch,
                    context=context,
                    variant=variant,
                    knobs=knobs,
                    auto_splits=splits,
                    us=us,
                    gbps=None if gbps is None else round(gbps, 1),
                    of_copy=None if gbps is None else round(gbps / copy, 3),
                )
            )
        del b  # free the pools before the next shape
        print(f"  decode {model} batch {batch} context {context}: done", flush=True)


# ---------------------------------------------------------------------------------------------- report


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def prefill_summary(rows) -> tuple[list[str], dict]:
    """Table lines (speed of each Triton variant relative to the best SDPA form; above 1 is faster) and, per
    head_dim, the variant with the best geometric-mean ratio over all cases."""
    cases, lines, by_dim = {}, [], {}
    for r in rows:
        cases.setdefault((r["model"], r["num_seqs"], r["new"], r["cached"]), []).append(r)
    lines.append(
        f"{'prefill':<13}{'seqs x new+cached':>19}{'sdpa us':>9}{'TFLOP/s':>8}{'default':>9}{'before':>8}"
        f"{'best variant':>16}{'best':>7}   (Triton speed / SDPA's)"
    )
    for (model, n, new, cached), rs in cases.items():
        sdpa = min((r["us"] for r in rs if r["impl"].startswith("sdpa") and r["us"]), default=None)
        tri = {r["variant"]: r for r in rs if r["impl"] == "triton-paged" and r["us"]}
        if not sdpa or not tri:
            continue
        ratio = {v: sdpa / r["us"] for v, r in tri.items()}
        for v, x in ratio.items():
            by_dim.setdefault(rs[0]["shape"][2], {}).setdefault(v, []).append(x)
        best = max(ratio, key=ratio.get)
        sdpa_tflops = next(
            r["tflops"] for r in rs if r["impl"].startswith("sdpa") and r["us"] == sdpa
        )
        fmt = lambda v: f"{ratio[v]:.2f}" if v in ratio else "-"  # noqa: E731
        lines.append(
            f"{model:<13}{f'{n}x{new}+{cached}':>19}{sdpa:>9.1f}{sdpa_tflops:>8.0f}{fmt('default'):>9}"
            f"{fmt('before'):>8}{best:>16}{ratio[best]:>7.2f}"
        )
    best_by_dim = {}
    for d, ratios in by_dim.items():
        means = {v: geomean(xs) for v, xs in ratios.items()}
        best = max(means, key=means.get)
        best_by_dim[d] = {
            "best": best,
            "geomean": round(means[best], 3),
            "default": round(means.get("default") or 0, 3),
            "all": {v: round(m, 3) for v, m in sorted(means.items(), key=lambda kv: -kv[1])},
        }
        lines.append(
            f"head_dim {d}: geomean Triton/SDPA speed, default {means.get('default') or 0:.2f}, "
            f"best {best} {means[best]:.2f}"
        )
    return lines, best_by_dim


def decode_summary(rows) -> list[str]:
    cases = {}
    for r in rows:
        cases.setdefault((r["model"], r["batch"], r["context"]), []).append(r)
    lines = [
        f"{'decode':<13}{'batch x context':>17}{'default us':>11}{'GB/s':>7}{'of copy':>8}{'best':>10}{'GB/s':>7}"
    ]
    for (model, batch, context), rs in cases.items():
        ok = [r for r in rs if r["us"]]
        if not ok:
            continue
        default = next((r for r in ok if r["variant"] == "default"), None)
        best = max(ok, key=lambda r: r["gbps"])
        head = (
            f"{default['us']:>11.1f}{default['gbps']:>7.0f}{default['of_copy']:>8.0%}"
            if default
            else f"{'-':>11}{'-':>7}{'-':>8}"
        )
        lines.append(
            f"{model:<13}{f'{batch}x{context}':>17}{head}{best['variant']:>10}{best['gbps']:>7.0f}"
        )
    return lines


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sweep(device, dtype, budget_s: float, quick: bool, out_dir: Path) -> int:
    """Checks, then timings until budget_s after the start; writes the JSON after each phase. Returns 1 when a
    check failed."""
    start = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."),
        "block_size": BLOCK_SIZE,
        "prefill_launch": {str(k): v for k, v in PREFILL_LAUNCH.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"attention_sweep_{slug(name)}.json"

    def save():
        path.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}: checks", flush=True)
    checks = check_all(device, dtype, tiny=device.type != "cuda", shapes={**MODELS, **ODD_HEADS})
    result["checks"] = checks.rows
    result["check_failures"] = sorted(map(list, checks.failed))
    result["sdpa_refused"] = sorted(map(list, checks.unsupported))
    result["sdpa_kernels"] = sdpa_kernels(device, dtype)
    print(
        f"  {len(checks.rows)} checks, {len(checks.failed)} failed, {time.time() - start:.0f} s; SDPA ran "
        f"{result['sdpa_kernels']}",
        flush=True,
    )
    save()

    result["copy_gbps"] = round(common.copy_gbps(), 1)
    deadline = start + budget_s
    prefill, decode = [], []
    result["prefill"], result["decode"] = prefill, decode
    # prefill: 2/3 of what is left
    timer = Timer(time.time() + (deadline - time.time()) * 2 / 3, checks, quick)
    time_prefill(timer, prefill, device, dtype)
    save()
    skipped = timer.skipped
    timer = Timer(deadline, checks, quick)
    time_decode(timer, decode, device, dtype, result["copy_gbps"])
    result["skipped"] = skipped + timer.skipped
    lines, result["prefill_best_by_head_dim"] = prefill_summary(prefill)
    save()

    print(
        f"\n{name}, torch {torch.__version__}, triton {triton.__version__}, {result['dtype']}, blocks of {BLOCK_SIZE};"
        f" copy {result['copy_gbps']:,.0f} GB/s; {time.time() - start:.0f} s; {result['skipped']} timings skipped "
        f"(budget); PREFILL_LAUNCH {PREFILL_LAUNCH}"
    )
    print("\n".join(lines + [""] + decode_summary(decode)))
    print(f"wrote {path}")
    if checks.failed:
        print(
            "CHECK FAILURES (left out of the timings): "
            + "; ".join(f"{w} {v}" for w, v in sorted(checks.failed))
        )
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-check",
        action="store_true",
        help="only the checks, on tiny shapes, under the interpreter",
    )
    parser.add_argument(
        "--budget-s", type=float, default=170, help="stop timing this many seconds after the start"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter do_bench windows (a smoke run)"
    )
    args = parser.parse_args(argv)
    if args.cpu_check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "attention_sweep.py --cpu-check runs under Triton's interpreter: set TRITON_INTERPRET=1 (import "
                "mini_infer sets it where there is no GPU)"
            )
            return 2
        start = time.time()
        checks = check_all(
            torch.device("cpu"), torch.float16, tiny=True, shapes={**MODELS, **ODD_HEADS}
        )
        print(
            f"{len(checks.rows)} checks, {len(checks.failed)} failed, {time.time() - start:.0f} s"
        )
        return 1 if checks.failed else 0
    if not torch.cuda.is_available():
        print(
            "attention_sweep.py measures a GPU; none is visible here (--cpu-check runs its checks on the CPU)."
        )
        return 0
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    return sweep(torch.device("cuda"), torch.bfloat16, args.budget_s, args.quick, out_dir)


if __name__ == "__main__":
    sys.exit(main())
