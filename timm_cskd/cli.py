"""The ``timm-cskd`` command: one subcommand per tool, as ``hf`` and ``git`` have.

    timm-cskd train -c resnet50_cskd --data-dir /imagenet      # = python -m timm_cskd.train ...
    torchrun --nproc_per_node=8 -m timm_cskd train -c resnet50_cskd --data-dir /imagenet
    timm-cskd evaluate --checkpoint output/run/model_best.pth.tar --data-dir /imagenet

Everything after the subcommand goes to that tool's ``main``, so ``timm-cskd train --help`` is the
trainer's help. A tool's module is imported only when it runs, so a tool that this install lacks is
left out of the list rather than breaking the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys

from timm_cskd.invocation import invoked_as

__all__ = ["COMMANDS", "main"]

# subcommand: ("module:function" taking argv and returning an exit code, one-line description)
COMMANDS = {
    "train": ("timm_cskd.train:cli", "train a timm model (CS-KD or another method); no arguments: the demo"),
    "evaluate": ("timm_cskd.evaluate:main", "error rates, NLL, ECE, recall@1 and a reliability diagram"),
    "export": ("timm_cskd.export:main", "a checkpoint as a folder timm and the Hugging Face Hub load"),
    "compare": ("timm_cskd.compare:main", "evaluated runs side by side, in the paper's table layout"),
    "figures": ("timm_cskd.figures:main", "the paper's analysis figures from evaluated runs"),
    "study": ("timm_cskd.study:main", "a grid of datasets x methods x seeds, resumable, with the paper's tables"),
    "study-report": ("timm_cskd.study.report:main", "a study folder's analysis per dataset"),
    "prepare": ("timm_cskd.data.prepare:main", "MNIST / Fashion-MNIST / CIFAR files on disk to ImageFolder trees"),
    "verify": ("timm_cskd.data.verify:main", "decode every image once, list those that cannot be decoded"),
    "shards": ("timm_cskd.data.shards:main", "an ImageFolder as webdataset tar shards with per-shard indexes, for node-local disks"),
    "benchmark": ("timm_cskd.benchmark:main", "training images/s of a model and method on this device, and whether the loader keeps up"),
}  # fmt: skip


def _installed(target: str) -> bool:
    return importlib.util.find_spec(target.partition(":")[0]) is not None


def _help() -> str:
    commands = {name: about for name, (target, about) in COMMANDS.items() if _installed(target)}
    width = max(map(len, commands))
    lines = [
        "usage: timm-cskd COMMAND [ARGS ...]",
        "",
        "Class-wise Self-Knowledge Distillation (CS-KD) for timm models. `timm-cskd COMMAND --help`",
        "shows a command's flags; `python -m timm_cskd COMMAND` is the same.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {about}" for name, about in commands.items()),
        "",
        "options:",
        "  -h, --help  show this message",
        "  --version   show the version",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from timm_cskd import __version__

        print(f"timm-cskd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    known = [n for n, (target, _) in COMMANDS.items() if _installed(target)]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'{hint} (commands: {', '.join(known)})", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[name][0].partition(":")
    with invoked_as(f"timm-cskd {name}"):
        return getattr(importlib.import_module(module), function)(rest)
