#!/usr/bin/env bash
# Chapter 9 on a machine with 2 GPUs (issue 17): the 2-GPU tests, the all-reduce latency of a decode
# step, Mini-Infer and vLLM on Llama-3-8B's shape (dummy weights, the nano-vllm protocol) with
# tensor_parallel_size 1 and 2. Every step has a timeout; a failing step is reported and the next runs.
#
#   OUT=DIR bash benchmarks/tp_session.sh [STEP ...]      # steps: setup tests allreduce mini vllm
#
# Default: every step, in that order. Rows are appended to $RESULTS (/tmp/tp_results, which lasts while
# the machine stays warm, so that two calls can share it) and copied to $OUT/results after every step,
# with the step's log in $OUT/logs/STEP.txt. At home: copy $OUT/results/tp_*.jsonl to benchmarks/results/
# and run `python benchmarks/tp_report.py` (Chapter 9's table and plot).
#
# Needs: python3 with torch (and NCCL); `gguf` importable or its wheel in .whl/ (carried); for vLLM the
# kit's folders in $KIT (/tmp/kit), installed into /tmp/site by the setup step when not there yet.
# Device time on 2 H200s, estimated from the single-GPU runs (one engine start-up each): setup 0.5-1 min,
# tests 1.5 min, allreduce 0.5 min, mini 3-4 min (two engines), vllm 4-5 min (two engines, 60-100 s of
# start-up each); in two calls of at most 10 minutes: `setup tests allreduce mini`, then `vllm`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?name the output folder in \$OUT}
RESULTS=${RESULTS:-/tmp/tp_results}
KIT=${KIT:-/tmp/kit}
MODEL=${MODEL:-llama3-8b}
SIZES=${SIZES:-1 2}
PY=${PYTHON:-python3}
export VLLM_SITE=${VLLM_SITE:-/tmp/site}
export PYTHONPATH="$PWD:$VLLM_SITE${PYTHONPATH:+:$PYTHONPATH}"  # mini_infer from this tree first
# NVLink multicast off in every process (the machine's rule; benchmarks/common.py sets them as well)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_ALLREDUCE_USE_SYMM_MEM=0
mkdir -p "$OUT/logs" "$OUT/results" "$RESULTS"
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(setup tests allreduce mini vllm)
status=0

# run SECONDS LOG COMMAND...: the command under a timeout, its output appended to $OUT/logs/LOG.txt
run() {
    local limit=$1 log=$2 t=$SECONDS rc
    shift 2
    echo "== $* (limit ${limit} s)" | tee -a "$OUT/logs/$log.txt"
    timeout -k 15 "$limit" "$@" >>"$OUT/logs/$log.txt" 2>&1
    rc=$?
    echo "== exit $rc after $((SECONDS - t)) s" | tee -a "$OUT/logs/$log.txt"
    # timeout stops the command, not the processes it started (vLLM's engine core and workers, left
    # holding 130 GB of each GPU after a timed-out start on the first visit): after a timeout, end
    # whatever still uses a GPU (this script assumes the lent machine is ours alone)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
    fi
    [ $rc -eq 0 ] || status=1
    cp "$RESULTS"/*.jsonl "$OUT/results/" 2>/dev/null
    return $rc
}

for step in "${STEPS[@]}"; do
    case $step in
    setup)
        run 60 setup bash -c 'nvidia-smi -L; nvidia-smi topo -m; '"$PY"' -c "import torch; print(torch.__version__, torch.cuda.device_count(), \"GPUs, NCCL\", torch.cuda.nccl.version())"'
        if ! "$PY" -c "import gguf" 2>/dev/null; then
            run 60 setup "$PY" -m pip install -q --no-index --no-deps --target "$VLLM_SITE" .whl/*.whl
        fi
        if [ ! -d "$VLLM_SITE/vllm" ] && [ -f "$KIT/.vk7/install.sh" ]; then
            run 180 setup env KIT="$KIT" bash "$KIT/.vk7/install.sh"
        fi ;;
    tests)  # the 2-GPU tests: fp32 tokens equal (sync, async), bf16 within the top 3, close() and memory
        run 400 tests "$PY" -m pytest -q -o addopts="" -p no:cacheprovider -k two_gpus \
            tests/test_tensor_parallel.py ;;
    allreduce)
        run 180 allreduce "$PY" benchmarks/allreduce_latency.py --model "$MODEL" \
            --out "$RESULTS/tp_allreduce.jsonl" ;;
    mini)  # each size with NCCL's all-reduce, then each size > 1 with the one-shot all-reduce
        for tp in $SIZES; do
            run 420 mini "$PY" benchmarks/benchmark_tp.py --model "$MODEL" --tensor-parallel-size "$tp" \
                --quiet --throughput-out "$RESULTS/tp_throughput.jsonl" \
                --latency-out "$RESULTS/tp_latency.jsonl"
        done
        for tp in $SIZES; do
            [ "$tp" -gt 1 ] || continue
            run 420 mini "$PY" benchmarks/benchmark_tp.py --model "$MODEL" --tensor-parallel-size "$tp" \
                --custom-all-reduce --quiet --throughput-out "$RESULTS/tp_throughput.jsonl" \
                --latency-out "$RESULTS/tp_latency.jsonl"
        done ;;
    vllm)  # with several GPUs, NCCL's all-reduce: vLLM's own stalled in graph capture on the first visit
        for tp in $SIZES; do
            run 420 vllm "$PY" benchmarks/compare_vllm.py --model "$MODEL" --tensor-parallel-size "$tp" \
                $([ "$tp" -gt 1 ] && echo --disable-custom-all-reduce) \
                --throughput-out "$RESULTS/tp_throughput.jsonl" --latency-out "$RESULTS/tp_latency.jsonl"
        done ;;
    *)
        echo "unknown step $step (setup tests allreduce mini vllm)" >&2
        exit 2 ;;
    esac
done
# Nothing may be left behind: python processes still running, and the GPUs' memory in use.
{ ps -eo pid,ppid,etime,args | grep -E "[p]ython" ; nvidia-smi --query-gpu=index,memory.used --format=csv; } \
    >"$OUT/logs/left_behind.txt" 2>&1
cat "$OUT/logs/left_behind.txt"
exit $status
