#!/usr/bin/env bash
# Several CPU processes on one machine without a GPU (gloo backend): for
# development, tests and CI of the distributed code paths.
#
#   launch/cpu_processes.sh --epochs 1 --max-steps 20
#   NUM_PROCS=4 launch/cpu_processes.sh --batch-size 64
#
# Why these flags: Accelerate's `--multi_gpu` is what selects its multi-process
# (torchrun) launcher; despite the name it needs no GPU. `--cpu` after `train` is
# *our* CLI's flag and makes each process join as a gloo CPU rank. Accelerate's
# own launcher flag `--cpu` would instead pick the simple launcher and start only
# ONE process. Without our `--cpu` on a GPU-less machine, each process would fall
# back to non-distributed mode and train alone as "rank 0 of 1".
set -euo pipefail

NUM_PROCS="${NUM_PROCS:-2}"
if [[ "$NUM_PROCS" == 1 ]]; then
    # Accelerate refuses --multi_gpu with fewer than 2 processes.
    exec accelerate launch --num_processes 1 --mixed_precision no -m vae_dist train --cpu "$@"
fi
exec accelerate launch --multi_gpu --num_machines 1 --num_processes "$NUM_PROCS" \
    --mixed_precision no -m vae_dist train --cpu "$@"
