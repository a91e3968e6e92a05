"""Command line and YAML configuration, following timm's train.py conventions.

``-c/--config FILE.yaml`` supplies defaults, flags on the command line override them, and the resolved
configuration is written to ``args.yaml`` in the experiment folder. ``-c NAME`` (no ``.yaml``, no folder,
not a file here) names a recipe shipped in the package (``timm_cskd/configs/``), so an installed wheel
runs them from any folder. A YAML key that is not a flag is an
error naming the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

import yaml
from timm.utils import ParseKwargs

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "DEMO_CONFIG",
    "REFUSED",
    "build_parser",
    "config_names",
    "load_yaml_defaults",
    "parse_args",
    "refused_settings",
    "resolve_config",
]


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot run."""


# The recipes shipped as package data; the repository's top-level configs/ links to this folder.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"  # what the trainer runs with neither --config nor --data-dir


def config_names() -> list[str]:
    """The packaged configs' names, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(ref: str | os.PathLike) -> Path:
    """The file ``ref`` means: an existing file or any path as given (a missing one is reported by its
    reader), else a packaged config's name; a name that is not packaged is an error listing those that are."""
    path = Path(ref)
    text = str(ref)
    is_name = text and not text.endswith((".yaml", ".yml")) and "/" not in text and os.sep not in text
    if path.is_file() or not is_name:
        return path
    packaged = CONFIG_DIR / f"{text}.yaml"
    if packaged.is_file():
        return packaged
    raise ConfigError(
        f"config '{text}' is neither a file nor a packaged config; packaged: {', '.join(config_names())}"
    )


# timm train.py flags this trainer accepts but cannot honour when set: (timm's default, why).
# A timm args.yaml carries them all at their defaults; a non-default value stops the run naming them.
REFUSED = {
    "dataset": ("", "reads ImageFolder trees, list files and timm_cskd.data.shards folders (wds/) only (torch/, hfds/, tfds/ datasets are not wired to the class-pair plan)"),
    "train_num_samples": (None, "applies to iterable datasets, which are not supported"),
    "val_num_samples": (None, "applies to iterable datasets, which are not supported"),
    "dataset_download": (False, "nothing is downloaded: the data must be on disk"),
    "input_img_mode": (None, "images are decoded to RGB (PIL or DALI)"),
    "input_key": (None, "applies to Hugging Face/WebDataset datasets, which are not supported"),
    "target_key": (None, "applies to Hugging Face/WebDataset datasets, which are not supported"),
    "dataset_trust_remote_code": (False, "applies to Hugging Face datasets, which are not supported"),
    "fuser": ("", "TorchScript fusers: use --torchcompile"),
    "torchscript": (False, "TorchScript is not supported: use --torchcompile"),
    "model_dtype": (None, "weights stay float32 (use --amp --amp-dtype for lower precision compute)"),
    "epoch_repeats": (0.0, "an epoch is one pass over the class-pair plan"),
    "start_epoch": (None, "the checkpoint records the exact position; overriding it would desynchronise plan, schedule and RNG"),
    "aug_splits": (0, "AugMix splits are not combined with class-pair batches"),
    "jsd_loss": (False, "needs --aug-splits"),
    "resplit": (False, "needs --aug-splits"),
    "split_bn": (False, "needs --aug-splits"),
    "model_ema_force_cpu": (False, "the EMA is validated on the training device every epoch"),
    "worker_seeding": ("all", "each sample's augmentation is seeded from its place in the epoch plan (exact resume), not per worker"),
    "save_images": (False, "not supported"),
    "tta": (0, "test-time augmentation is not supported"),
    "kd_distill_type": ("logit", "only logit distillation is supported"),
    "kd_loss_type": ("kl", "only the KL loss is supported (as in timm)"),
    "kd_student_feature_dim": (None, "applies to feature distillation, which is not supported"),
    "kd_teacher_feature_dim": (None, "applies to feature distillation, which is not supported"),
    "kd_token_distill_type": ("soft", "applies to token distillation, which is not supported"),
    "train_img_sizes": (None, "scheduled multi-resolution training is not supported"),
    "train_batch_sizes": (None, "scheduled multi-resolution training is not supported"),
    "train_size_probs": (None, "scheduled multi-resolution training is not supported"),
    "train_size_schedule": ("constant", "scheduled multi-resolution training is not supported"),
    "train_size_schedule_spread": (0.65, "scheduled multi-resolution training is not supported"),
    "train_size_random_mix": (0.1, "scheduled multi-resolution training is not supported"),
    "train_batches_per_epoch": (None, "an epoch is one pass over the class-pair plan"),
    "variable_batch_loss_scale": ("none", "scheduled multi-resolution training is not supported"),
    "naflex_loader": (False, "NaFlex loading is not supported"),
    "naflex_train_seq_lens": ([128, 256, 576, 784, 1024], "NaFlex loading is not supported"),
    "naflex_max_seq_len": (576, "NaFlex loading is not supported"),
    "naflex_patch_sizes": (None, "NaFlex loading is not supported"),
    "naflex_patch_size_probs": (None, "NaFlex loading is not supported"),
    "naflex_loss_scale": ("linear", "NaFlex loading is not supported"),
    "naflex_patchify_channels_first": (False, "NaFlex loading is not supported"),
}  # fmt: skip


