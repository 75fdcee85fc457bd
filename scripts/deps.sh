#!/usr/bin/env bash
# Installs troupe's build and test dependencies from Debian 12 packages (design.md §9).
# Idempotent: asks apt only for what is missing; used by both README commands.
# `deps.sh --fuzz` also installs clang 14 and its libFuzzer runtime (scripts/fuzz.sh).
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git python3 python3-venv
  libcaf-dev libssl-dev libboost-dev libmsgpack-cxx-dev libfmt-dev doctest-dev libyaml-cpp-dev
  nlohmann-json3-dev libpcre2-dev libutf8proc-dev libcli11-dev libgloo-dev
  libibverbs-dev librdmacm-dev libfabric-dev libfabric-bin clang-format
  iproute2
)
if [ "${1:-}" = "--fuzz" ]; then
  packages+=(clang-14 libclang-rt-14-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} > 0)); then
  echo "deps: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# xgrammar's C++ core (structured output), built from its PyPI sdist once per machine.
"$(dirname "$0")/fetch_xgrammar.sh" >/dev/null
