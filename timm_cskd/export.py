"""Export a checkpoint as a folder that ``timm.create_model('local-dir:DIR')`` and the Hugging Face hub load.

    python -m timm_cskd.export --checkpoint output/run/model_best.pth.tar --output exported/resnet50-cskd
    python -m timm_cskd.export --checkpoint ... --output DIR --push-to-hub my-org/resnet50-cskd

The folder holds exactly one weights file (``model.safetensors``: timm up to 1.0.28 preferred a ``.bin``
beside it), ``config.json`` written by timm's ``save_for_hf`` with the preprocessing the model was
trained for and its label names, and a model card ``README.md`` (huggingface_hub's ``ModelCard``) with
the recipe and the measured metrics, also as ``model-index`` entries (``EvalResult``) the hub reads.
``--push-to-hub`` uploads that folder in one commit with the token huggingface_hub finds
(``get_token``: HF_TOKEN, then the saved ``hf auth login``), to ``--revision`` (a branch) of a
repository created ``--private`` when it does not exist yet.
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
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.data import resolve_data_config
from timm.models import save_for_hf

from timm_cskd.checkpoint import CheckpointError, LoadedModel, load_model
from timm_cskd.metrics import DEFAULT_ECE_BINS

__all__ = ["export", "main"]

WEIGHTS = "model.safetensors"
EXPORT_FILES = {WEIGHTS, "config.json", "README.md"}
EXPORT_TAG = "cskd"
METRIC_KEYS = ("top1_err", "top5_err", "ece", "nll", "brier", "recall_at_1", "num_samples")
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pth", ".pth.tar")


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


def ece_bins(metrics: dict | None, train_args: dict) -> int:
    """The bins the card's ECE was measured with: evaluate records them in metrics.json (one written
    before it did used evaluate's default); a training run's summary.csv used the run's --ece-bins."""
    metrics = metrics or {}
    if "ece_bins" in metrics:
        return int(metrics["ece_bins"])
    from_evaluate = "checkpoint" in metrics  # evaluate's metrics.json names what it evaluated
    return DEFAULT_ECE_BINS if from_evaluate else int(train_args.get("ece_bins") or DEFAULT_ECE_BINS)


def card_eval_metrics(bins: int) -> tuple[tuple[str, str], ...]:
    """model-index entries: metrics.json key, metric name on the hub."""
    return (
        ("top1_err", "Top-1 error (%)"),
        ("top5_err", "Top-5 error (%)"),
        ("ece", f"ECE, {bins} bins (%)"),
        ("nll", "NLL"),
    )


def card_dataset(
    loaded: LoadedModel, metrics_file: str | None, metrics: dict, dataset: str | None = None
) -> tuple[str, str | None]:
    """(dataset, split) the card's metrics were measured on: ``dataset`` if named, else the --data-dir
    folder name that evaluate recorded or the training run's; the split as evaluated or validated."""
    if metrics_file is not None:
        evaluated = metrics.get("evaluated") or {}
        return dataset or evaluated.get("dataset") or "unknown", evaluated.get("split")
    args = loaded.train_args or {}
    return dataset or Path(args.get("data_dir") or args.get("data") or "unknown").name, args.get("val_split")


def model_card(
    loaded: LoadedModel,
    name: str,
    metrics: dict | None,
    ema: bool,
    source: str = "",
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    dataset: tuple[str, str | None] = ("unknown", None),
) -> ModelCard:
    """The card: huggingface_hub's metadata (``model-index`` with the measured metrics, which the hub
    shows and parses; timm's ``generate_readme`` writes none), the recipe and the metrics table."""
    args = loaded.train_args or {}
    bins = ece_bins(metrics, args)
    dataset_name, split = dataset
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_name=label,
            metric_value=float(metrics[key]),
        )
        for key, label in card_eval_metrics(bins)
        if metrics and key in metrics
    ]
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["image-classification", "timm", "cs-kd"],
        model_name=repo_id or name,
        eval_results=eval_results or None,
    )
    load = f"'{hub_name(repo_id, revision)}'" if repo_id else "'local-dir:PATH'"
    lines = [
        f"# {repo_id or name}",
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
        f"model = timm.create_model({load}, pretrained=True)",
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
            ("ece", f"ECE, {bins} bins (%)"),
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
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


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
    repo_id: str | None = None,
    revision: str | None = None,
    dataset: str | None = None,
) -> Path:
    """Write the export folder; ``repo_id`` (and ``revision``), where on the hub it is for, is what its
    card names."""
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
        card = model_card(
            loaded,
            out.name,
            metrics,
            ema,
            source,
            repo_id=repo_id,
            revision=revision,
            dataset=card_dataset(loaded, metrics_file, metrics or {}, dataset),
        )
        (staging / "README.md").write_text(str(card), encoding="utf-8")
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


