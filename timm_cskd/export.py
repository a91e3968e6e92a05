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
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import save_for_hf

from timm_cskd.checkpoint import CheckpointError, LoadedModel, load_model
from timm_cskd.hub import UploadError, check_repo_id, hub_name, hub_token, push_folder
from timm_cskd.invocation import program_name
from timm_cskd.model_card import card_dataset, checkpoint_metrics, ece_bins, model_card, read_metrics_file

__all__ = ["ExportConfig", "check_args", "ece_bins", "export", "main", "run"]

WEIGHTS = "model.safetensors"
EXPORT_FILES = {WEIGHTS, "config.json", "README.md"}
EXPORT_TAG = "cskd"


@dataclass(frozen=True)
class ExportConfig:
    """An export's settings, one field per flag (named by its destination, with its default):
    ``ExportConfig(checkpoint, output, ema=True)``."""

    checkpoint: str
    output: str
    ema: bool = False
    model: str | None = None
    metrics: str | None = None
    dataset: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ExportConfig:
        return cls(**vars(args))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.export"),
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


def check_args(args: ExportConfig) -> None:
    """The values alone, before the token is looked up or the checkpoint read."""
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
        return
    for flag in ("private", "revision"):
        if getattr(args, flag):
            raise CheckpointError(f"--{flag} is for the upload: add --push-to-hub ORG/NAME")


def run(args: ExportConfig) -> Path:
    """Export ``args.checkpoint`` to ``args.output`` (and upload it with ``push_to_hub``); the folder."""
    check_args(args)
    token = hub_token() if args.push_to_hub else None
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
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(ExportConfig.from_namespace(args))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
