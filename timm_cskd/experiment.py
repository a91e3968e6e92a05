"""An experiment's set-up around the training loop: the configuration resolved and checked taken
together (``resolve_run``), its folder (named, locked, never overwritten by accident), logging, seeds and
the dataset indices.
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timm_cskd import checkpoint as ckpt
from timm_cskd.config import DEFAULT_VAL_SPLIT, DataConfig, OutputConfig, RunConfig, dataset_refusal
from timm_cskd.data.index import DataIndexError, build_index, find_split
from timm_cskd.data.shard_index import (
    MANIFEST,
    find_shard_split,
    is_shard_folder,
    load_shard_index,
    rank_shards,
    read_manifest,
)
from timm_cskd.data.verify import read_exclude_list
from timm_cskd.distributed import Context
from timm_cskd.errors import ConfigError
from timm_cskd.flag_checks import check_flag_values
from timm_cskd.methods import KDConfig, Method, kd_config, resolve_method
from timm_cskd.run_lock import RunLock, RunLockedError

__all__ = [
    "ResolvedRun",
    "load_indices",
    "open_experiment",
    "remove_previous_run",
    "seed_everything",
    "resolve_run",
    "setup_logging",
    "warn_single_image_classes",
]

_logger = logging.getLogger("timm_cskd.train")


def setup_logging(ctx: Context, log_file: Path | None) -> Callable[[], None]:
    """The run's log lines on stdout (and rank 0's in ``log_file``) in place of the root logger's
    handlers; returns the function that closes them and puts the caller's back (a notebook trains twice)."""
    root = logging.getLogger()
    previous, previous_level = list(root.handlers), root.level
    for handler in previous:
        root.removeHandler(handler)
    level = logging.INFO if ctx.primary else logging.WARNING
    fmt = logging.Formatter(
        "%(asctime)s %(message)s" if ctx.primary else f"[rank {ctx.rank}] %(message)s", "%H:%M:%S"
    )
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None and ctx.primary:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
    root.setLevel(level)
    own = list(root.handlers)

    def restore() -> None:
        for handler in own:
            root.removeHandler(handler)
            handler.close()
        for handler in previous:
            root.addHandler(handler)
        root.setLevel(previous_level)

    return restore


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - timm's Mixup uses the global RNG
    torch.manual_seed(seed)


def open_experiment(config: RunConfig, ctx: Context) -> tuple[Path, RunLock | None, str]:
    """The experiment folder, locked by rank 0 for the run's life, and its name (--experiment, else
    timm's date-model-size with the method); every rank fails alike if it cannot."""
    args = config.output
    name = args.experiment
    if not name:
        # timm's naming (date-model-size), with the method: rank 0's clock names it for every rank.
        size = (config.model.input_size or [None, None, config.model.img_size])[-1]
        parts = [
            time.strftime("%Y%m%d-%H%M%S"),
            config.model.model.replace("/", "_"),
            config.method.method,
            size,
        ]
        name = ctx.broadcast("-".join(str(p) for p in parts if p is not None))
    # timm's default root when --output is empty.
    folder = Path(args.output or "output/train") / name
    lock, error = None, None
    if ctx.primary:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = RunLock(folder)
            lock.acquire()
            if previous_run(folder) and not args.resume and not args.overwrite:
                raise ConfigError(
                    f"{folder} already holds a training run: pass --resume auto to continue it, --overwrite "
                    "to start it over (its checkpoints and summary are deleted), or another --experiment"
                )
        except (ConfigError, RunLockedError, OSError) as e:
            if lock is not None:
                lock.release()
                lock = None
            if isinstance(e, OSError):
                e = ConfigError(
                    f"--output {args.output or 'output/train'}: cannot write {folder} ({e.strerror or e})"
                )
            error = e
    ctx.fail_together(error)
    return folder, lock, name


def previous_run(folder: Path) -> list[Path]:
    """The files of a run that an --overwrite replaces: its checkpoints, summary and status."""
    names = (ckpt.LAST, ckpt.PREVIOUS, ckpt.BEST, "summary.csv", "status.json")
    found = [folder / name for name in names if (folder / name).exists()]
    return found + sorted(folder.glob("checkpoint-*.pth.tar"))


