#!/usr/bin/env bash
# Fails when a source includes a folder above its own: runtime <- engine <- {cluster, http} <-
# actors <- cli (design.md §2). tests/ and bench/ may include anything. Prints each violation.
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A allowed=(
  [runtime]="runtime"
  [engine]="runtime engine"
  [cluster]="runtime engine cluster"
  [http]="runtime engine http"
  [actors]="runtime engine cluster http actors"
  [cli]="runtime engine cluster http actors cli"
)
bad=0
for layer in "${!allowed[@]}"; do
  while IFS=: read -r file line inc; do
    target=${inc#*\"}
    target=${target%%/*}
    if [[ " ${allowed[$layer]} " != *" $target "* ]]; then
      echo "layering: $file:$line: $layer/ may not include \"${inc#*\"}" >&2
      bad=1
    fi
  done < <(grep -rnE '^#include "[a-z_]+/' "$layer" --include='*.[ch]pp' --include='*.cu' \
             --include='*.cuh' || true)
done
# Inside engine/, one library per folder (engine/CMakeLists.txt), in the same spirit.
declare -A engine_allowed=(
  [model]="model"
  [kv]="kv"
  [sampling]="sampling"
  [comm]="comm model"
  [tokenizer]="tokenizer model"
  [grammar]="grammar tokenizer model"
  [backend]="backend model kv comm sampling"
  [exec]="exec backend model kv comm sampling"
  [scheduler]="scheduler exec backend model kv comm sampling grammar tokenizer"
)
for sub in "${!engine_allowed[@]}"; do
  while IFS=: read -r file line inc; do
    target=${inc#*\"engine/}
    target=${target%%/*}
    if [[ " ${engine_allowed[$sub]} " != *" $target "* ]]; then
      echo "layering: $file:$line: engine/$sub/ may not include \"${inc#*\"}" >&2
      bad=1
    fi
  done < <(grep -rnE '^#include "engine/' "engine/$sub" --include='*.[ch]pp' --include='*.cu' \
             --include='*.cuh' || true)
done
if [ "$bad" -ne 0 ]; then
  echo "layering: includes must point one way: runtime <- engine <- {cluster, http} <- actors <- cli;" >&2
  echo "  in engine/: model <- {kv, comm, tokenizer, sampling}, tokenizer <- grammar," >&2
  echo "  {model, kv, comm, sampling} <- backend <- exec <- scheduler (+ grammar)" >&2
  exit 1
fi
echo "layering: ok"
