#!/usr/bin/env bash
# Step 4 of duo's default draft, on one GPU: the target answers template prompts (config_gpu_template.json)
# and prompts it writes itself (config_gpu_self.json) in two processes at once, then two drafts train side by
# side on both sets of answers, each exported into its config's output_dir:
#   scratch   config_gpu_self.json      a new draft           -> /tmp/duo_distill_gpu_self/export_scratch
#   finetune  config_gpu_finetune.json  step 3's draft, tuned  -> /tmp/duo_distill_gpu_self/export_finetune
# (finetune starts from .distill_cache/self2/export, step 3's export; without it that run fails and scratch
# still trains). Both validate on the same answers to self-written prompts: <cache_dir>/runs/*/validation.json.
#
#   bash recipes/distill_draft/gpu_both_sources.sh      # logs in $LOG_DIR (default /tmp/duo_distill_gpu_self/logs)
#
# SET="--set key=value ..." applies the same overrides to every stage (a toy run on a CPU, say).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
recipe=recipes/distill_draft
log_dir=${LOG_DIR:-/tmp/duo_distill_gpu_self/logs}
mkdir -p "$log_dir"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed stage stops the one running beside it

# shellcheck disable=SC2086  # SET is a list of --set arguments, split on spaces
distill() { "$python" -m recipes.distill_draft.distill "$@" ${SET:-}; }

distill --stage generate --config "$recipe/config_gpu_template.json" >"$log_dir/generate_template.log" 2>&1 &
template=$!
distill --stage generate --config "$recipe/config_gpu_self.json" >"$log_dir/generate_self.log" 2>&1 &
self=$!
wait "$template" || { echo "template answers failed: $log_dir/generate_template.log" >&2; exit 1; }
wait "$self" || { echo "self-written prompts' answers failed: $log_dir/generate_self.log" >&2; exit 1; }

runs=(self finetune)
pids=()
for run in "${runs[@]}"; do
  distill --stage train --config "$recipe/config_gpu_$run.json" >"$log_dir/train_$run.log" 2>&1 &
  pids+=($!)
done
trained=()
for index in "${!runs[@]}"; do
  if wait "${pids[$index]}"; then
    trained+=("${runs[$index]}")
  else
    echo "training ${runs[$index]} failed: $log_dir/train_${runs[$index]}.log" >&2
  fi
done
[ ${#trained[@]} -gt 0 ] || exit 1
for run in "${trained[@]}"; do
  distill --stage export --config "$recipe/config_gpu_$run.json" 2>&1 | tee "$log_dir/export_$run.log"
done
