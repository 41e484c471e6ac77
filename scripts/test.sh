#!/usr/bin/env bash
# The test command: installs missing Debian packages, configures (with CUDA when nvcc is present),
# builds and runs ctest. Extra arguments go to ctest (e.g. -L cpu, -R Tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

./scripts/install_deps.sh

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

build=${OMNIQ_BUILD_DIR:-build}
jobs=${OMNIQ_JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${OMNIQ_CMAKE_ARGS:-}
cmake --build "$build" -j "$jobs"
cd "$build"
ctest --output-on-failure -j "$jobs" "$@"
