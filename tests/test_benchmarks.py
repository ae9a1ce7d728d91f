"""The benchmark scripts, as far as they run without a GPU: the command lines, the no-GPU exits, the shared
measurements on a stand-in engine, HF's static-batch accounting on a tiny model, and summarize.py's table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import summarize  # noqa: E402

SCRIPTS = [
    "benchmark_throughput",
    "benchmark_latency",
    "benchmark_batching",
    "compare_hf",
    "compare_vllm",
    "benchmark_tp",
    "allreduce_latency",
    "gemv_probe",
]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def run(*command, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env={**NO_GPU, **env}, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("script", SCRIPTS + ["summarize"])
def test_help(script):
    result = run(sys.executable, f"benchmarks/{script}.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout or script == "summarize"


@pytest.mark.parametrize("script", SCRIPTS)
def test_exits_cleanly_without_a_gpu(script):
    result = run(sys.executable, f"benchmarks/{script}.py", "--model", "llama3-8b")
    assert result.returncode == 0, result.stderr
    assert f"{script}.py measures a GPU; none is visible here." in result.stdout


def test_gemv_probe_shapes_are_the_ones_measured():
    import gemv_probe

    stored = json.loads((common.RESULTS / "gemv_probe_nvidia-h200.json").read_text())
    for model in {r["model"] for r in stored["rows"]}:
        measured = {r["shape"]: (r["n"], r["k"]) for r in stored["rows"] if r["model"] == model}
        assert gemv_probe.shapes(model) == measured


def test_cpu_quickstart_help():
    result = run(sys.executable, "benchmarks/cpu_quickstart.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--threads" in result.stdout and "--code" in result.stdout


@pytest.mark.parametrize(
    "command",
    [["bash", "benchmarks/race.sh", "--help"], [sys.executable, "benchmarks/report.py", "--help"]],
    ids=["race.sh", "report.py"],
)
def test_help_of_the_scripts_that_write_files_writes_nothing(command):
    readme = (ROOT / "README.md").stat().st_mtime_ns
    result = run(*command)
    assert result.returncode == 0, result.stderr
    assert "README" in result.stdout or "REPEAT" in result.stdout
    assert (ROOT / "README.md").stat().st_mtime_ns == readme


def test_race_exits_cleanly_without_a_gpu():
    result = run("bash", "benchmarks/race.sh", PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    assert "none is visible here" in result.stdout


def test_compare_vllm_without_vllm(monkeypatch, capsys):
    import compare_vllm

    monkeypatch.setattr(common, "gpu_missing", lambda script: False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(sys, "argv", ["compare_vllm.py", "--model", "qwen3-0.6b"])
    assert compare_vllm.main() == 0
    assert "vLLM does not import here" in capsys.readouterr().out


def test_workload_subset_is_the_start_of_the_full_workload():
    args = type("Args", (), {"num_seqs": 32, "max_input": 1024, "max_output": 1024})
    prompts, lengths = common.workload(args)
    args.num_seqs = 256
    full_prompts, full_lengths = common.workload(args)
    assert (prompts, lengths) == (full_prompts[:32], full_lengths[:32])
    # the reference workload
    assert (sum(map(len, full_prompts)), sum(full_lengths)) == (
        142_827,
        133_966,
    )


def fake_engine(calls):
    def generate(prompts, max_tokens, temperature):
        calls.append((len(prompts), list(max_tokens), temperature))
        return sum(max_tokens)

    return generate


def test_measure_throughput_warms_up_then_times_one_call_then_the_prefill():
    calls, seen = [], []
    engine = fake_engine(calls)

    def generate(prompts, max_tokens, temperature):
        seen.append(prompts)
        return engine(prompts, max_tokens, temperature)

    row = common.measure_throughput(generate, [[1, 2], [3]], [5, 7])
    assert seen[2] == [[2, 3], [4]]  # the same lengths, no prefix the timed call cached
    assert calls == [(1, [16], 0.6), (2, [5, 7], 0.6), (2, [1, 1], 0.6)]
    assert row["num_seqs"] == 2 and row["prompt_tokens"] == 3 and row["output_tokens"] == 12
    assert row["tokens_per_s"] > 0 and row["prefill_seconds"] >= 0


def test_repeated_runs_in_one_engine_never_meet_a_cached_prefix():
    seen = []

    def generate(prompts, max_tokens, temperature):
        seen.append(prompts)
        return sum(max_tokens)

    args = common.parser("", ("throughput",)).parse_args(["--num-seqs", "2", "--repeat", "2"])
    rows = list(common.throughput_runs(generate, args))
    prompts, _ = common.workload(args)
    assert len(rows) == 2 and len(seen) == 6  # a warm-up, a timed call and a prefill call per run
    timed_and_prefill = [seen[i] for i in (1, 2, 4, 5)]
    assert timed_and_prefill[0] == prompts  # the first run is the workload itself
    assert timed_and_prefill[3] == common.moved(prompts, 3)
    firsts = [tuple(p[0] for p in call) for call in timed_and_prefill]
    assert len(set(firsts)) == 4  # no call's prompts begin as another's do


def test_jit_variants_lists_the_kernels_triton_builds_inside_the_block():
    from types import SimpleNamespace

    import triton

    runtime = triton.knobs.runtime
    before = runtime.jit_post_compile_hook
    with common.jit_variants() as names:
        runtime.jit_post_compile_hook(key=None, fn=SimpleNamespace(name="_rope_kernel"))
    assert names == ["_rope_kernel"] and runtime.jit_post_compile_hook is before


def test_measure_latency_uses_fresh_greedy_prompts():
    calls, prompts = [], []
    engine = fake_engine(calls)

    def generate(p, max_tokens, temperature):
        prompts.append(p[0])
        return engine(p, max_tokens, temperature)

    row = common.measure_latency(generate)
    assert [c[1] for c in calls] == [[512], [512]] + [[1]] * common.TTFT_RUNS
    assert all(c[2] == 0.0 for c in calls) and all(len(p) == 128 for p in prompts)
    assert len({tuple(p) for p in prompts}) == len(prompts)  # no prompt twice: no prefix-cache hits
    assert row["prompt_tokens"] == 128 and row["output_tokens"] == 512 and row["ms_per_token"] >= 0
    # what else ran: the load average, and the GPU's other processes (None without nvidia-smi)
    assert row["load_avg_1m"] >= 0 and row["other_gpu_processes"] in (None, *range(1000))


def test_a_ratio_just_under_one_is_not_shown_as_a_tie():
    import summarize

    assert [summarize.ratio_text(x) for x in (0.996, 1.004, 1.0, 0.9999, 1.82)] == [
        "0.996",
        "1.004",
        "1.00",
        "1.00",
        "1.82",
    ]


def test_weight_bytes_are_what_a_decode_step_reads():
    import common

    # Llama-3-8B: 8.03 B parameters less the 128,256 x 4,096 embedding table (untied), in bf16
    assert common.weight_bytes("llama3-8b") == 2 * (8_030_261_248 - 128_256 * 4_096)
    assert common.weight_bytes("llama3-8b", tensor_parallel_size=2) == 15_009_849_344 // 2
    # SmolLM2-135M ties its table to the LM head: counted once
    assert common.weight_bytes("smollm2-135m") == 2 * 134_515_008


@pytest.mark.parametrize("temperature", [0.6, 0.0])
def test_hf_static_batches_count_only_each_requests_own_tokens(temperature):
    import torch
    from compare_hf import hf_generate
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=100,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight[5] += 10.0  # EOS is likely at every step: it must be ignored
    generate = hf_generate(model, batch_size=2)
    with torch.inference_mode():
        assert generate([[1, 2, 3], [4, 6, 7, 8, 9], [10, 11]], [2, 6, 3], temperature) == 11


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


H100, OTHER = (
    {"device": "H100", "date": "2026-12-01", "machine": "m1"},
    {"device": "A100", "date": "2026-12-01", "machine": "m3"},
)


def test_summarize_compares_only_rows_of_one_machine(tmp_path):
    full = {"num_seqs": 256, "policy": "continuous", "cuda_graphs": True}
    write(
        tmp_path / "throughput.jsonl",
        [
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "tokens_per_s": 99_999.0,
                **full,
                **H100,
                "date": "2026-11-30",
                "attention_backend": "auto",
            },  # another day: left out
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "tokens_per_s": 99_999.0,
                **full,
                **OTHER,
                "attention_backend": "auto",
            },  # another card: left out
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "tokens_per_s": 99_999.0,
                **full,
                **H100,
                "machine": "m2",
                "attention_backend": "auto",
            },  # the same card and day, another machine: left out
            {
                "engine": "mini_infer",
                "model": "qwen3-0.6b",
                "tokens_per_s": 900.0,
                **full,
                **H100,
                "cuda_graphs": False,
            },  # eager: not our best settings
            {
                "engine": "mini_infer",
                "model": "qwen3-0.6b",
                "tokens_per_s": 990.0,
                **full,
                **H100,
                "policy": "static",
            },
            {
                "engine": "mini_infer",
                "model": "qwen3-0.6b",
                "tokens_per_s": 500.0,
                **full,
                **H100,
                "num_seqs": 32,
            },
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "tokens_per_s": 1000.0,
                **full,
                **H100,
                "attention_backend": "auto",
            },
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "tokens_per_s": 1250.0,
                **full,
                **H100,
                "attention_backend": "TRITON_ATTN",
            },
            {
                "engine": "hf-transformers",
                "model": "qwen3-0.6b",
                "tokens_per_s": 50.0,
                "num_seqs": 32,
                "policy": "static",
                **H100,
            },
            {"engine": "mini_infer", "model": "qwen3-0.6b", "tokens_per_s": 800.0, **full, **H100},
        ],
    )
    latency = {"prompt_tokens": 128, "output_tokens": 512}
    write(
        tmp_path / "latency.jsonl",
        [
            {
                "engine": "mini_infer",
                "model": "qwen3-0.6b",
                "ms_per_token": 2.0,
                "ttft_ms": 10.0,
                **latency,
                **H100,
            },
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "ms_per_token": 3.0,
                "ttft_ms": 5.0,
                **latency,
                **H100,
                "attention_backend": "auto",
            },
            {
                "engine": "vllm",
                "model": "qwen3-0.6b",
                "ms_per_token": 0.1,
                "ttft_ms": 0.1,
                **latency,
                **OTHER,
                "attention_backend": "auto",
            },
        ],
    )
    summary = summarize.collect(tmp_path)
    assert (summary["device"], summary["date"], summary["kept"], summary["total"]) == (
        "H100",
        "2026-12-01",
        9,
        13,
    )
    best = summary["tables"]["throughput"]["qwen3-0.6b"]
    assert best["mini_infer"]["tokens_per_s"] == 800.0  # not the eager, static or 32-request rows
    # the better backend of the same card and day
    assert best["vllm"]["attention_backend"] == "TRITON_ATTN"
    assert summarize.speedup(best["mini_infer"], best["vllm"], "throughput") == pytest.approx(0.64)
    assert summarize.speedup(
        best["mini_infer"], best["hf-transformers"], "throughput"
    ) == pytest.approx(16.0)
    lat = summary["tables"]["latency"]["qwen3-0.6b"]
    assert summarize.speedup(lat["mini_infer"], lat["vllm"], "latency") == pytest.approx(1.5)
    assert lat["hf-transformers"] is None
    ttft = summary["tables"]["ttft"]["qwen3-0.6b"]
    assert summarize.speedup(ttft["mini_infer"], ttft["vllm"], "ttft") == pytest.approx(0.5)
    text = summarize.render(summary)
    assert (
        "H100 (machine m1) on 2026-12-01" in text
        and "(TRITON_ATTN)" in text
        and "0.64" in text
        and "16.00" in text
    )
    assert "99,999" not in text and "A100" not in text

    other = summarize.collect(tmp_path, device="A100")
    assert other["tables"]["throughput"]["qwen3-0.6b"]["mini_infer"] is None
    assert summarize.render(summarize.collect(tmp_path / "none")).startswith("no results yet")


def race_rows(
    machine: str, models: list[str], engines=("mini_infer", "vllm"), date="2026-12-01"
) -> tuple[list, list]:
    where = {
        "device": "H100",
        "date": date,
        "machine": machine,
        "cuda_graphs": True,
        "attention_backend": "auto",
    }
    tput = [
        {
            "engine": e,
            "model": m,
            "num_seqs": 256,
            "policy": "continuous",
            "tokens_per_s": 1.0,
            **where,
        }
        for m in models
        for e in engines
    ]
    lat = [
        {
            "engine": e,
            "model": m,
            "prompt_tokens": 128,
            "output_tokens": 512,
            "ms_per_token": 1.0,
            "ttft_ms": 1.0,
            **where,
        }
        for m in models
        for e in engines
    ]
    return tput, lat


def test_the_newest_machine_with_a_complete_race_is_reported(tmp_path):
    old, old_lat = race_rows("old", common.MODELS, date="2026-11-25")
    # a newer race that has not reached every model yet
    new, new_lat = race_rows("new", common.MODELS[:2])
    write(tmp_path / "throughput.jsonl", old + new)
    write(tmp_path / "latency.jsonl", old_lat + new_lat)
    assert summarize.machines(tmp_path)[0][2] == "new"
    assert summarize.newest_side_by_side(tmp_path, ("mini_infer", "vllm"))["machine"] == "old"
    partial = summarize.newest_side_by_side(tmp_path, ("mini_infer", "vllm"), every_model=False)
    assert (partial["machine"], partial["models"]) == ("new", common.MODELS[:2])

    done, done_lat = race_rows("new", common.MODELS[2:])
    write(tmp_path / "throughput.jsonl", old + new + done)
    write(tmp_path / "latency.jsonl", old_lat + new_lat + done_lat)
    assert summarize.newest_side_by_side(tmp_path, ("mini_infer", "vllm"))["machine"] == "new"
    assert (
        summarize.newest_side_by_side(
            tmp_path, ("mini_infer", "hf-transformers"), every_model=False
        )
        is None
    )


def test_report_without_results_says_how_to_make_them(tmp_path, monkeypatch):
    import report

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert "No results yet: run `python benchmarks/run_all.py` on a GPU." in report.readme_section()
    readme = f"before\n{report.START}\nold\n{report.END}\nafter\n"
    assert report.readme_with_section(readme) == f"before\n{report.readme_section()}\nafter\n"


def test_run_all_without_a_gpu_prints_every_step_and_runs_none():
    result = run(sys.executable, "benchmarks/run_all.py", "--skip-vllm")
    assert result.returncode == 0, result.stderr
    assert "run_all.py measures a GPU; none is visible here." in result.stdout
    for step in [
        "kernel_benchmark.py",
        "memory_test.py",
        "ENGINES=mini_infer hf' bash benchmarks/race.sh smollm2-135m",
        "profile_step.py --model llama3-8b",
        "benchmark_serving.py --model qwen3-0.6b",
        "benchmark_batching.py",
        "report.py",
    ]:
        assert step in result.stdout


def test_allreduce_latency_runs_on_gloo():
    """The script's processes and its rows, on the CPU (no CUDA graphs there)."""
    result = run(
        sys.executable, "benchmarks/allreduce_latency.py", "--device", "cpu", "--batch", "1", "4"
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["batch"] for r in rows] == [1, 4] and rows[1]["bytes"] == 4 * 576 * 2
    assert all(r["allreduces_per_step"] == 2 * 30 + 1 and r["allreduce_us"] > 0 for r in rows)


