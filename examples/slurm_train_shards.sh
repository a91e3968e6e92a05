#!/bin/bash
# Two nodes without a shared file system for the data: each node copies the training shards of its own
# ranks (and every validation shard) from the object store or a head node to its local NVMe, then trains.
#SBATCH --job-name=r50-cskd-shards --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=64
#SBATCH --time=48:00:00 --requeue --open-mode=append --output=logs/%x.out

export SHARDS=${SHARDS:-/shared/imagenet-shards}   # written once by python -m timm_cskd.data.shards
export LOCAL=${LOCAL:-/local_nvme/imagenet-shards}
export NNODES=2 NPROC=8
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Rank r owns training shards r, r + R, r + 2R, ... (timm_cskd.data.shard_index.rank_shards). Node n runs
# ranks n*8 .. n*8+7, so it stages their shards. Replace cp with `aws s3 cp`, `gsutil cp`, ... as needed.
srun --ntasks-per-node=1 bash -c '
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
'

# Static rendezvous (--node-rank): a node's ranks must be the ones whose shards it staged. (The c10d
# rendezvous hands out node ranks in arrival order, and a restart may shuffle them.)
export HEAD=$head
srun bash -c 'exec torchrun --nnodes=$NNODES --nproc_per_node=$NPROC --node-rank=$SLURM_NODEID \
    --master-addr=$HEAD --master-port=29500 --max-restarts=3 \
    train_imagenet.py -c configs/resnet50_cskd.yaml --data-dir "$LOCAL" \
    --output /shared/runs --experiment r50-cskd-shards --resume auto --log-interval 20'
