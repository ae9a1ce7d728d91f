"""Offline throughput of the engine on the nano-vllm protocol, and batch-1 latency, on one GPU.

    python benchmarks/benchmark_throughput.py --model smollm2-135m            # continuous batching
    python benchmarks/benchmark_throughput.py --model smollm2-135m --static   # static batching, same engine
    python benchmarks/benchmark_throughput.py --model llama3-8b --bs1         # also batch-1 latency

Protocol (`../reference` numbers use the same): 256 requests from `benchmark_workload` (seed 0, prompts
of 100-1024 random token ids, outputs of 100-1024 tokens), temperature 0.6, ignore_eos, random (dummy)
weights from `benchmarks/models/<model>/config.json`, max_model_len 4096. Throughput = output tokens /
wall time of one `generate` over all requests, after a warm-up request. Batch-1 latency: one request of
128 prompt tokens and 512 greedy output tokens, milliseconds per output token.
Appends one JSON line per run to `benchmarks/results/throughput.jsonl`.
"""
import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch
import triton

from mini_infer.device import device_name
from mini_infer.engine.simulate import benchmark_workload
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams

HERE = Path(__file__).resolve().parent


def run(args) -> dict:
    llm = LLM(HERE / "models" / args.model, load_format="dummy", max_model_len=4096, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9,
              enforce_eager=args.enforce_eager, static_batching=args.static)
    prompts, lengths = benchmark_workload(args.num_seqs, args.max_input, args.max_output)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in lengths]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert output_tokens == sum(lengths), "a request did not get all its tokens"
    row = {"engine": "mini_infer", "model": args.model, "policy": "static" if args.static else "continuous",
           "num_seqs": args.num_seqs, "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens,
           "seconds": round(seconds, 3), "tokens_per_s": round(output_tokens / seconds, 1),
           "kv_blocks": llm.engine.runner.num_blocks, "preemptions": llm.engine.scheduler.num_preemptions,
           "max_num_seqs": args.max_num_seqs, "cuda_graphs": not args.enforce_eager}
    if args.bs1:
        prompt = [random.Random(1).randint(0, 10000) for _ in range(128)]
        greedy = SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)
        llm.generate([prompt], greedy, use_tqdm=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], greedy, use_tqdm=False)
        torch.cuda.synchronize()
        row["bs1_ms_per_token"] = round((time.perf_counter() - start) * 1000 / 512, 3)
    return row


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(p.name for p in (HERE / "models").iterdir()))
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--static", action="store_true", help="static batching instead of continuous")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--bs1", action="store_true", help="also measure batch-1 latency")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "throughput.jsonl")
    return ap.parse_args()


def main_row() -> dict:
    """Parse the command line, run, append the result row to --out, print and return it."""
    args = parse_args()
    row = run(args)
    row.update(device=device_name("cuda"), torch=torch.__version__, triton=triton.__version__,
               date=datetime.date.today().isoformat())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    if torch.cuda.is_available():
        main_row()
    else:
        print("benchmark_throughput.py measures a GPU; none is visible here.")
