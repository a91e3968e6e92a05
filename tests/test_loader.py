"""The torch loader: augmentation is a function of the plan position, not of workers or resumes."""

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_device_preps, build_transforms, create_train_loader

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
    preps = build_device_preps(args, DATA_CONFIG, None, "cpu")
    return create_train_loader(
        build_index(folder),
        train_tf,
        args,
        batches="anchor",
        num_replicas=1,
        rank=0,
        seed=args.seed,
        preps=preps,
        pin_memory=False,
    )


def epoch(loader, number):
    loader.batch_sampler.set_epoch(number)
    return [(images.clone(), labels.clone()) for images, labels in loader]


MODES = {
    "anchor": ["--cskd-mode", "anchor"],
    "off-plain": ["--cskd-mode", "off", "--plain-sampler"],
    # Random erasing on the device, seeded from each sample's plan seed.
    "anchor-erasing": ["--cskd-mode", "anchor", "--reprob", "0.5", "--remode", "pixel"],
    # RandAugment draws its operations from NumPy's global RNG, which workers reseed per sample.
    "anchor-randaugment": ["--cskd-mode", "anchor", "--aa", "rand-m9-n3-mstd0.5"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_batches_do_not_depend_on_workers_or_resume(folder, mode):
    flags = MODES[mode]
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

    def reseed():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)  # noqa: NPY002

    reseed()
    expected = (torch.rand(3), random.random(), np.random.random())  # noqa: NPY002
    reseed()
    epoch(loader_for(folder, "-j", "0", "--aa", "rand-m9-n3-mstd0.5"), 0)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.random() == expected[2]  # noqa: NPY002


WORKER_SCRIPT = """
import os, signal, sys, time
import torch
from timm_cskd.data.loader import SignalSafeDataLoader, init_loader_worker


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if sys.argv[1] == "raise" and i == 5:
            raise ValueError("a transform failed")
        time.sleep(0.01)
        return torch.tensor(i)


if __name__ == "__main__":
    loader = SignalSafeDataLoader(Data(), batch_size=4, num_workers=2, worker_init_fn=init_loader_worker)
    it = iter(loader)
    next(it)
    print(" ".join(str(w.pid) for w in it._workers), flush=True)
    sys.stdin.readline()  # the test signals the workers meanwhile
    print(sum(len(b) for b in it), flush=True)  # the rest of the epoch, if the workers are alive
"""


def _start(tmp_path, mode):
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_workers_survive_a_group_sigterm_and_the_epoch_goes_on(tmp_path):
    """A scheduler's SIGTERM reaches the whole process group: the workers must survive it (the trainer
    saves its preemption checkpoint first); SIGTERM from anyone but their parent is dropped."""
    import os
    import signal

    proc = _start(tmp_path, "ok")
    workers = [int(p) for p in proc.stdout.readline().split()]
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    assert int(out) == 60, "the workers died of SIGTERM and the epoch lost batches"


def test_a_failing_worker_ends_the_trainer_instead_of_hanging_it(tmp_path):
    """A worker's exception propagates; at exit the parent stops its workers with SIGTERM, which they
    must obey although they drop everyone else's (a deaf worker would hang the exit forever)."""
    proc = _start(tmp_path, "raise")
    proc.stdout.readline()
    _, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode != 0
    assert "a transform failed" in err
