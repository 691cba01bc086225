#!/usr/bin/env bash
# Train with the deepspeed launcher: NPROC processes per node (one per GPU, or CPU processes over gloo).
#
#   Single node:            NPROC=8 launch/deepspeed.sh configs/125m.yaml [key=value ...]
#   Multi-node over ssh:    HOSTFILE=hostfile launch/deepspeed.sh configs/125m.yaml [key=value ...]
#                           run once, on the first host; deepspeed starts the others over passwordless ssh/pdsh.
#   Multi-node without ssh: on every node, the same HOSTFILE and MASTER_ADDR, and that node's NODE_RANK:
#                           HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 \
#                               launch/deepspeed.sh configs/125m.yaml [key=value ...]   # NODE_RANK=1 on the next
#
# A hostfile lists one node per line with its process slots, in node-rank order: `node0.example slots=8`.
# --no_local_rank: `slm train` reads LOCAL_RANK from the environment, not a --local_rank argument.
set -euo pipefail

port=(--master_port "${MASTER_PORT:-29500}")
if [[ -z "${HOSTFILE:-}" ]]; then
    exec deepspeed --num_gpus "${NPROC:-1}" "${port[@]}" --no_local_rank --module launch train "$@"
fi
if [[ -z "${NODE_RANK:-}" ]]; then
    exec deepspeed --hostfile "$HOSTFILE" "${port[@]}" --no_local_rank --module launch train "$@"
fi
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host of HOSTFILE}" "${port[@]}" \
    --no_local_rank --module launch train "$@"
