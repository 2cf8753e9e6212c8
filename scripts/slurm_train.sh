#!/bin/bash
# Multi-node dlr-train under SLURM: one torchrun per node, c10d rendezvous on the first node.
#
#   sbatch --nodes=4 scripts/slurm_train.sh model=llama_7b parallelism=fsdp2 gradient_checkpointing=true
#
# Every argument is a dlr-train override. out_dir defaults to runs/<model>-<method>-..., which
# does not depend on the job, so a requeued or resubmitted job (even with another --nodes)
# continues from the newest checkpoint (resume=auto; docs/training.md, "Resume elsewhere").
# Put out_dir on storage every node sees. Set DLR_VENV to the environment to activate.
#SBATCH --job-name=dlr-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [[ -n "${DLR_VENV:-}" ]]; then source "$DLR_VENV/bin/activate"; fi
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${DLR_PORT:-29500}
# Preemption notice: requeue the job; it resumes from the last checkpoint on whatever nodes it gets.
trap 'scontrol requeue "$SLURM_JOB_ID"' USR1

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD:$PORT" \
  -m dlr.cli.train resume=auto "$@" &
wait
