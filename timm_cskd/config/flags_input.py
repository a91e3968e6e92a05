"""timm train.py's dataset, model and device flags (their names, defaults and groups), and this trainer's own."""

from __future__ import annotations

import argparse

from timm.utils import ParseKwargs

from timm_cskd.config.refusal import refused

__all__ = ["DEFAULT_VAL_SPLIT", "add_input_flags"]

# timm's default --val-split; when it (or a synonym) is missing the run trains without validation.
DEFAULT_VAL_SPLIT = "validation"


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The dataset, model and device groups."""
    g = parser.add_argument_group("Dataset parameters")
    parser.add_argument(
        "data", nargs="?", metavar="DIR", default=None, help="path to dataset (deprecated: --data-dir)"
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="root with train/ and val/ (or validation/) ImageFolder trees or list files; none: the bundled demo dataset",
    )
    refused(
        g,
        "--dataset",
        default="",
        metavar="NAME",
        why="reads ImageFolder trees, list files and timm_cskd.data.shards folders (wds/) only (torch/, hfds/, tfds/ datasets are not wired to the class-pair plan)",
    )
    g.add_argument("--train-split", default="train", help="folder or list file under --data-dir")
    g.add_argument(
        "--val-split",
        default=DEFAULT_VAL_SPLIT,
        help="folder or list file under --data-dir; validation also finds val, valid, eval, evaluation (timm's synonyms)",
    )
    refused(
        g,
        "--train-num-samples",
        type=int,
        default=None,
        why="applies to iterable datasets, which are not supported",
    )
    refused(
        g,
        "--val-num-samples",
        type=int,
        default=None,
        why="applies to iterable datasets, which are not supported",
    )
    refused(
        g,
        "--dataset-download",
        action="store_true",
        default=False,
        why="nothing is downloaded: the data must be on disk",
    )
    g.add_argument(
        "--class-map",
        default="",
        help="file of class folder names, one per line, in label order (timm's txt form)",
    )
    refused(g, "--input-img-mode", default=None, why="images are decoded to RGB (PIL or DALI)")
    refused(
        g,
        "--input-key",
        default=None,
        why="applies to Hugging Face/WebDataset datasets, which are not supported",
    )
    refused(
        g,
        "--target-key",
        default=None,
        why="applies to Hugging Face/WebDataset datasets, which are not supported",
    )
    refused(
        g,
        "--dataset-trust-remote-code",
        action="store_true",
        default=False,
        why="applies to Hugging Face datasets, which are not supported",
    )
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
    refused(g, "--fuser", default="", why="TorchScript fusers: use --torchcompile")
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
    refused(
        g,
        "--torchscript",
        action="store_true",
        default=False,
        why="TorchScript is not supported: use --torchcompile",
    )
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")

    g = parser.add_argument_group("Device parameters")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu (timm: cuda)")
    g.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=False, help="torch.autocast mixed precision"
    )
    g.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16")
    refused(
        g,
        "--model-dtype",
        default=None,
        why="weights stay float32 (use --amp --amp-dtype for lower precision compute)",
    )
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
