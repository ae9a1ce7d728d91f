"""Where a decode step's time goes: GPU time by kind of kernel, and the host's share of the step.

    python benchmarks/profile_step.py --model smollm2-135m
    python benchmarks/profile_step.py --model llama3-8b --engine vllm          # vLLM's step, the same way
    python benchmarks/profile_step.py --model llama3-8b --tensor-parallel-size 2 --batch 1

Admits the benchmark workload's first `--batch` requests (dummy weights), runs until every one of them
is decoding, then profiles `--steps` engine steps with torch.profiler: each kernel's GPU time is put
in a category by its name (`gpu_ms`), and the step's wall time minus the GPU's busy time (the union of
its kernels' intervals) is the time the GPU sat idle waiting for the host (`host_ms`: host work that
async scheduling did not hide, and the gaps between kernels). Under programmatic dependent launch
(Chapter 7.3.4) a kernel starts before the one ahead of it ends and waits inside itself, so `gpu_ms`
counts that wait twice and no longer adds up to the step; `exposed_ms` counts each kernel only from
the latest end of the kernels before it (`exposed`), what it adds to the GPU's busy time, and adds up to
that busy time; `idle_between` gives the longest of the gaps (between and around the profiled steps'
kernels, by the kernels on either side). `--cprofile` also prints where the host's time goes, by Python
function.

`--engine vllm` steps vLLM 0.26's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so that the
profiler sees its kernels; vLLM from $VLLM_SITE as in compare_vllm.py) with compare_vllm.py's settings:
the same requests, so the two engines' steps can be compared kernel by kernel. Its host share is that of
vLLM's in-process engine, whose output processing runs in the thread that schedules (its default engine
core runs in a process of its own): compare GPU times, not host times. With `--tensor-parallel-size N` (Mini-Infer)
the profile is rank 0's: GPU 0's kernels, the all-reduce's included (a rank that waits for another in a
collective waits inside the collective's kernel).

Writes `benchmarks/results/profile_<model>.json`, with `_vllm`, `_tp<N>`, `_bs<batch>`, `_oneshot`, `_sync`,
`_eager`, `_seqs<N>` and `_tokens<N>` added to the name for anything but Mini-Infer's default engine on one
GPU at batch 256 (the profile the README and the chapters show). Mini-Infer's engine options are those of
the other benchmarks (`common.add_engine_args`); vLLM's engine is compare_vllm.py's.
"""

import argparse
import collections
import cProfile
import datetime
import json
import os
import pstats
import sys
import time
from pathlib import Path

import common  # its environment too: offline, NVLink multicast off
import torch
from torch.profiler import ProfilerActivity, profile

from mini_infer.device import device_name
from mini_infer.kernels import use_pdl
from mini_infer.testing.simulate import benchmark_workload

