"""Atomic training checkpoints in timm's format, and finding the newest valid one to resume from.

The file holds timm's keys (``arch``, ``state_dict``, ``state_dict_ema``, ``optimizer``, ``epoch`` as the
last completed epoch with ``version`` 2, ``args``, ``metric``, the AMP scaler under its timm key), so
timm's own ``load_checkpoint`` / ``resume_checkpoint`` read it, plus what timm's resume lacks to continue
mid-epoch: the scheduler, the sampler position and every RNG state. ``args`` is a plain dictionary of the
run's configuration; ``config_version`` numbers its layout, so a release reads the layouts it knows and
refuses, by name, a checkpoint written by a newer one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timm_cskd.atomic import atomic_path
from timm_cskd.methods import get_method
from timm_cskd.sampler import saved_position

__all__ = [
    "CONFIG_VERSION",
    "CheckpointError",
    "config_version",
    "LoadedModel",
    "load_model",
    "save_checkpoint",
    "copy_checkpoint",
    "load_checkpoint_file",
    "find_resume_checkpoint",
    "rng_state",
    "set_rng_state",
]

_logger = logging.getLogger(__name__)

LAST = "last.pth.tar"
BEST = "model_best.pth.tar"
PREVIOUS = "last-previous.pth.tar"

# The layout of the ``args`` dictionary this release writes. Checkpoints written before the key existed
# (tests/fixtures/checkpoint_release2) hold the same layout and count as version 1.
CONFIG_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(state: dict, path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """Write to a temporary file, fsync, then rename over ``path``: a crash leaves the old file intact.

    ``keep_previous`` first renames an existing file to ``last-previous.pth.tar`` as a fallback.
    """
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Synced before the old file is renamed away: a kill during a multi-GB fsync, or a quota
            # error that network file systems report only here, leaves last.pth.tar in place.
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREVIOUS))


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy via a temporary file and rename, as atomic as save_checkpoint."""
    with atomic_path(dst, durable=True) as tmp:
        shutil.copyfile(src, tmp)


def config_version(checkpoint: dict, path: str | os.PathLike) -> int:
    """The layout version of the checkpoint's ``args`` (1 when it does not say); a CheckpointError naming
    ``path`` for one newer than this release reads, or one that is not a positive integer."""
    version = checkpoint.get("config_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: config_version {version!r} is not a positive integer")
    if version > CONFIG_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer timm-cskd (config_version {version}; this one reads up to "
            f"{CONFIG_VERSION}): load it with the release that wrote it or a later one"
        )
    return version


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> dict:
    """torch.load with weights_only=True, turning truncation, foreign files and a configuration layout
    newer than this release's into CheckpointError."""
    checkpoint = _read_checkpoint(path, mmap)
    config_version(checkpoint, path)
    return checkpoint


def _read_checkpoint(path: str | os.PathLike, mmap: bool) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def training_progress(checkpoint: dict) -> tuple[int, int]:
    """(epoch, samples of it trained): comparable across checkpoints whatever rank count or batch size
    saved them, unlike the step count, whose unit an elastic resume changes."""
    return checkpoint.get("resume_epoch", 0), saved_position(checkpoint.get("sampler") or {})


def find_resume_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """The furthest-trained checkpoint in ``folder`` that loads, skipping unreadable ones with a warning.

    Candidates are memory-mapped while compared, so only the chosen one is ever read whole. Its
    ``config_version`` is the caller's to check: one from a newer release is refused, never skipped,
    since resuming an older checkpoint instead would overwrite the newer run's."""
    folder = Path(folder)
    best = None
    for name in (LAST, PREVIOUS, BEST):
        path = folder / name
        if not path.is_file():
            continue
        try:
            checkpoint = _read_checkpoint(path, mmap=True)
        except CheckpointError as e:
            _logger.warning("--resume auto: skipping %s", e)
            continue
        if "state_dict" not in checkpoint or "global_step" not in checkpoint:
            _logger.warning("--resume auto: skipping %s, it is not a timm-cskd training checkpoint", path)
            continue
        progress = training_progress(checkpoint)
        if best is None or progress > best[0]:
            best = (progress, path, checkpoint)
    return None if best is None else best[1:]


