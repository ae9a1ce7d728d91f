"""Mini-Infer against vLLM and Hugging Face transformers, side by side, from benchmarks/results/*.jsonl.

    python benchmarks/summarize.py                       # the machine of the newest row
    python benchmarks/summarize.py --device "NVIDIA H100 80GB HBM3" --date 2026-11-25 --machine 1a2b3c4d

Only rows measured side by side on one machine (the same device, date and boot of the machine) are
compared, since a number from another card, another day or another machine is not comparable; by default
those of the last row written to throughput.jsonl (else to latency.jsonl). Per model and engine the best row counts: the highest throughput on the full workload
(--num-seqs requests: Mini-Infer's continuous batching with CUDA graphs, vLLM with whichever attention
backend did best; HF's rows may hold a subset of the requests, and say how many), and the lowest batch-1
ms per token and time to first token. x = how many times faster Mini-Infer is (throughput: ours / theirs;
latency: their ms / our ms); above 1 Mini-Infer wins.
"""

import argparse
import json
from pathlib import Path

import common

OTHERS = {"vllm": "vLLM", "hf-transformers": "HF"}
TABLES = {  # name: (file, key, lower is better, title)
    "throughput": ("throughput.jsonl", "tokens_per_s", False, "Throughput, output tokens/s"),
    "latency": (
        "latency.jsonl",
        "ms_per_token",
        True,
        "Batch-1, ms per output token (128 prompt, 512 greedy)",
    ),
    "ttft": (
        "latency.jsonl",
        "ttft_ms",
        True,
        "Batch-1, time to first token, ms (128 prompt tokens)",
    ),
}


def load(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )


def comparable(row: dict, table: str, num_seqs: int) -> bool:
    """A row measured on the agreed workload, our engine at its best settings."""
    if row["engine"] != "hf-transformers" and not row.get("cuda_graphs", True):
        return False
    if (  # other experiments
        row.get("max_num_seqs", 256) != 256
        or row.get("max_num_batched_tokens", 8192) != 8192
        or row.get("tensor_parallel_size", 1) != 1
    ):
        return False
    if table == "throughput":
        return row["engine"] == "hf-transformers" or (
            row["num_seqs"] == num_seqs and row.get("policy") == "continuous"
        )
    return (
        row.get("prompt_tokens") == common.PROMPT_TOKENS
        and row.get("output_tokens") == common.OUTPUT_TOKENS
    )


def collect(
    results: Path,
    device: str | None = None,
    date: str | None = None,
    num_seqs: int = 256,
    machine: str | None = None,
) -> dict:
    """{"device", "date", "machine", "kept", "total", "tables": {table: {model: {engine: best row or None}}}}."""
    files = {file: load(results / file) for file, *_ in TABLES.values()}
    written = files["throughput.jsonl"] or files["latency.jsonl"]
    matching = [r for r in written if device in (None, r["device"]) and date in (None, r["date"])]
    if matching:  # what is not given comes from the newest row that matches what is
        newest = matching[-1]
        device, date = device or newest["device"], date or newest["date"]
        machine = machine or newest.get("machine")
    same = {
        file: [
            r
            for r in rows
            if (r.get("device"), r.get("date"), r.get("machine")) == (device, date, machine)
        ]
        for file, rows in files.items()
    }
    summary = {
        "device": device,
        "date": date,
        "machine": machine,
        "tables": {},
        "kept": sum(map(len, same.values())),
        "total": sum(map(len, files.values())),
    }
    for name, (file, key, lower, _) in TABLES.items():
        kept = [r for r in same[file] if key in r and comparable(r, name, num_seqs)]
        pick = min if lower else max
        summary["tables"][name] = {
            model: {
                engine: pick(
                    (r for r in kept if r["engine"] == engine and r["model"] == model),
                    key=lambda r: r[key],
                    default=None,
                )
                for engine in ("mini_infer", *OTHERS)
            }
            for model in common.MODELS
            if any(r["model"] == model for r in kept)
        }
    return summary


