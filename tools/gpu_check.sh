#!/usr/bin/env bash
# GPU validation of obsdiff's deployment path on one NVIDIA GPU with PyTorch and no internet:
# what each quantized format buys (GEMMs and one transformer block at SD3-Medium and Flux width: bf16 dense,
# 2:4 bf16, INT8, 2:4 INT8, FP8, 2:4 FP8), then an SD3-shaped denoiser (hidden 1536, bf16, random weights) dense
# vs 2:4 vs structured 30 %, timed with PyTorch eager, 2:4 sparse tensor cores (torch.sparse.to_sparse_semi_structured),
# torch.compile and TensorRT where installed. Under 8 minutes on an H100. Results: $OUT/gpu_check_quant.json and
# $OUT/gpu_check.json (+ .md each).
#
#   tools/gpu_check.sh                  # on the GPU machine; OUT=DIR or --out DIR sets where results go
#   tools/gpu_check.sh --quant-only     # the format section alone (~1 min; needs no diffusers)
#   tools/gpu_check.sh --dry-run        # tiny sizes, CPU backends only (what the test suite runs)
#   WHEELS=DIR tools/gpu_check.sh       # install missing pure-Python packages from DIR first [tools/wheels]
#
# The GPU machine has torch, transformers, onnx and onnxruntime but no diffusers and no internet, so the
# missing packages travel as wheels. Build the folder on a machine with PyPI access (Python 3.12 wheels):
#
#   pip download --dest tools/wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
#       diffusers click tqdm safetensors
#
# (about 37 MB with their dependencies, numpy and pillow included, under the 64 MiB a run may carry; add
# "transformers>=5" if the machine's transformers is older). obsdiff itself is not installed: this
# checkout is imported directly when no obsdiff is installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-tools/wheels}

needs_diffusers=1
for arg in "$@"; do
    if [ "$arg" = "--quant-only" ]; then needs_diffusers=0; fi  # the format section is torch alone
done

if [ "$needs_diffusers" = 1 ] && [ -d "$WHEELS" ] && ! "$PYTHON" -c "import diffusers, click" 2>/dev/null; then
    echo "installing missing packages from $WHEELS (no index)"
    # only what is missing: pip keeps installed packages that satisfy the requirements
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" diffusers click tqdm safetensors
fi
if [ "$needs_diffusers" = 1 ] && ! "$PYTHON" -c "import diffusers, click" 2>/dev/null; then
    echo "error: diffusers and click are needed; put their wheels in $WHEELS (see the header of $0)" >&2
    exit 2
fi

args=("$@")
if [ -n "${OUT:-}" ] && [[ " $* " != *" --out "* ]]; then
    args+=(--out "$OUT")
fi
exec "$PYTHON" tools/gpu_check.py "${args[@]}"