def test_tp_report_compares_one_machine(tmp_path, monkeypatch):
    import tp_report

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert tp_report.machine_rows() is None
    here = {"device": "NVIDIA H200", "date": "2026-12-01", "machine": "abcd1234"}
    old = {**here, "machine": "00000000"}
    mem = {"gpu0_weights_gib": 7.5, "gpu0_load_peak_gib": 8.5}
    tput = [
        {**old, "engine": "mini_infer", "tensor_parallel_size": 2, "tokens_per_s": 1.0, **mem},
        {**here, "engine": "mini_infer", "tensor_parallel_size": 1, "tokens_per_s": 9000.0, **mem},
        {**here, "engine": "mini_infer", "tensor_parallel_size": 2, "tokens_per_s": 15300.0, **mem},
        {**here, "engine": "vllm", "tensor_parallel_size": 1, "tokens_per_s": 9500.0},
    ]
    lat = [
        {**here, "engine": "mini_infer", "tensor_parallel_size": 1, "ms_per_token": 4.8},
        {**here, "engine": "mini_infer", "tensor_parallel_size": 2, "ms_per_token": 3.2},
    ]
    allreduce = [
        {
            **here,
            "batch": 1,
            "hidden_size": 4096,
            "bytes": 8192,
            "world_size": 2,
            "allreduce_us": 20.0,
            "graph_allreduce_us": 8.0,
            "allreduces_per_step": 65,
            "step_us_graph": 520.0,
        },
    ]
    for name, rows in (("tp_throughput", tput), ("tp_latency", lat), ("tp_allreduce", allreduce)):
        rows = [{"model": "llama3-8b", **r} for r in rows]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = tp_report.machine_rows()
    text = "\n".join(tp_report.table(found))
    assert "| Mini-Infer | 2 | 15,300 | 1.70x | 3.20 | 1.50x | 7.5 / 8.5 GiB |" in text
    assert "| vLLM | 1 | 9,500 | 1.00x | - | - | - |" in text
    assert "a decode step's 65: 0.52 ms" in text and "machine abcd1234" in text
    tp_report.plot(found, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_spec_decode_benchmark_exits_cleanly_without_a_gpu():
    result = run(sys.executable, "benchmarks/benchmark_spec_decode.py")
    assert result.returncode == 0, result.stderr
    assert "benchmark_spec_decode.py measures a GPU; none is visible here." in result.stdout


@pytest.mark.slow
def test_spec_decode_benchmark_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "spec_decode.jsonl"
    result = run(
        sys.executable,
        "benchmarks/benchmark_spec_decode.py",
        "--smoke",
        "--only",
        "rewrite",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["workload"], r["setting"]) for r in rows] == [
        ("rewrite", "plain"),
        ("rewrite", "ngram"),
    ]
    assert all(r["device"] and r["date"] and r["torch"] for r in rows)
    assert rows[1]["spec_decode_metrics"]["num_accepted_tokens"] > 0
    assert "speedup" in result.stdout and "same tokens: True" in result.stdout


