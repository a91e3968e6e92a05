"""The NVIDIA DALI data backend, driven by the sampler's epoch plan (class pairs or plain batches).

DALI's file reader cannot express class pairs, and its shuffle only mixes within a buffer, so the plan
decides the order: a parallel per-sample ``fn.external_source`` reads the encoded bytes of plan position
i (worker processes), DALI decodes with a random crop (``device="mixed"``: nvJPEG on the GPU; CPU
operators with ``device_id=None`` on machines without one), flips, normalises with the model's mean/std
and hands over NCHW batches ``[first; partners]`` exactly like the torch backend. Resuming mid-epoch
starts the plan at the saved position. Validation shards the images over ranks without padding, so each
image is counted once.

Broken files never stop a run. The reader checks each file's structure (JPEG start and end markers, PNG
end chunk, known signatures) and substitutes the next classmate for a file that fails, as the torch
backend does; a file that passes the check but still fails in DALI's decoder (whose error names no file)
is found by decoding the failing batches' files one by one, logged with its path, excluded, and the
pipeline restarts at the same batch.

The reader workers are spawned, not forked: the trainer has initialised CUDA by the time the pipeline
is built, and DALI refuses to fork a process with a CUDA context. A scheduler's SIGTERM does not stop
them (the trainer saves its preemption checkpoint, then exits) and they leave with the trainer
(``timm_cskd.data.workers``). Each is sent file names, not the index: the index is written once per
loader into memory-mapped files (``timm_cskd.data.mapped_index``) and each epoch's plan into another, so
``-j`` readers on each of a node's ranks share one copy of the pages instead of unpickling 1.28M paths
each at every pipeline start (``benchmarks/dali_index.py``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import multiprocessing
import os
import shutil
import tempfile

import numpy as np
import torch

from timm_cskd.data.index import ImageIndex
from timm_cskd.data.loader import create_batch_sampler
from timm_cskd.data.mapped_index import MappedIndex
from timm_cskd.data.workers import become_deaf_worker
from timm_cskd.errors import ConfigError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as e:  # pragma: no cover - exercised by hiding the module in the tests
    raise ConfigError(
        "--data-backend dali needs NVIDIA DALI: pip install 'timm-cskd[dali]' (the nvidia-dali-cuda130 wheel; "
        f"use nvidia-dali-cuda120 for drivers older than CUDA 13) [{e}]"
    ) from e

__all__ = [
    "DaliTrainLoader",
    "DaliValLoader",
    "create_dali_loaders",
    "dali_device_id",
    "structural_problem",
    "val_resize_shorter",
]

_logger = logging.getLogger(__name__)

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
# Batches past the failing one that may already be in flight when DALI reports a decoder error.
PROBE_WINDOW = 4


def structural_problem(data: np.ndarray) -> str | None:
    """What is wrong with an encoded image file, from its first and last bytes, or None if it looks whole.

    Catches truncated and foreign files before they reach a decoder: DALI's error names no file, and two
    such files in one batch have crashed the process outright."""
    if len(data) < 8:
        return "empty or truncated file"
    # Some writers pad a file after its last marker: look at the end without that padding.
    head, tail = bytes(data[:16]), bytes(data[-4096:]).rstrip(b"\x00\r\n ")[-64:]
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return None if int.from_bytes(head[4:8], "little") + 8 <= len(data) else "truncated WebP"
    if head.startswith(b"BM"):
        return None if int.from_bytes(head[2:6], "little") <= len(data) else "truncated BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"P5", b"P6", b"P2", b"P3", b"\x00\x00\x00\x0cjP  ")):
        return None
    return "not an image file DALI decodes (unknown signature)"


def _read(index: MappedIndex, i: int) -> tuple[np.ndarray | None, str | None]:
    try:
        data = index.read(i)
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"
    return data, structural_problem(data)


class _GoodFiles:
    """Encoded bytes of dataset item i, or of its next classmate that reads whole when i does not.

    Problems are reported once per file through marker files in ``report_dir``, shared by every reader
    process; the loader logs them (with paths) from the main process."""

    def __init__(self, index: MappedIndex, excluded: frozenset[int], report_dir: str):
        self.index = index  # pickled as its folder's name: no mapped array may be an attribute here
        self.excluded, self.report_dir = excluded, report_dir
        self._bad: set[int] = set(excluded)

    def _report(self, i: int, reason: str) -> None:
        try:
            fd = os.open(os.path.join(self.report_dir, f"bad-{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except OSError:  # reported already, or the loader is gone
            return
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.index.full_path(i)}\t{reason}")

    def _candidates(self, i: int):
        mates = self.index.classmates(int(self.index.labels[i]))
        start = int(np.flatnonzero(mates == i)[0])
        return itertools.chain(mates[start:], mates[:start])

    def get(self, i: int) -> tuple[np.ndarray, int]:
        for j in self._candidates(int(i)):
            j = int(j)
            if j in self._bad:
                continue
            data, problem = _read(self.index, j)
            if problem is None:
                return data, j
            self._bad.add(j)
            self._report(j, problem)
        raise RuntimeError(
            f"no image of class {int(self.index.labels[i])} under {self.index.root} can be read whole"
        )


def _in_reader() -> None:
    """In a spawned reader (not when unpickled in the trainer): deaf to SIGTERM, gone with the trainer."""
    if multiprocessing.parent_process() is not None:
        become_deaf_worker()


class _PlanSource:
    """Per-sample source: the encoded bytes and label of position i of this rank's epoch plan.

    Runs in DALI's spawned worker processes, ``-j`` per rank, each unpickling its own copy: so it holds
    only file names. The index is memory-mapped (``MappedIndex``, shared by every reader of the rank) and
    so is each epoch's plan, written by the loader (``_write_plan``) before DALI can ask for it; DALI's
    ``epoch_idx`` counts pipeline resets, mapped to (first_epoch + epoch_idx), the first of which starts
    at plan position ``start``.
    """

    def __init__(
        self,
        index: MappedIndex,
        plans: str,
        first_epoch: int,
        start: int,
        excluded: frozenset[int],
        report_dir: str,
    ):
        self.files = _GoodFiles(index, excluded, report_dir)
        self.plans, self.first_epoch, self.start = plans, first_epoch, start
        self._epoch, self._plan = None, None

    def __setstate__(self, state):
        self.__dict__.update(state)
        _in_reader()

    def _plan_for(self, epoch_idx: int) -> np.ndarray:
        if self._epoch != epoch_idx:
            epoch, start = self.first_epoch + epoch_idx, self.start if epoch_idx == 0 else 0
            self._plan = np.load(_plan_file(self.plans, epoch, start), mmap_mode="r")
            self._epoch = epoch_idx
        return self._plan

    def __call__(self, info):
        plan = self._plan_for(info.epoch_idx)
        if info.idx_in_epoch >= len(plan):
            raise StopIteration
        encoded, _ = self.files.get(plan[info.idx_in_epoch])
        return encoded, np.array(self.files.index.labels[plan[info.idx_in_epoch]], dtype=np.int64)


def _flat_plan(sampler, start: int) -> np.ndarray:
    """This rank's dataset indices from plan position ``start``, batch after batch (``[first; partners]``
    for class pairs), as the torch loader's batch sampler yields them."""
    columns = sampler.rank_plan(start)
    k = sampler.units_per_batch
    return np.concatenate([column.reshape(-1, k) for column in columns], axis=1).ravel()