# timm's default --val-split; when it (or a synonym) is missing the run trains without validation.
DEFAULT_VAL_SPLIT = "validation"

# timm's names for the folder dataset this trainer reads.
FOLDER_DATASETS = ("", "folder", "imagefolder")


def _refused_help(dest: str) -> str:
    return f"refused unless {REFUSED[dest][0]!r}: {REFUSED[dest][1]}"


def build_parser() -> argparse.ArgumentParser:
    """timm train.py's flags with timm's names, defaults and groups, plus this trainer's own."""
    parser = argparse.ArgumentParser(
        prog="train_imagenet.py",
        description="Train timm models on ImageNet-style folders with Class-wise Self-Knowledge Distillation. "
        "Accepts timm train.py's flags and args.yaml; flags it cannot honour stop the run when set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="YAML file of defaults (a timm args.yaml works) or a packaged config's name "
        "(resnet50_cskd, demo, ...); flags override it",
    )

    def refused(group, *names, **kwargs):
        dest = names[-1].lstrip("-").replace("-", "_")
        group.add_argument(*names, help=_refused_help(kwargs.pop("dest", dest)), **kwargs)

    g = parser.add_argument_group("Dataset parameters")
    parser.add_argument(
        "data", nargs="?", metavar="DIR", default=None, help="path to dataset (deprecated: --data-dir)"
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="root with train/ and val/ (or validation/) ImageFolder trees or list files; none: the bundled demo dataset",
    )
    refused(g, "--dataset", default="", metavar="NAME")
    g.add_argument("--train-split", default="train", help="folder or list file under --data-dir")
    g.add_argument(
        "--val-split",
        default=DEFAULT_VAL_SPLIT,
        help="folder or list file under --data-dir; validation also finds val, valid, eval, evaluation (timm's synonyms)",
    )
    refused(g, "--train-num-samples", type=int, default=None)
    refused(g, "--val-num-samples", type=int, default=None)
    refused(g, "--dataset-download", action="store_true", default=False)
    g.add_argument(
        "--class-map",
        default="",
        help="file of class folder names, one per line, in label order (timm's txt form)",
    )
    refused(g, "--input-img-mode", default=None)
    refused(g, "--input-key", default=None)
    refused(g, "--target-key", default=None)
    refused(g, "--dataset-trust-remote-code", action="store_true", default=False)
    g.add_argument(
        "--data-backend",
        choices=("torch", "dali"),
        default="torch",
        help="(timm-cskd) PIL in DataLoader workers, or NVIDIA DALI",
    )
    g.add_argument(
        "--exclude-list",
        default=None,
        help="(timm-cskd) file of undecodable images to skip (python -m timm_cskd.data.verify writes it)",
    )

    g = parser.add_argument_group("Model parameters")
    g.add_argument("--model", default="resnet50", help="any timm model name")
    g.add_argument(
        "--pretrained",
        action="store_true",
        default=False,
        help="start from timm's pretrained weights (cached locally when offline)",
    )
    g.add_argument(
        "--pretrained-path",
        default=None,
        help="load this checkpoint as the pretrained weights, the head adapted to --num-classes",
    )
    g.add_argument(
        "--initial-checkpoint", default="", help="load this checkpoint into the model after creation"
    )
    g.add_argument(
        "--resume",
        default="",
        help="checkpoint path, or 'auto' for the newest valid one in the experiment folder",
    )
    g.add_argument(
        "--no-resume-opt",
        action="store_true",
        default=False,
        help="do not restore the optimizer (and AMP scaler) when resuming",
    )
    g.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    g.add_argument("--gp", default=None, help="global pool type (model default if None)")
    g.add_argument("--img-size", type=int, default=None, help="image size (model default if None)")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (3 if None)")
    g.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="all input dimensions, overrides --img-size",
    )
    g.add_argument(
        "--crop-pct", type=float, default=None, help="validation centre-crop fraction (model default if None)"
    )
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument(
        "--interpolation", default="", help="validation resize interpolation (model default if empty)"
    )
    g.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=128,
        help="per process: anchors for the class-pair anchor layout (as many partners load too), images otherwise",
    )
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    refused(g, "--fuser", default="")
    g.add_argument(
        "--grad-accum-steps",
        type=int,
        default=1,
        help="batches accumulated per optimizer step (whole pairs each)",
    )
    g.add_argument("--grad-checkpointing", action="store_true", default=False)
    g.add_argument(
        "--fast-norm", action="store_true", default=False, help="timm's experimental fast norm layers"
    )
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE")
    g.add_argument("--head-init-scale", type=float, default=None)
    g.add_argument("--head-init-bias", type=float, default=None)
    g.add_argument("--torchcompile-mode", default=None)
    refused(g, "--torchscript", action="store_true", default=False)
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")

    g = parser.add_argument_group("Device parameters")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu (timm: cuda)")
    g.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=False, help="torch.autocast mixed precision"
    )
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16")
    refused(g, "--model-dtype", default=None)
    g.add_argument("--no-ddp-bb", action="store_true", default=False, help="DDP without broadcasting buffers")
    g.add_argument(
        "--synchronize-step",
        action="store_true",
        default=False,
        help="synchronise the device after every step",
    )
    g.add_argument(
        "--local_rank",
        type=int,
        default=0,
        help="accepted for torch.distributed.launch; the rank comes from the environment",
    )
    g.add_argument(
        "--device-modules", nargs="+", default=None, help="python modules to import for a device backend"
    )

    g = parser.add_argument_group("Optimizer parameters")
    g.add_argument(
        "--opt",
        default="sgd",
        help="timm optimizer name (sgd is Nesterov in timm; momentum: plain SGD momentum, as the paper)",
    )
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-5)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--layer-decay", type=float, default=None)
    g.add_argument("--layer-decay-min-scale", type=float, default=0)
    g.add_argument("--layer-decay-no-opt-scale", type=float, default=None)
    g.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE")
    g.add_argument(
        "--weight-decay-bias-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="(timm-cskd) also decay biases and norm weights (the paper's code does; timm skips them)",
    )

    g = parser.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", default="cosine", help="timm scheduler name")
    g.add_argument(
        "--sched-on-updates",
        action="store_true",
        default=False,
        help="step the schedule every update instead of every epoch",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="absolute learning rate; default: --lr-base scaled by the global batch",
    )
    g.add_argument(
        "--lr-base", type=float, default=0.1, help="learning rate per --lr-base-size images of global batch"
    )
    g.add_argument("--lr-base-size", type=int, default=256)
    g.add_argument(
        "--lr-base-scale",
        default="",
        help="linear or sqrt (default: sqrt for ada*/lamb optimizers, else linear)",
    )
    g.add_argument("--lr-noise", type=float, nargs="+", default=None)
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=float, default=1.0)
    g.add_argument("--lr-cycle-decay", type=float, default=0.5)
    g.add_argument("--lr-cycle-limit", type=int, default=1)
    g.add_argument("--lr-k-decay", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0)
    g.add_argument("--epochs", type=int, default=300)
    refused(g, "--epoch-repeats", type=float, default=0.0)
    refused(g, "--start-epoch", type=int, default=None)
    g.add_argument(
        "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="epochs of multistep decay"
    )
    g.add_argument("--decay-epochs", type=float, default=90, help="interval of step decay")
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true", default=False)
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)

    g = parser.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False)
    g.add_argument("--train-crop-mode", default=None, help="timm's rrc (default), rkrc or rkrr")
    g.add_argument(
        "--scale", type=float, nargs="+", default=[0.08, 1.0], help="random-resized-crop area range"
    )
    g.add_argument(
        "--ratio", type=float, nargs="+", default=[3 / 4, 4 / 3], help="random-resized-crop aspect range"
    )
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--color-jitter-prob", type=float, default=None)
    g.add_argument("--grayscale-prob", type=float, default=None)
    g.add_argument("--gaussian-blur-prob", type=float, default=None)
    g.add_argument("--aa", default=None, help="AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument(
        "--aug-repeats",
        type=float,
        default=0,
        help="repeated augmentation: each (pair) unit N times per epoch",
    )
    refused(g, "--aug-splits", type=int, default=0)
    refused(g, "--jsd-loss", action="store_true", default=False)
    g.add_argument(
        "--bce-loss",
        action="store_true",
        default=False,
        help="timm's BinaryCrossEntropy as the task term (with the CS-KD methods: beside their softmax KL)",
    )
    g.add_argument("--bce-sum", action="store_true", default=False)
    g.add_argument("--bce-target-thresh", type=float, default=None)
    g.add_argument("--bce-pos-weight", type=float, default=None)
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    refused(g, "--resplit", action="store_true", default=False)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument(
        "--mixup-off-epoch", type=int, default=0, help="turn Mixup/CutMix off from this epoch (0: never)"
    )
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--drop", type=float, default=0.0)
    g.add_argument("--drop-connect", type=float, default=None, help="deprecated timm alias of --drop-path")
    g.add_argument("--drop-path", type=float, default=None)
    g.add_argument("--drop-block", type=float, default=None)

    g = parser.add_argument_group("Batch norm parameters")
    g.add_argument("--bn-momentum", type=float, default=None)
    g.add_argument("--bn-eps", type=float, default=None)
    g.add_argument("--sync-bn", action="store_true", default=False)
    g.add_argument(
        "--dist-bn",
        choices=("reduce", "broadcast", ""),
        default="reduce",
        help="how BatchNorm running stats are made equal across ranks at epoch ends ('' keeps each rank's)",
    )
    refused(g, "--split-bn", action="store_true", default=False)

    g = parser.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action="store_true", default=False)
    refused(g, "--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true", default=False)

    g = parser.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=int, default=42)
    refused(g, "--worker-seeding", default="all")
    g.add_argument("--log-interval", type=int, default=50, help="steps between progress lines")
    g.add_argument(
        "--val-interval", type=int, default=1, help="validate every N epochs and after the last one"
    )
    g.add_argument(
        "--recovery-interval",
        type=int,
        default=0,
        help="also checkpoint every N batches (timm's name for --checkpoint-interval)",
    )
    g.add_argument(
        "--checkpoint-hist",
        type=int,
        default=10,
        help="keep this many best epoch checkpoints (checkpoint-<epoch>.pth.tar)",
    )
    g.add_argument(
        "-j", "--workers", type=int, default=4, help="data loading processes (threads for DALI) per rank"
    )
    refused(g, "--save-images", action="store_true", default=False)
    g.add_argument(
        "--pin-mem", action="store_true", default=False, help="pin loader batches (on CUDA by default)"
    )
    g.add_argument(
        "--no-pin-mem",
        action="store_true",
        default=False,
        help="(timm-cskd) do not pin loader batches on CUDA",
    )
    g.add_argument(
        "--no-prefetcher",
        action="store_true",
        default=False,
        help="accepted, no effect: the torch loader always ships uint8 and normalises on the device",
    )
    g.add_argument("--output", default="", help="root folder of experiments (default: output/train)")
    g.add_argument("--experiment", default="", help="sub-folder name (default: date-model-method-size)")
    g.add_argument(
        "--eval-metric",
        default="top1",
        choices=("top1", "top5", "loss"),
        help="which validation metric picks model_best",
    )
    refused(g, "--tta", type=int, default=0)
    g.add_argument(
        "--use-multi-epochs-loader",
        action="store_true",
        default=False,
        help="keep the loader workers alive across epochs",
    )
    g.add_argument(
        "--log-wandb",
        action="store_true",
        default=False,
        help="log summary.csv's scalars to Weights & Biases (extra: wandb)",
    )
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-tags", nargs="+", default=[])
    g.add_argument("--wandb-resume-id", default="")
    g.add_argument(
        "--log-tensorboard",
        action="store_true",
        default=False,
        help="(timm-cskd) also write TensorBoard scalars (extra: tensorboard)",
    )
    refused(g, "--train-img-sizes", type=int, nargs="+", default=None)
    refused(g, "--train-batch-sizes", type=int, nargs="+", default=None)
    refused(g, "--train-size-probs", type=float, nargs="+", default=None)
    refused(g, "--train-size-schedule", default="constant")
    refused(g, "--train-size-schedule-spread", type=float, default=0.65)
    refused(g, "--train-size-random-mix", type=float, default=0.1)
    refused(
        g,
        "--train-batches-per-epoch",
        "--train-steps-per-epoch",
        type=int,
        default=None,
        dest="train_batches_per_epoch",
    )
    refused(g, "--variable-batch-loss-scale", default="none")
    refused(g, "--naflex-loader", action="store_true", default=False)
    refused(g, "--naflex-train-seq-lens", type=int, nargs="+", default=[128, 256, 576, 784, 1024])
    refused(g, "--naflex-max-seq-len", type=int, default=576)
    refused(g, "--naflex-patch-sizes", type=int, nargs="+", default=None)
    refused(g, "--naflex-patch-size-probs", type=float, nargs="+", default=None)
    refused(g, "--naflex-loss-scale", default="linear")
    refused(g, "--naflex-patchify-channels-first", action="store_true", default=False)

    g = parser.add_argument_group("Distillation parameters (an add-on to any method)")
    g.add_argument(
        "--kd-model-name",
        default=None,
        help="teacher: a timm model name (pretrained weights), hf-hub:/local-dir: id, training checkpoint, "
        "exported folder or state_dict (with --kd-model-arch)",
    )
    refused(g, "--kd-distill-type", default="logit")
    refused(g, "--kd-loss-type", default="kl")
    g.add_argument(
        "--distill-loss-weight",
        type=float,
        default=None,
        help="weight of T^2 KL(teacher || student) (default 0.9, or 1 - --task-loss-weight)",
    )
    g.add_argument(
        "--task-loss-weight",
        type=float,
        default=None,
        help="weight of the CE term under KD (default 0.1; 1.0 when only --distill-loss-weight is given, as timm)",
    )
    g.add_argument("--kd-temperature", type=float, default=4.0)
    refused(g, "--kd-student-feature-dim", type=int, default=None)
    refused(g, "--kd-teacher-feature-dim", type=int, default=None)
    refused(g, "--kd-token-distill-type", default="soft")
    g.add_argument(
        "--kd-model-arch",
        default=None,
        help="(timm-cskd) the teacher's timm architecture for a plain state_dict",
    )

    g = parser.add_argument_group("Method (timm-cskd)")
    g.add_argument(
        "--method",
        default=None,
        help="training method (default: cskd, the paper's algorithm); --list-methods describes them all",
    )
    g.add_argument(
        "--method-kwargs",
        nargs="*",
        default={},
        action=ParseKwargs,
        metavar="KEY=VALUE",
        help="the method's hyper-parameters, e.g. temperature=4 lambda=1 (unknown keys are an error)",
    )
    g.add_argument("--list-methods", action="store_true", help="print every method with its hyper-parameters")
    g.add_argument(
        "--cskd-mode",
        choices=("anchor", "paired", "off"),
        default=None,
        help="older spelling of --method: anchor = cskd, paired = cskd-paired, off = ce",
    )
    g.add_argument("--cskd-temperature", type=float, default=None, help="= --method-kwargs temperature=")
    g.add_argument("--cskd-lambda", type=float, default=None, help="= --method-kwargs lambda=")
    g.add_argument(
        "--plain-sampler",
        action="store_true",
        help="accepted with methods that train on plain batches (their default); an error with class-pair methods",
    )

    g = parser.add_argument_group("Checkpoints and evaluation (timm-cskd)")
    g.add_argument(
        "--checkpoint-interval",
        type=int,
        default=0,
        help="also save every N optimizer steps (0: epoch ends only)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an experiment folder that holds a run (deletes its checkpoints and summary)",
    )
    g.add_argument("--ece-bins", type=int, default=20)
    return parser


