"""Every benchmark of the book on one GPU machine, then the README's results section and plots from the files.

    python benchmarks/run_all.py                                  # everything (roughly half an hour on an H100)
    python benchmarks/run_all.py --models smollm2-135m --skip-hf  # a part of it
    python benchmarks/run_all.py --dry-run                        # print the commands, run nothing

The steps, each printed before it runs: the kernels against the copy ceiling (kernel_benchmark.py), the KV
memory accounting (memory_test.py, CPU), the race of Mini-Infer against vLLM (when it imports) and HF
transformers, throughput and batch-1 latency (race.sh), per model a profile of one decode step
(profile_step.py) and online serving under load (benchmark_serving.py), static against continuous batching
(benchmark_batching.py: the first two models, chat workload, 64 and 256 slots), and last the README's
results section and the race plot (report.py), rebuilt from benchmarks/results/ only.
Every row names its device, machine, versions and date. Without a GPU it prints the commands and stops.
"""

import argparse
import shlex
import subprocess
import sys
import time

import common
from report import in_size_order


def commands(args) -> list[list[str]]:
    py = sys.executable
    engines = ["mini_infer"] + ["vllm"] * (not args.skip_vllm) + ["hf"] * (not args.skip_hf)
    return [
        *([[py, "benchmarks/kernel_benchmark.py"]] * (not args.skip_kernels)),
        [py, "benchmarks/memory_test.py"],
        [
            "env",
            f"PYTHON={py}",
            f"ENGINES={' '.join(engines)}",
            "bash",
            "benchmarks/race.sh",
            *args.models,
        ],
        *([py, "benchmarks/profile_step.py", "--model", m] for m in args.models),
        *([py, "benchmarks/benchmark_serving.py", "--model", m] for m in args.models),
        *(  # chat workload: more requests than batch slots, output lengths that vary widely
            [py, "benchmarks/benchmark_batching.py", "--model", m, "--quiet"]
            for m in args.models[:2]
        ),
        [py, "benchmarks/report.py"],
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", nargs="+", default=in_size_order(common.MODELS), choices=common.MODELS
    )
    ap.add_argument(
        "--skip-kernels", action="store_true", help="no kernel_benchmark.py (a few minutes)"
    )
    ap.add_argument("--skip-vllm", action="store_true", help="race without vLLM")
    ap.add_argument("--skip-hf", action="store_true", help="race without HF transformers")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    steps = commands(args)
    if args.dry_run or common.gpu_missing(__file__):
        print(
            "The commands, run from the repository root:",
            *(shlex.join(step).replace(sys.executable, "python") for step in steps),
            sep="\n  ",
        )
        return 0
    for step in steps:
        print(f"== {shlex.join(step)}", flush=True)
        start = time.perf_counter()
        if code := subprocess.run(step, cwd=common.HERE.parent).returncode:
            print(f"run_all.py: the step failed (exit {code}); stopping.")
            return code
        print(f"== {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
