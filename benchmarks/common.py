"""What the benchmark scripts share: model configs, command line, workload, the two measurements and
the result rows. Every engine is driven through one function,

    generate(prompts: list[list[int]], max_tokens: list[int], temperature: float) -> output tokens produced

which returns only when every request has finished, so a host clock around it is the wall time.

Throughput: one warm-up request (16 prompt and 16 output tokens), then one timed call over the workload
of `mini_infer.testing.simulate.benchmark_workload` at temperature 0.6 (ignore_eos, each request its own
max_tokens); then, to tell prefill from decode, the same prompts again with one output token each
(`prefill_seconds`; token ids moved by one so that the prefix cache does not serve them). Batch-1
latency: a warm-up run, then one request of 128 random prompt token ids and 512 greedy output tokens: ms
per token = its wall time / 512 (prefill included, as in the reference numbers); time to first token =
median of 5 runs with max_tokens=1, each on a fresh prompt so that no prefix cache serves it; decode ms
per token = (wall time - time to first token) / 511.
"""

import argparse
import contextlib
import datetime
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = sorted(p.name for p in (HERE / "models").iterdir() if (p / "config.json").exists())
RESULTS = HERE / "results"
TEMPERATURE = 0.6
PROMPT_TOKENS, OUTPUT_TOKENS, TTFT_RUNS = 128, 512, 5

# The GPU machine has no network: never let Hugging Face or vLLM try to reach it.
for _key, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_key, _value)
# NVLink multicast stays off on a shared machine (it can take the host's GPUs out of service), in this
# process and in every process it starts (Mini-Infer's and vLLM's tensor-parallel workers): NCCL's NVLS,
# PyTorch's and NVSHMEM's multicast, vLLM's all-reduce through symmetric memory; and, as a guard, FlashInfer's
# all-reduce on its peer-to-peer backend rather than "mnnvl" (multicast), should vLLM use it anywhere
# (compare_vllm.py turns off vLLM's all-reduce + RMSNorm fusion, the one place it would by default).
for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
    ("VLLM_ALLREDUCE_USE_SYMM_MEM", "0"),
    ("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm"),
):
    os.environ[_key] = _value


