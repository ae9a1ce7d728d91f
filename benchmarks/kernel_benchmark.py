"""Measure every kernel number of chapters 2 (RMSNorm), 3 (RoPE) and 4 (paged prefill attention) on one GPU.

    python benchmarks/kernel_benchmark.py           # full run, a few minutes on an H100
    python benchmarks/kernel_benchmark.py --quick   # smoke run: two shapes per op, no sweeps

For each op, shape and implementation (eager PyTorch, torch.compile, Triton, and vLLM's CUDA op when
`vllm` imports) it reports the median time of `triton.testing.do_bench` (which clears the L2 cache
before every call) and GB/s counted from the bytes the op must read and write:
  RMSNorm                 x read, out written, the weight read once
  residual add + RMSNorm  x and residual read, residual and out written, the weight read once
  RoPE                    q and k read and written, the positions and each token's cos/sin row read
The device-to-device copy bandwidth of a 2 GiB tensor (read + written) is the ceiling. Prefill attention is
arithmetic, so its rows also carry TFLOP/s (4 * head_dim * q heads FLOPs per visible query-key pair): chapter 4's
Triton kernel reading K/V through block tables ("triton") against PyTorch's SDPA, FlashAttention backend only, on
contiguous tensors (K/V repeated to every query head, "sdpa-flash", and with enable_gqa, "sdpa-flash-gqa"),
causal, bottom-right aligned under a cached prefix; each call is captured in a CUDA graph and its replay timed
(benchmarks/attention_sweep.py has the details, and the launch-parameter sweep). Writes
`benchmarks/results/kernels_<gpu>.json` and two plots beside it, then prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
import sys
from pathlib import Path

import common
import torch

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 1e-5
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20  # H100; inputs smaller than twice this are rotated among several copies

RMS_SHAPES = [(1, 4096), (256, 4096), (4096, 4096), (16384, 4096), (16384, 8192), (65536, 576)]
RMS_SWEEP = [
    (t, h)
    for h in (4096, 576)
    for t in (1, 16, 64, 256, 1024, 4096, 16384, 65536)
    if t * h <= 2**26
]
RESIDUAL_SHAPES = [(16384, 4096)]
LLAMA, SMOL = (32, 8, 128), (9, 3, 64)  # (q heads, kv heads, head_dim)
ROPE_SHAPES = [(1, *LLAMA), (64, *LLAMA), (16384, *LLAMA), (16384, *SMOL)]
ROPE_SWEEP = [(t, *LLAMA) for t in (1, 16, 64, 256, 1024, 4096, 16384)]
# (sequences, new tokens, cached tokens): one prompt of 512 to 4096 tokens, alone or after a cached prefix
PREFILL_CASES = [(1, n, 0) for n in (512, 1024, 2048, 4096)] + [
    (1, n, n) for n in (512, 1024, 2048)
]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def optional_impls() -> dict:
    """vLLM's custom ops, when vllm is importable (optional: the run goes on without them)."""
    try:
        from vllm import _custom_ops as ops
    except Exception as e:  # noqa: BLE001 (any import failure just means: no vLLM column)
        print(f"vllm not available ({type(e).__name__}): no vLLM column")
        return {}
    return {"vllm": ops}


def compiled(fn):
    # One compiled graph per shape, as a static-shape engine would use; compile time is not timed.
    return torch.compile(fn, dynamic=False)