class UploadError(Exception):
    """The hub refused or never received the upload (the local export is complete)."""


def hub_name(repo_id: str, revision: str | None) -> str:
    """timm's name for a hub model, ``hf-hub:ORG/NAME[@REVISION]``."""
    return f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")


def check_repo_id(repo_id: str) -> None:
    """The repository must be named in full: the card names it before the hub is asked anything."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(f"--push-to-hub {repo_id}: not a valid repository id ({e})") from None
    if "/" not in repo_id:
        raise CheckpointError(f"--push-to-hub {repo_id}: name the repository as ORG/NAME (or USER/NAME)")


def hub_token() -> str:
    """The token huggingface_hub itself would use (``get_token``: HF_TOKEN, then the saved ``hf auth
    login``), checked before anything is exported."""
    from huggingface_hub import constants, get_token

    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; the variable is read again here so
    # one set later in this process still refuses rather than ends in a connection error.
    # constants.HF_HUB_OFFLINE exists in every release (is_offline_mode() only from 1.2.1); the library
    # also honours TRANSFORMERS_OFFLINE.
    if constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").upper() in constants.ENV_VARS_TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        raise CheckpointError(
            "--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, "
            "or export without --push-to-hub"
        )
    token = get_token()
    if token is None:
        raise CheckpointError(
            "--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
            "(a write token from your hub settings)"
        )
    return token


def push_folder(
    folder: Path, repo_id: str, token: str, *, private: bool = False, revision: str | None = None
) -> str:
    """Upload the exported folder as it is, in one commit (the hub applies all of it or none), and return
    the commit's URL. timm's push_to_hf_hub would re-save into a temporary folder and keep an existing
    card, so the folder we tested locally would not be what lands on the hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="timm-cskd")
    try:
        # private=None, not False: a new repository then takes its organisation's default visibility.
        repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        # Weights of an earlier upload at the top level would sit beside ours, and timm <= 1.0.28 loads a
        # .bin first; the hub matches delete patterns with fnmatch ("*" crosses "/"), so name each file,
        # and leave whatever the user keeps in subfolders.
        stale = [
            name
            for name in api.list_repo_files(repo.repo_id, revision=revision)
            if "/" not in name and name.endswith(WEIGHT_SUFFIXES) and not (folder / name).is_file()
        ]
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message="Add timm-cskd model",
            delete_patterns=stale or None,
        )
    # Whatever the client raises (HTTP status, network, its own checks), the commit did not land.
    except Exception as e:
        raise UploadError(
            f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {e}); a hub commit lands "
            f"whole or not at all, and the export in {folder} is complete: rerun to upload it"
        ) from e
    return commit.commit_url


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
    parser.add_argument(
        "--dataset",
        default=None,
        help="the card's name for the dataset the metrics were measured on, e.g. a hub dataset id "
        "(default: the evaluated --data-dir folder's name)",
    )
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="ORG/NAME",
        help="also upload the folder to this hub repository (created if missing), with the token of "
        "`hf auth login` or HF_TOKEN",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (an existing one keeps its visibility)",
    )
    parser.add_argument(
        "--revision", default=None, help="branch to commit to (created from main if missing; default: main)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = None
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
            token = hub_token()
        else:
            for flag in ("private", "revision"):
                if getattr(args, flag):
                    raise CheckpointError(f"--{flag} is for the upload: add --push-to-hub ORG/NAME")
        out = export(
            args.checkpoint,
            args.output,
            ema=args.ema,
            model_name=args.model,
            metrics_file=args.metrics,
            repo_id=args.push_to_hub,
            revision=args.revision,
            dataset=args.dataset,
        )
        print(f"exported to {out}: load with timm.create_model('local-dir:{out}', pretrained=True)")
        if args.push_to_hub:
            url = push_folder(out, args.push_to_hub, token, private=args.private, revision=args.revision)
            name = hub_name(args.push_to_hub, args.revision)
            print(f"uploaded to {url}: load with timm.create_model('{name}', pretrained=True)")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
