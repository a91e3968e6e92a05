"""The DALI pipelines: decode (nvJPEG on the GPU, or CPU operators), resize, augment and normalise.

Training decodes with a random-resized crop, resizes with timm's --train-interpolation, colour-jitters
and flips; validation resizes the shorter side by ``crop_pct`` and centre-crops, as timm's eval
transform does. Both normalise with the model's mean/std. ``device_id=None`` runs every operator on the
CPU, for machines without a GPU.
"""

from __future__ import annotations

import math

import torch
from nvidia.dali import fn, pipeline_def, types

from timm_cskd.errors import ConfigError

__all__ = [
    "DALI_UNSUPPORTED",
    "INTERP",
    "check_dali_augmentation",
    "dali_device_id",
    "decoder_device",
    "train_pipeline",
    "val_pipeline",
    "val_resize_shorter",
]

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}

# timm augmentation flags the DALI pipeline does not implement, with their inactive values.
DALI_UNSUPPORTED = {
    "aa": None,
    "reprob": 0.0,
    "vflip": 0.0,
    "no_aug": False,
    "train_crop_mode": None,
    "color_jitter_prob": None,
    "grayscale_prob": None,
    "gaussian_blur_prob": None,
}


def check_dali_augmentation(args) -> None:
    """DALI decodes with a random-resized crop, resizes, colour-jitters and flips; refuse the rest by name."""
    unsupported = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r}"
        for k, off in DALI_UNSUPPORTED.items()
        if getattr(args, k) != off
    ]
    if unsupported:
        raise ConfigError(
            f"--data-backend dali does not implement {', '.join(unsupported)}: use --data-backend torch (timm's transforms)"
        )


def dali_device_id(device: torch.device) -> int | None:
    """The GPU this process trains on (``--device cuda:1`` included), or None for CPU operators."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def decoder_device(device_id: int | None) -> str:
    """DALI's decoder placement: ``mixed`` (nvJPEG, CPU input and GPU output) on a GPU, else ``cpu``."""
    return "mixed" if device_id is not None else "cpu"


def val_resize_shorter(input_size, crop_pct: float) -> int:
    """The validation resize of the shorter side, rounded down as timm's eval transform does."""
    return math.floor(input_size[-2] / crop_pct)


def _train_interpolation(args, data_config):
    """timm's --train-interpolation: a fixed filter, or per image bilinear or bicubic for ``random``."""
    name = args.train_interpolation or data_config["interpolation"]
    if name == "random":
        choice = fn.random.choice([int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)])
        return fn.cast(choice, dtype=types.DALIDataType.INTERP_TYPE)
    if name not in INTERP:
        raise ConfigError(f"--train-interpolation {name}: DALI offers {', '.join(INTERP)} and random")
    return INTERP[name]


def _normalise(images, data_config, *, mirror, layout: str, dtype):
    mean = [255 * m for m in data_config["mean"]]
    std = [255 * s for s in data_config["std"]]
    return fn.crop_mirror_normalize(
        images, dtype=dtype, output_layout=layout, mean=mean, std=std, mirror=mirror
    )


def train_pipeline(
    source, args, data_config: dict, *, batch_size: int, device_id, seed: int, float16: bool, layout: str
):
    """The built training pipeline over a parallel per-sample ``source`` of (encoded bytes, label), its
    readers spawned (see ``timm_cskd.data.dali.source``)."""
    size = data_config["input_size"][-2:]
    dtype = types.FLOAT16 if float16 and device_id is not None else types.FLOAT

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(args.workers, 1),
        device_id=device_id,
        seed=seed,
        py_num_workers=max(args.workers, 1),
        py_start_method="spawn",
        prefetch_queue_depth=2,
    )
    def pipeline():
        jpegs, labels = fn.external_source(
            source=source, num_outputs=2, batch=False, parallel=True, dtype=[types.UINT8, types.INT64]
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder_device(device_id),
            output_type=types.RGB,
            random_area=list(args.scale),
            random_aspect_ratio=list(args.ratio),
        )
        images = fn.resize(
            images,
            resize_x=size[1],
            resize_y=size[0],
            interp_type=_train_interpolation(args, data_config),
        )
        if args.color_jitter:
            # timm's ColorJitter(b, c, s) factors, each uniform in [max(0, 1 - cj), 1 + cj].
            cj = [max(0.0, 1.0 - args.color_jitter), 1.0 + args.color_jitter]
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=cj),
                contrast=fn.random.uniform(range=cj),
                saturation=fn.random.uniform(range=cj),
            )
        mirror = fn.random.coin_flip(probability=args.hflip)
        images = _normalise(images, data_config, mirror=mirror, layout=layout, dtype=dtype)
        return images, labels.gpu() if device_id is not None else labels

    pipe = pipeline()
    pipe.build()
    return pipe


def val_pipeline(batches, data_config: dict, *, batch_size: int, workers: int, device_id, layout: str):
    """The built validation pipeline over ``batches``, a generator function of (encoded bytes, labels)
    batches that DALI restarts for every pass."""
    size = data_config["input_size"][-2:]

    @pipeline_def(batch_size=batch_size, num_threads=max(workers, 1), device_id=device_id)
    def pipeline():
        jpegs, labels = fn.external_source(
            source=batches,
            num_outputs=2,
            cycle="raise",
            dtype=[types.UINT8, types.INT64],
        )
        images = fn.decoders.image(jpegs, device=decoder_device(device_id), output_type=types.RGB)
        images = fn.resize(
            images,
            resize_shorter=val_resize_shorter(size, data_config["crop_pct"]),
            interp_type=INTERP.get(data_config["interpolation"], types.INTERP_CUBIC),
        )
        images = fn.crop(images, crop=list(size))
        images = _normalise(images, data_config, mirror=0, layout=layout, dtype=types.FLOAT)
        return images, labels.gpu() if device_id is not None else labels

    pipe = pipeline()
    pipe.build()
    return pipe