def parser(doc: str, outputs: tuple[str, ...]) -> argparse.ArgumentParser:
    """--model, the workload's options when measuring throughput, and one --<kind>-out file per output
    ("throughput", "latency"); a script with one output also takes --out; one with two takes --only."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="smollm2-135m", choices=MODELS, help="a config under benchmarks/models"
    )
    if "throughput" in outputs:
        ap.add_argument(
            "--workload",
            choices=("nano-vllm", "chat"),
            default="nano-vllm",
            help="nano-vllm: the reference protocol (benchmark_workload); chat: 1,024 requests with "
            "log-normal prompt and output lengths (chat_workload, seed 0)",
        )
        ap.add_argument(
            "--num-seqs",
            type=int,
            default=256,
            help="requests of the nano-vllm workload; up to 256, the first ones of its 256 requests",
        )
        ap.add_argument("--max-input", type=int, default=1024)
        ap.add_argument("--max-output", type=int, default=1024)
        ap.add_argument(
            "--repeat",
            type=int,
            default=1,
            help="timed throughput runs in one engine, a row each (a run's token ids are moved by 2 per "
            "earlier run, so that no prefix an earlier run cached serves it)",
        )
    for kind in outputs:
        flags = [f"--{kind}-out"] + (["--out"] if len(outputs) == 1 else [])
        ap.add_argument(
            *flags,
            dest=f"{kind}_out",
            type=Path,
            default=RESULTS / f"{kind}.jsonl",
            help=f"JSONL file the {kind} row is appended to",
        )
    if len(outputs) > 1:
        ap.add_argument("--only", choices=outputs, help="measure only this")
    return ap


def model_dir(name: str) -> Path:
    return HERE / "models" / name


def workload(args) -> tuple[list[list[int]], list[int]]:
    """The chat workload (--workload chat), or the first --num-seqs requests of the 256-request benchmark
    workload (a larger number draws more)."""
    from mini_infer.testing.simulate import benchmark_workload, chat_workload

    if getattr(args, "workload", "nano-vllm") == "chat":
        return chat_workload()

    prompts, lengths = benchmark_workload(max(args.num_seqs, 256), args.max_input, args.max_output)
    return prompts[: args.num_seqs], lengths[: args.num_seqs]


@contextlib.contextmanager
def jit_variants():
    """The names of the Triton kernel variants this process builds (or loads from Triton's disk cache)
    inside the block, in a list that fills as they come: a variant first needed in the middle of a timed
    run costs its compile time there, on a machine whose cache is cold. Stays empty where Triton has no
    such hook, or runs its interpreter (which compiles nothing)."""
    names: list[str] = []
    try:
        import triton

        runtime = triton.knobs.runtime
    except (ImportError, AttributeError):
        yield names
        return
    previous = runtime.jit_post_compile_hook

    def hook(**kwargs):
        names.append(getattr(kwargs.get("fn"), "name", "?"))
        return previous(**kwargs) if previous else None

    runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        runtime.jit_post_compile_hook = previous


def throughput_runs(generate, args):
    """`args.repeat` measurements of the workload (measure_throughput's) in one engine, one at a time."""
    prompts, lengths = workload(args)
    return (measure_throughput(generate, prompts, lengths, run) for run in range(args.repeat))


def gpu_missing(script: str) -> bool:
    """True (after saying so) when PyTorch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{Path(script).name} measures a GPU; none is visible here.")
    return True


def parse_on_gpu(ap: argparse.ArgumentParser, script: str) -> argparse.Namespace | None:
    """The parsed command line (so that --help works anywhere), or None after a message when there is no GPU."""
    args = ap.parse_args()
    return None if gpu_missing(script) else args


def timed(fn, *args):
    """(fn(*args), wall seconds), the GPU drained first and last when this process uses it."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn(*args)
    sync()
    return result, time.perf_counter() - start


def moved(prompts: list[list[int]], by: int) -> list[list[int]]:
    """The prompts with every token id moved by `by`: the same lengths, and no prefix in common with them."""
    return [[t + by for t in p] for p in prompts] if by else prompts


def measure_throughput(
    generate, prompts: list[list[int]], lengths: list[int], run: int = 0
) -> dict:
    """The throughput protocol (the module docstring) on `prompts`, or with run > 0, a later run in the same
    engine, on the prompts moved by 2 x run."""
    generate([list(range(1, 17))], [16], TEMPERATURE)  # warm-up
    produced, seconds = timed(generate, moved(prompts, 2 * run), lengths, TEMPERATURE)
    assert produced == sum(lengths), f"{produced} output tokens, expected {sum(lengths)}"
    # An estimate of the prefill's share of that time (the timed call interleaves it with decoding): the
    # same prompts with one output token each, every token id moved by one more, so that no prefix the
    # timed call cached serves them.
    fresh = moved(prompts, 2 * run + 1)
    _, prefill_seconds = timed(generate, fresh, [1] * len(prompts), TEMPERATURE)
    return {
        "num_seqs": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": produced,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(produced / seconds, 1),
        "prefill_seconds": round(prefill_seconds, 3),
    }


def latency_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, 10000) for _ in range(PROMPT_TOKENS)]


def host_load() -> dict:
    """What else ran on the machine as a row was measured (a small model's batch-1 step waits on the host):
    the 1-minute load average, and the processes on the GPUs other than this one (an engine's own worker
    processes count; None where nvidia-smi is missing)."""
    try:
        pids = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        others = sum(pid != str(os.getpid()) for pid in pids)
    except (OSError, subprocess.SubprocessError):
        others = None
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "other_gpu_processes": others}


def measure_latency(generate) -> dict:
    generate([latency_prompt(0)], [OUTPUT_TOKENS], 0.0)  # warm-up
    host = host_load()
    produced, seconds = timed(generate, [latency_prompt(1)], [OUTPUT_TOKENS], 0.0)
    assert produced == OUTPUT_TOKENS, f"{produced} output tokens, expected {OUTPUT_TOKENS}"
    ttft = statistics.median(
        [timed(generate, [latency_prompt(seed)], [1], 0.0)[1] for seed in range(2, 2 + TTFT_RUNS)]
    )
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "seconds": round(seconds, 3),
        "ms_per_token": round(seconds * 1000 / OUTPUT_TOKENS, 3),
        "ttft_ms": round(ttft * 1000, 2),
        "decode_ms_per_token": round((seconds - ttft) * 1000 / (OUTPUT_TOKENS - 1), 3),
        **host,
    }


