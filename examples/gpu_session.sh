#!/usr/bin/env bash
# The GPU checks of issue 26 as one command, for a session lent a GPU machine (which has torch,
# transformers and accelerate but not diffusers, tgate or DeepCache, and reaches no network).
#
#   bash examples/gpu_session.sh prepare    # here: fetch the missing wheels into .whl/ (git-ignored)
#   bash examples/gpu_session.sh run        # there (the device tool's `run`, carry [".whl"]),
#                                           # with $OUT set: everything it measures lands in $OUT
#
# `run` takes at most 9 minutes (run it with timeout_s 600): examples/benchmark_gpu.py within its
# --budget, then the CUDA-only tests; each benchmark row is written to $OUT/table.md as soon as it
# is measured, so a run stopped at its limit still brings back what it measured. Compiling is the
# unknown: each row's line says how long its warm-up (which compiles) took.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # the test extra's versions (pyproject.toml); importlib_metadata 8.x needs only zipp, which is there
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d .whl diffusers==0.42.1 tgate==1.0.0 DeepCache==0.1.1 importlib_metadata==8.7.0
    ;;
run)
    : "${OUT:?set OUT to the folder that comes back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    python3 -c "import torch, diffusers, transformers, tgate; print(torch.__version__, diffusers.__version__, \
transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
    # the benchmark first (its rows are the issue's table), then the CUDA-only tests; about 9 minutes
    timeout 380 python3 examples/benchmark_gpu.py --budget 300 --out "$OUT/table.md" 2>&1 \
        | grep -v "it/s\]" > "$OUT/benchmark.log"
    timeout 180 python3 -m pytest -q -p no:cacheprovider -k "cuda_graphs and not sdxl or on_the_gpu" \
        tests/core/test_static_caches.py tests/stable_diffusion/test_pipeline_habits.py 2>&1 | tee "$OUT/cuda_tests.log"
    tail -n 60 "$OUT/benchmark.log"
    ;;
*)
    echo "usage: bash examples/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
