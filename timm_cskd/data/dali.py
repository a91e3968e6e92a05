"""The NVIDIA DALI data backend, driven by ClassPairSampler's epoch plan.

DALI's file reader cannot express class pairs, and its shuffle only mixes within a buffer, so the plan
decides the order: a parallel per-sample ``fn.external_source`` reads the encoded bytes of plan position
i (worker processes), DALI decodes with a random crop (``device="mixed"``: nvJPEG on the GPU; CPU
operators with ``device_id=None`` on machines without one), flips, normalises with the model's mean/std
and hands over NCHW batches ``[first; partners]`` exactly like the torch backend. Resuming mid-epoch
starts the plan at the saved batch. Validation shards the images over ranks without padding, so each
image is counted once.
"""

from __future__ import annotations

import copy
import os

import numpy as np

from timm_cskd.config import ConfigError
from timm_cskd.data.index import ImageIndex
from timm_cskd.sampler import ClassPairSampler

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as e:  # pragma: no cover - exercised by hiding the module in the tests
    raise ConfigError(
        "--data-backend dali needs NVIDIA DALI: pip install 'timm-cskd[dali]' (the nvidia-dali-cuda130 wheel; "
        f"use nvidia-dali-cuda120 for drivers older than CUDA 13) [{e}]"
    ) from e

__all__ = ["DaliTrainLoader", "DaliValLoader", "create_dali_loaders"]

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}


class _PlanSource:
    """Per-sample source: the encoded bytes and label of position i of this rank's epoch plan.

    Runs in DALI's worker processes, so it derives everything from (seed, epoch) through its own copy of
    the sampler; DALI's ``epoch_idx`` counts pipeline resets, mapped to (first_epoch + epoch_idx).
    """

    def __init__(self, index: ImageIndex, sampler: ClassPairSampler, first_epoch: int, start_batch: int):
        self.root, self.paths, self.labels = index.root, index.paths, index.labels
        self.sampler = copy.copy(sampler)  # set_epoch below must not move the trainer's sampler
        self.first_epoch, self.start_batch = first_epoch, start_batch
        self.batch = 2 * sampler.pairs_per_batch
        self._epoch, self._plan = None, None

    def _plan_for(self, epoch_idx: int) -> np.ndarray:
        if self._epoch != epoch_idx:
            self.sampler.set_epoch(self.first_epoch + epoch_idx)
            first, partner = self.sampler.rank_plan()
            k = self.sampler.pairs_per_batch
            self._plan = np.concatenate((first.reshape(-1, k), partner.reshape(-1, k)), axis=1).ravel()
            self._epoch = epoch_idx
        return self._plan

    def __call__(self, info):
        plan = self._plan_for(info.epoch_idx)
        offset = self.start_batch * self.batch if info.epoch_idx == 0 else 0
        position = offset + info.idx_in_epoch
        if position >= len(plan):
            raise StopIteration
        i = plan[position]
        encoded = np.fromfile(os.path.join(self.root, self.paths[i]), dtype=np.uint8)
        return encoded, np.array(self.labels[i], dtype=np.int64)


def _normalise(images, data_config, *, mirror, layout: str, dtype):
    mean = [255 * m for m in data_config["mean"]]
    std = [255 * s for s in data_config["std"]]
    return fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout=layout, mean=mean, std=std, mirror=mirror
    )


class _DaliLoader:
    """Shared conversion from DALI outputs to torch (images NCHW, channels_last in memory if asked)."""

    def __init__(self, device_id: int | None, channels_last: bool):
        self.device_id = device_id
        self.channels_last = channels_last
        self.layout = "HWC" if channels_last else "CHW"

    def _torch_batches(self, iterator):
        for data in iterator:
            images, labels = data[0]["images"], data[0]["labels"].view(-1).long()
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels_last for free
            yield images, labels


