"""Export a checkpoint as a folder that ``timm.create_model('local-dir:DIR')`` and the Hugging Face hub load.

    python -m timm_cskd.export --checkpoint output/run/model_best.pth.tar --output exported/resnet50-cskd
    python -m timm_cskd.export --checkpoint ... --output DIR --push-to-hub my-org/resnet50-cskd

The folder holds exactly one weights file (``model.safetensors``: timm up to 1.0.28 preferred a ``.bin``
beside it), ``config.json`` written by timm's ``save_for_hf`` with the preprocessing the model was
trained for and its label names, and a model card ``README.md`` with the recipe and measured metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import save_for_hf

from timm_cskd.checkpoint import CheckpointError, LoadedModel, load_model

__all__ = ["export", "main"]

WEIGHTS = "model.safetensors"
EXPORT_FILES = {WEIGHTS, "config.json", "README.md"}
EXPORT_TAG = "cskd"
METRIC_KEYS = ("top1_err", "top5_err", "ece", "nll", "brier", "recall_at_1", "num_samples")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def checkpoint_metrics(
    loaded: LoadedModel, checkpoint: Path, ema: bool, metrics_file: str | None
) -> dict | None:
    """Metrics for the card: an evaluate metrics.json if given, else the training run's validation of
    exactly these weights, the summary.csv row of the checkpoint's epoch (its ``ema_`` columns for --ema).
    None when no row matches (a checkpoint saved mid-epoch)."""
    if metrics_file is not None:
        return read_metrics_file(metrics_file)
    summary = checkpoint.parent / "summary.csv"
    if loaded.epoch is None or not checkpoint.is_file() or not summary.is_file():
        return None
    with open(summary, newline="") as f:
        # The last row of that epoch: a run killed between its summary row and its checkpoint trains
        # the epoch again on resume, and the checkpoint holds the weights of that second pass.
        rows = [r for r in csv.DictReader(f) if r.get("epoch") == str(loaded.epoch)]
    row = rows[-1] if rows else None
    if row is None:
        return None
    prefix = "eval_ema_" if ema else "eval_"
    metrics = {k.removeprefix(prefix): float(v) for k, v in row.items() if k.startswith(prefix) and v}
    if not ema:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("ema_")}
    return metrics or None


def model_card(loaded: LoadedModel, name: str, metrics: dict | None, ema: bool, source: str = "") -> str:
    args = loaded.train_args or {}
    lines = [
        "---",
        "library_name: timm",
        "tags:",
        "- image-classification",
        "- timm",
        "- cs-kd",
        "license: apache-2.0",
        "---",
        f"# {name}",
        "",
        f"A `{args.get('model', loaded.model.default_cfg.get('architecture'))}` trained with "
        f"[timm-cskd](https://arxiv.org/abs/2003.13964), method `{loaded.method or 'cskd'}`"
        + (
            " (Class-wise Self-Knowledge Distillation, Yun et al., CVPR 2020)"
            if (loaded.method or "cskd").startswith("cskd")
            else ""
        )
        + (", exponential moving average weights." if ema else "."),
        "",
        "```python",
        "import timm",
        f"model = timm.create_model('hf-hub:ORG/{name}', pretrained=True)  # or 'local-dir:PATH'",
        "```",
    ]
    if args:
        recipe = [
            ("method", args.get("method", "cskd")),
            ("method hyper-parameters", ", ".join(f"{k}={v}" for k, v in (loaded.method_kwargs or {}).items()) or "-"),
            ("knowledge distillation", f"from {args['kd_model_name']}, T {args.get('kd_temperature')}" if args.get("kd_model_name") else "-"),
            ("epochs", args.get("epochs")),
            ("images per step", f"{args.get('batch_size')} per process"),
            ("optimizer", f"{args.get('opt')}, lr {args.get('lr')}, momentum {args.get('momentum')}, weight decay {args.get('weight_decay')}"),
            ("schedule", f"{args.get('sched')}" + (f", /{1 / args['decay_rate']:g} at epochs {args.get('decay_milestones')}" if args.get("sched") == "multistep" else "")),
            ("augmentation", f"random-resized-crop {args.get('img_size')} scale {args.get('scale')}, hflip {args.get('hflip')}, mixup {args.get('mixup')}, cutmix {args.get('cutmix')}, smoothing {args.get('smoothing')}"),
            ("precision", f"AMP {args.get('amp_dtype')}" if args.get("amp") else "float32"),
        ]  # fmt: skip
        lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in recipe]
    if metrics:
        names = [
            ("top1_err", "top-1 error (%)"),
            ("top5_err", "top-5 error (%)"),
            ("ece", "ECE, 20 bins (%)"),
            ("nll", "NLL"),
            ("brier", "Brier"),
            ("recall_at_1", "recall@1 (%)"),
            ("num_samples", "validation images"),
        ]
        lines += [
            "",
            "## Measured metrics",
            "",
            *([source, ""] if source else []),
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {label} | {metrics[key]:.4g} |" for key, label in names if key in metrics]
    return "\n".join(lines) + "\n"


def plain_timm_model(loaded: LoadedModel) -> torch.nn.Module:
    """The trained model as the plain timm architecture, which ``create_model('local-dir:...')`` rebuilds,
    giving the same logits; a method whose evaluated model has no such form refuses with its reason."""
    if loaded.method is None:
        return loaded.model
    from timm_cskd.methods import get_method

    method = get_method(loaded.method)
    arch = loaded.model.pretrained_cfg.get("architecture") or (loaded.train_args or {}).get("model")
    plain = timm.create_model(arch, pretrained=False, num_classes=loaded.model.num_classes)
    try:
        state_dict = method.export_state_dict(loaded.model.state_dict(), loaded.method_kwargs or {})
    except ValueError as e:
        raise CheckpointError(f"cannot export a --method {loaded.method} model: {e}") from e
    plain.load_state_dict(state_dict)
    return plain


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    ema: bool = False,
    model_name: str | None = None,
    metrics_file: str | None = None,
) -> Path:
    out = Path(output)
    check_output_folder(out)
    if metrics_file is not None:
        read_metrics_file(metrics_file)
    loaded = load_model(checkpoint, model_name, ema=ema)
    model = plain_timm_model(loaded).eval()
    data_config = resolve_data_config(loaded.data_config or {}, model=model)
    metrics = checkpoint_metrics(loaded, Path(checkpoint), ema, metrics_file)
    if metrics_file is not None:
        source = f"From `{Path(metrics_file).name}` (timm_cskd.evaluate)."
    else:
        source = f"The training run's validation after epoch {(loaded.epoch or 0) + 1}" + (
            " (EMA weights)." if ema else "."
        )
    # The architecture's default pretrained_cfg names its own weights (tag, paper): these are ours.
    model_config = {"pretrained_cfg": {"tag": EXPORT_TAG, "paper_ids": "arXiv:2003.13964"}}
    if loaded.class_names:
        model_config["label_names"] = list(loaded.class_names)
    # Written beside the target, then swapped in: a failure leaves the previous export as it was.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; an export is not
    except OSError as e:
        raise CheckpointError(f"--output {out}: cannot write there ({e.strerror})") from e
    try:
        save_for_hf(
            model, str(staging), model_config=model_config, safe_serialization=True, data_config=data_config
        )
        (staging / "README.md").write_text(
            model_card(loaded, out.name, metrics, ema, source), encoding="utf-8"
        )
        _swap_in(staging, out)
    except OSError as e:
        raise CheckpointError(f"--output {out}: cannot write the export ({e})") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _is_our_export(folder: Path) -> bool:
    """A folder this tool wrote: only the files it writes, and its config.json carries our tag."""
    names = {p.name for p in folder.iterdir()}
    if not names <= EXPORT_FILES or "config.json" not in names:
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("pretrained_cfg") or {}).get("tag") == EXPORT_TAG


def check_output_folder(out: Path) -> None:
    """--output must be a new or empty folder, or an earlier export of this tool (which is replaced):
    never a file, never a folder of the user's other files."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {out} is an existing file: export writes a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_our_export(out):
        raise CheckpointError(
            f"--output {out} is a folder of other files (not an earlier export of this tool): "
            "export into a new or empty folder"
        )


