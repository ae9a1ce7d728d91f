"""Where a decode step's time goes: GPU time by kind of kernel, and the host's share of the step.

    python benchmarks/profile_step.py --model smollm2-135m

Admits the benchmark workload's first `--batch` requests (dummy weights), runs until every one of them
is decoding, then profiles `--steps` engine steps with torch.profiler: each kernel's GPU time is put
in a category by its name, and the step's wall time minus the GPU's busy time is the time the GPU sat
idle waiting for the host (`host_ms`: host work that async scheduling did not hide). `--cprofile` also
prints where the host's time goes, by Python function. Writes `benchmarks/results/profile_<model>.json`.
"""

import argparse
import collections
import cProfile
import datetime
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mini_infer.device import device_name
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams
from mini_infer.testing.simulate import benchmark_workload

HERE = Path(__file__).resolve().parent
CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("decode attention", ("_decode_split_kernel", "_decode_reduce_kernel")),
    ("prefill attention", ("_prefill_kernel",)),
    ("KV store", ("_store_kvcache",)),
    ("RMSNorm", ("_rms_norm",)),
    ("RoPE", ("_rope",)),
    ("SiLU-and-mul", ("_silu_and_mul",)),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas")),
]


def category(kernel: str) -> str:
    return next(
        (name for name, keys in CATEGORIES if any(k in kernel for k in keys)),
        "other (sampling, copies)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--cprofile", action="store_true", help="also print the host's time by Python function"
    )
    ap.add_argument("--sync-scheduling", action="store_true", help="no host/GPU overlap")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py profiles a GPU; none is visible here.")
        return
    llm = LLM(
        HERE / "models" / args.model,
        load_format="dummy",
        max_model_len=4096,
        max_num_seqs=args.batch,
        async_scheduling=not args.sync_scheduling,
    )
    engine = llm.engine
    prompts, _ = benchmark_workload(args.batch)
    for i, p in enumerate(prompts):
        engine.add_request(
            str(i), p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1536 - len(p))
        )
    while engine.scheduler.waiting or any(
        s.num_tokens - s.num_computed_tokens > 1 for s in engine.scheduler.running
    ):
        engine.step()
    engine.step()  # the first all-decode step
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    gpu_ms = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            gpu_ms[category(event.key)] += event.device_time_total / 1000 / args.steps
    busy = sum(gpu_ms.values())
    result = {
        "model": args.model,
        "batch": args.batch,
        "steps": args.steps,
        "step_ms": round(wall_ms, 3),
        "async_scheduling": engine.async_scheduling,
        "gpu_ms": {k: round(v, 3) for k, v in gpu_ms.most_common()},
        "host_ms": round(max(wall_ms - busy, 0.0), 3),
        "mean_context": round(sum(s.num_tokens for s in engine.scheduler.running) / args.batch),
        "device": device_name("cuda"),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    out = HERE / "results" / f"profile_{args.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if args.cprofile:
        host = cProfile.Profile()
        host.runcall(lambda: [engine.step() for _ in range(args.steps)])
        pstats.Stats(host).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