def _plan_file(folder: str, epoch: int, start: int) -> str:
    return os.path.join(folder, f"plan-{epoch}-{start}.npy")


def _write_plan(folder: str, sampler, epoch: int, start: int) -> None:
    """Write ``_flat_plan`` of ``epoch`` from ``start`` for the readers, whole or not at all; drop the
    plans of epochs before the previous one, which no reader can still be reading."""
    path = _plan_file(folder, epoch, start)
    if not os.path.exists(path):
        planner = copy.copy(sampler)  # set_epoch must not move the trainer's sampler
        planner.set_epoch(epoch)
        partial = path.removesuffix(".npy") + ".partial.npy"
        np.save(partial, _flat_plan(planner, start))
        os.replace(partial, path)
    for name in os.listdir(folder):
        if name.startswith("plan-") and int(name.split("-")[1]) < epoch - 1:
            os.remove(os.path.join(folder, name))


def _images_per_batch(sampler) -> int:
    return sampler.units_per_batch * sampler.num_columns


def _is_decode_error(error: Exception) -> bool:
    text = str(error)
    return any(marker in text for marker in ("fn.decoders", "nvImageCodec", "Failed to decode"))


def _decoder_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "failure" in line or "Failed" in line), lines[-1])


def _decodes(files: list[np.ndarray], device_id: int | None) -> bool:
    """Whether DALI's decoder (on the training device) decodes all of ``files`` in one batch."""

    @pipeline_def(batch_size=len(files), num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def probe():
        data = fn.external_source(source=lambda: files, batch=True, dtype=types.UINT8)
        return fn.decoders.image(
            data, device="mixed" if device_id is not None else "cpu", output_type=types.RGB
        )

    pipe = probe()
    try:
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    finally:
        del pipe
    return True


def _undecodable(files: dict[int, np.ndarray], device_id: int | None) -> list[int]:
    """The keys of ``files`` DALI cannot decode, by bisection: about 2 log2(n) batch decodes per bad
    file instead of one pipeline per file, so a large window costs seconds while other ranks wait."""
    if not files or _decodes(list(files.values()), device_id):
        return []
    if len(files) == 1:
        return list(files)
    keys = list(files)
    half = len(keys) // 2
    return _undecodable({k: files[k] for k in keys[:half]}, device_id) + _undecodable(
        {k: files[k] for k in keys[half:]}, device_id
    )


def dali_device_id(device: torch.device) -> int | None:
    """The GPU this process trains on (``--device cuda:1`` included), or None for CPU operators."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def val_resize_shorter(input_size, crop_pct: float) -> int:
    """The validation resize of the shorter side, rounded down as timm's eval transform does."""
    return math.floor(input_size[-2] / crop_pct)


def _train_interpolation(args, data_config):
    """timm's --train-interpolation: a fixed filter, or per image bilinear or bicubic for ``random``."""
    name = args.train_interpolation or data_config["interpolation"]
    if name == "random":
        choice = fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)])
        return fn.cast(choice, dtype=types.DALIDataType.INTERP_TYPE)
    if name not in INTERP:
        raise ConfigError(f"--train-interpolation {name}: DALI offers {', '.join(INTERP)} and random")
    return INTERP[name]


