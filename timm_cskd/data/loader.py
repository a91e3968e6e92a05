"""The torch/PIL data backend: datasets over an ImageIndex, timm transforms, and loaders.

Training batches come from ``ClassPairSampler`` (first half, then same-class partners) or, for a plain
cross-entropy baseline, from a resumable ``ShuffledBatchSampler``. Validation shards the images over ranks
without padding, so every image counts exactly once. The workers ship uint8 images (timm's transforms as
its prefetcher path builds them); the loaders finish them on the device (``timm_cskd.data.device_prep``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from timm_cskd.config import DataConfig
from timm_cskd.data.classmates import Classmates
from timm_cskd.data.device_prep import DeviceLoader, DevicePrep
from timm_cskd.data.index import ImageIndex
from timm_cskd.data.shard_index import ShardIndex
from timm_cskd.data.workers import become_worker, stop_signal_blocked
from timm_cskd.errors import ConfigError
from timm_cskd.run_lock import close_inherited
from timm_cskd.sampler import ClassPairSampler, ShuffledBatchSampler
from timm_cskd.shard_sampler import RankClassPairSampler, RankShuffledBatchSampler

__all__ = [
    "ImageIndexDataset",
    "SeededBatches",
    "build_device_preps",
    "build_transforms",
    "build_val_prep",
    "build_val_transform",
    "train_transform_kwargs",
    "create_batch_sampler",
    "create_train_loader",
    "create_val_loader",
    "init_loader_worker",
    "resolve_pin_memory",
    "seeded_rngs",
    "SignalSafeDataLoader",
]

_logger = logging.getLogger(__name__)


class ImageIndexDataset(Dataset):
    """Decoded RGB images of an ImageIndex with their labels.

    A file that fails to decode is logged once, counted in ``failures``, and replaced by the next
    classmate that decodes, so a 90-epoch run never dies on one bad file and pairs stay same-class.
    ``transform`` may be a list: each item is then a tuple of independently augmented views. A seeded
    item ``(index, seed)`` returns its seed third, for the random erasing done on the device.
    """

    def __init__(self, index: ImageIndex, transform=None):
        self.index = index
        self.transform = transform
        self.failures: set[str] = set()
        self._classmates = Classmates.group(index.labels)

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> Image.Image:
        with Image.open(self.index.image_source(i)) as img:
            return img.convert("RGB")

    def _replacement(self, i: int) -> int:
        label = int(self.index.labels[i])
        for j in itertools.islice(self._classmates.round_from(i, label), 1, None):
            if self.index.paths[j] not in self.failures:
                return j
        raise RuntimeError(f"no image of class {self.index.classes[label]!r} can be decoded")

    def __getitem__(self, item: int | tuple[int, int]):
        """``item`` is an index, or ``(index, seed)`` from SeededBatches for a reproducible augmentation."""
        i, seed = item if isinstance(item, tuple) else (item, None)
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
        if isinstance(self.transform, list | tuple):
            with seeded_rngs(seed):
                img = tuple(transform(img) for transform in self.transform)
        elif self.transform is not None:
            with seeded_rngs(seed):
                img = self.transform(img)
        return (img, target) if seed is None else (img, target, seed)


@contextlib.contextmanager
def seeded_rngs(seed: int | None):
    """Run timm's transforms from ``seed``: python's ``random``, torch's CPU generator and NumPy's global
    RNG (RandAugment and AugMix draw their operations from it). In the main process (``-j 0``) all three
    are left as they were; a loader worker's generators are its own and every sample reseeds them, so
    they are not saved there (NumPy's state alone costs ~70 us to save and restore, 2% of a decode)."""
    if seed is None:
        yield
        return
    # The CPU generator directly: torch.manual_seed also visits every accelerator backend (~100 us).
    generator = torch.default_generator
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        python_state, torch_state = random.getstate(), generator.get_state()
        numpy_state = np.random.get_state()  # noqa: NPY002 - the global RNG timm's augmentations use
    generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    try:
        yield
    finally:
        if restore:
            random.setstate(python_state)
            generator.set_state(torch_state)
            np.random.set_state(numpy_state)  # noqa: NPY002


class SeededBatches(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Pairs each index of a batch sampler with an augmentation seed drawn from (seed, rank, epoch,
    batch, slot), so a sample's crop and flip depend neither on the number of loader workers nor on
    where a run was resumed: a resumed epoch replays the exact images of an uninterrupted one."""

    def __init__(self, batch_sampler, seed: int, rank: int):
        self.batch_sampler, self.seed, self.rank = batch_sampler, seed, rank

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        return self.batch_sampler.state_dict(batches_consumed)

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)

    def __iter__(self):
        # Sample seeds stay below 2**63 (int64 in a collated batch): base < 2**32, slot < 4096.
        epoch, start = self.batch_sampler.epoch, self.batch_sampler.position
        for b, batch in enumerate(self.batch_sampler, start):
            base = int(
                np.random.SeedSequence([self.seed, self.rank, epoch, b]).generate_state(1, np.uint32)[0]
            )
            yield [(i, base * 4096 + j) for j, i in enumerate(batch)]


def init_loader_worker(_worker_id: int | None = None) -> None:
    """A loader worker survives a scheduler's group-wide SIGTERM (the trainer saves its preemption
    checkpoint first) and exits on its parent's (see ``timm_cskd.data.workers``). It also drops its
    inherited copy of the experiment lock, which is the trainer's alone."""
    become_worker()
    close_inherited()


class SignalSafeDataLoader(DataLoader):
    """Starts its worker processes with SIGTERM blocked: a preemption notice that lands while a worker
    is still starting would otherwise kill it before ``init_loader_worker`` runs. The trainer receives
    a notice that arrives meanwhile as soon as the workers are up."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signal_blocked():
            return super()._get_iterator()


def train_transform_kwargs(args: DataConfig, data_config: dict) -> dict:
    """``create_transform``'s training arguments from timm train.py's flags, as timm's ``create_loader``
    passes them without its prefetcher (a float transform that normalises and erases); the loaders here
    build it with ``use_prefetcher=True`` (uint8) and do the rest on the device."""
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config["interpolation"]
    return dict(
        input_size=data_config["input_size"],
        is_training=True,
        no_aug=args.no_aug,
        train_crop_mode=args.train_crop_mode,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob,
        auto_augment=args.aa,
        interpolation=interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_num_splits=0,
    )


def build_transforms(args: DataConfig, data_config: dict, views: list[dict] | None = None):
    """timm transforms to uint8 CHW tensors: random-resized-crop + flip for training, resize + centre crop
    for validation (normalisation and random erasing follow on the device: ``build_device_preps``).

    ``views`` (a method's declaration) gives one dict of ``create_transform`` overrides per augmented
    view; with more than one the training transform is a list, one per view."""

    def train_transform(**overrides):
        kwargs = {**train_transform_kwargs(args, data_config), **overrides}
        return create_transform(**kwargs, use_prefetcher=True)

    views = views or [{}]
    train = train_transform(**views[0]) if len(views) == 1 else [train_transform(**v) for v in views]
    return train, build_val_transform(data_config)


def build_val_transform(data_config: dict):
    """Resize by ``crop_pct`` then centre-crop, as timm validates (to uint8: see ``build_val_prep``)."""
    return create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"],
        use_prefetcher=True,
    )


def build_device_preps(
    args: DataConfig, data_config: dict, views: list[dict] | None, device
) -> list[DevicePrep]:
    """The device half of each training view's transform: normalisation, --channels-last, and random
    erasing (--reprob, --remode, --recount, a view's overrides included; none with --no-aug, as timm's
    ``create_loader`` leaves its prefetcher's out)."""
    preps = []
    for overrides in views or [{}]:
        kwargs = {**train_transform_kwargs(args, data_config), **overrides}
        preps.append(
            DevicePrep(
                data_config["mean"],
                data_config["std"],
                device,
                channels_last=args.channels_last,
                re_prob=0.0 if kwargs["no_aug"] else kwargs["re_prob"],
                re_mode=kwargs["re_mode"],
                re_count=kwargs["re_count"],
            )
        )
    return preps


def build_val_prep(data_config: dict, device, channels_last: bool = False) -> DevicePrep:
    return DevicePrep(data_config["mean"], data_config["std"], device, channels_last=channels_last)


def resolve_pin_memory(args: DataConfig, device) -> bool:
    """Pinned batches on CUDA unless --no-pin-mem (a non-blocking copy from pageable memory blocks the
    host); elsewhere only with --pin-mem. timm's args.yaml always says ``pin_mem: false``, its default."""
    if args.pin_mem and args.no_pin_mem:
        raise ConfigError("--pin-mem and --no-pin-mem contradict each other: pass one")
    return args.pin_mem or (not args.no_pin_mem and torch.device(device).type == "cuda")


def create_batch_sampler(
    index: ImageIndex,
    batches: str,
    batch_size: int,
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    repeats: float = 0,
):
    """The epoch plan a method's ``batches`` declaration asks for: plain shuffled images, class-pair
    anchors with partners (``anchor``), or a partition into same-class pairs (``paired``); ``repeats`` is
    timm's --aug-repeats. A ShardIndex holds this rank's shards only: its plan is rank-local
    (``timm_cskd.shard_sampler``; the caller sets the common epoch length with ``set_epoch_units``)."""
    if isinstance(index, ShardIndex):
        local = dict(rank=rank, world_size=num_replicas, seed=seed, repeats=repeats)
        if batches == "plain":
            return RankShuffledBatchSampler(len(index), batch_size, **local)
        return RankClassPairSampler(index.labels, batch_size, mode=batches, **local)
    common = dict(num_replicas=num_replicas, rank=rank, seed=seed, repeats=repeats)
    if batches == "plain":
        return ShuffledBatchSampler(len(index), batch_size, **common)
    return ClassPairSampler(index.labels, batch_size, mode=batches, **common)


def create_train_loader(
    index: ImageIndex,
    transform,
    args: DataConfig,
    *,
    batches: str,
    num_replicas: int,
    rank: int,
    seed: int,
    preps: list[DevicePrep],
    pin_memory: bool,
) -> DeviceLoader:
    """This rank's training batches in the plan ``batches`` asks for (drawn from ``seed``), finished on
    the preps' device (one prep per view); the loader's ``plan`` is the plan sampler itself."""
    dataset = ImageIndexDataset(index, transform)
    plan = create_batch_sampler(
        index,
        batches,
        args.batch_size,
        num_replicas=num_replicas,
        rank=rank,
        seed=seed,
        repeats=args.aug_repeats,
    )
    loader = SignalSafeDataLoader(
        dataset,
        batch_sampler=SeededBatches(plan, seed, rank),
        num_workers=args.workers,
        pin_memory=pin_memory,
        worker_init_fn=init_loader_worker,
        # Its own generator: creating an epoch's iterator must not consume the global RNG (exact resume).
        generator=torch.Generator(),
        # timm's --use-multi-epochs-loader: workers kept across epochs (augmentation is seeded per sample).
        persistent_workers=args.use_multi_epochs_loader and args.workers > 0,
    )
    return DeviceLoader(loader, preps, preps[0].device, plan=plan)


def create_val_loader(
    index: ImageIndex,
    transform,
    batch_size: int,
    *,
    num_replicas: int,
    rank: int,
    workers: int,
    prep: DevicePrep,
    pin_memory: bool,
) -> DeviceLoader:
    """This rank's contiguous-stride share of the validation images, unpadded, finished on the prep's
    device."""
    dataset = torch.utils.data.Subset(
        ImageIndexDataset(index, transform), range(rank, len(index), num_replicas)
    )
    loader = SignalSafeDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=init_loader_worker,
    )
    return DeviceLoader(loader, [prep], prep.device)