HERE = Path(__file__).resolve().parent
CATEGORIES = [  # (category, substrings of kernel names), first match wins; vLLM's kernels too
    ("all-reduce", ("AllReduce", "one_shot", "cross_device_reduce", "allreduce")),
    ("all-gather, broadcast", ("AllGather", "Broadcast")),
    ("KV store", ("_store_kvcache", "reshape_and_cache")),
    (
        "decode attention",
        ("_decode_split_kernel", "_decode_reduce_kernel", "flash", "Flash", "unified_attention"),
    ),
    ("prefill attention", ("_prefill_kernel",)),
    ("RMSNorm", ("_rms_norm", "rms_norm")),
    ("RoPE", ("_rope", "rotary")),
    ("SiLU-and-mul", ("_silu_and_mul", "act_and_mul")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas", "_gemv_kernel")),
    ("fused by torch.compile", ("triton_poi", "triton_red", "triton_per")),
]
DEFAULT_BATCH = 256
TOP_KERNELS = 15  # the longest kernels of a step, by name, in the result


def exposed(
    kernels: list[tuple[float, float, str]],
) -> tuple[collections.Counter, collections.Counter]:
    """What each kernel adds to the GPU's busy time, and where the GPU idles. kernels: (start, end, name),
    in any unit and order. A kernel counts from the later of its start and the latest end among the
    kernels that started before it, to its end (nothing for one that ends first): summed by name, the sum
    over all names is the length of the union of the intervals. A gap, from that latest end to a later
    start, counts for the pair (name of the kernel that ended last, name of the one that starts)."""
    busy, idle = collections.Counter(), collections.Counter()
    last, last_name = float("-inf"), None
    for start, end, name in sorted(kernels):
        busy[name] += max(0.0, end - max(start, last))
        if last_name is not None and start > last:
            idle[(last_name, name)] += start - last
        if end > last:
            last, last_name = end, name
    return busy, idle


def category(kernel: str) -> str:
    return next(
        (name for name, keys in CATEGORIES if any(k in kernel for k in keys)),
        "other (sampling, copies)",
    )


def mini_infer_engine(args):
    """Mini-Infer's engine as the other benchmarks build it (`common.mini_infer_llm`, with the engine options
    of the command line: the race's engine by default, whatever --batch admits), and a function that adds
    one request."""
    from mini_infer.sampling_params import SamplingParams

    llm = common.mini_infer_llm(args)
    engine = llm.engine

    def add(i: int, prompt: list[int]) -> None:
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1536 - len(prompt))
        engine.add_request(str(i), prompt, params)

    return llm, engine, add


def vllm_engine(args):
    """vLLM's engine in this process, built as compare_vllm.py builds its LLM, and a function that adds
    one request. Raises ImportError where vLLM does not import."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    import compare_vllm  # vLLM's folder on sys.path, and the race's settings

    llm = compare_vllm.vllm_llm(args.model)
    engine = llm.llm_engine
    from vllm import SamplingParams

    def add(i: int, prompt: list[int]) -> None:
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1536 - len(prompt))
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)

    return llm, engine, add


def all_decoding(engine, use_vllm: bool, started: set, outputs) -> bool:
    """Whether every admitted request is past its prompt (has produced a token)."""
    if not use_vllm:
        return not engine.scheduler.waiting and all(
            s.num_tokens - s.num_computed_tokens <= 1 for s in engine.scheduler.running
        )
    started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
    return len(started) >= engine.get_num_unfinished_requests()


def mean_context(engine, use_vllm: bool, prompts: list[list[int]], outputs) -> int:
    """The requests' mean number of tokens (prompt and output) after the profiled steps."""
    if not use_vllm:
        return round(sum(s.num_tokens for s in engine.scheduler.running) / len(prompts))
    lengths = [len(prompts[int(o.request_id)]) + len(o.outputs[0].token_ids) for o in outputs]
    return round(sum(lengths) / max(len(lengths), 1))