# timm augmentation flags the DALI pipeline does not implement, with their inactive values.
DALI_UNSUPPORTED = {
    "aa": None,
    "reprob": 0.0,
    "vflip": 0.0,
    "no_aug": False,
    "train_crop_mode": None,
    "color_jitter_prob": None,
    "grayscale_prob": None,
    "gaussian_blur_prob": None,
}


def check_dali_augmentation(args) -> None:
    """DALI decodes with a random-resized crop, resizes, colour-jitters and flips; refuse the rest by name."""
    unsupported = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r}"
        for k, off in DALI_UNSUPPORTED.items()
        if getattr(args, k) != off
    ]
    if unsupported:
        raise ConfigError(
            f"--data-backend dali does not implement {', '.join(unsupported)}: use --data-backend torch (timm's transforms)"
        )


def _normalise(images, data_config, *, mirror, layout: str, dtype):
    mean = [255 * m for m in data_config["mean"]]
    std = [255 * s for s in data_config["std"]]
    return fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout=layout, mean=mean, std=std, mirror=mirror
    )


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
        files = _GoodFiles(self.mapped, frozenset(self.excluded), self._report_dir)
        readable = {}
        for i in dict.fromkeys(int(i) for i in items):
            encoded, used = files.get(i)
            if used == i:  # a substituted file never reached the decoder
                readable[i] = encoded
        found = _undecodable(readable, self.device_id)
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
                _decoder_message(error),
            )
        self.excluded.update(found)