def refused_settings(args: argparse.Namespace) -> list[str]:
    """The timm flags set to values this trainer cannot honour, each with its reason."""
    found = []
    for dest, (default, reason) in REFUSED.items():
        value = getattr(args, dest)
        if dest == "dataset" and (value in FOLDER_DATASETS or str(value).startswith("wds/")):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if value != default:
            found.append(f"--{dest.replace('_', '-')} {value!r}: {reason}")
    return found


def _valid_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def load_yaml_defaults(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config (a path or a packaged config's name); keys may use dashes or underscores.
    Unknown keys name the closest valid one."""
    path = resolve_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML: {getattr(e, 'problem', None) or e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    valid = _valid_keys(parser)
    values = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            close = KEY_SYNONYMS.get(dest) or next(
                iter(difflib.get_close_matches(dest, list(valid), n=1, cutoff=0.5)), None
            )
            hint = f"; did you mean '{close}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        action = valid[dest]
        if isinstance(action, ParseKwargs) and isinstance(value, list):
            namespace = argparse.Namespace()
            action(None, namespace, [str(v) for v in value])
            value = getattr(namespace, dest)
        value = _typed(path, key, action, value)
        if (
            action.choices is not None
            and value not in action.choices
            and not (value is None and action.default is None)
        ):
            raise ConfigError(
                f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}"
                + (" (quote it: bare yes/no/on/off are YAML booleans)" if isinstance(value, bool) else "")
            )
        values[dest] = value
    return values


# Other trainers' names for timm's keys, which string similarity alone does not find.
KEY_SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr_base",
    "optimizer": "opt",
    "optim": "opt",
    "scheduler": "sched",
    "lr_scheduler": "sched",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "arch": "model",
    "data_path": "data_dir",
    "dataset_dir": "data_dir",
    "num_workers": "workers",
    "label_smoothing": "smoothing",
    "wd": "weight_decay",
}


def _typed(path, key, action: argparse.Action, value):
    """A YAML value as its flag takes it: the flag's type for each element, a list only where the flag
    takes several values, a boolean for an on/off flag."""
    if value is None or isinstance(action, ParseKwargs):
        return value
    takes_many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, list | tuple) and not takes_many:
        raise ConfigError(f"{path}: {key}: expected one value, got the list {list(value)}")
    if isinstance(
        action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key}: expected true or false, got {value!r}")
        return value
    if action.type is None:
        return value
    kind = getattr(action.type, "__name__", str(action.type))
    try:
        if isinstance(value, list | tuple):
            return [action.type(v) for v in value]
        if isinstance(value, bool) and action.type in (int, float):
            raise ValueError("a boolean")
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return action.type(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{path}: {key}: expected {'numbers' if takes_many else 'a number'} ({kind}), got {value!r}"
        ) from None


def parse_args(
    argv: list[str] | None = None, default_config: str | os.PathLike | None = None
) -> argparse.Namespace:
    """Parse flags over the YAML defaults; with no --config and no --data-dir, ``default_config`` applies."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and pre.data_dir is None and default_config is not None:
        config = default_config
    if config is not None:
        config = resolve_config(config)
        defaults = load_yaml_defaults(config, parser)
        _yield_method_to_command_line(defaults, pre)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.config = str(config) if config is not None else None
    return args


def _yield_method_to_command_line(defaults: dict, cli: argparse.Namespace) -> None:
    """The command line overrides the YAML's method, whichever of the two spellings each uses
    (``--method``/``--method-kwargs`` or the older ``--cskd-*``); the YAML's hyper-parameters go with
    its method when the command line names another."""
    from timm_cskd.methods import LEGACY_KWARGS, LEGACY_MODES

    cli_method = cli.method or LEGACY_MODES.get(cli.cskd_mode)
    if cli_method is not None:
        yaml_method = defaults.pop("method", None) or LEGACY_MODES.get(defaults.pop("cskd_mode", None))
        if yaml_method != cli_method:
            defaults.pop("method_kwargs", None)
            for flag in LEGACY_KWARGS:
                defaults.pop(flag, None)
    yaml_kwargs = dict(defaults.get("method_kwargs") or {})
    for flag, key in LEGACY_KWARGS.items():
        if getattr(cli, flag) is not None:
            yaml_kwargs.pop(key, None)
        if key in (cli.method_kwargs or {}):
            defaults.pop(flag, None)
    if "method_kwargs" in defaults:
        defaults["method_kwargs"] = yaml_kwargs


def dump_args(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """The resolved configuration, loadable again with -c (as timm's args.yaml is)."""
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "config"}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
