#!/usr/bin/env bash
# FSDP on GPUs, in a few minutes: what the CPU tests cannot show (accelerate enables FSDP only on GPUs).
#
#   scripts/check_fsdp.sh            # needs 2 or more GPUs; exit status 2: not enough GPUs here
#
# 1. tests/test_fsdp.py on 2 GPUs through accelerate unchanged (NCCL): the tiny UNet fully fine-tuned
#    under accelerate_configs/fsdp.yaml trains the weights one process trains, and final/ loads in diffusers;
# 2. one epoch of FLUX.1-dev's real widths (model=flux_arch, random weights, 2 of its 19 double-stream and
#    4 of its 38 single-stream blocks) fully fine-tuned under FSDP in bf16 at 512 px, printing each
#    process's peak GPU memory, so the README's arithmetic can be checked against a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "check_fsdp: $gpus GPU(s) here; FSDP needs 2 or more (one process per GPU)" >&2
    exit 2
fi

echo "check_fsdp: 1/2 tests/test_fsdp.py on 2 GPUs"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fsdp.py -k gpus

echo "check_fsdp: 2/2 flux_arch (6 blocks) under FSDP, bf16, 512 px, one epoch"
out=$(mktemp -d)
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$out/memory.csv" &
poller=$!
status=0
"$PYTHON" -m accelerate.commands.launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 \
    --mixed_precision bf16 train.py model=flux_arch pipeline=flux model.num_layers=2 model.num_single_layers=4 \
    model.resolution=512 pipeline.max_sequence_length=64 use_lora=false mixed_precision=bf16 \
    pipeline.gradient_checkpointing=true algorithm=grpo algorithm.group_size=2 sample.num_steps=4 \
    sample.batch_size=1 sample.num_batches_per_epoch=2 train.batch_size=1 num_epochs=1 logger=none \
    per_prompt_stat_tracking.enabled=false "hydra.run.dir=$out/run" > "$out/launch.log" 2>&1 || status=$?
kill "$poller" 2>/dev/null || true
tail -5 "$out/launch.log"
grep -E "world size|trained weights|error" "$out/run/train.log" || true
ls "$out/run/final/transformer" "$out/run/checkpoints"/*/ || true
# the peak of nvidia-smi's memory.used per GPU while it ran (every process on the GPU, sampled each 0.5 s)
awk -F', ' '{ if ($2 > peak[$1]) peak[$1] = $2 } END { for (g in peak) print "check_fsdp: GPU " g " peak " peak[g] " MiB" }' "$out/memory.csv"
echo "check_fsdp: outputs in $out (exit $status)"
exit "$status"