class DaliTrainLoader(_DaliLoader):
    """Iterates training batches (``[first; partners]`` for class pairs) for ``batch_sampler``'s current
    epoch and position."""

    def __init__(self, index: ImageIndex, batch_sampler, data_config: dict, args, device_id):
        super().__init__(index, device_id, args.channels_last)
        self.batch_sampler, self.data_config, self.args = batch_sampler, data_config, args
        self._batch_images = _images_per_batch(batch_sampler)
        self._iterator, self._next_epoch = None, None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _source(self, epoch: int, start: int) -> _PlanSource:
        """The readers' source for a pipeline that starts at plan position ``start`` of ``epoch``."""
        _write_plan(self._shared_dir, self.batch_sampler, epoch, start)
        _write_plan(self._shared_dir, self.batch_sampler, epoch + 1, 0)  # DALI may start it unasked
        return _PlanSource(
            self.mapped, self._shared_dir, epoch, start, frozenset(self.excluded), self._report_dir
        )

    def _build(self, epoch: int, start: int):
        args, device_id = self.args, self.device_id
        rank = self.batch_sampler.rank
        source = self._source(epoch, start)
        decoder = "mixed" if device_id is not None else "cpu"
        size = self.data_config["input_size"][-2:]
        dtype = (
            types.FLOAT16
            if args.amp and args.amp_dtype == "float16" and device_id is not None
            else types.FLOAT
        )

        @pipeline_def(
            batch_size=self._batch_images,
            num_threads=max(args.workers, 1),
            device_id=device_id,
            seed=args.seed * 1000 + rank,
            py_num_workers=max(args.workers, 1),
            py_start_method="spawn",
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
                interp_type=_train_interpolation(args, self.data_config),
            )
            if args.color_jitter:
                # timm's ColorJitter(b, c, s) factors, each uniform in [max(0, 1 - cj), 1 + cj].
                cj = [max(0.0, 1.0 - args.color_jitter), 1.0 + args.color_jitter]
                images = fn.color_twist(
                    images,
                    brightness=fn.random.uniform(range=cj),
                    contrast=fn.random.uniform(range=cj),
                    saturation=fn.random.uniform(range=cj),
                )
            mirror = fn.random.coin_flip(probability=args.hflip)
            images = _normalise(images, self.data_config, mirror=mirror, layout=self.layout, dtype=dtype)
            return images, labels.gpu() if device_id is not None else labels

        pipe = pipeline()
        pipe.build()
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
            _write_plan(self._shared_dir, sampler, epoch + 1, 0)
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
                if not _is_decode_error(e):
                    raise
                self._iterator = None
                start = sampler.state_dict(batches_consumed=batch)["units_consumed"]
                window = _flat_plan(sampler, start)[: PROBE_WINDOW * self._batch_images]
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
        files = _GoodFiles(self.mapped, frozenset(self.excluded), self._report_dir)
        for start in range(first_batch * self.batch_size, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield (
                [files.get(i)[0] for i in chunk],
                [np.array(self.index.labels[i], dtype=np.int64) for i in chunk],
            )

    def _build(self, first_batch: int):
        cfg, device_id = self.data_config, self.device_id
        size = cfg["input_size"][-2:]

        def batches():  # a generator function: DALI restarts it for every pass
            yield from self._batches(first_batch)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(self.args.workers, 1), device_id=device_id)
        def pipeline():
            jpegs, labels = fn.external_source(
                source=batches,
                num_outputs=2,
                cycle="raise",
                dtype=[types.UINT8, types.INT64],
            )
            images = fn.decoders.image(
                jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB
            )
            images = fn.resize(
                images,
                resize_shorter=val_resize_shorter(size, cfg["crop_pct"]),
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
                if not _is_decode_error(e):
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
):
    """One pipeline per rank on its own GPU (CPU operators when the device is the CPU), reading the plan
    a method's ``batches`` declaration asks for."""
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
        seed=args.seed,
        repeats=args.aug_repeats,
    )
    train = DaliTrainLoader(train_index, sampler, data_config, args, device_id)
    val = None
    if val_index is not None:
        val = DaliValLoader(
            val_index, data_config, args, device_id, num_replicas=ctx.world_size, rank=ctx.rank
        )
    return train, val
