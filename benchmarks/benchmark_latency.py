"""Batch-1 latency of the engine on one GPU: how fast one request streams its tokens.

    python benchmarks/benchmark_latency.py --model llama3-8b

Protocol (the reference numbers' "bs1"): dummy weights of `benchmarks/models/<model>/config.json`, the
engine built as `benchmark_throughput.py` builds it; after a warm-up run, one request of 128 seeded
random prompt token ids and 512 greedy output tokens (ignore_eos): ms per output token = its wall time
/ 512. Also the time to first token (median of 5 runs with max_tokens=1, fresh prompts) and the decode
time per token, and the weight-read floor measured in the same run (`common.weight_floor`: weight
bytes over this GPU's copy bandwidth); `common.py` has the details. `pdl` says whether the kernels
launched early (Chapter 7.3.4; `MINI_INFER_PDL=0` in the environment turns that off), `gemv_choices`
what `linear` chose for each weight at batch 1 (7.3.2-7.3.3; the choice can differ between machines;
empty with tensor parallelism, whose ranks choose in their own processes), and `load_avg_1m` and
`other_gpu_processes` what else ran (`common.host_load`: SmolLM2's batch-1 rows have moved by half
between runs of the same code on one machine). Appends one JSON
line to `benchmarks/results/latency.jsonl`.
"""

import common
import torch

from mini_infer.kernels import gemv, use_pdl


def main() -> None:
    ap = common.parser(__doc__, ("latency",))
    common.add_engine_args(ap)
    if not (args := common.parse_on_gpu(ap, __file__)):
        return
    llm = common.mini_infer_llm(args)
    row = {
        "engine": "mini_infer",
        "model": args.model,
        **common.measure_latency(common.mini_infer_generate(llm)),
        "cuda_graphs": not args.enforce_eager,
        "async_scheduling": llm.engine.async_scheduling,
        "pdl": use_pdl(torch.device("cuda")),  # Chapter 7.3.4; MINI_INFER_PDL=0 turns it off
        "tensor_parallel_size": args.tensor_parallel_size,
        **common.weight_floor(args.model, args.tensor_parallel_size),
        "gemv_choices": gemv.gemv_choices(),  # batch 1's products as measured here (Chapter 7.3.2)
    }
    common.append_row(row, args.latency_out)


if __name__ == "__main__":
    main()
