#!/usr/bin/env bash
# One process on one GPU, bf16 autocast.
#
# Use it on a workstation or a one-GPU cloud box, or to debug before scaling out.
# Pick the GPU with CUDA_VISIBLE_DEVICES; every argument goes to our CLI:
#   launch/single_gpu.sh --epochs 20 --data-dir ~/data/mnist
#   CUDA_VISIBLE_DEVICES=3 launch/single_gpu.sh --batch-size 256
set -euo pipefail

exec accelerate launch --num_processes 1 --mixed_precision bf16 -m vae_dist train "$@"
