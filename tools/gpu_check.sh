#!/usr/bin/env bash
# The checks of a machine with a GPU, in one command (docs/benchmarks.md, "GPU"):
#
#   bash tools/gpu_check.sh [OUT]    # OUT: where the logs and benchmark.json go (runs/gpu_check)
#
# 1. the machine: nvidia-smi, torch and torchvision versions;
# 2. the CUDA tests (python -m pytest -m cuda: tests/test_cuda.py);
# 3. python tools/benchmark.py --sections gpu (iteration speed-ups over torchvision's
#    RetinaNets, the training loop's images/s, peak memory);
# 4. the host side of an iteration on the CPU (tools/hostcost.py), for comparison.
#
# It uses the machine's python3 (PYTHON=... chooses another) with this checkout on PYTHONPATH,
# stops at once when that python sees no CUDA device, and generates the built-in dataset when
# data/shapes is missing (about 10 s). Packages that python lacks (on a bare PyTorch image:
# pycocotools, albumentations and its dependencies) can come as wheels in .whl/, installed into
# /tmp/incdet-site; fetch them where pip reaches an index, for that machine's Python version
# (3.12 below):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pycocotools albumentations albucore pydantic pydantic_core annotated-types \
#       typing-inspection stringzilla simsimd
#
# Exit status: 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/incdet-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/incdet-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
{
    nvidia-smi || true
    "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())"
} > "$out/machine.txt" 2>&1 || status=1
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $py sees no CUDA device (see $out/machine.txt); nothing to check" >&2
    exit 2
fi
[ -d data/shapes ] || "$py" tools/make_dataset.py --out data/shapes > /dev/null || status=1
"$py" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/cuda_tests.txt" || status=1
"$py" tools/benchmark.py --sections gpu --out "$out" 2>&1 | tee "$out/benchmark.txt" || status=1
"$py" tools/hostcost.py --iters 7 > "$out/hostcost.json" 2> "$out/hostcost.log" || status=1
echo "gpu_check: status $status; logs in $out"
exit $status
