#!/usr/bin/env bash
# The race of issue 6 on one GPU machine: Mini-Infer against vLLM (and Hugging Face transformers) on the
# same card on the same day, every row appended to benchmarks/results/{throughput,latency}.jsonl, then
# the side-by-side table of this device's rows of today (benchmarks/summarize.py).
#
#   bash benchmarks/race.sh [MODEL ...]                 # Mini-Infer and vLLM; default: all three models
#   ENGINES=hf bash benchmarks/race.sh [MODEL ...]      # HF transformers only, on the first $HF_SEQS requests
#
# Per model, in this order: Mini-Infer throughput; for each of $VLLM_BACKENDS (default "auto TRITON_ATTN";
# auto = vLLM's choice, FlashAttention 3 on an H100) vLLM throughput then vLLM batch-1 latency in the same
# engine (one 60-100 s start-up serves both); Mini-Infer batch-1 latency. vLLM comes from this python3 or
# from $VLLM_SITE (/tmp/site), installed first from $KIT/.vk7/install.sh (/tmp/kit) when that is there.
# Mini-Infer's steps must succeed; a failing vLLM or HF step is reported and the race goes on.
#
# Wall time on an H100, estimated from the reference start-up times: SmolLM2 ~4 min, Qwen3 ~4.5 min,
# Llama-3-8B ~5.5 min with both vLLM backends (about 1.5 min less each with one); HF with HF_SEQS=32
# about 5 min for the three. So give one model per command where a command may run 10 minutes.
# Environment: PYTHON (python3), ENGINES ("mini_infer vllm"; add or give "hf"), VLLM_BACKENDS, HF_SEQS (32),
# REPEAT (1): timed throughput runs per engine start, a row each (summarize.py compares each engine's best).
set -euo pipefail
if [[ " $* " == *" -h "* || " $* " == *" --help "* ]]; then  # the comment above is the usage
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENGINES=${ENGINES:-mini_infer vllm}
VLLM_BACKENDS=${VLLM_BACKENDS:-auto TRITON_ATTN}
HF_SEQS=${HF_SEQS:-32}
REPEAT=${REPEAT:-1}
KIT=${KIT:-/tmp/kit}
export VLLM_SITE=${VLLM_SITE:-/tmp/site}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # mini_infer from this tree
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(smollm2-135m qwen3-0.6b llama3-8b)

step() { local t=$SECONDS; echo "== $*"; "$@" || return; echo "== $((SECONDS - t)) s"; }
optional() { step "$@" || echo "race.sh: optional step failed (exit $?), going on: $*" >&2; }
racing() { [[ " $ENGINES " == *" $1 "* ]]; }

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "race.sh races on a GPU; none is visible here."
    exit 0
fi
if racing vllm && [ ! -d "$VLLM_SITE/vllm" ] && [ -f "$KIT/.vk7/install.sh" ]; then
    optional env KIT="$KIT" bash "$KIT/.vk7/install.sh"
fi

for model in "${MODELS[@]}"; do
    if racing mini_infer; then
        step "$PY" benchmarks/benchmark_throughput.py --model "$model" --quiet --repeat "$REPEAT"
    fi
    if racing vllm; then
        for backend in $VLLM_BACKENDS; do
            optional "$PY" benchmarks/compare_vllm.py --model "$model" --repeat "$REPEAT" \
                $([ "$backend" = auto ] || echo --attention-backend "$backend")
        done
    fi
    if racing mini_infer; then step "$PY" benchmarks/benchmark_latency.py --model "$model"; fi
    if racing hf; then optional "$PY" benchmarks/compare_hf.py --model "$model" --num-seqs "$HF_SEQS"; fi
done
"$PY" benchmarks/summarize.py
