"""A timm train.py flag this trainer accepts but cannot honour when set, declared once with its reason.

A timm ``args.yaml`` carries every timm flag at its default, so a refused flag is still parsed; only a
value other than timm's default stops the run, naming the flag and why.
"""

from __future__ import annotations

import argparse

__all__ = ["refusals", "refused"]


def refused(group, *names: str, why: str, **kwargs) -> argparse.Action:
    """Add a refused flag to ``group``; its help says which value is accepted and why no other is."""
    action = group.add_argument(*names, help=f"refused unless {kwargs.get('default')!r}: {why}", **kwargs)
    action.refused_because = why
    return action


def refusals(parser: argparse.ArgumentParser) -> dict[str, tuple[object, str]]:
    """Each refused flag's destination: (timm's default, why), in the parser's order."""
    return {a.dest: (a.default, a.refused_because) for a in parser._actions if hasattr(a, "refused_because")}
