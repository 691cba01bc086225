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
# Over ssh the launcher forwards only NCCL_*, PYTHON*, UCX_*, MV2_* and MLFLOW_* (and ~/.deepspeed_env, ./.deepspeed_env):
# this script adds the run's own (AWS_*, HF_*, WANDB_*, SLM_*, TRITON_CACHE_DIR, ...) through a private DS_ENV_FILE.
set -euo pipefail

# Variables the other nodes need to read data and checkpoints, log, and find node-local caches.
FORWARD='^(AWS_|HF_|HUGGING_FACE_|WANDB_|SLM_|S3_|FSSPEC_|TRITON_CACHE_DIR$|TORCH_EXTENSIONS_DIR$|OMP_NUM_THREADS$|TOKENIZERS_PARALLELISM$)'

# Write the user's .deepspeed_env files and this shell's forwarded variables to a private temporary file (mode 0600:
# it may hold credentials), removed when the launcher exits. Values with a newline cannot travel in that format.
forwarded_env_file() {
    local file name
    file=$(mktemp "${TMPDIR:-/tmp}/slm-deepspeed-env.XXXXXX")
    for user_file in "$HOME/.deepspeed_env" ./.deepspeed_env; do
        if [[ -f "$user_file" ]]; then grep -v '^[[:space:]]*$' "$user_file" >>"$file" || true; fi
    done
    for name in $(compgen -e | grep -E "$FORWARD" || true); do
        if [[ "${!name}" != *$'\n'* ]]; then printf '%s=%s\n' "$name" "${!name}" >>"$file"; fi
    done
    echo "$file"
}

port=(--master_port "${MASTER_PORT:-29500}")
if [[ -z "${HOSTFILE:-}" ]]; then
    exec deepspeed --num_gpus "${NPROC:-1}" "${port[@]}" --no_local_rank --module launch train "$@"
fi
if [[ -z "${NODE_RANK:-}" ]]; then
    DS_ENV_FILE=$(forwarded_env_file)
    export DS_ENV_FILE  # an absolute path: DeepSpeed joins it to ~ and . and reads that one file
    trap 'rm -f "$DS_ENV_FILE"' EXIT
    deepspeed --hostfile "$HOSTFILE" "${port[@]}" --no_local_rank --module launch train "$@"
    exit $?
fi
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host of HOSTFILE}" "${port[@]}" \
    --no_local_rank --module launch train "$@"
