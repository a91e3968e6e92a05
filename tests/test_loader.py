"""The torch loader: augmentation is a function of the plan position, not of workers or resumes."""

import pytest
import torch
from conftest import make_image_folder

from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_transforms, create_train_loader

DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("aug") / "train", [5, 4, 6], size=(40, 30), noise=80)


def loader_for(folder, *flags):
    args = parse_args(["--data-dir", str(folder), "-b", "3", "--seed", "3", "--color-jitter", "0.4", *flags])
    train_tf, _ = build_transforms(args, DATA_CONFIG)
    return create_train_loader(build_index(folder), train_tf, args, num_replicas=1, rank=0, pin_memory=False)


def epoch(loader, number):
    loader.batch_sampler.set_epoch(number)
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("mode", ["anchor", "off-plain"])
def test_batches_do_not_depend_on_workers_or_resume(folder, mode):
    flags = ["--cskd-mode", "anchor"] if mode == "anchor" else ["--cskd-mode", "off", "--plain-sampler"]
    single = epoch(loader_for(folder, "-j", "0", *flags), 1)
    workers = epoch(loader_for(folder, "-j", "2", *flags), 1)
    assert len(single) == len(workers) > 2
    for (a, la), (b, lb) in zip(single, workers):
        assert torch.equal(la, lb) and torch.equal(a, b)

    resumed = loader_for(folder, "-j", "2", *flags)
    resumed.batch_sampler.load_state_dict(resumed.batch_sampler.state_dict(batches_consumed=2) | {"epoch": 1})
    tail = epoch(resumed, 1)
    assert len(tail) == len(single) - 2
    for (a, _), (b, _) in zip(single[2:], tail):
        assert torch.equal(a, b)
    # Still random, not frozen: the next epoch augments differently.
    assert not torch.equal(single[0][0], epoch(loader_for(folder, "-j", "0", *flags), 2)[0][0])


def test_loading_leaves_the_global_rngs_alone(folder):
    import random

    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    epoch(loader_for(folder, "-j", "0"), 0)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_workers_ignore_sigterm_and_leave_it_unblocked(image_folder):
    """A scheduler's SIGTERM reaches the whole process group: loader workers must survive it so the
    trainer can save its preemption checkpoint (their mask and disposition as the kernel reports them)."""
    import os
    import signal
    from pathlib import Path

    from timm_cskd.config import parse_args
    from timm_cskd.data import build_index
    from timm_cskd.data.loader import build_transforms, create_train_loader

    args = parse_args(
        ["--data-dir", str(image_folder), "-b", "2", "-j", "2", "--img-size", "16", "--crop-pct", "1.0"]
    )
    cfg = {
        "input_size": (3, 16, 16),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    loader = create_train_loader(
        build_index(image_folder),
        build_transforms(args, cfg)[0],
        args,
        num_replicas=1,
        rank=0,
        pin_memory=False,
    )
    it = iter(loader)
    next(it)
    bit = 1 << (signal.SIGTERM - 1)
    workers = [w.pid for w in it._workers]
    for pid in workers:
        status = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":\t" in line
        )
        assert int(status["SigIgn"], 16) & bit, "a loader worker would die of SIGTERM"
        assert not int(status["SigBlk"], 16) & bit
    own = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines()
        if ":\t" in line
    )
    assert not int(own["SigBlk"], 16) & bit, "the trainer must get SIGTERM again once its workers are up"
    del it