def remove_previous_run(args: OutputConfig, ctx: Context, folder: Path) -> None:
    """--overwrite: rank 0 deletes the old run's files, called only once the new run is fully built and
    about to write its first file, so a run that fails its checks destroys nothing."""
    error = None
    if ctx.primary and args.overwrite and not args.resume:
        try:
            for path in previous_run(folder):
                path.unlink()
        except OSError as e:
            error = ConfigError(f"--overwrite: cannot delete the previous run's {e.filename}: {e.strerror}")
    ctx.fail_together(error)


def resolve_data_dir(args: DataConfig, ctx: Context) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    from timm_cskd.data.demo import demo_data_dir

    if ctx.primary:
        demo_data_dir()
    ctx.barrier()
    return demo_data_dir()


def read_class_map(path: str) -> list[str]:
    """timm's txt class map: one class folder name per line, in label order."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"--class-map {path}: {e}") from e
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"--class-map {path}: expected distinct class names, one per line")
    return names


def load_indices(args: DataConfig, ctx: Context, out_dir: Path, *, num_classes: int | None, batches: str):
    """Train/val indices (``num_classes``: --num-classes, checked against them; ``batches``: the method's
    plan). Rank 0 scans (and caches) first, then the other ranks read its cache."""
    data_dir = resolve_data_dir(args, ctx)
    if not data_dir.is_dir():
        raise DataIndexError(f"--data-dir {data_dir} does not exist or is not a folder")
    shards = is_shard_folder(data_dir) or str(args.dataset).startswith("wds/")
    if shards:
        train, val = _load_rank_shards(args, ctx, data_dir, num_classes, batches)
    else:
        train, val = _load_folders(args, ctx, data_dir, out_dir, num_classes)
    if args.exclude_list:
        try:
            listed = [data_dir / line for line in read_exclude_list(args.exclude_list)]
        except (OSError, UnicodeDecodeError) as e:
            raise DataIndexError(f"--exclude-list {args.exclude_list}: cannot read it ({e})") from e
        train, val = (None if index is None else index.without_files(listed) for index in (train, val))
        # A rank's share of shards may lack a class: emptiness is a folder dataset's error only.
        emptied = (
            []
            if shards
            else [
                train.classes[c]
                for c in np.flatnonzero(np.bincount(train.labels, minlength=train.num_classes) == 0)
            ]
        )
        if emptied:
            raise DataIndexError(
                f"--exclude-list {args.exclude_list} removes every training image of class {emptied[0]}"
                + (f" (and {len(emptied) - 1} more)" if len(emptied) > 1 else "")
                + ": a class without training images cannot be learnt, as an empty class folder"
            )
        excluded = len(train.excluded) + (len(val.excluded) if val is not None else 0)
        _logger.info("excluding %d undecodable images listed in %s", excluded, args.exclude_list)
    return train, val


def _load_folders(args: DataConfig, ctx: Context, data_dir: Path, out_dir: Path, num_classes: int | None):
    """Train/val indices of ImageFolder trees or list files. Rank 0 scans (and caches) first, then the
    other ranks read its cache."""
    train_path = find_split(data_dir, [args.train_split])
    if train_path is None:
        raise DataIndexError(f"no '{args.train_split}' folder or list file in {data_dir}")
    val_path = find_split(data_dir, [args.val_split]) if args.val_split else None  # '': no validation
    if args.val_split and val_path is None:
        if args.val_split != DEFAULT_VAL_SPLIT:
            raise DataIndexError(
                f"--val-split {args.val_split}: no '{args.val_split}' folder or list file in {data_dir}"
            )
        _logger.warning(
            "no validation split (val/, validation/ or a .txt list) in %s: training without validation, "
            "so no model_best and no eval columns (pass --val-split NAME, or --val-split '' to silence this)",
            data_dir,
        )
    cache_dir = out_dir / "index-cache"
    class_map = read_class_map(args.class_map) if args.class_map else None

    def build():
        train_all = build_index(train_path, cache_dir=cache_dir)
        train = train_all
        if class_map is not None:
            train = train.with_classes(class_map)
        if num_classes is not None and num_classes != train.num_classes:
            kind = "class folders" if train_path.is_dir() else "classes"
            raise DataIndexError(
                f"--num-classes is {num_classes} but {train_path} has {train.num_classes} {kind}"
            )
        val = None
        if val_path is not None:
            val = build_index(
                val_path, cache_dir=cache_dir, classes=None if val_path.is_dir() else train.classes
            )
            if val_path.is_dir():
                unknown = sorted(set(val.classes) - set(train_all.classes))
                if unknown:
                    raise DataIndexError(
                        f"{val_path} has class folders {unknown[:5]} that the training split {train_path} "
                        "lacks: the model could never predict them (remove them or add training images)"
                    )
                val = val.with_classes(train.classes, source=f"the training split {train_path}")
        return train, val

    # Rank 0 scans first (minutes on network storage); the other ranks then read its cache.
    indices, error = None, None
    if ctx.primary:
        try:
            indices = build()
        except (DataIndexError, OSError) as e:
            error = e
    ctx.fail_together(error, slow=True)
    if not ctx.primary:
        try:
            indices = build()
        except (DataIndexError, OSError) as e:
            error = e
    ctx.fail_together(error)
    return indices


def _load_rank_shards(args: DataConfig, ctx: Context, data_dir: Path, num_classes: int | None, batches: str):
    """This rank's training shards (``rank_shards``) and every validation shard of a shard folder;
    each rank reads only those files, so a node needs only its ranks' shards on its disk."""
    error, indices = None, None
    try:
        if not is_shard_folder(data_dir):
            raise DataIndexError(
                f"--dataset {args.dataset}: {data_dir} has no {MANIFEST} (write shards with python -m "
                "timm_cskd.data.shards)"
            )
        manifest = read_manifest(data_dir)
        train_split = find_shard_split(manifest, args.train_split)
        if train_split is None:
            raise DataIndexError(f"no '{args.train_split}' split in {data_dir / MANIFEST}")
        num_shards = len(manifest["splits"][train_split]["shards"])
        train = load_shard_index(data_dir, train_split, rank_shards(num_shards, ctx.rank, ctx.world_size))
        val_split = find_shard_split(manifest, args.val_split) if args.val_split else None
        if args.val_split and val_split is None and args.val_split != DEFAULT_VAL_SPLIT:
            raise DataIndexError(f"--val-split {args.val_split}: no such split in {data_dir / MANIFEST}")
        val = load_shard_index(data_dir, val_split) if val_split else None
        if args.class_map:
            classes = read_class_map(args.class_map)
            train, val = (None if ix is None else ix.with_classes(classes) for ix in (train, val))
        if num_classes is not None and num_classes != train.num_classes:
            raise DataIndexError(
                f"--num-classes is {num_classes} but {data_dir / MANIFEST} has {train.num_classes} classes"
            )
        indices = train, val
    except (DataIndexError, OSError) as e:
        error = e
    ctx.fail_together(error)
    if batches != "plain":  # the same on every rank: the gather is collective
        _warn_single_image_classes_per_rank(indices[0], ctx)
    if indices[1] is None and args.val_split:
        _logger.warning("no validation split in %s: training without validation", data_dir / MANIFEST)
    return indices