def output_path(args) -> Path:
    default = parser().get_default
    tags = [
        *(["vllm"] if args.engine == "vllm" else []),
        *([f"tp{args.tensor_parallel_size}"] if args.tensor_parallel_size > 1 else []),
        *([f"bs{args.batch}"] if args.batch != DEFAULT_BATCH else []),
        *(["oneshot"] if args.custom_all_reduce else []),
        *(["sync"] if args.sync_scheduling else []),
        *(["eager"] if args.enforce_eager else []),
        *([f"seqs{args.max_num_seqs}"] if args.max_num_seqs != default("max_num_seqs") else []),
        *(
            [f"tokens{args.max_num_batched_tokens}"]
            if args.max_num_batched_tokens != default("max_num_batched_tokens")
            else []
        ),
    ]
    return HERE / "results" / f"profile_{'_'.join([args.model, *tags])}.json"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        choices=common.MODELS,
        help="a config under benchmarks/models",
    )
    ap.add_argument("--engine", choices=("mini_infer", "vllm"), default="mini_infer")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="requests decoding together")
    ap.add_argument("--steps", type=int, default=20, help="engine steps profiled")
    ap.add_argument(
        "--cprofile", action="store_true", help="also print the host's time by Python function"
    )
    common.add_engine_args(ap)  # Mini-Infer's engine options (vLLM's engine is compare_vllm.py's)
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    use_vllm = args.engine == "vllm"
    if args.batch > args.max_num_seqs:
        ap.error(f"--batch {args.batch} needs --max-num-seqs of at least as many")
    if use_vllm and (args.tensor_parallel_size > 1 or args.sync_scheduling):
        ap.error(
            "--engine vllm profiles vLLM's default engine on one GPU (its tensor-parallel workers "
            "are other processes)"
        )
    if args.custom_all_reduce and args.tensor_parallel_size == 1:
        ap.error("--custom-all-reduce needs --tensor-parallel-size > 1")
    if not torch.cuda.is_available():
        print("profile_step.py profiles a GPU; none is visible here.")
        return
    try:
        llm, engine, add = (vllm_engine if use_vllm else mini_infer_engine)(args)
    except ImportError as e:
        if not use_vllm:
            raise
        print(f"profile_step.py: vLLM does not import here ({e}); see compare_vllm.py")
        return
    prompts, _ = benchmark_workload(args.batch)
    for i, p in enumerate(prompts):
        add(i, p)
    started: set = set()
    while not all_decoding(engine, use_vllm, started, engine.step()):
        pass
    engine.step()  # the first all-decode step
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            outputs = engine.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    intervals = [  # the GPU's kernels and copies, in microseconds since the trace began
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    # names cut to 80 characters (C++ templates run long), summed when they meet
    gpu_ms, top = collections.Counter(), collections.Counter()
    for start, end, kernel in intervals:
        ms = (end - start) / 1000 / args.steps
        gpu_ms[category(kernel)] += ms
        top[kernel[:80]] += ms
    busy_us, idle_us = exposed(intervals)
    exposed_ms = collections.Counter()
    for kernel, us in busy_us.items():
        exposed_ms[category(kernel)] += us / 1000 / args.steps
    # where the GPU idles inside the profiled steps and between them: the longest gaps by the kernels around
    # them (names cut to 60 characters)
    idle_ms = collections.Counter()
    for (before, after), us in idle_us.items():
        idle_ms[f"{before[:60]} -> {after[:60]}"] += us / 1000 / args.steps
    busy = sum(exposed_ms.values())
    result = {
        "model": args.model,
        "engine": args.engine,
        "batch": args.batch,
        "steps": args.steps,
        "step_ms": round(wall_ms, 3),
        "async_scheduling": engine.vllm_config.scheduler_config.async_scheduling
        if use_vllm
        else engine.async_scheduling,
        "tensor_parallel_size": args.tensor_parallel_size,
        "custom_all_reduce": None
        if use_vllm
        else getattr(engine.runner, "custom_all_reduce", False),
        "pdl": None if use_vllm else use_pdl(torch.device("cuda")),
        "gpu_ms": {k: round(v, 3) for k, v in gpu_ms.most_common()},
        "exposed_ms": {k: round(v, 3) for k, v in exposed_ms.most_common()},
        "top_kernels": {k: round(v, 3) for k, v in top.most_common(TOP_KERNELS)},
        "host_ms": round(max(wall_ms - busy, 0.0), 3),
        "idle_between": {k: round(v, 3) for k, v in idle_ms.most_common(TOP_KERNELS)},
        "mean_context": mean_context(engine, use_vllm, prompts, outputs),
        "device": device_name("cuda"),
        "machine": common.machine_id(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if use_vllm:
        result["vllm"] = sys.modules["vllm"].__version__  # imported by compare_vllm.vllm_llm
    out = output_path(args)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if args.cprofile:
        host = cProfile.Profile()
        host.runcall(lambda: [engine.step() for _ in range(args.steps)])
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
    if args.tensor_parallel_size > 1:
        engine.runner.close()


if __name__ == "__main__":
    main()
