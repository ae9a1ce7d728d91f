"""Offline throughput of the engine on the nano-vllm protocol, on one GPU.

    python benchmarks/benchmark_throughput.py --model smollm2-135m            # continuous batching
    python benchmarks/benchmark_throughput.py --model smollm2-135m --static   # static batching, same engine

Protocol (`../reference` numbers use the same): 256 requests from `benchmark_workload` (seed 0, prompts
of 100-1024 random token ids, outputs of 100-1024 tokens), temperature 0.6, ignore_eos, random (dummy)
weights from `benchmarks/models/<model>/config.json`, max_model_len 4096. Throughput = output tokens /
wall time of one `generate` over all requests, after a warm-up request (`common.py` has the details).
Batch-1 latency is `benchmark_latency.py`'s. Appends one JSON line per run to
`benchmarks/results/throughput.jsonl`.
"""

import common


def run(args) -> list[dict]:
    """One engine, --repeat rows."""
    llm = common.mini_infer_llm(args, static=args.static)
    generate = common.mini_infer_generate(llm, progress=not args.quiet)
    rows = []
    preempted = built = 0  # the engine's counts before this run (they add up over its life)
    with common.jit_variants() as variants:
        for measured in common.throughput_runs(generate, args):
            preemptions = llm.engine.scheduler.num_preemptions - preempted
            preempted += preemptions
            new_variants, built = variants[built:], len(variants)
            rows.append(
                {
                    "engine": "mini_infer",
                    "model": args.model,
                    "policy": "static" if args.static else "continuous",
                    "workload": args.workload,
                    **measured,
                    "kv_blocks": llm.engine.runner.num_blocks,
                    "preemptions": preemptions,
                    # Triton kernels built during this run (its warm-up request and its prefill call
                    # included): each may cost a compile; their names say where
                    "jit_variants": len(new_variants),
                    "jit_kernels": new_variants,
                    "max_num_seqs": args.max_num_seqs,
                    "max_num_batched_tokens": args.max_num_batched_tokens,
                    "cuda_graphs": not args.enforce_eager,
                    "async_scheduling": llm.engine.async_scheduling,
                    "tensor_parallel_size": args.tensor_parallel_size,
                }
            )
    return rows


def parser(doc: str = __doc__):
    ap = common.parser(doc, ("throughput",))
    common.add_engine_args(ap)
    ap.add_argument("--static", action="store_true", help="static batching instead of continuous")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main_row(args=None) -> dict:
    """Run (parsing the command line when no args are given), append each run's row to --out, print them,
    and return the fastest."""
    args = args or parser().parse_args()
    rows = [common.append_row(row, args.throughput_out) for row in run(args)]
    return max(rows, key=lambda r: r["tokens_per_s"])


if __name__ == "__main__" and (args := common.parse_on_gpu(parser(), __file__)):
    main_row(args)
