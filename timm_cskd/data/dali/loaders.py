"""The DALI training and validation loaders: torch batches from a pipeline per rank.

Training batches are ``[first; partners]`` for class pairs, in the order of ``batch_sampler``'s plan at
its current epoch and position, so resuming mid-epoch starts the plan at the saved position; one pipeline
serves consecutive epochs. Validation shards the images over ranks without padding, so each image is
counted once. A decoder error restarts the pipeline at the failing batch once the files it cannot decode
are excluded (``probe``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from timm_cskd.data.dali.files import GoodFiles
from timm_cskd.data.dali.pipelines import (
    check_dali_augmentation,
    dali_device_id,
    train_pipeline,
    val_pipeline,
)
from timm_cskd.data.dali.probe import PROBE_WINDOW, decoder_message, is_decode_error, undecodable
from timm_cskd.data.dali.source import PlanSource, flat_plan, images_per_batch, write_plan
from timm_cskd.data.index import ImageIndex
from timm_cskd.data.loader import create_batch_sampler
from timm_cskd.data.mapped_index import MappedIndex
from timm_cskd.errors import ConfigError

__all__ = ["DaliTrainLoader", "DaliValLoader", "create_dali_loaders"]

_logger = logging.getLogger(__name__)


class _DaliLoader:
    """Shared conversion from DALI outputs to torch (images NCHW, channels_last in memory if asked) and
    the handling of files DALI cannot decode."""

    def __init__(self, index: ImageIndex, device_id: int | None, channels_last: bool):
        self.index = index
        self.device_id = device_id
        self.channels_last = channels_last
        self.layout = "HWC" if channels_last else "CHW"
        self.excluded: set[int] = set()
        self._report_dir = tempfile.mkdtemp(prefix="timm_cskd_dali_")
        self._reported: set[str] = set()
        # Written once per loader (each rank's), mapped by every reader of every pipeline it builds.
        self._shared_dir = tempfile.mkdtemp(prefix="timm_cskd_dali_index_")
        self.mapped = MappedIndex.write(index, self._shared_dir)

    def __del__(self):
        shutil.rmtree(getattr(self, "_report_dir", ""), ignore_errors=True)
        shutil.rmtree(getattr(self, "_shared_dir", ""), ignore_errors=True)

    def _torch_batches(self, iterator):
        for data in iterator:
            images, labels = data[0]["images"], data[0]["labels"].view(-1).long()
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels_last for free
            yield images, labels

    def log_reports(self) -> None:
        """Log, once each, the files the readers substituted."""
        for name in os.listdir(self._report_dir):
            if name in self._reported or not name.startswith("bad-"):
                continue
            self._reported.add(name)
            with open(os.path.join(self._report_dir, name)) as f:
                path, _, reason = f.read().partition("\t")
            _logger.warning(
                "DALI: skipping unreadable image %s (%s); a classmate stands in for it", path, reason
            )

    def _exclude_undecodable(self, error: RuntimeError, items: np.ndarray, where: str) -> None:
        """After a decoder error: find which of ``items`` DALI cannot decode, exclude them, or re-raise
        naming the files when each decodes."""
        files = GoodFiles(self.mapped, frozenset(self.excluded), self._report_dir)
        readable = {}
        for i in dict.fromkeys(int(i) for i in items):
            encoded, used = files.get(i)
            if used == i:  # a substituted file never reached the decoder
                readable[i] = encoded
        found = undecodable(readable, self.device_id)
        self.log_reports()
        if not found:
            paths = ", ".join(self.index.full_path(i) for i in dict.fromkeys(int(i) for i in items))
            raise RuntimeError(
                f"DALI failed on {where}, but each of its files decodes on its own ({paths}): {error}"
            ) from error
        for i in found:
            _logger.warning(
                "DALI cannot decode %s (%s): excluded from this run; list it with python -m timm_cskd.data.verify",
                self.index.full_path(i),
                decoder_message(error),
            )
        self.excluded.update(found)


class DaliTrainLoader(_DaliLoader):
    """Iterates training batches (``[first; partners]`` for class pairs) for ``batch_sampler``'s current
    epoch and position."""

    def __init__(
        self,
        index: ImageIndex,
        batch_sampler,
        data_config: dict,
        args,
        device_id,
        *,
        seed: int,
        float16: bool = False,
    ):
        super().__init__(index, device_id, args.channels_last)
        self.batch_sampler, self.data_config, self.args = batch_sampler, data_config, args
        # The pipeline's random streams (one per rank) and its output dtype (float16 under fp16 AMP).
        self.seed, self.float16 = seed, float16
        self._batch_images = images_per_batch(batch_sampler)
        self._iterator, self._next_epoch = None, None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _source(self, epoch: int, start: int) -> PlanSource:
        """The readers' source for a pipeline that starts at plan position ``start`` of ``epoch``."""
        write_plan(self._shared_dir, self.batch_sampler, epoch, start)
        write_plan(self._shared_dir, self.batch_sampler, epoch + 1, 0)  # DALI may start it unasked
        return PlanSource(
            self.mapped, self._shared_dir, epoch, start, frozenset(self.excluded), self._report_dir
        )

    def _build(self, epoch: int, start: int):
        pipe = train_pipeline(
            self._source(epoch, start),
            self.args,
            self.data_config,
            batch_size=self._batch_images,
            device_id=self.device_id,
            seed=self.seed * 1000 + self.batch_sampler.rank,
            float16=self.float16,
            layout=self.layout,
        )
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels"], auto_reset=True, last_batch_policy=LastBatchPolicy.DROP
        )

    def __iter__(self):
        sampler = self.batch_sampler
        epoch, batch = sampler.epoch, sampler.position
        start = sampler.state_dict(batches_consumed=batch)["units_consumed"]
        # One pipeline serves consecutive epochs from their first batch; anything else (a resume, a
        # repeated epoch) rebuilds it so the plan, not DALI's state, decides where reading starts.
        if epoch != self._next_epoch or start != 0:
            self._iterator = None
        else:
            # The running pipeline's readers move on to the next epoch as soon as this one ends.
            write_plan(self._shared_dir, sampler, epoch + 1, 0)
        self._next_epoch = epoch + 1
        if batch >= len(self):
            # Saved at the epoch's last batch (or re-sharded into less than one step): nothing left.
            self._iterator = None
            return
        while True:
            try:
                if self._iterator is None:
                    self._build(epoch, start)  # DALI's iterator runs the first batch already
                for images, labels in self._torch_batches(self._iterator):
                    yield images, labels
                    batch += 1
                    if batch % 100 == 0:
                        self.log_reports()
                break
            except RuntimeError as e:
                if not is_decode_error(e):
                    raise
                self._iterator = None
                start = sampler.state_dict(batches_consumed=batch)["units_consumed"]
                window = flat_plan(sampler, start)[: PROBE_WINDOW * self._batch_images]
                # The same batch again next time round the loop, its undecodable files substituted.
                self._exclude_undecodable(e, window, f"batch {batch + 1} of epoch {epoch + 1}")
        self.log_reports()


