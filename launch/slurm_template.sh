#!/bin/bash
# Slurm batch script for the slm-forge run in @RUN_DIR@, written by `slm slurm`.
# Submit it with `sbatch @SCRIPT@` (or `slm slurm ... --submit`).
@SBATCH_LINES@
#
# Preemption and time limits: Slurm sends USR1 to this shell @SIGNAL_SECONDS@ s before the time limit
# (--signal=B:USR1@...); you can send it yourself with `scancel --signal=USR1 --batch JOBID`. The shell
# forwards it to the training processes: `slm train` finishes its step, saves a checkpoint and exits with
# code 3. The shell then requeues the job with `scontrol requeue`; after Slurm's requeue delay the job starts
# again and `slm train` resumes from the latest checkpoint in checkpoint.dir (run.dir/checkpoints, or a URL:
# the job's environment, AWS_* included, is the submitting shell's). A run that reached train.max_steps has
# written run.dir/DONE and is never requeued. Job and attempt logs: @RUN_DIR@/slurm/.
set -euo pipefail

RUN_DIR=@RUN_DIR@
ATTEMPT="${SLURM_RESTART_COUNT:-0}"   # 0 on the first start, +1 per requeue
SEGMENT="${SLM_SEGMENT:-1}"           # which of the chained jobs this is (`slm slurm --segments`)
SEGMENTS=@SEGMENTS@
LOG="$RUN_DIR/slurm/train-$SLURM_JOB_ID-attempt$ATTEMPT.log"   # what the training processes print
export PATH=@BIN_DIR@:"$PATH"   # the Python environment that wrote this script

if [[ -f "$RUN_DIR/DONE" ]]; then
    echo "$(date -Is) job $SLURM_JOB_ID segment $SEGMENT/$SEGMENTS: $RUN_DIR/DONE exists, the run is finished."
    exit 0
fi

# The first node of the allocation hosts the rendezvous. The port comes from the job id (jobs sharing a node
# do not collide) plus the attempt (a requeued job never waits for its last socket to close); export
# SLM_MASTER_PORT before sbatch to choose the base port yourself.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
BASE_PORT="${SLM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 2000 * 10))}"
MASTER_PORT=$((BASE_PORT + ATTEMPT % 10))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-@OMP_THREADS@}"   # CPU threads per training process
export TOKENIZERS_PARALLELISM=false
# Compiler caches on node-local disk: a shared home would serialise every rank's torch.compile on file locks.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${SLURM_TMPDIR:-/tmp}/triton-$USER}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=@SHUTDOWN_SECONDS@   # seconds torchrun gives workers to checkpoint after a TERM
# Interconnect (GPU clusters): uncomment what your fabric needs.
# export NCCL_SOCKET_IFNAME=ib0             # interface NCCL bootstraps over (GLOO_SOCKET_IFNAME for gloo)
# export NCCL_IB_HCA=mlx5                   # InfiniBand adapters NCCL may use
# export NCCL_DEBUG=INFO                    # log the transports and topology NCCL picked
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # fail fast instead of hanging when a rank dies
@LAUNCHER_SETUP@
echo "$(date -Is) job $SLURM_JOB_ID attempt $ATTEMPT segment $SEGMENT/$SEGMENTS on $SLURM_JOB_NODELIST," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, log $LOG"

srun_pid=""
signal_received=""
forward_signal() {
    signal_received="$1"
    echo "$(date -Is) got SIG$1: asking the training processes to checkpoint and stop"
    if [[ -n "$srun_pid" ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi   # srun signals every process of the step
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

# One task per node. The launcher starts with USR1 ignored (`trap "" USR1` survives exec): only the training
# processes, which install a handler, act on it; torchrun and the deepspeed launcher would die of it.
@LAUNCH@
srun_pid=$!

status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do   # a trapped signal ends `wait` early; the step is still saving
    status=0
    wait "$srun_pid" || status=$?
done
echo "$(date -Is) training exited with status $status"

if [[ -f "$RUN_DIR/DONE" ]]; then
    echo "$(date -Is) the run is finished."
    exit 0
fi
if [[ "$signal_received" == TERM ]]; then
    echo "$(date -Is) Slurm is ending this job (scancel, preemption or time limit): its own requeue policy applies."
    exit "$status"
fi
if [[ "$signal_received" == USR1 || "$status" == 3 ]]; then
    if (( SEGMENT < SEGMENTS )); then
        echo "$(date -Is) stopped at a checkpoint; segment $((SEGMENT + 1)) of $SEGMENTS continues the run."
        exit 0
    fi
    echo "$(date -Is) stopped at a checkpoint; requeueing job $SLURM_JOB_ID to resume it."
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "$(date -Is) training failed with status $status; not requeued (see $LOG)."
exit "$status"
