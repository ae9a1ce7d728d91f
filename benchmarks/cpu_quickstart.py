"""The quickstart on the CPU: load time and generation speed under each thread setting.

    python benchmarks/cpu_quickstart.py --runs 5 --threads default 1 2
    python benchmarks/cpu_quickstart.py --code before=/path/to/an/older/checkout now=. --threads default

Runs `examples/quickstart.py` of each `--code` checkout (default: this one) in a fresh process per run,
with MINI_INFER_DEVICE=cpu. `default` leaves the threads to the code (the engine's choice, or
PyTorch's in code without one); a number N runs with OMP_NUM_THREADS=N. Every (code, threads)
setting takes its turn in each round, so that the changing load of a shared machine falls on all
of them alike. Records what the quickstart
prints (load time, tokens/s of its answer, the threads PyTorch used), the process's wall time and the
1-minute load average before each run, and appends the runs and their medians to
benchmarks/results/cpu_quickstart.json.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_quickstart.json"
LOADED = re.compile(r"loaded in ([\d.]+) s on (.*) \((\d+) threads?\)")
SPEED = re.compile(r"\((\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s\)")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} CPUs"


def run_once(label: str, code: Path, threads: str) -> dict:
    env = {**os.environ, "MINI_INFER_DEVICE": "cpu", "PYTHONPATH": str(code)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    load_average = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(code / "examples" / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - start
    loaded, speed = LOADED.search(out.stdout), SPEED.search(out.stdout)
    if out.returncode or not (loaded and speed):
        raise RuntimeError(f"the quickstart failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return {
        "code": label,
        "threads_setting": threads,
        "torch_threads": int(loaded.group(3)),
        "load_s": float(loaded.group(1)),
        "tokens": int(speed.group(1)),
        "generate_s": float(speed.group(2)),
        "tokens_per_s": float(speed.group(3)),
        "process_s": round(wall, 2),
        "load_average_1m": round(load_average, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5, help="runs of each setting (default 5)")
    ap.add_argument("--threads", nargs="+", default=["default", "1", "2"])
    ap.add_argument(
        "--code",
        nargs="+",
        default=[f"now={ROOT}"],
        help="LABEL=DIR of each checkout to run (default: now=this one)",
    )
    args = ap.parse_args()

    codes = [
        (label, Path(path).resolve()) for label, _, path in (c.partition("=") for c in args.code)
    ]
    settings = [(label, code, threads) for label, code in codes for threads in args.threads]
    runs = []
    for i in range(args.runs):
        for label, code, threads in settings:
            runs.append(run_once(label, code, threads))
            r = runs[-1]
            print(
                f"round {i + 1}/{args.runs}, {label}, threads {threads} ({r['torch_threads']} used): "
                f"load {r['load_s']:.1f} s, {r['tokens_per_s']:.1f} tokens/s "
                f"(load average {r['load_average_1m']:.2f})",
                flush=True,
            )
    medians = {
        f"{label}, threads {threads}": {
            key: round(
                statistics.median(
                    r[key] for r in runs if (r["code"], r["threads_setting"]) == (label, threads)
                ),
                3,
            )
            for key in ("load_s", "tokens_per_s", "process_s", "load_average_1m")
        }
        for label, _, threads in settings
    }
    record = {
        "what": "examples/quickstart.py on the CPU, one fresh process per run, settings interleaved",
        "code": [label for label, _ in codes],
        "device": cpu_model(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "date": datetime.date.today().isoformat(),
        "medians": medians,
        "runs": runs,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(results + [record], indent=1) + "\n")
    for setting, m in medians.items():
        print(
            f"{setting}: median load {m['load_s']:.1f} s, "
            f"{m['tokens_per_s']:.1f} tokens/s, process {m['process_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