def weight_floor(model: str, tensor_parallel_size: int = 1) -> dict:
    """The batch-1 decode floor of `model`'s shape: a decode step reads every weight once, so it takes at
    least (weight bytes) / (copy bandwidth): `weight_bytes(model, tensor_parallel_size)`; `copy_gbps`:
    `copy_gbps()` now, on a buffer that fits beside an engine holding most of the GPU; `floor_ms` their
    quotient, ms per token. The KV cache's reads are left out (at batch 1 a few percent of a small model's
    bytes)."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    bandwidth = copy_gbps(min(2**30, free // 4))
    nbytes = weight_bytes(model, tensor_parallel_size)
    return {
        "weight_bytes": nbytes,
        "copy_gbps": round(bandwidth),
        "floor_ms": round(nbytes / bandwidth / 1e6, 3),
    }


def weight_bytes(model: str, tensor_parallel_size: int = 1) -> int:
    """The bytes of bf16 weights one decode step of `model`'s shape reads on each GPU: every parameter but
    the embedding table, of which a step reads one row per token (a table tied to the LM head counts once,
    as the LM head), divided among `tensor_parallel_size` GPUs (each reads its shard; the few replicated
    norm weights are counted as split too). From the config alone: the model is built on the meta device."""
    import torch

    from mini_infer.config import ModelConfig
    from mini_infer.models.llama import LlamaForCausalLM

    config = ModelConfig.from_hf(json.loads((model_dir(model) / "config.json").read_text()))
    with torch.device("meta"):  # shapes only
        net = LlamaForCausalLM(config)
    embedding = 0 if config.tie_word_embeddings else net.model.embed_tokens.weight.numel()
    return 2 * (sum(p.numel() for p in net.parameters()) - embedding) // tensor_parallel_size


def copy_gbps(nbytes: int = 2**31) -> float:
    """This GPU's device-to-device copy bandwidth now, GB/s: `nbytes` copied (2 GiB; far more than any L2
    cache either way), bytes read and written over the median time of `triton.testing.do_bench`. The
    ceiling the benchmarks hold memory-bound work against."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9  # both buffers are freed on return


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """Mini-Infer's engine options."""
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument(
        "--sync-scheduling",
        action="store_true",
        help="record each step's tokens before launching the next (no host/GPU overlap)",
    )
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over this many GPUs (Chapter 9; set NCCL_NVLS_ENABLE=0)",
    )
    ap.add_argument(
        "--custom-all-reduce",
        action="store_true",
        help="with several GPUs, small all-reduces through the one-shot all-reduce (default: NCCL)",
    )


def mini_infer_llm(args, static: bool = False):
    """A Mini-Infer `LLM` with dummy weights of --model, as every benchmark of this engine builds it."""
    from mini_infer.llm import LLM

    return LLM(
        model_dir(args.model),
        load_format="dummy",
        max_model_len=4096,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=0.9,
        enforce_eager=args.enforce_eager,
        static_batching=static,
        async_scheduling=False if args.sync_scheduling else None,  # None: the engine's default
        tensor_parallel_size=args.tensor_parallel_size,
        disable_custom_all_reduce=not args.custom_all_reduce,
    )


def mini_infer_generate(llm, progress: bool = False):
    """The `generate` of a Mini-Infer `LLM`."""
    from mini_infer.sampling_params import SamplingParams

    def generate(prompts, max_tokens, temperature):
        params = [
            SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=n)
            for n in max_tokens
        ]
        return sum(
            len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=progress)
        )

    return generate


def machine_id() -> str:
    """This boot of this machine: rows with the same id were measured side by side on one machine."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return boot_id.read_text().strip()[:8] if boot_id.exists() else "unknown"


def append_row(row: dict, out: Path) -> dict:
    """Add the device, versions and date to a result row, append it to `out` as one JSON line, print it."""
    import torch
    import triton

    from mini_infer.device import default_device, device_name

    row = {
        **row,
        "device": device_name(default_device()),
        "machine": machine_id(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row
