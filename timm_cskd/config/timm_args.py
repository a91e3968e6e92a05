"""The one adapter back to a namespace: timm's ``optimizer_kwargs(cfg)`` and ``scheduler_kwargs(cfg)`` read
their settings off an argparse-style object, so they get one made of the optimisation section (and the
seed of the schedule's noise), with the values as the command line gave them (lists, not tuples)."""

from __future__ import annotations

import argparse
import dataclasses

from timm_cskd.config.sections import OptimConfig

__all__ = ["timm_namespace"]


def timm_namespace(optim: OptimConfig, **extra) -> argparse.Namespace:
    """What timm's ``optimizer_kwargs`` / ``scheduler_kwargs`` read: ``optim``'s fields and ``extra``
    (for the scheduler: ``seed``, of the schedule's noise, and ``eval_metric``, the plateau's mode)."""
    values = {
        f.name: list(v) if isinstance(v := getattr(optim, f.name), tuple) else v
        for f in dataclasses.fields(optim)
    }
    return argparse.Namespace(**values, **extra)
