"""Online serving under load: concurrent streaming clients against `python -m mini_infer.serve` on loopback.

    python benchmarks/benchmark_serving.py --model smollm2-135m --num-clients 64 --num-requests 512
    python benchmarks/benchmark_serving.py --num-clients 4 --num-requests 16 --max-tokens 16   # a CPU-sized run

The server runs in its own process with random (dummy) weights of --model, as the other benchmarks do.
Each of --num-requests requests has a prompt of --input-len random token ids and asks for --max-tokens
tokens (temperature 0.6, ignore_eos); --num-clients clients each stream one request after another
(`mini_infer.serve.loadgen`). Reported: requests/s, output tokens/s, time to first token and inter-token
latency (median and p99). On a GPU (or with --offline) the same workload then runs through `LLM.generate`
in this process, for the offline throughput beside the online one. Appends one JSON line to
`benchmarks/results/serving.jsonl`.
"""

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import time

import common
import httpx
import torch

from mini_infer.serve.loadgen import run_load, summarize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "mini_infer.serve",
        "--model",
        str(common.model_dir(args.model)),
        "--served-model-name",
        args.model,
        "--load-format",
        "dummy",
        "--port",
        str(port),
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command + (["--enforce-eager"] if args.enforce_eager else []))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not come up")


def workload(args) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10000) for _ in range(args.input_len)] for _ in range(args.num_requests)]


def run(args) -> dict:
    prompts = workload(args)
    bodies = [
        {
            "model": args.model,
            "prompt": p,
            "max_tokens": args.max_tokens,
            "temperature": common.TEMPERATURE,
            "ignore_eos": True,
        }
        for p in prompts
    ]
    port = free_port()
    server = start_server(args, port)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_load(url, bodies[:1], 1))  # warm-up
        timings, seconds = asyncio.run(run_load(url, bodies, args.num_clients))
    finally:
        server.terminate()
        server.wait()
    row = {
        "engine": "mini_infer",
        "model": args.model,
        "num_requests": args.num_requests,
        "num_clients": args.num_clients,
        "input_len": args.input_len,
        "max_tokens": args.max_tokens,
        "output_tokens": sum(t.num_output_tokens for t in timings),
        "seconds": round(seconds, 3),
        **summarize(timings, seconds),
        "max_num_seqs": args.max_num_seqs,
        "cuda_graphs": not args.enforce_eager,
    }
    if args.offline:
        generate = common.mini_infer_generate(common.mini_infer_llm(args))
        row["offline_tokens_per_s"] = common.measure_throughput(
            generate, prompts, [args.max_tokens] * len(prompts)
        )["tokens_per_s"]
    return row


def parser(doc: str = __doc__):
    ap = common.parser(doc, ("serving",))
    common.add_engine_args(ap)
    ap.add_argument("--num-clients", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=256, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=torch.cuda.is_available(),
        help="also measure LLM.generate on the same workload (default: on a GPU)",
    )
    return ap


if __name__ == "__main__":
    args = parser().parse_args()
    row = common.append_row(run(args), args.serving_out)
    print(
        f"{row['device']}: {row['requests_per_s']} requests/s, {row['output_tokens_per_s']} output tokens/s, "
        f"TTFT {row['ttft_ms_median']} ms (p99 {row['ttft_ms_p99']}), ITL {row['itl_ms_median']} ms "
        f"(p99 {row['itl_ms_p99']})"
        + (
            f"; offline {row['offline_tokens_per_s']} tokens/s"
            if "offline_tokens_per_s" in row
            else ""
        )
    )
