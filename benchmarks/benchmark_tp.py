"""Chapter 9's scaling run: throughput, batch-1 latency and GPU 0's memory of one engine with
--tensor-parallel-size N, on the protocols of benchmark_throughput.py and benchmark_latency.py.

    NCCL_NVLS_ENABLE=0 python benchmarks/benchmark_tp.py --model llama3-8b --tensor-parallel-size 2

One engine serves both measurements (its start-up, CUDA graphs included, is paid once): throughput on
the first --num-seqs requests of the nano-vllm workload, then batch 1 (128 prompt tokens, 512 greedy).
Both rows carry GPU 0's memory: the shard of the weights it holds (gpu0_weights_gib), its peak while the
weights were loaded (gpu0_load_peak_gib: each rank loads only its own shard, so at tp=2 about half of
tp=1's) and its peak at the end (gpu0_peak_gib, the KV cache included, which fills what
gpu_memory_utilization leaves). Rows are appended to results/tp_throughput.jsonl and tp_latency.jsonl;
`tp_report.py` shows them beside vLLM's (compare_vllm.py --tensor-parallel-size N).
"""

import common


def gpu0_memory(llm) -> dict:
    """GPU 0's memory in GiB: the weights its shard holds, its peak while loading, its peak so far."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    return {
        "gpu0_weights_gib": round(weights / 2**30, 2),
        "gpu0_load_peak_gib": round(llm.engine.load_memory / 2**30, 2),
        "gpu0_peak_gib": round(torch.cuda.max_memory_allocated(0) / 2**30, 2),
    }


def parser():
    ap = common.parser(__doc__, ("throughput", "latency"))
    common.add_engine_args(ap)
    ap.set_defaults(
        throughput_out=common.RESULTS / "tp_throughput.jsonl",
        latency_out=common.RESULTS / "tp_latency.jsonl",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main() -> None:
    if not (args := common.parse_on_gpu(parser(), __file__)):
        return
    llm = common.mini_infer_llm(args)
    generate = common.mini_infer_generate(llm, progress=not args.quiet)
    tag = {
        "engine": "mini_infer",
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "cuda_graphs": not args.enforce_eager,
        "async_scheduling": llm.engine.async_scheduling,
        # what ran: the one-shot all-reduce falls back to NCCL where it cannot be set up
        "custom_all_reduce": getattr(llm.engine.runner, "custom_all_reduce", False),
    }
    rows = []
    if args.only != "latency":
        for measured in common.throughput_runs(generate, args):
            rows.append(({**tag, "policy": "continuous", **measured}, args.throughput_out))
    if args.only != "throughput":
        rows.append(({**tag, **common.measure_latency(generate)}, args.latency_out))
    memory = gpu0_memory(llm)
    for row, out in rows:
        common.append_row({**row, **memory}, out)
    if args.tensor_parallel_size > 1:
        llm.engine.runner.close()


if __name__ == "__main__":
    main()
