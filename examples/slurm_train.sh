#!/bin/bash
#SBATCH --job-name=r50-cskd --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=48:00:00 --requeue --open-mode=append --output=logs/%x.out
#SBATCH --signal=B:USR1@300   # five minutes before the time limit, tell this script (B: only this shell)

# torchrun's wait between passing on SIGTERM and SIGKILLing its workers (releases without the
# variable ignore it and wait 30 s). It must cover a stop at the next --log-interval step plus a save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   # a restarted group must not read the dead one's addresses
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint="$head:29500" \
    --rdzv-id="$SLURM_JOB_ID" --max-restarts=3 \
    train_imagenet.py -c configs/resnet50_cskd.yaml --data-dir /imagenet \
    --output /shared/runs --experiment r50-cskd --resume auto --log-interval 20 &
step=$!

# Time limit: stop the step first (srun passes SIGTERM on to torchrun on every node, torchrun to its
# workers: each rank checkpoints and exits), requeue after. A requeue ends a running job within
# KillWait (30 s by default), too soon for a checkpoint, so it comes last.
requeue=false
trap 'requeue=true; kill -TERM "$step"' USR1
# Preemption, scancel: Slurm signals the step itself and --requeue puts the job back; this shell only
# keeps waiting, so the job does not end before the checkpoint is written.
trap ':' TERM
while true; do
    wait "$step"
    status=$?
    kill -0 "$step" 2>/dev/null || break   # still running: a signal interrupted the wait
done
if $requeue; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