def _warn_single_image_classes_per_rank(train, ctx: Context) -> None:
    """A rank's plan pairs a class's only image on its shards with itself: rank 0 names them per rank."""
    counts = np.bincount(train.labels, minlength=train.num_classes)
    single = ctx.gather([train.classes[c] for c in np.flatnonzero(counts == 1)])
    for rank, names in enumerate(single):
        if names and ctx.primary:
            _logger.warning(
                "rank %d: %d class(es) have a single image on its shards (%s%s): each pairs with itself",
                rank,
                len(names),
                ", ".join(names[:5]),
                ", ..." if len(names) > 5 else "",
            )


def warn_single_image_classes(index, method_cls: type[Method]) -> None:
    """A class-pair method pairs a class's only image with itself: say so once, naming the classes."""
    if method_cls.batches == "plain":
        return
    single = [
        index.classes[c] for c in np.flatnonzero(np.bincount(index.labels, minlength=index.num_classes) == 1)
    ]
    if single:
        _logger.warning(
            "%d class(es) have a single training image (%s%s): --method %s pairs each with itself, so it "
            "gets no classmate to learn from",
            len(single),
            ", ".join(single[:5]),
            ", ..." if len(single) > 5 else "",
            method_cls.name,
        )


@dataclass(frozen=True)
class ResolvedRun:
    """A run's configuration resolved (``config``), with what resolving it found: the method's class, its
    distillation settings (None without a teacher) and its augmented views."""

    config: RunConfig
    method_cls: type[Method]
    kd: KDConfig | None
    views: list[dict]