class DaliTrainLoader(_DaliLoader):
    """Iterates training batches ``[first; partners]`` for ``batch_sampler``'s current epoch and position."""

    def __init__(
        self, index: ImageIndex, batch_sampler: ClassPairSampler, data_config: dict, args, device_id
    ):
        super().__init__(device_id, args.channels_last)
        self.index, self.batch_sampler, self.data_config, self.args = index, batch_sampler, data_config, args
        self._iterator, self._next_epoch = None, None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _build(self, epoch: int, start_batch: int):
        args, device_id = self.args, self.device_id
        rank = self.batch_sampler.rank
        source = _PlanSource(self.index, self.batch_sampler, epoch, start_batch)
        decoder = "mixed" if device_id is not None else "cpu"
        size = self.data_config["input_size"][-2:]
        dtype = (
            types.FLOAT16
            if args.amp and args.amp_dtype == "float16" and device_id is not None
            else types.FLOAT
        )

        @pipeline_def(
            batch_size=source.batch,
            num_threads=max(args.workers, 1),
            device_id=device_id,
            seed=args.seed * 1000 + rank,
            py_num_workers=max(args.workers, 1),
            py_start_method="fork",
            prefetch_queue_depth=2,
        )
        def pipeline():
            jpegs, labels = fn.external_source(
                source=source, num_outputs=2, batch=False, parallel=True, dtype=[types.UINT8, types.INT64]
            )
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decoder,
                output_type=types.RGB,
                random_area=list(args.scale),
                random_aspect_ratio=list(args.ratio),
            )
            images = fn.resize(
                images,
                resize_x=size[1],
                resize_y=size[0],
                interp_type=INTERP.get(args.train_interpolation, types.INTERP_LINEAR),
            )
            mirror = fn.random.coin_flip(probability=args.hflip)
            images = _normalise(images, self.data_config, mirror=mirror, layout=self.layout, dtype=dtype)
            return images, labels.gpu() if device_id is not None else labels

        pipe = pipeline()
        pipe.build()
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels"], auto_reset=True, last_batch_policy=LastBatchPolicy.DROP
        )
        self._next_epoch = epoch

    def __iter__(self):
        sampler = self.batch_sampler
        epoch, start = sampler.epoch, sampler.position
        # One pipeline serves consecutive epochs from their first batch; anything else (a resume, a
        # repeated epoch) rebuilds it so the plan, not DALI's state, decides where reading starts.
        if self._iterator is None or epoch != self._next_epoch or start != 0:
            self._build(epoch, start)
        self._next_epoch = epoch + 1
        yield from self._torch_batches(self._iterator)


class DaliValLoader(_DaliLoader):
    """This rank's images ``rank, rank + W, ...``, unpadded: the last batch may be smaller."""

    def __init__(
        self, index: ImageIndex, data_config: dict, args, device_id, *, num_replicas: int, rank: int
    ):
        super().__init__(device_id, args.channels_last)
        self.index, self.data_config, self.args = index, data_config, args
        self.indices = np.arange(rank, len(index), num_replicas)
        self.batch_size = args.validation_batch_size or 2 * args.batch_size
        self._iterator = None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batches(self):
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield (
                [np.fromfile(self.index.full_path(i), dtype=np.uint8) for i in chunk],
                [np.array(self.index.labels[i], dtype=np.int64) for i in chunk],
            )

    def _build(self):
        cfg, device_id = self.data_config, self.device_id
        size = cfg["input_size"][-2:]
        resize_shorter = int(round(size[0] / cfg["crop_pct"]))

        @pipeline_def(batch_size=self.batch_size, num_threads=max(self.args.workers, 1), device_id=device_id)
        def pipeline():
            jpegs, labels = fn.external_source(
                source=self._batches, num_outputs=2, cycle="raise", dtype=[types.UINT8, types.INT64]
            )
            images = fn.decoders.image(
                jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB
            )
            images = fn.resize(
                images,
                resize_shorter=resize_shorter,
                interp_type=INTERP.get(cfg["interpolation"], types.INTERP_CUBIC),
            )
            images = fn.crop(images, crop=list(size))
            images = _normalise(images, cfg, mirror=0, layout=self.layout, dtype=types.FLOAT)
            return images, labels.gpu() if device_id is not None else labels

        pipe = pipeline()
        pipe.build()
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels"], auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL
        )

    def __iter__(self):
        if self._iterator is None:
            self._build()
        yield from self._torch_batches(self._iterator)


def create_dali_loaders(args, train_index: ImageIndex, val_index: ImageIndex | None, data_config: dict, ctx):
    """One pipeline per rank on its local GPU (CPU operators when the device is the CPU)."""
    if args.plain_sampler:
        raise ConfigError("--data-backend dali reads the class-pair plan; drop --plain-sampler")
    device_id = ctx.local_rank if ctx.device.type == "cuda" else None
    sampler = ClassPairSampler(
        train_index.labels,
        args.batch_size,
        mode="paired" if args.cskd_mode == "paired" else "anchor",
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        seed=args.seed,
    )
    train = DaliTrainLoader(train_index, sampler, data_config, args, device_id)
    val = None
    if val_index is not None:
        val = DaliValLoader(
            val_index, data_config, args, device_id, num_replicas=ctx.world_size, rank=ctx.rank
        )
    return train, val