def machines(results: Path) -> list[tuple[str, str, str]]:
    """(device, date, machine) of every machine that wrote rows, newest first: by date, then by last row written."""
    rows = load(results / "throughput.jsonl") + load(results / "latency.jsonl")
    last = {(r["device"], r["date"], r.get("machine")): i for i, r in enumerate(rows)}
    return sorted(last, key=lambda key: (key[1], last[key]), reverse=True)


def newest_side_by_side(
    results: Path, engines: tuple[str, ...], every_model: bool = True
) -> dict | None:
    """collect() of the newest machine on which every engine of `engines` has a throughput and a batch-1 row
    for every model (or, when not every_model, for one model at least), with "models": those models."""
    for device, date, machine in machines(results):
        summary = collect(results, device, date, machine=machine)
        models = [
            m
            for m in common.MODELS
            if all(
                summary["tables"][t].get(m, {}).get(e)
                for t in ("throughput", "latency")
                for e in engines
            )
        ]
        if models and (models == common.MODELS or not every_model):
            return {**summary, "models": models}
    return None


def speedup(ours: dict | None, theirs: dict | None, table: str) -> float | None:
    """How many times faster Mini-Infer is than the other engine, or None without both rows."""
    if not ours or not theirs:
        return None
    _, key, lower, _ = TABLES[table]
    return theirs[key] / ours[key] if lower else ours[key] / theirs[key]


def ratio_text(x: float) -> str:
    """A ratio to two decimals, or three where two would round it to 1.00 (0.996 is a loss, not a tie)."""
    return f"{x:.3f}" if f"{x:.2f}" == "1.00" and round(x, 3) != 1 else f"{x:.2f}"


def cell(row: dict | None, key: str) -> str:
    return f"{row[key]:>10,}" if row else f"{'-':>10}"


def render(summary: dict) -> str:
    if summary["device"] is None:
        return "no results yet: run benchmarks/race.sh on a GPU"
    lines = [
        f"Only rows measured on {summary['device']} (machine {summary['machine']}) on {summary['date']} are compared "
        f"({summary['kept']} of {summary['total']} rows). x = how many times faster Mini-Infer is."
    ]
    for name, models in summary["tables"].items():
        key, title = TABLES[name][1], TABLES[name][3]
        lines += [
            "",
            title,
            f"{'model':14} {'Mini-Infer':>10} {'vLLM':>10} {'(backend)':13} {'x':>6} "
            f"{'HF':>10} {'(requests)':11} {'x':>6}",
        ]
        if not models:
            lines.append("(no rows)")
        for model, best in models.items():
            vllm, hf = best["vllm"], best["hf-transformers"]
            backend = f"({vllm['attention_backend']})" if vllm else ""
            requests = f"({hf['num_seqs']})" if hf and name == "throughput" else ""
            x_vllm, x_hf = (speedup(best["mini_infer"], best[e], name) for e in OTHERS)
            lines.append(
                f"{model:14} {cell(best['mini_infer'], key)} {cell(vllm, key)} {backend:13} "
                f"{ratio_text(x_vllm) if x_vllm else '-':>6} {cell(hf, key)} {requests:11} "
                f"{ratio_text(x_hf) if x_hf else '-':>6}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--results",
        type=Path,
        default=common.RESULTS,
        help="folder of throughput.jsonl, latency.jsonl",
    )
    ap.add_argument("--device", help="compare rows of this device (default: the newest row's)")
    ap.add_argument(
        "--date", help="compare rows of this date, YYYY-MM-DD (default: the newest row's)"
    )
    ap.add_argument(
        "--machine", help="compare rows of this machine boot id (default: the newest row's)"
    )
    ap.add_argument("--num-seqs", type=int, default=256, help="the workload's number of requests")
    args = ap.parse_args()
    print(render(collect(args.results, args.device, args.date, args.num_seqs, args.machine)))


if __name__ == "__main__":
    main()