class Bench:
    def __init__(self, quick: bool):
        from triton.testing import do_bench

        self.do_bench, self.quick, self.rows = do_bench, quick, []

    def time(self, op, shape, impl, fn_sets, nbytes, flops=None, graphed=False):
        """Median microseconds of fn over rotating input sets (or of one fn's CUDA-graph replay, graphed=True);
        records the row. Failures skip the impl."""
        try:
            if graphed:
                from attention_sweep import time_graph

                ms = time_graph(fn_sets[0], self.quick) / 1e3
            else:
                calls = itertools.cycle(fn_sets)
                ms = self.do_bench(
                    lambda: next(calls)(),
                    warmup=10 if self.quick else 25,
                    rep=40 if self.quick else 100,
                    return_mode="median",
                )
        except Exception as e:  # noqa: BLE001 (torch.compile or vLLM failing must not end the run)
            print(f"  {op} {shape} {impl}: skipped ({type(e).__name__}: {str(e)[:120]})")
            return
        row = {
            "op": op,
            "shape": list(shape),
            "dtype": str(DTYPE).removeprefix("torch."),
            "impl": impl,
            "us": round(ms * 1e3, 2),
            "gbps": round(nbytes / (ms * 1e-3) / 1e9, 1),
        }
        if flops is not None:
            row["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
        self.rows.append(row)


def n_sets(nbytes: int) -> int:
    return max(1, min(8, 2 * L2_BYTES // nbytes))


def bench_rms_norm(bench: Bench, shapes, residual: bool, vllm) -> None:
    from mini_infer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton

    op = "rmsnorm+residual" if residual else "rmsnorm"
    for tokens, hidden in shapes:
        es = torch.finfo(DTYPE).bits // 8
        nbytes = (4 if residual else 2) * tokens * hidden * es + hidden * es
        sets = [
            (
                torch.randn(tokens, hidden, device="cuda", dtype=DTYPE),
                torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) if residual else None,
            )
            for _ in range(n_sets(nbytes))
        ]
        weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
        # Correctness first, on fresh random inputs (the residual is updated in place: check on copies).
        x, res = sets[0]
        want = rms_norm_ref(x, weight, EPS, None if res is None else res.clone())
        got = rms_norm_triton(x, weight, EPS, None if res is None else res.clone())
        for w, g in zip(want if residual else [want], got if residual else [got]):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)

        impls = {
            "eager": rms_norm_ref,
            "torch.compile": compiled(rms_norm_ref),
            "triton": rms_norm_triton,
        }
        for impl, fn in impls.items():
            bench.time(
                op,
                (tokens, hidden),
                impl,
                [lambda x=x, r=r, fn=fn: fn(x, weight, EPS, r) for x, r in sets],
                nbytes,
            )
        if vllm is not None:
            if residual:  # in place: x becomes the output, residual the sum
                fns = [lambda x=x, r=r: vllm.fused_add_rms_norm(x, r, weight, EPS) for x, r in sets]
            else:
                out = torch.empty_like(sets[0][0])
                fns = [lambda x=x: vllm.rms_norm(out, x, weight, EPS) for x, _ in sets]
            bench.time(op, (tokens, hidden), "vllm", fns, nbytes)


def bench_rope(bench: Bench, shapes, vllm) -> None:
    from mini_infer.kernels.rope import apply_rope_ref, apply_rope_triton, rope_cos_sin_cache

    cache = rope_cos_sin_cache(128, 131072, 500_000.0, device="cuda")
    for tokens, n_q, n_kv, head_dim in shapes:
        es = torch.finfo(DTYPE).bits // 8
        nbytes = 2 * tokens * (n_q + n_kv) * head_dim * es + tokens * (8 + head_dim * 4)
        cos_sin = (
            cache[:, :head_dim]
            if head_dim == 128
            else rope_cos_sin_cache(head_dim, 131072, 500_000.0, device="cuda")
        )
        cos_sin = cos_sin.contiguous()
        sets = []
        for _ in range(
            n_sets(nbytes)
        ):  # q and k as views of one fused qkv output, like the model's
            qkv = torch.randn(tokens, (n_q + 2 * n_kv) * head_dim, device="cuda", dtype=DTYPE)
            q = qkv[:, : n_q * head_dim].view(tokens, n_q, head_dim)
            k = qkv[:, n_q * head_dim : (n_q + n_kv) * head_dim].view(tokens, n_kv, head_dim)
            sets.append((q, k, torch.randint(0, 131072, (tokens,), device="cuda")))
        q, k, pos = sets[0]
        want = apply_rope_ref(q, k, pos, cos_sin)
        got = apply_rope_triton(q.clone(), k.clone(), pos, cos_sin)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)

        shape = (tokens, n_q, n_kv, head_dim)
        impls = {
            "eager": apply_rope_ref,
            "torch.compile": compiled(apply_rope_ref),
            "triton": apply_rope_triton,
        }
        for impl, fn in impls.items():
            bench.time(
                "rope", shape, impl, [lambda s=s, fn=fn: fn(*s, cos_sin) for s in sets], nbytes
            )
        if vllm is not None:  # vLLM takes [T, heads * D] views and a cache in the model's dtype
            cache_lp = cos_sin.to(DTYPE)
            fns = [
                lambda q=q, k=k, p=p: vllm.rotary_embedding(
                    p, q.flatten(1), k.flatten(1), head_dim, cache_lp, True
                )
                for q, k, p in sets
            ]
            bench.time("rope", shape, "vllm", fns, nbytes)


