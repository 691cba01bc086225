#!/usr/bin/env bash
# Train with torchrun: NPROC processes per node (one per GPU, or CPU processes over gloo).
#
#   Single node:  NPROC=8 launch/torchrun.sh configs/125m.yaml [key=value ...]
#   Multi-node:   the same command on every node, with the same NNODES, MASTER_ADDR and MASTER_PORT:
#                 NNODES=2 MASTER_ADDR=node0.example MASTER_PORT=29500 NPROC=8 \
#                     launch/torchrun.sh configs/125m.yaml [key=value ...]
#
# The nodes meet in torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT, hosted by the node MASTER_ADDR
# names; it hands out node ranks itself (no NODE_RANK needed). RDZV_ID names the run, so two jobs that share
# a rendezvous host do not mix.
set -euo pipefail

if [[ "${NNODES:-1}" == 1 ]]; then
    exec torchrun --standalone --nproc_per_node "${NPROC:-1}" -m launch train "$@"
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC:-1}" \
    --rdzv_backend c10d --rdzv_id "${RDZV_ID:-slm}" \
    --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR to the node that hosts the rendezvous}:${MASTER_PORT:-29500}" \
    -m launch train "$@"
