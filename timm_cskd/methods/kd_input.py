"""The student's normalised input as a knowledge-distillation teacher expects it (timm's
``DistillationTeacher.normalize_input``), decided once when the task is built."""

from __future__ import annotations

import torch
from timm.task.distillation import DistillationTeacher

__all__ = ["input_renormalisation"]


def input_renormalisation(
    teacher: DistillationTeacher, mean, std
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` with ``x * scale + shift`` equal to timm's ``teacher.normalize_input(x, mean,
    std)`` for input ``x`` normalised with the student's ``mean``/``std``; None when the teacher expects
    the same normalisation.

    Decided once, when the task is built: ``normalize_input`` compares the buffers with ``torch.equal``
    at every call, a device-to-host synchronisation per training step on a GPU."""
    student_mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    student_std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    teacher_mean = teacher.mean_kd.detach().to("cpu", torch.float32)
    teacher_std = teacher.std_kd.detach().to("cpu", torch.float32)
    if torch.equal(student_mean, teacher_mean) and torch.equal(student_std, teacher_std):
        return None
    return student_std / teacher_std, (student_mean - teacher_mean) / teacher_std
