"""Static against continuous batching with the same engine and kernels, side by side on one GPU.

    python benchmarks/benchmark_batching.py --model smollm2-135m

Runs benchmark_throughput.py's protocol twice in one process, first with static batching (a new batch
of max_num_seqs requests only when the last one has finished), then with continuous batching, and
prints the ratio. It takes benchmark_throughput.py's options. Both rows are appended to
`benchmarks/results/throughput.jsonl`.
"""

import gc
import sys

import benchmark_throughput
import common
import torch


def main() -> int:
    if not (args := common.parse_on_gpu(benchmark_throughput.parser(__doc__), __file__)):
        return 0
    rows = {}
    for policy in ("static", "continuous"):
        args.static = policy == "static"
        rows[policy] = benchmark_throughput.main_row(args)
        gc.collect()
        torch.cuda.empty_cache()  # the next engine sizes its KV cache from the free memory
    ratio = rows["continuous"]["tokens_per_s"] / rows["static"]["tokens_per_s"]
    print(
        f"continuous / static on {rows['static']['device']}, {rows['static']['model']}: {ratio:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
