#!/usr/bin/env bash
# One-shot check of the GPU path for the first lent GPU (about 8 minutes on one H100, each step
# time-boxed): the CUDA-only tests; `python -m bench.gpu` at 7B shapes, fp16, a short answer; the
# whole pipeline at 7B shapes with random weights (`python -m bench.gpu_check`: graph captured and
# reused, static = dynamic tokens, a 4-scale sweep, ms/token vs the bandwidth limit, peak memory;
# on >= 2 GPUs the device-map split, and the cuda:1 test among the CUDA tests); `python -m bench.api` at
# 7B shapes: 8 clients at once through the OpenAI-compatible API vs one after another.
#
#   bash bench/gpu_check.sh            # on a GPU machine
#   bash bench/gpu_check.sh --smoke    # CPU, tiny shapes, well under a minute (also GPU_CHECK_SMOKE=1)
#
# Results go under $OUT (default: a new temp folder): one log per step, steps.txt, gpu_check.md/.json
# and bench_gpu.md. Exit status 0 only when every step passed.
set -u
cd "$(dirname "$0")/.."
smoke="${GPU_CHECK_SMOKE:-0}"
[ "${1:-}" = "--smoke" ] && smoke=1
OUT="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
status=0

step() {    # step NAME SECONDS COMMAND...: run it time-boxed, log it, remember a failure
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (at most ${limit} s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(($(date +%s) - start)) s" | tee -a "$OUT/steps.txt"
    tail -n 30 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

if [ "$smoke" = 1 ]; then
    export OMP_NUM_THREADS=1
    step bench_gpu 60 python3 -m bench.gpu --device cpu --tiny --tokens 3 --repeats 1 --audio 2 --threads 1 \
        --results "$OUT/bench_gpu.md"
    step pipeline 60 python3 -m bench.gpu_check --device cpu --tiny --tokens 4 --audio 2 --threads 1 --out "$OUT"
    step api 60 python3 -m bench.api --shape tiny --device cpu --clients 3 --tokens 4 --clip 2 --threads 1 \
        --results "$OUT/bench_api.md"
else
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    step cuda_tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_path.py \
        tests/test_speed.py::test_decode_loop_has_no_device_syncs_on_cuda tests/test_fbank.py::test_cuda_matches_cpu
    step bench_gpu 200 python3 -m bench.gpu --shapes 7b --dtypes fp16 --tokens 32 --repeats 2 \
        --results "$OUT/bench_gpu.md"
    step pipeline 150 python3 -m bench.gpu_check --shape 7b --dtype fp16 --tokens 64 --out "$OUT"
    step api 100 python3 -m bench.api --shape 7b --device cuda --dtype fp16 --clients 8 --tokens 64 --clip 10 \
        --results "$OUT/bench_api.md"
fi
echo "results in $OUT"
exit "$status"
