#!/usr/bin/env bash
# Builds the release binaries and bundles them with the non-system shared libraries they need
# (CAF, fmt, yaml-cpp, ...) into dist/troupe/{bin,lib}; binaries find lib/ through RPATH
# $ORIGIN/../lib. The CUDA backend is the plugin lib/libtroupe_cuda.so, loaded only when a GPU is
# asked for: `cluster` itself links no CUDA library. CUDA, cuBLAS(Lt) and NCCL are NOT bundled:
# the target's own CUDA 13 runtime, cuBLASLt and NCCL 2.x are used. With the golden data beside
# the checkout, the bundle is then run with every CUDA library hidden (tests/serve/no_cuda.py).
# Usage: scripts/bundle.sh [extra targets...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cmake --preset release >/dev/null
targets=(cluster "$@")
cmake --build --preset release --target "${targets[@]}"
out=dist/troupe
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for t in "${targets[@]}"; do
  bin=$(find build/release -type f -name "$t" -perm -u+x | head -n 1)
  cp "$bin" "$out/bin/"
  # Every resolved dependency except the C/C++ runtime, the loader and CUDA's own libraries.
  ./packaging/docker/copy_libs.sh "$bin" "$out/lib"
done
if [ -f build/release/lib/libtroupe_cuda.so ]; then # built when the CUDA toolkit and NCCL were found
  cp build/release/lib/libtroupe_cuda.so "$out/lib/"
  ./packaging/docker/copy_libs.sh build/release/lib/libtroupe_cuda.so "$out/lib"
fi
# Bundled libraries find each other in lib/ (a binary's RUNPATH does not reach its libraries'
# own dependencies, e.g. libgloo -> libhiredis).
if ! command -v patchelf >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends patchelf
fi
for lib in "$out"/lib/*; do
  chmod u+w "$lib"
  patchelf --set-rpath '$ORIGIN' "$lib"
done
cat > "$out/README.txt" <<TXT
troupe $(git describe --always --dirty 2>/dev/null || echo dev) for x86-64 Linux, built on Debian 12.
Needs on the target: glibc and libstdc++ as new as Debian 12's. CPU serving needs nothing more.
The CUDA backend (lib/libtroupe_cuda.so, loaded only when GPUs are looked for) needs an NVIDIA
driver and the CUDA 13 runtime, cuBLASLt 13 and NCCL 2.x on the library path (not bundled).
TXT
du -sh "$out"
if [ -f ../shared/golden/models/tiny-qwen3/config.json ]; then
  python3 tests/serve/no_cuda.py "$out/bin/cluster" ../shared/golden || [ $? -eq 77 ] # 77: skipped
fi