def resolve_run(config: RunConfig) -> ResolvedRun:
    """Resolve the configuration once and check its flags together, before any folder, scan or model:
    the method (its name and full hyper-parameters, as args.yaml records them), the data folder (timm's
    positional one), the checkpoint interval (timm's --recovery-interval)."""
    refusal = dataset_refusal(config.data.dataset)  # also for a configuration built in Python
    if refusal:
        raise ConfigError(f"timm train.py settings this trainer cannot honour: {refusal}")
    method_cls, method_kwargs = resolve_method(config.method)
    views = method_cls.views(method_kwargs)
    config = config.replace(method=method_cls.name, method_kwargs=method_kwargs)
    check_flag_values(config, views)
    data, out = config.data, config.output
    if data.data is not None:  # timm's deprecated positional data dir
        if data.data_dir is not None and data.data_dir != data.data:
            raise ConfigError(f"two data folders: positional {data.data} and --data-dir {data.data_dir}")
        config = config.replace(data_dir=data.data)
    if out.recovery_interval:  # timm's name for a mid-epoch checkpoint interval
        if out.checkpoint_interval and out.checkpoint_interval != out.recovery_interval:
            raise ConfigError("--recovery-interval and --checkpoint-interval disagree: give one")
        config = config.replace(checkpoint_interval=out.recovery_interval)
    name, batch_size = method_cls.name, data.batch_size
    mixup_on = data.mixup > 0 or data.cutmix > 0 or data.cutmix_minmax is not None
    if mixup_on and method_cls.batches != "plain" and data.mixup_mode != "batch":
        raise ConfigError(
            f"--method {name} mixes partners' predictions with the batch's one lambda: use --mixup-mode batch"
        )
    kd = kd_config(config.method)  # the distillation flags fail here, before any folder or scan
    if data.aa and any("auto_augment" in view for view in views):
        raise ConfigError(
            f"--method {name} sets its own augmentation policy for one of its views "
            "(--method-kwargs auto_augment=...); --aa would change its standard view too: drop --aa"
        )
    if config.method.bce_loss and not method_cls.bce_loss:
        raise ConfigError(f"--method {name} does not combine with --bce-loss: {method_cls.bce_note}")
    if method_cls.batches == "paired" and batch_size % 2:
        raise ConfigError(
            f"--method {name} needs an even --batch-size (it counts images: pairs x 2), got {batch_size}"
        )
    if mixup_on:
        if not method_cls.mixup:
            raise ConfigError(f"--method {name} does not compose with Mixup/CutMix: {method_cls.mixup_note}")
        if batch_size % 2:
            raise ConfigError(f"Mixup/CutMix needs an even --batch-size, got {batch_size}")
    if data.data_backend == "dali":
        importlib.import_module("timm_cskd.data.dali")  # raises with install instructions when missing
    if not out.experiment and out.resume == "auto":
        raise ConfigError("--resume auto needs --experiment to know which folder to resume")
    return ResolvedRun(config, method_cls, kd, views)