class DaliValLoader(_DaliLoader):
    """This rank's images ``rank, rank + W, ...``, unpadded: the last batch may be smaller."""

    def __init__(
        self, index: ImageIndex, data_config: dict, args, device_id, *, num_replicas: int, rank: int
    ):
        super().__init__(index, device_id, args.channels_last)
        self.data_config, self.args = data_config, args
        self.indices = np.arange(rank, len(index), num_replicas)
        self.batch_size = args.validation_batch_size or args.batch_size
        self._iterator = None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batches(self, first_batch: int):
        files = GoodFiles(self.mapped, frozenset(self.excluded), self._report_dir)
        for start in range(first_batch * self.batch_size, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield (
                [files.get(i)[0] for i in chunk],
                [np.array(self.index.labels[i], dtype=np.int64) for i in chunk],
            )

    def _build(self, first_batch: int):
        def batches():  # a generator function: DALI restarts it for every pass
            yield from self._batches(first_batch)

        pipe = val_pipeline(
            batches,
            self.data_config,
            batch_size=self.batch_size,
            workers=self.args.workers,
            device_id=self.device_id,
            layout=self.layout,
        )
        self._iterator = DALIGenericIterator(
            pipe, ["images", "labels"], auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL
        )

    def __iter__(self):
        batch, restarted = 0, False
        while True:
            try:
                if self._iterator is None:
                    self._build(batch)  # DALI's iterator runs the first batch already
                for images, labels in self._torch_batches(self._iterator):
                    yield images, labels
                    batch += 1
                break
            except RuntimeError as e:
                if not is_decode_error(e):
                    raise
                self._iterator, restarted = None, True
                window = self.indices[batch * self.batch_size : (batch + PROBE_WINDOW) * self.batch_size]
                self._exclude_undecodable(e, window, f"validation batch {batch + 1}")
        if restarted:
            self._iterator = None  # it restarts at the failed batch: the next pass needs a fresh one
        self.log_reports()


def create_dali_loaders(
    args,
    train_index: ImageIndex,
    val_index: ImageIndex | None,
    data_config: dict,
    ctx,
    batches: str = "anchor",
    views: int = 1,
    *,
    seed: int,
    float16: bool = False,
):
    """One pipeline per rank on its own GPU (CPU operators when the device is the CPU), reading the plan
    a method's ``batches`` declaration asks for; ``seed`` is the run's (--seed), ``float16`` the output
    dtype on a GPU under float16 AMP."""
    if views != 1:
        raise ConfigError(
            f"--data-backend dali decodes one augmented view per image; this method needs {views}: "
            "use --data-backend torch"
        )
    check_dali_augmentation(args)
    device_id = dali_device_id(ctx.device)
    sampler = create_batch_sampler(
        train_index,
        batches,
        args.batch_size,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        seed=seed,
        repeats=args.aug_repeats,
    )
    train = DaliTrainLoader(train_index, sampler, data_config, args, device_id, seed=seed, float16=float16)
    val = None
    if val_index is not None:
        val = DaliValLoader(
            val_index, data_config, args, device_id, num_replicas=ctx.world_size, rank=ctx.rank
        )
    return train, val
