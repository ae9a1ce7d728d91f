"""Ask the embedded SmolLM2-135M-Instruct a question and print its greedy answer.

    python examples/quickstart.py
    python examples/quickstart.py "Name three primary colours." --max-tokens 64
    python examples/quickstart.py --model path/to/model_dir_or_hub_id

Runs on the GPU when there is one, else on the CPU (MINI_INFER_DEVICE=cpu forces the CPU).
"""

import argparse
import time

from mini_infer.device import device_name
from mini_infer.llm import LLM
from mini_infer.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "prompt", nargs="?", default="What is the capital of France? Answer in one sentence."
    )
    parser.add_argument(
        "--max-tokens", type=int, default=48, help="most new tokens to generate (default 48)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a model directory or a hub id "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        llm = LLM(args.model, max_model_len=2048)
    except (OSError, ValueError) as e:  # a bad path, an unreachable hub, a damaged file: say which
        raise SystemExit(f"error: {e}") from None
    runner = llm.engine.runner
    print(
        f"loaded in {time.perf_counter() - start:.1f} s on {device_name(runner.device)} ({runner.dtype})"
    )

    start = time.perf_counter()
    try:
        output = llm.chat(
            [{"role": "user", "content": args.prompt}],
            SamplingParams(temperature=0, max_tokens=args.max_tokens),
            use_tqdm=False,
        )[0]
    except ValueError as e:  # e.g. no tokenizer in the model directory
        raise SystemExit(f"error: {e}") from None
    if output.error:  # a request the engine rejected (a prompt too long, say) ends with the reason
        raise SystemExit(f"error: {output.error}")
    reply = output.outputs[0]
    seconds = time.perf_counter() - start
    print(f"> {args.prompt}\n{reply.text.strip()}")
    print(
        f"({len(reply.token_ids)} tokens in {seconds:.2f} s, {len(reply.token_ids) / seconds:.1f} tokens/s)"
    )


if __name__ == "__main__":
    main()
