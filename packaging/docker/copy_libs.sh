#!/usr/bin/env bash
# Copies the shared libraries BINARY needs into DIR, except the C/C++ runtime, the loader and
# CUDA's own (which the base image provides). Usage: copy_libs.sh BINARY DIR
set -euo pipefail
bin="$1" dir="$2"
mkdir -p "$dir"
ldd "$bin" | awk '/=> \//{print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*|libdl.so*|librt.so*) ;;
    libcuda.so*|libcudart*|libcublas*|libnccl*|libnvidia*) ;;
    *) cp -nL "$lib" "$dir/" ;;
  esac
done
