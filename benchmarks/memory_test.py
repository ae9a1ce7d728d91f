"""KV-cache memory on the benchmark workload: contiguous reservations against paged blocks (chapter 4).

    python benchmarks/memory_test.py [--max-model-len 4096] [--budget-gib 2]

Accounting, not timing: it runs on the CPU in seconds and counts tokens. The workload is the nano-vllm
protocol (256 requests, `random.Random(0)`: every prompt, 100-1,024 token ids in [0, 10000], then every
output length, 100-1,024); the KV shape is SmolLM2-135M's (30 layers, 3 KV heads, head_dim 64, bf16).
Three ways to reserve KV memory for a running request:

  contiguous max      max_model_len tokens, from its first step (static caches, systems before vLLM)
  contiguous oracle   exactly its final length (prompt + output), from its first step
  paged               the blocks of 16 tokens it has filled (mini_infer's BlockManager)

A minimal continuous-batching loop drives them: admit waiting requests first come first served while
the memory allows, then every running request computes one token per step (its prompt at its first
step); when a paged request needs a block and none is free, the newest running request is preempted
(freed, and recomputed when it is admitted again, as in vLLM). Two runs:

  unlimited   memory for everything: all 256 requests start together; what share of the reserved
              memory holds real tokens, summed over all steps (memory x time) and at the first step
  budget      a fixed KV budget (2 GiB by default): how many requests fit at once (peak and mean), how
              many steps the workload takes, how many preemptions

Writes `benchmarks/results/memory.json` and prints a table.
"""

import argparse
import datetime
import json
import platform
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mini_infer.memory.block_manager import BlockManager

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE_BYTES = 30, 3, 64, 2  # SmolLM2-135M, bf16
BYTES_PER_TOKEN = 2 * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * DTYPE_BYTES
BLOCK_SIZE = 16


@dataclass
class Request:
    token_ids: list
    output_len: int
    prompt_len: int = 0
    block_table: list = field(default_factory=list)  # what the block manager reads and writes
    num_cached_tokens: int = 0

    def __post_init__(self):
        self.prompt_len = len(self.token_ids)

    @property
    def done(self) -> bool:
        return len(self.token_ids) - self.prompt_len == self.output_len


def workload(num_requests: int = 256) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    prompts = [
        [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_requests)
    ]
    return list(zip(prompts, [rng.randint(100, 1024) for _ in range(num_requests)]))


class Contiguous:
    """Reserves `size(request)` tokens when a request starts; nothing grows after that."""

    def __init__(self, budget_tokens: int, size):
        self.budget, self.size, self.used = budget_tokens, size, 0

    def admit(self, req: Request) -> bool:
        if self.used + self.size(req) > self.budget:
            return False
        self.used += self.size(req)
        return True

    def grow(self, req: Request) -> bool:
        return True

    def release(self, req: Request) -> None:
        self.used -= self.size(req)

    def reserved_tokens(self) -> int:
        return self.used


