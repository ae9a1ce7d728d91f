"""Hugging Face transformers `generate`, with static batches, on the workload of benchmark_throughput.py.

    python benchmarks/compare_hf.py --model smollm2-135m --num-seqs 32

Protocol: random bf16 weights from `benchmarks/models/<model>/config.json`
(`AutoModelForCausalLM.from_config`, seed 0) on the GPU, transformers' default attention (SDPA) and
dynamic KV cache. Throughput: the first --num-seqs requests of the 256-request workload (all 256 by
default; HF is slow, about 1,000 output tokens/s on SmolLM2-135M and 240 on Llama-3-8B on an H100, so a
subset is the practical choice), in static batches of --batch-size consecutive requests (256 for
SmolLM2-135M and 64 for the others, as the reference numbers used), left-padded, sampled at temperature
0.6 (no top-k, no top-p), EOS ignored. `generate` takes one max_new_tokens per call, so each batch runs
until its longest request is done and only each request's own max_tokens count as output tokens: the
steps spent on finished requests are what static batching costs (the row's "batch_tokens" counts every
generated position). Batch-1 latency: as benchmark_latency.py (128 prompt tokens, 512 greedy tokens).
Rows with "engine": "hf-transformers" go to results/throughput.jsonl and latency.jsonl.
"""

import common

BATCH_SIZES = {"smollm2-135m": 256}  # the others: 64


def hf_generate(model, batch_size: int):
    """The `generate` of a Hugging Face model (see common.py): static batches of `batch_size` requests."""
    import torch

    # ignore_eos: every request runs to its max_new_tokens
    model.generation_config.eos_token_id = None

    def generate(prompts, max_tokens, temperature):
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0}
            if temperature
            else {"do_sample": False}
        )
        produced = 0
        for i in range(0, len(prompts), batch_size):
            batch, lengths = prompts[i : i + batch_size], max_tokens[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device
            )
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=max(lengths), pad_token_id=0, **sampling
            )
            assert out.shape[1] - width == max(lengths), (
                "generate stopped before the longest request was done"
            )
            # each request's own tokens: those past its max_tokens are discarded
            produced += sum(lengths)
        return produced

    return generate


def load(model_name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise the random weights on the GPU, not on the CPU
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(common.model_dir(model_name)), dtype=torch.bfloat16
        )
    return model.to("cuda").eval()


def main() -> None:
    ap = common.parser(__doc__, ("throughput", "latency"))
    ap.add_argument(
        "--batch-size", type=int, help="static batch size (default: 256 for smollm2-135m, else 64)"
    )
    if not (args := common.parse_on_gpu(ap, __file__)):
        return
    import torch
    import transformers

    batch_size = args.batch_size or BATCH_SIZES.get(args.model, 64)
    model = load(args.model)
    tag = {
        "engine": "hf-transformers",
        "model": args.model,
        "transformers": transformers.__version__,
    }
    with torch.inference_mode():
        if args.only != "latency":
            prompts, lengths = common.workload(args)
            torch.manual_seed(0)
            measured = common.measure_throughput(hf_generate(model, batch_size), prompts, lengths)
            batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
            common.append_row(
                {
                    **tag,
                    "policy": "static",
                    **measured,
                    "batch_size": min(batch_size, len(lengths)),
                    "batch_tokens": sum(len(b) * max(b) for b in batches),
                },
                args.throughput_out,
            )
        if args.only != "throughput":
            common.append_row(
                {**tag, **common.measure_latency(hf_generate(model, 1))}, args.latency_out
            )


if __name__ == "__main__":
    main()
