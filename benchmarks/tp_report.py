"""Chapter 9's table and plot: Mini-Infer and vLLM with tensor_parallel_size 1 and 2, from the rows of
results/tp_throughput.jsonl, tp_latency.jsonl and tp_allreduce.jsonl (benchmarks/tp_session.sh writes them).

    python benchmarks/tp_report.py            # print the table, write results/tp_scaling_<device>.png

Only rows of one machine are compared (the same device, date and boot): the machine of the newest
Mini-Infer throughput row at tensor_parallel_size 2. Per engine, all-reduce and size, the newest row of
that machine; a row with "custom_all_reduce": false (every all-reduce through NCCL) is an engine of its
own in the table and the plot.
"""

import argparse
import json

import common
from kernel_benchmark import slug

ENGINES = {
    ("mini_infer", True): "Mini-Infer",
    ("mini_infer", False): "Mini-Infer, NCCL all-reduce",
    ("vllm", True): "vLLM",
    ("vllm", False): "vLLM, NCCL all-reduce",
}

METHODS = {"nccl": "NCCL", "one-shot": "one-shot over symmetric memory"}


def load(name: str) -> list[dict]:
    path = common.RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def series(row: dict) -> tuple[str, bool]:
    """(engine, custom all-reduce): one GPU has no all-reduce, so its row serves both series."""
    return row["engine"], row.get("custom_all_reduce", True) or row.get(
        "tensor_parallel_size", 1
    ) == 1


def machine_rows(model: str = "llama3-8b") -> dict | None:
    """{"where": (device, date, machine), "throughput"|"latency": {((engine, custom all-reduce), tp): row},
    "allreduce": [rows]}
    for the newest machine with a Mini-Infer tp=2 throughput row of `model`; None without one."""
    tput = [r for r in load("tp_throughput.jsonl") if r["model"] == model]
    ours = [r for r in tput if r["engine"] == "mini_infer" and r["tensor_parallel_size"] == 2]
    if not ours:
        return None
    where = tuple(ours[-1][k] for k in ("device", "date", "machine"))

    def same_machine(rows):
        return [r for r in rows if tuple(r.get(k) for k in ("device", "date", "machine")) == where]

    found = {"where": where}
    for kind, rows in (("throughput", tput), ("latency", load("tp_latency.jsonl"))):
        found[kind] = {  # (a row with synchronous scheduling is a diagnosis, not the engine)
            (series(r), r.get("tensor_parallel_size", 1)): r
            for r in same_machine(rows)
            if r["model"] == model and r.get("async_scheduling", True)
        }
    found["allreduce"] = [
        r for r in same_machine(load("tp_allreduce.jsonl")) if r["model"] == model
    ]
    return found


def table(found: dict) -> list[str]:
    device, date, machine = found["where"]
    tput, lat = found["throughput"], found["latency"]
    lines = [
        f"Llama-3-8B's shape (dummy weights, bf16) on {device} (machine {machine}, {date}); throughput: "
        "the nano-vllm protocol; batch 1: 128 prompt tokens, 512 greedy tokens.",
        "",
        "| engine | GPUs | throughput, tok/s | speed-up | batch-1 ms/token | speed-up | GPU 0: weights / peak while loading |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, label in ENGINES.items():
        for tp in sorted({tp for e, tp in tput | lat if e == engine}):
            t, la = tput.get((engine, tp)), lat.get((engine, tp))
            # the one-GPU row (no all-reduce) is listed once, under the engine's own name
            one = ((engine[0], True), 1)
            t1, la1 = tput.get(one), lat.get(one)
            cells = [
                f"{t['tokens_per_s']:,.0f}" if t else "-",
                f"{t['tokens_per_s'] / t1['tokens_per_s']:.2f}x" if t and t1 else "-",
                f"{la['ms_per_token']:.2f}" if la else "-",
                f"{la1['ms_per_token'] / la['ms_per_token']:.2f}x" if la and la1 else "-",
                f"{t['gpu0_weights_gib']:.1f} / {t['gpu0_load_peak_gib']:.1f} GiB"
                if t and "gpu0_weights_gib" in t
                else "-",
            ]
            lines.append(f"| {label} | {tp} | {' | '.join(cells)} |")
    for r in found["allreduce"]:
        lines.append(
            f"\nAll-reduce of {r['batch']} x {r['hidden_size']} bf16 ({r['bytes'] / 1024:,.0f} KiB) over "
            f"{r['world_size']} GPUs, {METHODS[r.get('method', 'nccl')]}: {r['allreduce_us']:.1f} us launched alone, "
            f"{r['graph_allreduce_us']:.1f} us each in a CUDA graph; a decode step's "
            f"{r['allreduces_per_step']}: {r['step_us_graph'] / 1000:.2f} ms."
        )
    return lines


def figure(found: dict):
    """Throughput and batch-1 latency, per engine and number of GPUs, as bars."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, key, title in (
        (axes[0], "throughput", "tokens_per_s", "throughput, output tokens/s (higher is better)"),
        (axes[1], "latency", "ms_per_token", "batch 1, ms per token (lower is better)"),
    ):
        rows = found[kind]
        sizes = sorted({tp for _, tp in rows})
        shown = [e for e in ENGINES if any((e, tp) in rows for tp in sizes if tp > 1)]
        width = 0.8 / max(1, len(shown))
        for i, engine in enumerate(shown):  # an engine this machine did not measure gets no bars
            at = [(j, tp) for j, tp in enumerate(sizes) if (engine, tp) in rows]
            xs = [j + (i - (len(shown) - 1) / 2) * width for j, _ in at]
            ys = [rows[(engine, tp)][key] for _, tp in at]
            bars = ax.bar(xs, ys, width=width * 0.95, label=ENGINES[engine], color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f" if key == "tokens_per_s" else "%.2f", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"{tp} GPU{'s' if tp > 1 else ''}" for tp in sizes])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Llama-3-8B shape, tensor parallelism on {found['where'][0]}", fontsize=11)
    fig.tight_layout()
    return fig


def plot(found: dict, path) -> None:
    """The figure, written to `path` (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(found)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    found = machine_rows()
    if found is None:
        print("No tensor-parallel rows yet: run `OUT=DIR bash benchmarks/tp_session.sh` on 2 GPUs.")
        return
    print("\n".join(table(found)))
    path = common.RESULTS / f"tp_scaling_{slug(found['where'][0])}.png"
    plot(found, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
