"""Knowledge-distillation teachers from whatever a timm user has: a timm model name (its pretrained
weights, which must be in the local cache when offline), an ``hf-hub:`` id, a ``local-dir:`` export, a
timm-cskd training checkpoint or exported folder, or a plain state_dict (with ``--kd-model-arch``).

The teacher is timm's ``DistillationTeacher``: eval mode, frozen, with the mean/std it was trained with
(taken from the teacher checkpoint's own data config when it has one);
``timm_cskd.methods.kd_input.input_renormalisation`` maps the student's normalised input onto them.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.task.distillation import DistillationTeacher

from timm_cskd.checkpoint import CheckpointError, load_model
from timm_cskd.errors import ConfigError

__all__ = ["load_teacher"]


def _create(name: str, num_classes: int) -> torch.nn.Module:
    try:
        if name.startswith(("hf-hub:", "local-dir:")):
            return timm.create_model(name, pretrained=True)
        if name not in timm.list_models():
            raise ConfigError(
                f"--kd-model-name {name}: neither a file nor a timm model name (or an hf-hub:/local-dir: id)"
            )
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except ConfigError:
        raise
    except Exception as e:  # hub and download errors come in many types
        raise ConfigError(
            f"--kd-model-name {name}: cannot load its pretrained weights ({type(e).__name__}: {e}); offline, "
            "pass a checkpoint file or an exported folder instead"
        ) from e


def load_teacher(
    name_or_path: str, num_classes: int, arch: str | None = None
) -> tuple[DistillationTeacher, str]:
    """The frozen teacher and a description of where it came from (recorded in the run's log)."""
    path = Path(name_or_path)
    mean = std = None
    if path.exists():
        try:
            loaded = load_model(path, arch)
        except CheckpointError as e:
            message = str(e).replace("pass --model", "pass --kd-model-arch")
            raise ConfigError(f"--kd-model-name: {message}") from e
        model, source = loaded.model, f"{path} ({unwrap_name(loaded.model)})"
        if loaded.data_config:
            mean, std = loaded.data_config.get("mean"), loaded.data_config.get("std")
    else:
        model, source = _create(name_or_path, num_classes), name_or_path
    if model.num_classes != num_classes:
        raise ConfigError(
            f"--kd-model-name {name_or_path} predicts {model.num_classes} classes, the student {num_classes}"
        )
    teacher = DistillationTeacher(model)
    if mean is not None and std is not None:
        teacher.mean_kd.copy_(torch.tensor(mean).view(1, -1, 1, 1))
        teacher.std_kd.copy_(torch.tensor(std).view(1, -1, 1, 1))
    teacher.requires_grad_(False)
    return teacher, source


def unwrap_name(model: torch.nn.Module) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)
