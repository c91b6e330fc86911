#!/usr/bin/env bash
# Installs what shmalloc needs on Debian 12, from Debian's packages only.
# Skips apt entirely when everything is already there.
set -euo pipefail
packages=(g++ cmake ninja-build pkg-config libboost-dev libasio-dev doctest-dev
          prometheus-cpp-dev libcli11-dev libspdlog-dev libfmt-dev libtomlplusplus-dev
          nlohmann-json3-dev libxxhash-dev curl prometheus docker-compose
          docker.io debootstrap clang libclang-rt-14-dev llvm)  # docker.io, debootstrap: tools/docker-stack-test.sh; clang, libclang-rt-14-dev (libFuzzer, sanitizer runtimes), llvm (llvm-symbolizer): tools/fuzz.sh
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-debian: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
