#!/bin/bash
# Two nodes without a shared file system for the data: each node copies the training shards of its own
# ranks (and every validation shard) from the object store or a head node to its local NVMe, then trains.
# Time limit, preemption and requeue as in slurm_train.sh.
#SBATCH --job-name=r50-cskd-shards --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=48:00:00 --requeue --open-mode=append --output=logs/%x.out
#SBATCH --signal=B:USR1@300   # five minutes before the time limit, tell this script (B: only this shell)
set -uo pipefail

export SHARDS=${SHARDS:-/shared/imagenet-shards}   # written once by timm-cskd shards
export LOCAL=${LOCAL:-/local_nvme/imagenet-shards}
export NNODES=2 NPROC=8
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240   # torchrun waits this long after SIGTERM before SIGKILL
export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Rank r owns training shards r, r + R, r + 2R, ... (timm_cskd.data.shard_index.rank_shards). Node n runs
# ranks n*8 .. n*8+7, so it stages their shards. Replace cp with `aws s3 cp`, `gsutil cp`, ... as needed.
# A node whose copy fails ends the job here, before any rank waits for it.
srun --ntasks-per-node=1 bash -c '
set -euo pipefail
mkdir -p "$LOCAL"
python - "$SLURM_NODEID" <<PY | xargs -P 16 -I{} cp "$SHARDS/{}" "$LOCAL/"
import json, sys
from timm_cskd.data.shard_index import rank_shards
node = int(sys.argv[1])
manifest = json.load(open("$SHARDS/manifest.json"))
world = $NNODES * $NPROC
print("manifest.json")
for split, entry in manifest["splits"].items():
    listed = entry["shards"]
    owned = range(len(listed))
    if split == "train":
        owned = [s for r in range(node * $NPROC, (node + 1) * $NPROC) for s in rank_shards(len(listed), r, world)]
    for s in owned:
        print(listed[s]["tar"]); print(listed[s]["index"]); print(listed[s]["dali_index"])
PY
' || { echo "staging the shards failed" >&2; exit 1; }

# Static rendezvous (--node-rank): a node's ranks must be the ones whose shards it staged (c10d hands out
# node ranks in arrival order). No --max-restarts: a static group restarts one node's workers while the
# other's wait in NCCL; a failed step ends the job, and the rerun resumes (--resume auto).
srun bash -c 'exec torchrun --nnodes=$NNODES --nproc_per_node=$NPROC --node-rank=$SLURM_NODEID \
    --master-addr=$HEAD --master-port=29500 --max-restarts=0 \
    -m timm_cskd.train -c resnet50_cskd --data-dir "$LOCAL" \
    --output /shared/runs --experiment r50-cskd-shards --resume auto --log-interval 20' &
step=$!

# Time limit: stop the step first (every rank checkpoints and exits), requeue after: a requeue ends a
# running job within KillWait (30 s by default), too soon for a checkpoint. Preemption and scancel signal
# the step themselves; this shell keeps waiting so the job does not end before the checkpoint.
requeue=false
trap 'requeue=true; kill -TERM "$step"' USR1
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
