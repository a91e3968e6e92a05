"""timm train.py's miscellaneous and distillation flags, and this trainer's method and checkpoint flags."""

from __future__ import annotations

import argparse

from timm.utils import ParseKwargs

from timm_cskd.config.refusal import refused

__all__ = ["add_run_flags"]


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The miscellaneous, distillation, method and checkpoint groups."""
    g = parser.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=int, default=42)
    refused(
        g,
        "--worker-seeding",
        default="all",
        why="each sample's augmentation is seeded from its place in the epoch plan (exact resume), not per worker",
    )
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
    refused(g, "--save-images", action="store_true", default=False, why="not supported")
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
    refused(g, "--tta", type=int, default=0, why="test-time augmentation is not supported")
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
    refused(
        g,
        "--train-img-sizes",
        type=int,
        nargs="+",
        default=None,
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-size-probs",
        type=float,
        nargs="+",
        default=None,
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-size-schedule",
        default="constant",
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-size-schedule-spread",
        type=float,
        default=0.65,
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-size-random-mix",
        type=float,
        default=0.1,
        why="scheduled multi-resolution training is not supported",
    )
    refused(
        g,
        "--train-batches-per-epoch",
        "--train-steps-per-epoch",
        type=int,
        default=None,
        dest="train_batches_per_epoch",
        why="an epoch is one pass over the class-pair plan",
    )
    refused(
        g,
        "--variable-batch-loss-scale",
        default="none",
        why="scheduled multi-resolution training is not supported",
    )
    refused(g, "--naflex-loader", action="store_true", default=False, why="NaFlex loading is not supported")
    refused(
        g,
        "--naflex-train-seq-lens",
        type=int,
        nargs="+",
        default=[128, 256, 576, 784, 1024],
        why="NaFlex loading is not supported",
    )
    refused(g, "--naflex-max-seq-len", type=int, default=576, why="NaFlex loading is not supported")
    refused(
        g, "--naflex-patch-sizes", type=int, nargs="+", default=None, why="NaFlex loading is not supported"
    )
    refused(
        g,
        "--naflex-patch-size-probs",
        type=float,
        nargs="+",
        default=None,
        why="NaFlex loading is not supported",
    )
    refused(g, "--naflex-loss-scale", default="linear", why="NaFlex loading is not supported")
    refused(
        g,
        "--naflex-patchify-channels-first",
        action="store_true",
        default=False,
        why="NaFlex loading is not supported",
    )

    g = parser.add_argument_group("Distillation parameters (an add-on to any method)")
    g.add_argument(
        "--kd-model-name",
        default=None,
        help="teacher: a timm model name (pretrained weights), hf-hub:/local-dir: id, training checkpoint, "
        "exported folder or state_dict (with --kd-model-arch)",
    )
    refused(g, "--kd-distill-type", default="logit", why="only logit distillation is supported")
    refused(g, "--kd-loss-type", default="kl", why="only the KL loss is supported (as in timm)")
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
    refused(
        g,
        "--kd-student-feature-dim",
        type=int,
        default=None,
        why="applies to feature distillation, which is not supported",
    )
    refused(
        g,
        "--kd-teacher-feature-dim",
        type=int,
        default=None,
        why="applies to feature distillation, which is not supported",
    )
    refused(
        g,
        "--kd-token-distill-type",
        default="soft",
        why="applies to token distillation, which is not supported",
    )
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
