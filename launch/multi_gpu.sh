#!/usr/bin/env bash
# All GPUs of one node, one process per GPU (DDP over NCCL), bf16 autocast.
#
# Use it on a single multi-GPU machine. The GPU count comes from `nvidia-smi -L`;
# set NUM_GPUS to use fewer (together with CUDA_VISIBLE_DEVICES to choose which):
#   launch/multi_gpu.sh --epochs 20
#   NUM_GPUS=4 CUDA_VISIBLE_DEVICES=0,1,2,3 launch/multi_gpu.sh --batch-size 128
# --batch-size is per process: the global batch is batch-size * NUM_GPUS.
set -euo pipefail

if [[ -z "${NUM_GPUS:-}" ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "multi_gpu.sh: nvidia-smi not found; set NUM_GPUS or use launch/cpu_processes.sh" >&2
        exit 2
    fi
    # Count only "GPU n:" lines: on MIG systems `nvidia-smi -L | wc -l` would also
    # count the indented MIG device lines.
    NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU ' || true)
fi
if ! [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || (( NUM_GPUS < 1 )); then
    echo "multi_gpu.sh: need at least one GPU, got NUM_GPUS='$NUM_GPUS'" >&2
    exit 2
fi

if (( NUM_GPUS == 1 )); then
    # Accelerate refuses --multi_gpu with fewer than 2 processes.
    exec accelerate launch --num_processes 1 --mixed_precision bf16 -m vae_dist train "$@"
fi
exec accelerate launch --multi_gpu --num_machines 1 --num_processes "$NUM_GPUS" \
    --mixed_precision bf16 -m vae_dist train "$@"
