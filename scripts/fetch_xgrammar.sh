#!/usr/bin/env bash
# Builds xgrammar's C++ core (the constrained-decoding engine: JSON schema, regex, EBNF grammars ->
# per-step token masks) once per machine and prints its install prefix (include/ + lib/libxgrammar.a);
# later runs only print it. xgrammar is not packaged in Debian: its PyPI source distribution carries
# the C++ sources, so pip fetches that sdist (pinned by version and sha256) and CMake compiles the
# static library with the Python bindings off, in Release (outside our sanitizer flags), without LTO
# (so linking troupe does not redo its code generation). Nothing of it is copied into the repository.
# Cache: $TROUPE_CACHE, default ~/.cache/troupe; keyed by version. Called by scripts/deps.sh.
set -euo pipefail
version=0.2.9
sha256=87b466bca2475e29bb0323abc62c6c33cbcbcff47e5fb800a3e2099ac9620b90
prefix="${TROUPE_CACHE:-$HOME/.cache/troupe}/xgrammar-$version"

if [ ! -f "$prefix/lib/libxgrammar.a" ] || [ ! -f "$prefix/include/xgrammar/xgrammar.h" ]; then
  echo "fetch_xgrammar: building xgrammar==$version (C++ core, static) into $prefix" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then # Debian's python3 has no pip; a venv does
    python3 -m venv "$tmp/venv"
    pip=("$tmp/venv/bin/pip")
  fi
  # --no-binary: the sdist, not a wheel; its build requirements may come as wheels.
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --no-binary xgrammar \
    -d "$tmp" "xgrammar==$version" >&2
  sdist="$tmp/xgrammar-$version.tar.gz"
  if ! echo "$sha256  $sdist" | sha256sum --check --quiet >&2; then
    echo "fetch_xgrammar: xgrammar-$version.tar.gz has an unexpected sha256" >&2
    exit 1
  fi
  tar -xzf "$sdist" -C "$tmp"
  # The sdist's cmake/config.cmake turns the Python bindings on (they need nanobind and tvm_ffi); a
  # config.cmake in the build folder takes its place.
  mkdir -p "$tmp/build"
  printf 'set(XGRAMMAR_BUILD_PYTHON_BINDINGS OFF)\nset(XGRAMMAR_BUILD_CXX_TESTS OFF)\n' >"$tmp/build/config.cmake"
  # xgrammar's CMakeLists puts -flto=auto and -Werror before CMAKE_CXX_FLAGS; ours come after and win.
  # ccache (when present) makes a rebuild after a wiped cache folder cheap, as for troupe itself.
  launcher=()
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    export CCACHE_BASEDIR="$tmp" CCACHE_NOHASHDIR=true
  fi
  cmake -S "$tmp/xgrammar-$version" -B "$tmp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
    -DCMAKE_CXX_FLAGS="-fno-lto -Wno-error" -DCMAKE_INSTALL_PREFIX="$prefix.part" \
    -DCMAKE_INSTALL_LIBDIR=lib >&2
  cmake --build "$tmp/build" -j "$(nproc)" >&2
  rm -rf "$prefix.part"
  cmake --install "$tmp/build" >&2
  # Kept: the library and its public headers (plus dlpack's, which they include).
  rm -rf "$prefix"
  mv "$prefix.part" "$prefix"
fi
echo "$prefix"
