#!/usr/bin/env bash
# Fuzzes the harnesses of fuzz/ with libFuzzer: builds the `fuzz` preset (clang 14, ASan +
# UBSan, build/fuzz), then runs each harness for SECONDS (default 10) from its checked-in seed
# corpus, adding what it discovers to build/fuzz/corpus/<harness>/ (kept between runs). Stops at
# the first crash, leak, hang (an input running over 30 s) or allocation over 2 GiB and leaves
# the input in build/fuzz/artifacts/<harness>/: fix the bug and copy the input into
# fuzz/corpus/<harness>/ (the fuzz_replay_<harness> tests replay it in every build).
#   scripts/fuzz.sh [SECONDS] [HARNESS...]     e.g. scripts/fuzz.sh 600 chat_template
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
shift || true
all=(http_request openai_request model_yaml config_json safetensors_header gguf_header
     tokenizer_json chat_template caf_message)
harnesses=("$@")
((${#harnesses[@]} > 0)) || harnesses=("${all[@]}")

./scripts/deps.sh --fuzz
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz --target "${harnesses[@]/#/fuzz_}"

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" UBSAN_OPTIONS="print_stacktrace=1"
for h in "${harnesses[@]}"; do
  corpus="build/fuzz/corpus/$h" artifacts="build/fuzz/artifacts/$h"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzz: $h for ${seconds} s"
  if ! "build/fuzz/fuzz/fuzz_$h" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
      -malloc_limit_mb=2048 -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/" \
      "$corpus" "fuzz/corpus/$h" 2>"build/fuzz/$h.log"; then
    tail -n 60 "build/fuzz/$h.log" >&2
    echo "fuzz: $h found a failing input: $(ls -t "$artifacts" | head -n 1)" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "build/fuzz/$h.log" |
    sed "s/^/fuzz: $h /"
done
echo "fuzz: ${#harnesses[@]} harnesses, no failure"
