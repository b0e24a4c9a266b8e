#!/usr/bin/env bash
# Prepare .whl/: the Python packages the GPU machine's image lacks, as wheels for its Python 3.12
# (benchmarks/gpu_check.sh installs them into /tmp/site there; the device tool carries .whl with
# carry=[".whl"]). Run once, here, in the checkout's root (.gitignore has /.whl/). What is missing
# there (benchmarks/README.md, "GPU check"): diffusers. Its requirements are on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=${DIFFUSERS_VERSION:-0.42.1}
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl "diffusers==$DIFFUSERS"
ls -l .whl