@dataclass
class LoadedModel:
    """A model rebuilt from any checkpoint form, with what the checkpoint says about its data."""

    model: torch.nn.Module
    source: str
    data_config: dict | None
    class_names: list[str] | None
    train_args: dict | None
    # The last completed epoch, None for a checkpoint saved mid-epoch or one without training state.
    epoch: int | None = None
    # The training method and its hyper-parameters, when the checkpoint records them.
    method: str | None = None
    method_kwargs: dict | None = None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _classifier_size(model_name: str, state_dict: dict) -> int | None:
    import timm

    classifier = timm.create_model(model_name, pretrained=False).pretrained_cfg.get("classifier", "fc")
    weight = state_dict.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def load_model(path: str | os.PathLike, model_name: str | None = None, ema: bool = False) -> LoadedModel:
    """Rebuild a timm model from a training checkpoint (``.pth.tar``), a plain state_dict (needs
    ``model_name``) or an exported ``local-dir`` folder. Errors name the file and what is wrong."""
    import timm
    from timm.models import clean_state_dict

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json: not an exported timm model")
        if ema:
            raise CheckpointError(
                "--ema applies to training checkpoints; an exported folder holds one set of weights"
            )
        try:
            model = timm.create_model(f"local-dir:{path}", pretrained=True)
        except Exception as e:
            raise CheckpointError(
                f"cannot load the exported model in {path} ({type(e).__name__}: {e})"
            ) from e
        cfg = model.pretrained_cfg
        data_config = {
            k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in cfg
        }
        return LoadedModel(model, str(path), data_config, cfg.get("label_names"), None)

    checkpoint = load_checkpoint_file(path)
    train_args = None
    if "state_dict" in checkpoint:
        train_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else None
        key = "state_dict_ema" if ema else "state_dict"
        if key not in checkpoint:
            raise CheckpointError(f"{path} has no {key} (was it trained with --model-ema?)")
        state_dict = clean_state_dict(checkpoint[key])
        model_name = model_name or checkpoint.get("arch") or (train_args or {}).get("model")
        num_classes = checkpoint.get("num_classes")
    elif _is_state_dict(checkpoint):
        if ema:
            raise CheckpointError(f"{path} is a plain state_dict: it holds no EMA weights")
        state_dict = clean_state_dict(checkpoint)
        num_classes = None
    else:
        raise CheckpointError(f"{path} is neither a training checkpoint nor a state_dict of tensors")
    if model_name is None:
        raise CheckpointError(f"{path} does not name its architecture: pass --model")
    if model_name not in timm.list_models():
        raise CheckpointError(f"{path}: unknown timm model '{model_name}'")
    if num_classes is None:
        num_classes = _classifier_size(model_name, state_dict)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    method, method_kwargs = (train_args or {}).get("method"), (train_args or {}).get("method_kwargs") or {}
    if method is not None:
        # The method's change to the model (a cosine head, a bias-free classifier) holds these weights.
        model = get_method(method).adapt_model(model, method_kwargs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {model_name}: {str(e).splitlines()[0]}") from e
    epoch = checkpoint.get("epoch") if checkpoint.get("resume_batch", 0) == 0 else None
    return LoadedModel(
        model,
        str(path),
        checkpoint.get("data_config"),
        checkpoint.get("class_names"),
        train_args,
        epoch,
        method,
        method_kwargs,
    )


def rng_state() -> dict:
    """Every RNG the data pipeline and Mixup draw from, as plain bytes and ints: weights_only loading
    accepts them, and torch.distributed.gather_object pickles them without tensor storages."""
    np_state = np.random.get_state()  # noqa: NPY002 - timm's Mixup draws from the legacy global RNG
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": bytes(torch.get_rng_state().numpy()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = bytes(torch.cuda.get_rng_state().numpy())
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # noqa: NPY002
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]))
