#!/usr/bin/env bash
# The wheels the device image lacks, for its Python 3.12, into .whl/ (git-ignored), to carry to a lent GPU machine.
#
#   bash benchmarks/gpu_wheels.sh          # here, before the device run (needs PyPI, about 5 MiB)
#
# The image (/work/.library/device/KINDS.md) has torch, accelerate, transformers, safetensors, timm, torchmetrics,
# scipy, scikit-image and the rest the benchmarks import, but not diffusers (nor importlib_metadata, which diffusers
# needs). Both are pure-Python wheels. The packages the benchmarks never import (tiffslide, shapely, openpyxl,
# torch-fidelity, the offline EfficientNet / MiniLM weights) stay behind: benchmarks/gpu_session.sh runs the
# histosynth tree from src/ without installing it.
set -euo pipefail
cd "$(dirname "$0")/.."
diffusers=$(python3 -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null \
            || .venv/bin/python -c 'import diffusers; print(diffusers.__version__)')
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl "diffusers==$diffusers" importlib_metadata
ls -l .whl
