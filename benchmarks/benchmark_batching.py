"""Static against continuous batching with the same engine and kernels, side by side on one GPU.

    python benchmarks/benchmark_batching.py --model smollm2-135m              # chat workload, 64 and 256 slots
    python benchmarks/benchmark_batching.py --workload nano-vllm --slots 256  # the reference protocol

For each number of batch slots (`--slots`, max_num_seqs), runs benchmark_throughput.py's measurement
twice in one process, first with static batching (the textbook policy: a new batch of up to that many
requests only when every request of the last one has finished), then with continuous batching, and
prints the ratio. The default workload is `chat` (`chat_workload`, seed 0: 1,024 requests, log-normal
prompt lengths of median 256 and output lengths of median 128, both of shape 1, clipped to [8, 2048]),
where output lengths vary widely, as in chat traffic. It takes benchmark_throughput.py's options. Every
row is appended to `benchmarks/results/throughput.jsonl`.
"""

import gc
import sys

import benchmark_throughput
import common
import torch


def main() -> int:
    ap = benchmark_throughput.parser(__doc__)
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 256], help="max_num_seqs values")
    ap.set_defaults(workload="chat")
    if not (args := common.parse_on_gpu(ap, __file__)):
        return 0
    for slots in args.slots:
        args.max_num_seqs = slots
        rows = {}
        for policy in ("static", "continuous"):
            args.static = policy == "static"
            rows[policy] = benchmark_throughput.main_row(args)
            gc.collect()
            torch.cuda.empty_cache()  # the next engine sizes its KV cache from the free memory
        ratio = rows["continuous"]["tokens_per_s"] / rows["static"]["tokens_per_s"]
        print(
            f"continuous / static on {rows['static']['device']}, {args.model}, {args.workload} "
            f"workload, {slots} slots: {ratio:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
