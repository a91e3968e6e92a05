"""Full IEEE float32 for measurements: TF32 and reduced-precision matmuls off inside, restored after.

``setup_context`` turns TF32 on for training speed; metrics compared across runs, GPUs and papers must
not carry its 10-bit mantissa. ``timm_cskd.evaluate`` and the GPU check's references both run under
``full_fp32``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["full_fp32"]


def _precision_settings() -> list:
    """torch >= 2.9's per-backend float32 precision settings ("ieee", "tf32", "bf16", or "none": as the
    enclosing backend), where this torch has them."""
    found = []
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):
        holder = torch.backends
        for part in path.split("."):
            holder = getattr(holder, part, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            found.append(holder)
    return found


def _readable(getter):
    # torch's legacy getters raise once the per-backend API has left the backends disagreeing.
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def full_fp32():
    """Float32 matmuls and convolutions in IEEE float32 (no TF32, no bf16) inside; the caller's
    settings restored after, also on errors."""
    settings = _precision_settings()
    saved = [holder.fp32_precision for holder in settings]
    saved_matmul = _readable(torch.get_float32_matmul_precision)
    saved_cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        for holder in settings:
            holder.fp32_precision = "ieee"
        yield
    finally:
        # The legacy setters also write the per-backend settings, so those are restored last.
        if saved_matmul is not None:
            torch.set_float32_matmul_precision(saved_matmul)
        if saved_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = saved_cudnn
        for holder, value in zip(settings, saved):
            holder.fp32_precision = value
