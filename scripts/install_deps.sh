#!/usr/bin/env bash
# Installs the Debian packages omniq builds with, when missing (needs root; otherwise lists them).
set -euo pipefail
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
    echo "== missing packages (install them, or run as root): ${need[*]}" >&2
  fi
fi