def test_profiles_other_than_the_default_have_their_own_files_and_stay_out_of_the_readme(
    tmp_path, monkeypatch
):
    import profile_step
    import report

    def path(*flags):
        return profile_step.output_path(profile_step.parser().parse_args(flags)).name

    llama = ("--model", "llama3-8b")
    assert path(*llama) == "profile_llama3-8b.json"
    assert path(*llama, "--engine", "vllm") == "profile_llama3-8b_vllm.json"
    assert (
        path(*llama, "--tensor-parallel-size", "2", "--batch", "1")
        == "profile_llama3-8b_tp2_bs1.json"
    )
    assert (
        path(*llama, "--tensor-parallel-size", "2", "--custom-all-reduce", "--sync-scheduling")
        == "profile_llama3-8b_tp2_oneshot_sync.json"
    )
    # the other engine options of the benchmarks, away from their defaults
    assert path(*llama, "--enforce-eager") == "profile_llama3-8b_eager.json"
    assert (
        path(*llama, "--max-num-seqs", "512", "--max-num-batched-tokens", "16384")
        == "profile_llama3-8b_seqs512_tokens16384.json"
    )
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    for name in ("profile_llama3-8b.json", "profile_llama3-8b_vllm.json"):
        (tmp_path / name).write_text(json.dumps({"model": "llama3-8b", "name": name}))
    assert [p["name"] for p in report.profiles()] == ["profile_llama3-8b.json"]
    assert profile_step.category("reshape_and_cache_flash_kernel") == "KV store"
    assert profile_step.category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all-reduce"


def test_profile_step_counts_what_each_kernel_adds_to_the_busy_time():
    """Under PDL a kernel starts early and waits inside itself: it counts from the end of the one before;
    one inside another's interval adds nothing; the sum is the union's length; a gap goes to the kernel
    that ended last and the one that starts after it."""
    import profile_step

    kernels = [(7.0, 9.0, "c"), (0.0, 2.0, "a"), (1.0, 4.5, "b"), (1.5, 1.75, "a"), (6.0, 7.5, "b")]
    busy, idle = profile_step.exposed(kernels)
    assert busy == {"a": 2.0, "b": 2.5 + 1.5, "c": 1.5}
    assert sum(busy.values()) == 2.0 + 2.5 + 3.0  # [0, 4.5] and [6, 9]
    assert idle == {("b", "b"): 1.5}  # from b's end at 4.5 to the next b's start at 6
    assert profile_step.exposed([]) == ({}, {})