def bench_prefill(bench: Bench, cases, models) -> None:
    """Paged Triton prefill against SDPA's FlashAttention on the same keys and values; shape rows are
    (sequences, new tokens, cached tokens, q heads, kv heads, head_dim)."""
    from attention_sweep import contiguous_qkv, paged_batch, sdpa_call, visible_pairs

    from mini_infer.kernels.attention import prefill_attention_ref, prefill_attention_triton

    for (num_seqs, new, cached), (hq, hkv, d) in itertools.product(cases, models):
        b = paged_batch(
            (hq, hkv, d),
            [new] * num_seqs,
            [new + cached] * num_seqs,
            DTYPE,
            torch.device("cuda"),
            seed=0,
        )
        es = torch.finfo(DTYPE).bits // 8
        # q, out; K and V once
        nbytes = es * num_seqs * d * (2 * new * hq + 2 * (new + cached) * hkv)
        flops = 4 * d * hq * visible_pairs(new, cached) * num_seqs

        def triton_fn(b=b):
            return prefill_attention_triton(
                b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.cu, b.scale
            )

        want = prefill_attention_ref(
            b.q, b.k_cache, b.v_cache, b.tables, b.lens, b.cu, b.scale
        ).float()
        err = float((triton_fn().float() - want).norm() / want.norm())
        assert err < 1e-2, (
            f"prefill {num_seqs}x{new}+{cached} ({hq}, {hkv}, {d}): relative error {err:.2e}"
        )
        shape = (num_seqs, new, cached, hq, hkv, d)
        bench.time("prefill_attention", shape, "triton", [triton_fn], nbytes, flops, graphed=True)
        q4, k4, v4 = contiguous_qkv(b)
        for gqa in (False, True):
            bench.time(
                "prefill_attention",
                shape,
                "sdpa-flash-gqa" if gqa else "sdpa-flash",
                [sdpa_call(q4, k4, v4, gqa, flash_only=True)],
                nbytes,
                flops,
                graphed=True,
            )


def figure(result: dict, op: str):
    """GB/s against tokens of each implementation of `op`, one panel per row size, below the copy ceiling."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["op"] == op]
    # hidden size, or (q heads, kv heads, head_dim)
    groups = sorted({tuple(r["shape"][1:]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted(
                (r["shape"][0], r["gbps"])
                for r in rows
                if r["impl"] == impl and tuple(r["shape"][1:]) == group
            )
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(result["copy_gbps"], color="gray", linestyle="--", label="2 GiB copy")
        ax.set(
            xscale="log",
            xlabel="tokens",
            ylabel="GB/s",
            title=f"{op}, {' x '.join(map(str, group))}",
        )
        ax.legend()
    fig.suptitle(f"{result['device']} ({result['dtype']})")
    fig.tight_layout()
    return fig


def plot(result: dict, path_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = []
    for op in ("rmsnorm", "rope"):
        fig = figure(result, op)
        path = path_prefix.with_name(f"{op}_{path_prefix.name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        saved.append(path)
    return saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: two shapes per op, no sweeps, short timings",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "kernel_benchmark: no CUDA GPU here, nothing to measure (the chapters show the stored results)."
        )
        return 0
    import triton

    torch._dynamo.config.recompile_limit = 64  # one recompile per shape: keep them all compiled
    bench = Bench(args.quick)
    vllm = optional_impls().get("vllm")
    start = datetime.datetime.now()
    rms = RMS_SHAPES[:2] if args.quick else sorted(set(RMS_SHAPES + RMS_SWEEP))
    bench_rms_norm(bench, rms, residual=False, vllm=vllm)
    bench_rms_norm(bench, RESIDUAL_SHAPES, residual=True, vllm=vllm)
    rope = (
        [ROPE_SHAPES[0], ROPE_SHAPES[-1]] if args.quick else sorted(set(ROPE_SHAPES + ROPE_SWEEP))
    )
    bench_rope(bench, rope, vllm)
    bench_prefill(
        bench,
        PREFILL_CASES[::3] if args.quick else PREFILL_CASES,
        [SMOL] if args.quick else [SMOL, LLAMA],
    )
    copy_gbps = common.copy_gbps()

    device = torch.cuda.get_device_name()
    result = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "vllm": None if vllm is None else sys.modules["vllm"].__version__,
        "date": start.isoformat(timespec="seconds"),
        "quick": args.quick,
        "dtype": str(DTYPE).removeprefix("torch."),
        "copy_gbps": round(copy_gbps, 1),
        "rows": bench.rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"kernels_{slug(device)}" + ("_quick" if args.quick else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in plot(result, RESULTS / name):
        print(f"saved {p.relative_to(RESULTS.parent.parent)}")

    print(
        f"\n{device}, torch {torch.__version__}, triton {triton.__version__}; {result['dtype']}; "
        f"2 GiB copy {copy_gbps:,.0f} GB/s; {(datetime.datetime.now() - start).seconds} s"
    )
    impls = list(dict.fromkeys(r["impl"] for r in bench.rows))
    print(
        f"{'op':<17}{'shape':<22}"
        + "".join(f"{i:>22}" for i in impls)
        + "   (us | GB/s; prefill: us | TFLOP/s)"
    )
    table = {}
    for r in bench.rows:
        rate = r["tflops"] if "tflops" in r else r["gbps"]
        table.setdefault((r["op"], tuple(r["shape"])), {})[r["impl"]] = (
            f"{r['us']:>9,.1f} | {rate:>7,.0f}"
        )
    for (op, shape), cells in table.items():
        print(
            f"{op:<17}{'x'.join(map(str, shape)):<22}"
            + "".join(f"{cells.get(i, '-'):>22}" for i in impls)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
