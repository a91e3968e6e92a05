"""The 20-second check before any row: is this machine able to run the rest, and if not, what is missing."""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

TIMM_MIN = (1, 0, 29)
TORCH_MIN = (2, 4)
# What timm_cskd takes from timm (a timm without one of these is too old, whatever its version says).
TIMM_FEATURES = [
    ("timm.task", "TrainingTask"),
    ("timm.utils", "ModelEmaV3"),
    ("timm.utils.distributed", "init_distributed_device_so"),
    ("timm.optim", "create_optimizer_v2"),
    ("timm.scheduler", "create_scheduler_v2"),
    ("timm.data", "create_transform"),
    ("timm.loss", "BinaryCrossEntropy"),
]
VENDOR_HINT = (
    "bring a newer timm: here `python3 -m pip download --no-deps --only-binary=:all: -d .whl timm==1.0.31` "
    "(.whl ignored, carried), there `python3 -m pip install -q --no-index --no-deps --target /tmp/site "
    ".whl/timm-*.whl && export PYTHONPATH=/tmp/site` before this script (python3 benchmarks/gpu_check.py --help)"
)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


class Report:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, text: str, fatal: bool = True) -> bool:
        self.items.append({"name": name, "ok": ok, "text": text, "fatal": fatal and not ok})
        return ok

    @property
    def fatal(self) -> list[dict]:
        return [i for i in self.items if i["fatal"]]


def _timm(report: Report) -> None:
    try:
        import timm
    except ImportError as e:
        report.add("timm", False, f"not importable ({e}); {VENDOR_HINT}")
        return
    where = str(Path(timm.__file__).parent)
    missing = []
    for module, name in TIMM_FEATURES:
        try:
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{module}.{name}")
        except ImportError:
            missing.append(f"{module}.{name}")
    new_enough = version_tuple(timm.__version__) >= TIMM_MIN
    ok = new_enough and not missing
    text = f"{timm.__version__} at {where}"
    if not ok:
        need = ".".join(map(str, TIMM_MIN))
        lacks = f", lacks {', '.join(missing)}" if missing else ""
        text += f": timm_cskd needs timm>={need}{lacks}; {VENDOR_HINT}"
    report.add("timm", ok, text)


def _package(report: Report) -> None:
    """The trainer's whole import chain (timm_cskd and everything it imports: yaml, PIL, matplotlib...)."""
    try:
        importlib.import_module("timm_cskd.train")
        importlib.import_module("timm_cskd.methods")
    except Exception as e:
        report.add("timm_cskd imports", False, f"{type(e).__name__}: {e}")
        return
    report.add("timm_cskd imports", True, "timm_cskd.train, timm_cskd.methods")


def _cuda(report: Report, torch, device, min_free_gib: float) -> None:
    if device.type != "cuda":
        report.add("CUDA", True, "not used (CPU run)", fatal=False)
        return
    if not torch.cuda.is_available():
        report.add(
            "CUDA", False, f"torch {torch.__version__} sees no GPU (torch.version.cuda {torch.version.cuda})"
        )
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    report.add(
        "CUDA",
        True,
        f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
    )
    report.add(
        "GPU memory",
        free / 2**30 >= min_free_gib,
        f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free (rows need {min_free_gib:.0f}; "
        "lower --batch-size if another process holds it)",
    )


def _compiler(report: Report, torch, device) -> str | None:
    """torch.compile of a two-op function on the device: Triton (GPU) or C++ (CPU) codegen works here."""
    from .common import compiler_missing

    reason = compiler_missing(device)
    if reason is None and device.type == "cuda":
        try:
            import triton

            version = f"triton {triton.__version__}"
        except ImportError as e:
            reason = f"triton not importable ({e})"
    if reason is None:
        start = time.perf_counter()
        try:
            fn = torch.compile(lambda x: (x * 2).sin() + 1, dynamic=False)
            x = torch.randn(64, device=device)
            ok = torch.allclose(fn(x), (x * 2).sin() + 1, atol=1e-5)
            reason = None if ok else "compiled result differs from eager"
            version = (version + ", " if device.type == "cuda" else "") + (
                f"a tiny kernel compiled in {time.perf_counter() - start:.1f} s"
            )
        except Exception as e:
            reason = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    report.add(
        "torch.compile",
        reason is None,
        version if reason is None else f"{reason} (compiled rows SKIP)",
        fatal=False,
    )
    return reason


def run_preflight(
    device_name: str, work_dir: Path, min_free_gib: float, min_disk_gib: float, compile_probe: bool = True
) -> dict:
    """``compile_probe``: whether a selected row compiles (else the probe's seconds are saved). Returns ``{"items": [...], "fatal": [...], "compile_missing": reason or None, "seconds": s}``."""
    start = time.perf_counter()
    report = Report()
    report.add("python", sys.version_info >= (3, 10), f"{platform.python_version()} ({sys.executable})")
    try:
        import torch
    except ImportError as e:
        report.add("torch", False, f"not importable: {e}")
        return {"items": report.items, "fatal": report.fatal, "compile_missing": "no torch", "seconds": 0.0}
    report.add(
        "torch",
        version_tuple(torch.__version__) >= TORCH_MIN,
        f"{torch.__version__} (timm_cskd needs >= {'.'.join(map(str, TORCH_MIN))})",
    )
    device = torch.device(device_name)
    _cuda(report, torch, device, min_free_gib)
    _timm(report)
    if not report.fatal:
        _package(report)
    free_disk = shutil.disk_usage(work_dir).free / 2**30
    report.add(
        "disk",
        free_disk >= min_disk_gib,
        f"{free_disk:.1f} GiB free in {work_dir} (needs {min_disk_gib:.0f})",
    )
    report.add("CPU cores", True, f"{os.cpu_count()} (loader workers come from these)", fatal=False)
    if report.fatal:
        compile_missing = "preflight failed"
    elif compile_probe:
        compile_missing = _compiler(report, torch, device)
    else:
        compile_missing = "no selected row compiles"
    return {
        "items": report.items,
        "fatal": report.fatal,
        "compile_missing": compile_missing,
        "seconds": time.perf_counter() - start,
    }


def format_preflight(result: dict) -> list[str]:
    lines = [f"preflight ({result['seconds']:.1f} s):"]
    for item in result["items"]:
        mark = "ok " if item["ok"] else ("MISSING" if item["fatal"] else "no ")
        lines.append(f"  {mark:7} {item['name']}: {item['text']}")
    return lines
