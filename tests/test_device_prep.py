"""uint8 from the loader workers, finished on the device: the model sees what the float path gave it.

The reference is computed apart from the loader: each planned sample's file run through timm's float
transform (ToTensor + Normalize) from the sample's seed, and, with random erasing, timm's RandomErasing on
that one image from ``erasing_seed(seed, view)`` (the semantics the device prep defines).
"""

import random

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from timm_cskd.config import ConfigError, parse_args
from timm_cskd.data import build_index
from timm_cskd.data.device_prep import erasing_seed
from timm_cskd.data.loader import (
    build_device_preps,
    build_transforms,
    build_val_prep,
    build_val_transform,
    create_train_loader,
    create_val_loader,
    resolve_pin_memory,
    train_transform_kwargs,
)

DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}
POLICY = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("prep") / "train", [4, 4, 5], size=(40, 30), noise=80)


def make_loader(folder, views, *flags):
    args = parse_args(["--data-dir", str(folder), "-b", "3", "--seed", "5", "-j", "0", *flags])
    train_tf, _ = build_transforms(args, DATA_CONFIG, views)
    preps = build_device_preps(args, DATA_CONFIG, views, "cpu")
    index = build_index(folder)
    loader = create_train_loader(
        index,
        train_tf,
        args,
        batches="anchor",
        num_replicas=1,
        rank=0,
        seed=args.seed,
        preps=preps,
        pin_memory=False,
    )
    return args, index, loader


def float_path(args, views, path, seed):
    """Today's float path for one sample: each view's timm transform with ToTensor + Normalize (no
    erasing), one after the other from the sample's seed as the loader seeds it (python, NumPy and
    torch's CPU generator)."""
    kwargs = train_transform_kwargs(args, DATA_CONFIG)
    transforms = [create_transform(**{**kwargs, **view, "re_prob": 0.0}) for view in views or [{}]]
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.default_generator.manual_seed(seed)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return [transform(img) for transform in transforms]
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])


def erased(args, image, seed, view):
    """timm's RandomErasing on one normalised image, from the seed the device prep defines for it."""
    image = image.clone()
    s = erasing_seed(seed, view)
    states = random.getstate(), torch.get_rng_state()
    random.seed(s)
    torch.manual_seed(s)
    try:
        RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device="cpu")(image)
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])
    return image


CASES = {
    "single": (None, []),
    "single-erasing": (None, ["--reprob", "0.6", "--remode", "pixel", "--recount", "2"]),
    "ddgsd-two-views-erasing": ([{}, {}], ["--reprob", "0.6", "--remode", "rand"]),
    "cskd-e-randaugment-view": ([{"auto_augment": POLICY}, {}], ["--color-jitter", "0.4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_inputs_equal_the_float_path(folder, case):
    views, flags = CASES[case]
    args, index, loader = make_loader(folder, views, *flags)
    loader.batch_sampler.set_epoch(1)
    plans = list(loader.batch_sampler)
    checked = erasures = 0
    for (images, target), plan in zip(loader, plans, strict=True):
        batch_views = images if views else [images]
        assert len(batch_views) == len(views or [{}])
        assert target.tolist() == [int(index.labels[i]) for i, _ in plan]
        for j, (i, seed) in enumerate(plan):
            for v, (batch, plain) in enumerate(
                zip(batch_views, float_path(args, views, index.full_path(i), seed))
            ):
                assert batch.dtype == torch.float32 and batch.shape == (len(plan), 3, 16, 16)
                expected = erased(args, plain, seed, v) if args.reprob else plain
                torch.testing.assert_close(batch[j], expected, rtol=0, atol=1e-6)
                erasures += not torch.equal(expected, plain)
                checked += 1
    assert checked >= 24 * len(views or [{}])
    if args.reprob:
        # Erasing happened, and not to every image (probability 0.6).
        assert 0 < erasures < checked, (erasures, checked)


def test_workers_ship_a_quarter_of_the_float_bytes(folder):
    args, index, loader = make_loader(folder, None)
    loader.batch_sampler.set_epoch(0)
    (i, seed), *_ = list(loader.batch_sampler)[0]
    shipped, target, seeds = next(iter(loader.loader))  # what leaves the workers
    assert shipped.dtype == torch.uint8 and seeds.dtype == torch.int64 and int(seeds[0]) == seed
    float_bytes = float_path(args, None, index.full_path(i), seed)[0].nbytes
    assert shipped.nbytes == len(shipped) * 3 * 16 * 16
    assert float_bytes == 4 * shipped.nbytes // len(shipped)


def test_channels_last_is_applied_on_the_device(folder):
    _, _, loader = make_loader(folder, None, "--channels-last", "--reprob", "0.5")
    loader.batch_sampler.set_epoch(0)
    images, _ = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)
    _, _, plain = make_loader(folder, None, "--reprob", "0.5")
    plain.batch_sampler.set_epoch(0)
    expected, _ = next(iter(plain))
    assert not expected.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, expected)


def test_no_aug_erases_nothing_as_timm(folder):
    args, _, loader = make_loader(folder, None, "--no-aug", "--reprob", "1.0")
    assert [p.erasing for p in loader.preps] == [None]


def test_erasing_leaves_the_global_rngs_alone(folder):
    _, _, loader = make_loader(folder, None, "--reprob", "1.0", "--remode", "pixel")
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    loader.batch_sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) > 2
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_validation_inputs_equal_the_float_path(folder):
    index = build_index(folder)
    loader = create_val_loader(
        index,
        build_val_transform(DATA_CONFIG),
        4,
        num_replicas=2,
        rank=1,
        workers=0,
        prep=build_val_prep(DATA_CONFIG, "cpu"),
        pin_memory=False,
    )
    reference = create_transform(
        input_size=16, is_training=False, interpolation="bilinear", crop_pct=0.875,
        mean=DATA_CONFIG["mean"], std=DATA_CONFIG["std"],
    )  # fmt: skip
    got = torch.cat([images for images, _ in loader])
    expected = []
    for i in range(1, len(index), 2):
        with Image.open(index.full_path(i)) as img:
            expected.append(reference(img.convert("RGB")))
    torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=1e-6)


def test_pinned_by_default_on_cuda_only(tmp_path):
    def pin(device, *flags, config=None):
        argv = ["--data-dir", str(tmp_path), *flags] + (["-c", str(config)] if config else [])
        return resolve_pin_memory(parse_args(argv), torch.device(device))

    assert pin("cuda") and pin("cuda:1") and not pin("cpu")
    assert not pin("cuda", "--no-pin-mem") and pin("cpu", "--pin-mem")
    # timm's args.yaml always carries its default pin_mem: false; that is not an opt-out.
    config = tmp_path / "timm_args.yaml"
    config.write_text("pin_mem: false\n")
    assert pin("cuda", config=config)
    with pytest.raises(ConfigError, match="--pin-mem and --no-pin-mem"):
        pin("cuda", "--pin-mem", "--no-pin-mem")
