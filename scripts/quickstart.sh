#!/usr/bin/env bash
# The quickstart: RTN vs OmniQuant at W4A16g128 and W3A16 on the bundled LLaMA nano model
# (experiments/configs/quickstart.yaml), on the CPU when no GPU is visible. Builds omniq if needed,
# runs the sweep into runs/quickstart/ and prints its table. A few minutes on two cores, build excluded.
# Rerunning skips finished points (delete runs/quickstart to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if [ -f build/CMakeCache.txt ]; then
  build=build; cuda=()                               # reuse the main build (scripts/test.sh makes it)
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  build=build; cuda=()                               # a GPU: the full build (CUDA when nvcc is there)
else
  build=build-quickstart; cuda=(-DOMNIQ_CUDA=OFF)    # no GPU: CPU only, much faster to compile
fi
./scripts/install_deps.sh
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || { echo "quickstart: '$tool' is missing; run ./scripts/test.sh once (it installs the build dependencies)" >&2; exit 1; }
done
if [ ! -f "$build/CMakeCache.txt" ]; then
  echo "== configuring $build"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIQ_TESTS=OFF -DOMNIQ_BENCH=OFF "${cuda[@]}" >/dev/null
fi
echo "== building omniq in $build (incremental: nothing to do when it is up to date)"
cmake --build "$build" -j "$(nproc)" --target omniq_cli
omniq=$build/omniq

echo "== $omniq sweep experiments/configs/quickstart.yaml"
"$omniq" sweep experiments/configs/quickstart.yaml
