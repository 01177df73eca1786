#!/usr/bin/env bash
# Download benchmarks/gpu/wheels.txt as CPython 3.12 x86-64 wheels into .whl/ (git-ignored through
# .git/info/exclude), for the GPU machine, which reaches no package registry.  Run once, here.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
mkdir -p .whl
grep -v '^#' benchmarks/gpu/wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl
ls .whl