def read_metrics_file(path: str | os.PathLike) -> dict:
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"--metrics {path}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"--metrics {path}: not a readable metrics.json ({e})") from e
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) for k, v in metrics.items() if k in METRIC_KEYS
    ):
        raise CheckpointError(
            f"--metrics {path}: expected timm_cskd.evaluate's metrics.json, a mapping of numbers"
        )
    return metrics


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with two renames (an earlier export moves aside, then goes)."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def hub_token() -> str:
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if token is None:
        raise CheckpointError(
            f"--push-to-hub needs a Hugging Face token: set {TOKEN_VARIABLES[0]} (a write token from your hub settings)"
        )
    return token


def push_folder(folder: Path, repo_id: str, token: str) -> str:
    """Upload the exported folder as it is. timm's push_to_hf_hub would re-save into a temporary folder
    and write its own card, so the folder we tested locally would not be what lands on the hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="timm-cskd")
    repo = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message="Add timm-cskd model")
    return repo.repo_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m timm_cskd.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="training .pth.tar or plain state_dict")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--model", default=None, help="timm model name (needed for a plain state_dict)")
    parser.add_argument(
        "--metrics", default=None, help="metrics.json from timm_cskd.evaluate for the model card"
    )
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload the folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = hub_token() if args.push_to_hub else None
        out = export(
            args.checkpoint, args.output, ema=args.ema, model_name=args.model, metrics_file=args.metrics
        )
        print(f"exported to {out}: load with timm.create_model('local-dir:{out}', pretrained=True)")
        if args.push_to_hub:
            print(f"uploaded to https://huggingface.co/{push_folder(out, args.push_to_hub, token)}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
