"""One rank of the two-rank trainer row: ``python -m gpu_check.rank RESULT.json ARGV_JSON``.

The Trainer as torchrun would start it (RANK, WORLD_SIZE, MASTER_* in the environment), with the process
group forced to gloo: both ranks share the one GPU, which NCCL refuses. Writes the rank's backend,
device, step count and a digest of its final weights."""

from __future__ import annotations

import hashlib
import json
import sys

import torch.distributed as dist


def _force_gloo() -> None:
    original = dist.init_process_group

    def gloo(backend=None, *args, **kwargs):
        kwargs.pop("device_id", None)  # an NCCL option
        return original("gloo", *args, **kwargs)

    dist.init_process_group = gloo


def main(result_path: str, argv: list[str]) -> int:
    _force_gloo()
    from timm.utils.model import unwrap_model

    from timm_cskd.config import parse_args
    from timm_cskd.train import Trainer

    trainer = Trainer(parse_args(argv))
    try:
        backend = dist.get_backend() if dist.is_initialized() else None
        metrics = trainer.fit()
        module = unwrap_model(trainer.task.get_trainable_module())
        digest = hashlib.sha256()
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        result = {
            "rank": trainer.ctx.rank,
            "world_size": trainer.ctx.world_size,
            "backend": backend,
            "device": str(next(module.parameters()).device),
            "steps": trainer.state.global_step,
            "nll": metrics.get("nll"),
            "sha256": digest.hexdigest(),
        }
    finally:
        trainer.close()
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
