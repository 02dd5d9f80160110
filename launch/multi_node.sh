#!/usr/bin/env bash
# Several nodes by hand (no scheduler): run this once on every machine.
#
# Use it when you have shell access to N identical GPU machines that can reach
# each other. Machine 0 hosts the rendezvous; each machine starts GPUS_PER_NODE
# processes. Example, two 8-GPU machines, machine 0 at 10.0.0.1:
#   machine 0: NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 GPUS_PER_NODE=8 launch/multi_node.sh --epochs 20
#   machine 1: NUM_MACHINES=2 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 GPUS_PER_NODE=8 launch/multi_node.sh --epochs 20
# Pass the same CLI flags on every machine. MAIN_PROCESS_PORT defaults to 29500
# and must be open on machine 0. --artifact-dir must be on a filesystem all
# machines share (only the main process writes, but --resume reads it everywhere).
set -euo pipefail

for var in NUM_MACHINES MACHINE_RANK MAIN_PROCESS_IP GPUS_PER_NODE; do
    if [[ -z "${!var:-}" ]]; then
        echo "multi_node.sh: $var is not set (need NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, GPUS_PER_NODE)" >&2
        exit 2
    fi
done
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
for var in NUM_MACHINES MACHINE_RANK GPUS_PER_NODE MAIN_PROCESS_PORT; do
    if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
        echo "multi_node.sh: $var must be a whole number, got '${!var}'" >&2
        exit 2
    fi
done
if (( MACHINE_RANK >= NUM_MACHINES )); then
    echo "multi_node.sh: MACHINE_RANK=$MACHINE_RANK must be below NUM_MACHINES=$NUM_MACHINES" >&2
    exit 2
fi
TOTAL=$(( NUM_MACHINES * GPUS_PER_NODE ))

exec accelerate launch --multi_gpu \
    --num_machines "$NUM_MACHINES" \
    --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PROCESS_PORT" \
    --num_processes "$TOTAL" \
    --rdzv_backend static --same_network \
    --mixed_precision bf16 \
    -m vae_dist train "$@"
