#!/usr/bin/env bash
# Chapter 9's scaling run, on one machine with enough GPUs: a model (dummy weights) on the nano-vllm
# protocol with each tensor_parallel_size given, throughput then batch-1 latency, the rows appended to
# benchmarks/results/tp_{throughput,latency}.jsonl, which Chapter 9 shows side by side.
#
#   bash benchmarks/tensor_parallel.sh [MODEL [SIZE ...]]     # default: llama3-8b 1 2
#
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${1:-llama3-8b}
SIZES=("${@:2}")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(1 2)
export NCCL_NVLS_ENABLE=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # mini_infer from this tree
for tp in "${SIZES[@]}"; do
    echo "== $MODEL, tensor_parallel_size $tp"
    "$PY" benchmarks/benchmark_throughput.py --model "$MODEL" --tensor-parallel-size "$tp" --quiet \
        --out benchmarks/results/tp_throughput.jsonl
    "$PY" benchmarks/benchmark_latency.py --model "$MODEL" --tensor-parallel-size "$tp" \
        --out benchmarks/results/tp_latency.jsonl
done