class Paged:
    """Blocks from mini_infer's BlockManager: a request holds the blocks its tokens fill."""

    def __init__(self, budget_tokens: int):
        self.bm = BlockManager(budget_tokens // BLOCK_SIZE, BLOCK_SIZE)

    def admit(self, req: Request) -> bool:
        if not self.bm.can_allocate(req):
            return False
        self.bm.allocate(req)
        return True

    def grow(self, req: Request) -> bool:
        # this step wrote all but the newest token's K/V
        self.bm.cache_computed(req, len(req.token_ids) - 1)
        if not self.bm.can_append(req):
            return False
        self.bm.append_slot(req)
        return True

    def release(self, req: Request) -> None:
        self.bm.free(req)

    def reserved_tokens(self) -> int:
        return (self.bm.num_blocks - self.bm.num_free_blocks) * BLOCK_SIZE


def simulate(policy, requests: list[Request]) -> dict:
    waiting, running = deque(requests), []
    steps = preemptions = real_sum = reserved_sum = 0
    batch_sizes, first_step_share = [], None
    while waiting or running:
        while waiting and policy.admit(waiting[0]):
            running.append(waiting.popleft())
        if not running:
            raise RuntimeError("a single request does not fit the budget")
        steps += 1
        batch_sizes.append(len(running))
        for req in list(running):  # oldest first; each computes one token
            if req not in running:  # preempted earlier in this step
                continue
            req.token_ids.append(0)
            if req.done:
                policy.release(req)
                running.remove(req)
                continue
            while not policy.grow(
                req
            ):  # room for the new token's K/V, or preempt the newest request
                victim = running.pop()
                policy.release(victim)
                waiting.appendleft(victim)
                preemptions += 1
                if victim is req:
                    break
        real = sum(len(r.token_ids) for r in running)
        real_sum += real
        reserved_sum += policy.reserved_tokens()
        if first_step_share is None:
            first_step_share = real / policy.reserved_tokens()
    return {
        "real_share_over_decode": real_sum / reserved_sum,
        "real_share_first_step": first_step_share,
        "peak_running": max(batch_sizes),
        "mean_running": sum(batch_sizes) / len(batch_sizes),
        "steps": steps,
        "preemptions": preemptions,
    }


def run(budget_tokens: int, max_model_len: int) -> dict:
    policies = {
        "contiguous max": lambda: Contiguous(budget_tokens, lambda r: max_model_len),
        "contiguous oracle": lambda: Contiguous(
            budget_tokens, lambda r: r.prompt_len + r.output_len
        ),
        "paged": lambda: Paged(budget_tokens),
    }
    return {
        name: simulate(make(), [Request(list(p), n) for p, n in workload()])
        for name, make in policies.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--budget-gib", type=float, default=2.0)
    args = parser.parse_args()

    budget_tokens = int(args.budget_gib * 2**30) // BYTES_PER_TOKEN
    results = {
        "what": "KV-cache accounting on the nano-vllm workload (CPU simulation; counts tokens, no timing)",
        "device": f"CPU ({platform.machine()}), accounting only",
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "kv_shape": {
            "model": "SmolLM2-135M",
            "num_layers": NUM_LAYERS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
            "bytes_per_token": BYTES_PER_TOKEN,
        },
        "block_size": BLOCK_SIZE,
        "max_model_len": args.max_model_len,
        "unlimited": run(256 * args.max_model_len, args.max_model_len),
        "budget": {
            "budget_gib": args.budget_gib,
            "budget_tokens": budget_tokens,
            **run(budget_tokens, args.max_model_len),
        },
        "published": "vLLM paper (SOSP 2023): earlier systems kept real tokens in 20.4-38.2% of the KV memory "
        "they reserved; paged allocation wastes under 4%",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"SmolLM2-135M KV ({BYTES_PER_TOKEN:,} bytes/token, bf16), 256 benchmark requests, "
        f"max_model_len {args.max_model_len}, blocks of {BLOCK_SIZE}"
    )
    print(
        "\nall requests at once, unlimited memory: share of reserved KV memory holding real tokens"
    )
    print(f"{'':20s}{'over the decode':>17s}{'first step':>12s}")
    for name, r in results["unlimited"].items():
        print(f"{name:20s}{r['real_share_over_decode']:17.1%}{r['real_share_first_step']:12.1%}")
    print(f"\nKV budget {args.budget_gib:g} GiB ({budget_tokens:,} tokens): continuous batching")
    print(
        f"{'':20s}{'peak running':>13s}{'mean running':>13s}{'steps':>8s}{'preemptions':>13s}{'real share':>12s}"
    )
    for name in ("contiguous max", "contiguous oracle", "paged"):
        r = results["budget"][name]
        print(
            f"{name:20s}{r['peak_running']:13d}{r['mean_running']:13.1f}{r['steps']:8d}"
            f"{r['preemptions']:13d}{r['real_share_over_decode']:12.1%}"
        )
    print(f"\n{results['published']}")
    print(f"wrote {RESULTS / 'memory.json'}")


if __name__ == "__main__":
    main()
