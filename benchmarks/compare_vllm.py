"""vLLM on exactly the workload and settings of benchmark_throughput.py and benchmark_latency.py.

    python benchmarks/compare_vllm.py --model qwen3-0.6b
    python benchmarks/compare_vllm.py --model qwen3-0.6b --attention-backend TRITON_ATTN
    python benchmarks/compare_vllm.py --model llama3-8b --tensor-parallel-size 2 \
        --throughput-out benchmarks/results/tp_throughput.jsonl --latency-out benchmarks/results/tp_latency.jsonl

vLLM comes from this Python or from the offline kit's folder ($VLLM_SITE, default /tmp/site, which
../shared/tools/vllm-kit/install.sh fills); that folder goes on sys.path and on PYTHONPATH, since vLLM's
engine runs in a child process. Where vLLM does not import, the script says so and exits 0.

Protocol: LLM(benchmarks/models/<model>, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
gpu_memory_utilization=0.9, seed=0) with vLLM's defaults otherwise (torch.compile, CUDA graphs, prefix
caching), the attention backend of vLLM's choice (FlashAttention 3 on an H100) or --attention-backend,
given as attention_config={"backend": NAME}. In the same engine: throughput (256 requests, temperature
0.6, ignore_eos, each request its own max_tokens, after one warm-up request), then batch-1 latency (128
prompt tokens, 512 greedy tokens), both as `common.py` measures every engine. VLLM_USE_FLASHINFER_SAMPLER=0
as in the reference kit: temperature-only sampling never calls FlashInfer, so only an import is saved.
One row each, "engine": "vllm" with its version and backend, to results/throughput.jsonl and latency.jsonl.

--tensor-parallel-size N gives vLLM's LLM tensor_parallel_size=N: one worker process per GPU, started by
its multiprocessing executor, which inherit this environment. NVLink multicast stays off in every one of
them: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, and vLLM's own
all-reduce through PyTorch's symmetric memory is not used (VLLM_ALLREDUCE_USE_SYMM_MEM=0); vLLM's custom
all-reduce (peer-to-peer over NVLink) and NCCL remain (common.py sets these for every benchmark). Its fusion
of each all-reduce with the next RMSNorm (FlashInfer's all-reduce, on by default with several Hopper GPUs)
is turned off: FlashInfer's default backend for it maps NVLink multicast memory.
"""

import os
import sys

SITE = os.environ.get("VLLM_SITE", "/tmp/site")
if os.path.isdir(SITE) and SITE not in sys.path:
    sys.path.insert(0, SITE)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)
# Look for the GPU through NVML, so that this process does not initialise CUDA before vLLM starts its engine.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

import common  # noqa: E402


def vllm_generate(llm):
    """The `generate` of a vLLM `LLM` (see common.py)."""
    from vllm import SamplingParams

    def generate(prompts, max_tokens, temperature):
        params = [
            SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=n)
            for n in max_tokens
        ]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    return generate


def vllm_llm(
    model: str,
    attention_backend: str | None = None,
    tensor_parallel_size: int = 1,
    disable_custom_all_reduce: bool = False,
):
    """vLLM's `LLM` with this protocol's settings (the module docstring), for a config under
    benchmarks/models. Raises ImportError where vLLM does not import."""
    import vllm

    return vllm.LLM(
        model=str(common.model_dir(model)),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=4096,
        gpu_memory_utilization=0.9,
        seed=0,
        attention_config={"backend": attention_backend} if attention_backend else None,
        tensor_parallel_size=tensor_parallel_size,
        disable_custom_all_reduce=disable_custom_all_reduce,
        # with several GPUs on a Hopper, vLLM 0.26 fuses each all-reduce with the next RMSNorm through
        # FlashInfer's all-reduce, whose backend "auto" picks "mnnvl", which maps NVLink multicast memory:
        # not allowed on a shared machine, and on the one we used its CUDA-graph capture failed with an
        # illegal memory access
        compilation_config={"pass_config": {"fuse_allreduce_rms": False}}
        if tensor_parallel_size > 1
        else None,
    )


def main() -> int:
    ap = common.parser(__doc__, ("throughput", "latency"))
    ap.add_argument(
        "--attention-backend", help="e.g. TRITON_ATTN or FLASH_ATTN (default: vLLM's choice)"
    )
    ap.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vLLM's tensor_parallel_size"
    )
    ap.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="vLLM's disable_custom_all_reduce: every all-reduce through NCCL",
    )
    if not (args := common.parse_on_gpu(ap, __file__)):
        return 0
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - whatever stops the import, there is no vLLM to race
        print(
            f"compare_vllm.py: vLLM does not import here ({type(e).__name__}: {e}); nothing measured. "
            f"See ../shared/tools/vllm-kit/README.md to install it."
        )
        return 0
    backend = args.attention_backend
    llm = vllm_llm(args.model, backend, args.tensor_parallel_size, args.disable_custom_all_reduce)
    generate = vllm_generate(llm)
    tag = {
        "engine": "vllm",
        "model": args.model,
        "vllm": vllm.__version__,
        "attention_backend": backend or "auto",
        "cuda_graphs": True,
        "tensor_parallel_size": args.tensor_parallel_size,
        "custom_all_reduce": not args.disable_custom_all_reduce,
    }
    rows = []
    if args.only != "latency":
        for measured in common.throughput_runs(generate, args):
            rows.append(({**tag, "policy": "continuous", **measured}, args.throughput_out))
    if args.only != "throughput":
        rows.append(({**tag, **common.measure_latency(generate)}, args.latency_out))
    # only now, after vLLM's runs: the floor's copy and naming the device open a CUDA context in this
    # process
    for row, out in rows:
        if "ttft_ms" in row:
            row |= common.weight_floor(args.model, args.tensor_parallel_size)
        common.append_row(row, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
