#!/bin/sh
# The Triton image's install step (deploy/triton/Dockerfile), also replayed by the tests in a
# Python 3.10 of their own (tests/test_triton_image.py): the by_key models' store libraries,
# exactly as locked (hashes, no dependency resolved here), into a directory of their own that
# PYTHONPATH puts before the image's own packages.
#   install.sh PYTHON REQUIREMENTS TARGET
set -eu
python=$1
requirements=$2
target=$3
"$python" -m pip install --no-cache-dir --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --target "$target" -r "$requirements"
