#!/usr/bin/env bash
# The test command: installs missing Debian packages, configures (with CUDA when nvcc is present),
# builds and runs ctest. Extra arguments go to ctest (e.g. -L cpu, -R Tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

need=()
for pkg in cmake ninja-build g++ libgtest-dev libyaml-cpp-dev libhdf5-dev hdf5-tools nlohmann-json3-dev libopenblas-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "== missing packages (install them or run as root): ${need[*]}" >&2
  fi
fi

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

build=${OMNIQ_BUILD_DIR:-build}
jobs=${OMNIQ_JOBS:-$(nproc)}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${OMNIQ_CMAKE_ARGS:-}
cmake --build "$build" -j "$jobs"
cd "$build"
ctest --output-on-failure -j "$jobs" "$@"
