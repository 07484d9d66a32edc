#!/usr/bin/env bash
# Step 1 of duo's default draft, on one GPU with config_gpu.json: the teacher data once, then one draft per depth
# given (default: 4 layers, the shipped depth) trained side by side on the same GPU, then the run that commits the most
# tokens per round on the validation answers exported into the config's output_dir (/tmp/duo_distill_gpu/export),
# which step 2 (config_self_cpu.json, see README.md) fine-tunes. A depth with
# a letter after it ("4b") trains that depth again under another name: a check that a retrain reproduces.
#
#   bash recipes/distill_draft/gpu_run.sh [LAYERS ...]      # logs go to $LOG_DIR (default <cache_dir>/logs)
#
# Step 4 (both prompt sources, two drafts side by side) has its own script: gpu_both_sources.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
config=${CONFIG:-recipes/distill_draft/config_gpu.json}
log_dir=${LOG_DIR:-$("$python" -c "import json; print(json.load(open('$config'))['cache_dir'])")/logs}
layers=("$@")
[ ${#layers[@]} -gt 0 ] || layers=(4)
mkdir -p "$log_dir"

distill() { "$python" -m recipes.distill_draft.distill --config "$config" "$@"; }

distill --stage generate 2>&1 | tee "$log_dir/generate.log"
for run in "${layers[@]}"; do
  distill --stage train --set run_name="layers$run" --set draft.num_hidden_layers="${run%%[a-z]*}" \
    >"$log_dir/train_layers$run.log" 2>&1 &
done
wait
distill --stage export --set run_name=best 2>&1 | tee "$log_dir/export.log"
