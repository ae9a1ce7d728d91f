"""Ask the embedded SmolLM2-135M-Instruct a question and print its greedy answer.

    python examples/quickstart.py
    python examples/quickstart.py "Name three primary colours." --max-tokens 64
    python examples/quickstart.py --model path/to/model_dir_or_hub_id

Runs on the GPU when there is one, else on the CPU (MINI_INFER_DEVICE=cpu forces the CPU).
"""
import argparse
import time

from mini_infer.device import device_name
from mini_infer.kv_cache import generate_greedy
from mini_infer.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=48, help="most new tokens to generate (default 48)")
    parser.add_argument("--model", default=None, help="a .gguf file, a model directory or a hub id "
                                                      "(default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        model, tokenizer, config = load_model(args.model)
    except (OSError, ValueError) as e:  # a bad path, an unreachable hub, a damaged file: say which
        raise SystemExit(f"error: {e}") from None
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files: the quickstart needs one to read the prompt")
    weight = model.lm_head.weight
    print(f"loaded in {time.perf_counter() - start:.1f} s on {device_name(weight.device)} ({weight.dtype})")

    messages = [{"role": "user", "content": args.prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    start = time.perf_counter()
    answer = generate_greedy(model, prompt_ids, args.max_tokens, config.eos_token_ids)
    seconds = time.perf_counter() - start
    print(f"> {args.prompt}\n{tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    print(f"({len(answer)} tokens in {seconds:.2f} s, {len(answer) / seconds:.1f} tokens/s)")


if __name__ == "__main__":
    main()
