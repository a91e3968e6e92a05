"""Count device-to-host synchronisations over a Trainer's steps, by where they happen.

On CUDA, torch's own sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns at every
synchronising call; each warning is recorded with its Python stack. On CPU nothing synchronises, so a
proxy counts the calls that would on a GPU: ``Tensor.item``, ``Tensor.tolist``, ``Tensor.numpy`` and
``torch.equal``, in the main thread.
"""

from __future__ import annotations

import threading
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

PROXIED = ("item", "tolist", "numpy")
SYNC_WARNING = "synchronizing CUDA operation"


@dataclass
class SyncEvent:
    region: str  # "step" (forward, backward, optimizer, loader), "log" (log/checkpoint/agree), "other"
    step: int
    where: str
    grad_scaler: bool


@dataclass
class SyncCounter:
    cuda: bool
    step: int = 0
    region: str = "other"
    events: list[SyncEvent] = field(default_factory=list)
    _saved: dict = field(default_factory=dict)

    def record(self) -> None:
        if threading.get_ident() != threading.main_thread().ident:
            return
        stack = [
            f for f in traceback.extract_stack() if f.filename != __file__ and "warnings" not in f.filename
        ]
        inner = stack[-1] if stack else None
        ours = next((f for f in reversed(stack) if "timm_cskd" in f.filename), None)
        where = f"{_short(inner)}" + (
            f" via {_short(ours)}" if ours is not None and ours is not inner else ""
        )
        scaler = any(f.filename.endswith("grad_scaler.py") for f in stack)
        self.events.append(SyncEvent(self.region, self.step, where, scaler))

    def __enter__(self) -> SyncCounter:
        if self.cuda:
            self._saved["mode"] = torch.cuda.get_sync_debug_mode()
            self._saved["warnings"] = warnings.catch_warnings()
            self._saved["warnings"].__enter__()
            warnings.simplefilter("always")
            previous = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if SYNC_WARNING in str(message):
                    self.record()
                else:
                    previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in PROXIED:
            self._patch(torch.Tensor, name)
        self._patch(torch, "equal")
        return self

    def _patch(self, owner, name: str) -> None:
        original = getattr(owner, name)
        self._saved[(owner, name)] = (original, name in vars(owner))

        def counted(*args, **kwargs):
            self.record()
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._saved.pop("mode"))
            self._saved.pop("warnings").__exit__(*exc)
            return
        for (owner, name), (original, own) in self._saved.items():
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()

    def summary(self, warmup_steps: int) -> dict:
        """Counts after the warm-up steps: per region, the GradScaler's apart, and the places in steps."""
        counted = [e for e in self.events if e.step > warmup_steps]
        in_steps = [e for e in counted if e.region == "step" and not e.grad_scaler]
        return {
            "steps": self.step,
            "warmup_steps": warmup_steps,
            "in_steps": len(in_steps),
            "grad_scaler_in_steps": sum(e.region == "step" and e.grad_scaler for e in counted),
            "at_log_steps": sum(e.region == "log" for e in counted),
            "in_warmup": sum(e.step <= warmup_steps for e in self.events),
            "places_in_steps": dict(Counter(e.where for e in in_steps).most_common(5)),
        }


def _pinned(tensor) -> bool | None:
    if tensor.device.type != "cpu":
        return None
    try:
        return bool(tensor.is_pinned())
    except RuntimeError:  # no accelerator to pin for
        return False


def _short(frame) -> str:
    if frame is None:
        return "?"
    parts = frame.filename.replace("\\", "/").split("/")
    return f"{'/'.join(parts[-2:])}:{frame.lineno} {frame.name}"


def instrument(trainer, counter: SyncCounter) -> None:
    """Mark the trainer's regions: each ``_train_step`` opens a step; logging, checkpoints, the ranks'
    agreement at log steps, validation and the epoch's end are log-step work, where syncs are expected."""
    step = trainer._train_step

    def counted_step(*args, **kwargs):
        counter.step += 1
        counter.region = "step"
        return step(*args, **kwargs)

    trainer._train_step = counted_step
    for name in ("_log_progress", "_save_mid_epoch", "save", "validate", "sync_batchnorm_stats"):
        _as_log_region(trainer, name, counter, lambda *a, **k: True)
    # Single-process runs ask for a stop every step without a sync (check_finite=False): those stay in
    # the step; the check at log steps reads the device's divergence flag.
    _as_log_region(trainer, "_agree", counter, lambda *a, **k: k.get("check_finite", True))
    loader = trainer.train_loader
    trainer.train_loader = _MarkedLoader(loader, counter)


def _as_log_region(trainer, name, counter, applies) -> None:
    method = getattr(trainer, name)

    def marked(*args, **kwargs):
        if not applies(*args, **kwargs):
            return method(*args, **kwargs)
        before, counter.region = counter.region, "log"
        try:
            return method(*args, **kwargs)
        finally:
            counter.region = before

    setattr(trainer, name, marked)


class _MarkedLoader:
    """The trainer's loader; its end closes the last step (the epoch's totals are log-step work) and
    the first batch's form (dtype, device, pinned) is kept for the report."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter, self.first_batch = loader, counter, None

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for images, target in self.loader:
            if self.first_batch is None:
                first = images[0] if isinstance(images, list | tuple) else images
                self.first_batch = {
                    "dtype": str(first.dtype).removeprefix("torch."),
                    "device": str(first.device),
                    "pinned": _pinned(first),
                    "shape": list(first.shape),
                }
            yield images, target
        self.counter.region = "other"
