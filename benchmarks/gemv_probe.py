"""Batch 1's GEMV (Chapter 7.3.2) against cuBLAS, on one GPU: the kernel alone at every weight shape of the
models named, and with --latency the engine's batch-1 latency without it, with it, and with its prologues
(7.3.3: the norms and SwiGLU's activation computed inside it).

    python benchmarks/gemv_probe.py [--models llama3-8b qwen3-0.6b ...] [--latency] [--out FILE]

Shapes: each model's qkv (hidden -> (heads + 2 x KV heads) x head_dim), o, gate_up, down and lm_head
(benchmarks/models/<model>/config.json), weight [N, K] in bf16, one row of x. For each, the median time
of `triton.testing.do_bench` (L2 flushed before every call) of F.linear (cuBLAS, both BLAS libraries
PyTorch offers) and of `gemv_triton` at each knob set of a sweep (FMA_KNOBS and gemv.GEMV_KNOBS), after
checking its result: the fastest (triton_us, triton_knobs), the choice `linear` makes there (the knobs of
GEMV_KNOBS it measures fastest, or "cublas") and each time's share of the copy bandwidth.

--latency: for each model, benchmark_latency.py's batch-1 row (`common.measure_latency`) in a fresh engine
with `use_gemv(False)` (cuBLAS only: gemv false), `use_gemv(True, prologues=False)` (`linear` choosing
per shape, the norms and the activation in their own kernels: gemv true, prologues false) and then the
engine's default (prologues true), with the choices made, beside the weights' floor; each row is appended to
--latency-out. One JSON with the rows and the latency rows to --out: by default, with --latency,
benchmarks/results/gemv_probe_<gpu>.json (which report.py and Chapters 7.3.2-7.3.3 read), else gemv_probe.json
here (a sweep alone does not replace the stored A/B).
"""

import argparse
import functools
import gc
import json
import sys
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from kernel_benchmark import slug
from triton.testing import do_bench

from mini_infer.config import ModelConfig
from mini_infer.kernels import gemv

# gemv_triton's knobs (block_n, block_k, num_warps, num_stages) swept: tiles of 1 to 16 rows and 256 to
# 1,024 columns, num_warps such that each thread holds 16 of the tile's weights (two 16-byte loads of
# bf16), num_stages 1 (plain loads) to 3 (pipelined through shared memory); and GEMV_KNOBS, which
# `linear` races (chosen from this sweep on an H200).
FMA_TILES = [(1, 1024), (2, 1024), (4, 512), (4, 1024), (8, 512), (16, 256)]
FMA_KNOBS = [(bn, bk, bn * bk // 512, stages) for bn, bk in FMA_TILES for stages in (1, 2, 3)]
KNOBS = list(dict.fromkeys([*FMA_KNOBS, *gemv.GEMV_KNOBS]))


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """The (N, K) of a model's weight matrices, by projection."""
    text = (common.model_dir(model) / "config.json").read_text()
    c = ModelConfig.from_hf(json.loads(text))
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "qkv": (q + 2 * kv, c.hidden_size),
        "o": (c.hidden_size, q),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", choices=common.MODELS, default=["llama3-8b"])
    ap.add_argument("--out", type=Path, help="the JSON of the whole run")
    ap.add_argument("--latency", action="store_true", help="then each model's batch-1 latency A/B")
    ap.add_argument(
        "--latency-out",
        type=Path,
        default=common.RESULTS / "gemv_latency.jsonl",
        help="JSONL file the latency rows are appended to",
    )
    args = ap.parse_args()
    if common.gpu_missing(__file__):
        return 0
    copy = common.copy_gbps()
    rows = [
        probe(model, name, n, k, copy)
        for model in args.models
        for name, (n, k) in shapes(model).items()
    ]
    result = {"device": torch.cuda.get_device_name(), "copy_gbps": copy, "rows": rows}
    if args.latency:
        result["latency"] = [
            common.append_row(latency(model, enabled, prologues), args.latency_out)
            for model in args.models
            for enabled, prologues in ((False, True), (True, False), (True, True))
        ]
    stored = common.RESULTS / f"gemv_probe_{slug(result['device'])}.json"
    out = args.out or (stored if args.latency else Path("gemv_probe.json"))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def probe(model: str, name: str, n: int, k: int, copy: float) -> dict:
    """One shape's row: cuBLAS's times, gemv_triton's best knobs, `linear`'s choice."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, w)
    row = {"model": model, "shape": name, "m": 1, "n": n, "k": k}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        row[lib] = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3
    torch.backends.cuda.preferred_blas_library("default")
    times = {}
    for knobs in KNOBS:
        torch.testing.assert_close(gemv.gemv_triton(x, w, None, *knobs), want, atol=5e-2, rtol=5e-2)
        run = functools.partial(gemv.gemv_triton, x, w, None, *knobs)
        times[knobs] = do_bench(run, return_mode="median") * 1e3
    best = min(times, key=times.get)
    # the measurement `linear` makes at first use, on these operands
    choice = gemv._fastest(x, w, None)
    row |= {"triton_path": "fma", "triton_us": times[best], "triton_knobs": best}
    row["linear_choice"] = choice or "cublas"
    for key in ("cublas", "cublaslt", "triton_us"):
        row[f"{key}_of_copy"] = round(2 * n * k / (row[key] * 1e-6) / 1e9 / copy, 3)
    print(json.dumps(row), flush=True)
    return row


def latency(model: str, enabled: bool, prologues: bool) -> dict:
    """The model's batch-1 latency row (benchmark_latency.py's, fresh engine) with `linear` racing the GEMV
    against cuBLAS (enabled, the default; with or without the prologues) or with cuBLAS only, and the
    choices made: "N x K" (with the prologue's name) -> knobs or "cublas"."""
    gemv.use_gemv(enabled, prologues)
    try:
        ap = common.parser("", ("latency",))
        common.add_engine_args(ap)
        llm = common.mini_infer_llm(ap.parse_args(["--model", model]))
        row = common.measure_latency(common.mini_infer_generate(llm))
        # beside the live engine, as benchmark_latency.py measures it (measured after the engine was
        # deleted, the copy read 11% slower on an H200, for a reason not found)
        floor = common.weight_floor(model)
        choices = gemv.gemv_choices()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    finally:
        gemv.use_gemv(True)
    row = {"engine": "mini_infer", "model": model, "gemv": enabled, "prologues": prologues, **row}
    return {**row, "gemv_choices": choices, **floor}


if __name__ == "__main__":
    sys.exit(main())
