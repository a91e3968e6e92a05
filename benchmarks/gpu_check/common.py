"""What every row shares: the row record, the run's environment and budget, models, batches, steps."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
LR = 0.05
# The throughput configuration; the compile row compiles it at the throughput batch so that the
# compiled throughput rows reuse its graphs: one compilation in the whole run.
AMP_DTYPE = torch.bfloat16
MODES = ("off", "anchor", "paired")
MODE_LABEL = {"off": "CE", "anchor": "CS-KD anchor", "paired": "CS-KD paired"}
METHOD_OF_MODE = {"off": "ce", "anchor": "cskd", "paired": "cskd-paired"}


class Skip(Exception):
    """A row that cannot run here for a reason outside the code under test."""


@dataclass
class Row:
    name: str
    kind: str  # "check" (PASS/FAIL/SKIP) or "measure" (ok/FAIL/SKIP)
    status: str
    value: str = ""
    detail: str = ""
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0


def check(name: str, ok: bool, value: str, detail: str, raw: dict | None = None) -> Row:
    return Row(name, "check", "PASS" if ok else "FAIL", value, detail, raw or {})


@dataclass
class Env:
    args: argparse.Namespace
    device: torch.device
    start: float
    preflight: dict = field(default_factory=dict)
    work_dir: Path | None = None  # generated data and trainer outputs (never --output: only that returns)
    logs: list[str] = field(default_factory=list)  # trainer process output tails, for trainer_logs.txt
    _shared: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def shared_model(self) -> torch.nn.Module:
        """The throughput model (channels_last, seed 0), built once."""
        if "model" not in self._shared:
            self._shared["model"] = make_model(self).to(memory_format=torch.channels_last).train()
            self._shared["initial"] = copy.deepcopy(self._shared["model"])
        return self._shared["model"]

    def initial_weights(self) -> torch.nn.Module:
        """An eager copy of the shared model as it was built, before any step changed it."""
        self.shared_model()
        return copy.deepcopy(self._shared["initial"])

    def compiled_model(self) -> torch.nn.Module:
        """``torch.compile`` of the shared model, made once; static shapes, so every mode at the
        throughput batch runs the same two graphs (with and without grad)."""
        reason = self.preflight.get("compile_missing")
        if reason:
            raise Skip(reason)
        if "compiled" not in self._shared:
            self._shared["compiled"] = torch.compile(self.shared_model(), dynamic=False)
        return self._shared["compiled"]


def make_model(env: Env, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(env.args.model, num_classes=env.args.num_classes).to(env.device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    # The recipe's optimizer (configs/*.yaml: opt momentum, 0.9, weight decay 1e-4).
    return create_optimizer_v2(model, opt="momentum", lr=LR, momentum=0.9, weight_decay=1e-4)


def make_batch(env: Env, mode: str, size: int, seed: int = 0, channels_last: bool = False):
    """``size`` images with gradient: anchor mode adds ``size`` partners, paired is size/2 pairs.

    Class-pair layout ``[x; x']`` with the targets repeated, as ClassPairSampler yields it.
    """
    g = torch.Generator().manual_seed(seed)
    loaded = 2 * size if mode == "anchor" else size
    img = env.args.img_size
    images = torch.randn(loaded, 3, img, img, generator=g)
    target = torch.randint(0, env.args.num_classes, (loaded // 2,), generator=g).repeat(2)
    if mode == "off":
        target = torch.randint(0, env.args.num_classes, (loaded,), generator=g)
    images = images.to(env.device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(env.device)


def make_task(model, mode: str):
    """The trainer's method for a mode: ``ce`` on plain batches, ``cskd`` and ``cskd-paired`` on pairs."""
    from timm_cskd.methods import get_method, method_hparams

    cls = get_method(METHOD_OF_MODE[mode])
    return cls(model, method_hparams(cls, {}))


def autocast(env: Env, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=dtype)


def train_step(env, task, optimizer, batch, amp_dtype=None, scaler=None) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast(env, amp_dtype):
        loss = task(*batch)["loss"]
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach().float()


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compiler_missing(device: torch.device) -> str | None:
    """Inductor builds C++ on CPU; on CUDA Triton builds a small C launcher. Either needs a compiler."""
    names = ["CXX", "g++", "c++", "clang++"] if device.type == "cpu" else ["CC", "cc", "gcc", "clang"]
    env_var = os.environ.get(names[0])
    if (env_var and shutil.which(env_var)) or any(shutil.which(n) for n in names[1:]):
        return None
    return f"no C/C++ compiler on PATH ({', '.join(names[1:])}); inductor needs one"


def is_missing_compiler_error(exc: BaseException) -> bool:
    return any(type(e).__name__ == "InvalidCxxCompiler" for e in (exc, exc.__cause__, exc.__context__))


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
