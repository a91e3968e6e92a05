"""The torch/PIL data backend: datasets over an ImageIndex, timm transforms, and loaders.

Training batches come from ``ClassPairSampler`` (first half, then same-class partners) or, for a plain
cross-entropy baseline, from a resumable ``DistributedSampler``. Validation shards the images over ranks
without padding, so every image counts exactly once.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from timm_cskd.data.index import ImageIndex
from timm_cskd.sampler import ClassPairSampler

__all__ = [
    "ImageIndexDataset",
    "ResumableBatchSampler",
    "build_transforms",
    "build_val_transform",
    "create_train_loader",
    "create_val_loader",
    "seed_loader",
]

_logger = logging.getLogger(__name__)


class ImageIndexDataset(Dataset):
    """Decoded RGB images of an ImageIndex with their labels.

    A file that fails to decode is logged once, counted in ``failures``, and replaced by the next
    classmate that decodes, so a 90-epoch run never dies on one bad file and pairs stay same-class.
    """

    def __init__(self, index: ImageIndex, transform=None):
        self.index = index
        self.transform = transform
        self.failures: set[str] = set()
        order = np.argsort(index.labels, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(index.labels[order])) + 1)
        self._classmates = {int(index.labels[g[0]]): g for g in groups}

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> Image.Image:
        with Image.open(self.index.full_path(i)) as img:
            return img.convert("RGB")

    def _replacement(self, i: int) -> int:
        label = int(self.index.labels[i])
        mates = self._classmates[label]
        start = int(np.flatnonzero(mates == i)[0])
        for j in itertools.chain(mates[start + 1 :], mates[:start]):
            if self.index.paths[j] not in self.failures:
                return int(j)
        raise RuntimeError(f"no image of class {self.index.classes[label]!r} can be decoded")

    def __getitem__(self, i: int):
        target = int(self.index.labels[i])
        while True:
            try:
                img = self._load(i)
                break
            except (OSError, ValueError, SyntaxError) as e:
                path = self.index.paths[i]
                if path not in self.failures:
                    self.failures.add(path)
                    _logger.warning(
                        "skipping undecodable image %s (%s: %s)", self.index.full_path(i), type(e).__name__, e
                    )
                i = self._replacement(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of a DistributedSampler that can start mid-epoch, for the plain (non-pair) CE baseline."""

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: int, rank: int, seed: int):
        self.sampler = DistributedSampler(
            range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        if len(self) == 0:
            raise ValueError(
                f"{num_samples} samples are too few for one batch of {batch_size} on {num_replicas} rank(s)"
            )
        self._position = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self._position = 0
        self.sampler.set_epoch(epoch)

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        return {
            "epoch": self.sampler.epoch,
            "batches_consumed": self._position if batches_consumed is None else batches_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._position = state["batches_consumed"]

    def __iter__(self):
        indices = list(self.sampler)
        start, self._position = self._position, 0
        for b in range(start, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


def build_transforms(args, data_config: dict):
    """timm transforms: random-resized-crop + flip for training, resize + centre crop for validation."""
    train = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter or None,
        interpolation=args.train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
    )
    return train, build_val_transform(data_config)


def build_val_transform(data_config: dict):
    """Resize by ``crop_pct`` then centre-crop, as timm validates."""
    return create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
    )


def seed_loader(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Worker seeds become a function of (seed, epoch, rank) instead of the global RNG's position."""
    loader.generator.manual_seed(int(np.random.default_rng([seed, epoch, rank]).integers(2**62)))


def create_train_loader(
    index: ImageIndex, transform, args, *, num_replicas: int, rank: int, pin_memory: bool
):
    dataset = ImageIndexDataset(index, transform)
    if args.cskd_mode == "off" and args.plain_sampler:
        batch_sampler = ResumableBatchSampler(
            len(index), args.batch_size, num_replicas=num_replicas, rank=rank, seed=args.seed
        )
    else:
        batch_sampler = ClassPairSampler(
            index.labels,
            args.batch_size,
            mode="paired" if args.cskd_mode == "paired" else "anchor",
            num_replicas=num_replicas,
            rank=rank,
            seed=args.seed,
        )
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=args.workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
        persistent_workers=False,
    )


def create_val_loader(
    index: ImageIndex,
    transform,
    batch_size: int,
    *,
    num_replicas: int,
    rank: int,
    workers: int,
    pin_memory: bool,
):
    """This rank's contiguous-stride share of the validation images, unpadded."""
    dataset = torch.utils.data.Subset(
        ImageIndexDataset(index, transform), range(rank, len(index), num_replicas)
    )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory
    )
