#!/usr/bin/env bash
# Fails when a source includes a folder above its own: runtime <- engine <- {cluster, http} <-
# actors <- cli (design.md §2), and inside engine/ (one library per folder, engine/CMakeLists.txt)
# model <- {kv, comm, tokenizer, sampling}, tokenizer <- grammar,
# {model, kv, comm, sampling} <- backend <- exec <- scheduler (+ grammar).
# tests/ and bench/ may include anything. Prints each violation.
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A allowed=(
  [runtime]="runtime"
  [engine]="runtime engine"
  [cluster]="runtime engine cluster"
  [http]="runtime engine http"
  [actors]="runtime engine cluster http actors"
  [cli]="runtime engine cluster http actors cli"
  [engine/model]="model"
  [engine/kv]="kv"
  [engine/sampling]="sampling"
  [engine/comm]="comm model"
  [engine/tokenizer]="tokenizer model"
  [engine/grammar]="grammar tokenizer model"
  [engine/backend]="backend model kv comm sampling"
  [engine/exec]="exec backend model kv comm sampling"
  [engine/scheduler]="scheduler exec backend model kv comm sampling grammar tokenizer"
)
bad=0
for folder in "${!allowed[@]}"; do
  # Top-level folders are checked on their first path part, engine/'s folders on the second.
  prefix=""
  [[ $folder == engine/* ]] && prefix="engine/"
  while IFS=: read -r file line inc; do
    target=${inc#*\"$prefix}
    target=${target%%/*}
    if [[ " ${allowed[$folder]} " != *" $target "* ]]; then
      echo "layering: $file:$line: $folder/ may not include \"${inc#*\"}" >&2
      bad=1
    fi
  done < <(grep -rnE "^#include \"$prefix[a-z_]+/" "$folder" --include='*.[ch]pp' --include='*.cu' \
             --include='*.cuh' || true)
done
if [ "$bad" -ne 0 ]; then
  echo "layering: includes must point one way (see the top of scripts/check_layers.sh)" >&2
  exit 1
fi
echo "layering: ok"
