"""DALI backend on CPU (device_id=None): the plan decides the order, decoding matches the pixels."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.verify import main as verify_main
from timm_cskd.distributed import Context
from timm_cskd.train import main, run

dali = pytest.importorskip("timm_cskd.data.dali")

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": MEAN,
    "std": STD,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}
SIZES = [7, 3, 1, 9]
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def coded_folder(tmp_path_factory):
    """Each image is one solid colour: red encodes its class, green its dataset index."""
    root = tmp_path_factory.mktemp("coded") / "train"
    index = 0
    for c, n in enumerate(SIZES):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(n):
            colour = (40 + 50 * c, 8 * index + 4, 128)
            Image.new("RGB", (30, 24), colour).save(root / f"class_{c}" / f"{i:03d}.jpg", quality=100)
            index += 1
    return root


def decode(images):
    """Mean colour of each image, un-normalised, as (class, dataset position in scan order)."""
    pixels = images.float().mean(dim=(2, 3)).numpy() * (255 * np.array(STD)) + 255 * np.array(MEAN)
    return np.rint((pixels[:, 0] - 40) / 50).astype(int), np.rint((pixels[:, 1] - 4) / 8).astype(int)


def dali_args(mode="anchor", batch=3, **extra):
    args = parse_args(
        ["--data-dir", "unused", "-b", str(batch), "--cskd-mode", mode, "-j", "1", "--seed", "5"]
    )
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def epoch_indices(loader, index):
    out = []
    for images, labels in loader:
        classes, positions = decode(images)
        np.testing.assert_array_equal(classes, labels.numpy(), err_msg="decoded colour is not the label's")
        np.testing.assert_array_equal(index.labels[positions], labels.numpy())
        out.append(positions)
    return out


@pytest.mark.parametrize("mode", ["anchor", "paired"])
def test_batches_follow_the_plan_on_two_ranks(coded_folder, mode):
    index = build_index(coded_folder)
    batch = 3 if mode == "anchor" else 4
    anchors = []
    for rank in range(2):
        train, _ = dali.create_dali_loaders(
            dali_args(mode, batch), index, None, DATA_CONFIG, Context(CPU, 2, rank)
        )
        sampler = train.batch_sampler
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got = epoch_indices(train, index)
            first, partner = sampler.rank_plan()
            k = sampler.pairs_per_batch
            expected = [
                np.concatenate((first[b * k : (b + 1) * k], partner[b * k : (b + 1) * k]))
                for b in range(len(sampler))
            ]
            assert len(got) == len(expected) == len(train)
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)
                assert (index.labels[g[:k]] == index.labels[g[k:]]).all()
            if epoch == 0:
                anchors.extend(int(i) for g in got for i in g[:k])
    assert len(anchors) == len(set(anchors)), "the two ranks' anchors overlap"


def test_labels_equal_the_torch_backend(coded_folder):
    from timm_cskd.data.loader import build_transforms, create_train_loader

    index = build_index(coded_folder)
    args = dali_args("anchor", 3, workers=0)
    train_tf, _ = build_transforms(args, DATA_CONFIG)
    torch_loader = create_train_loader(index, train_tf, args, num_replicas=1, rank=0, pin_memory=False)
    dali_loader, _ = dali.create_dali_loaders(dali_args("anchor", 3), index, None, DATA_CONFIG, Context(CPU))
    for epoch in (0, 4):
        torch_loader.batch_sampler.set_epoch(epoch)
        dali_loader.batch_sampler.set_epoch(epoch)
        torch_labels = [labels.tolist() for _, labels in torch_loader]
        dali_labels = [labels.tolist() for _, labels in dali_loader]
        assert torch_labels == dali_labels


def test_resume_mid_epoch_starts_at_the_saved_batch(coded_folder):
    index = build_index(coded_folder)
    train, _ = dali.create_dali_loaders(dali_args(), index, None, DATA_CONFIG, Context(CPU))
    sampler = train.batch_sampler
    sampler.set_epoch(2)
    full = epoch_indices(train, index)
    sampler.load_state_dict(sampler.state_dict(batches_consumed=2))
    sampler.set_epoch(2)
    resumed = epoch_indices(train, index)
    assert [r.tolist() for r in resumed] == [f.tolist() for f in full[2:]]
    sampler.set_epoch(3)
    assert len(epoch_indices(train, index)) == len(sampler)


def test_validation_counts_each_image_once(coded_folder):
    index = build_index(coded_folder)
    seen = []
    for rank in range(2):
        _, val = dali.create_dali_loaders(
            dali_args(validation_batch_size=4), index, index, DATA_CONFIG, Context(CPU, 2, rank)
        )
        for images, labels in val:
            classes, positions = decode(images)
            np.testing.assert_array_equal(classes, labels.numpy())
            seen.extend(positions.tolist())
    assert sorted(seen) == list(range(len(index)))


@pytest.mark.slow
def test_trains_on_the_demo_dataset_and_loss_falls(tmp_path):
    import csv

    args = ["--data-backend", "dali", "--epochs", "3", "--img-size", "28", "-j", "2", "--output", str(tmp_path),
            "--experiment", "dali", "--log-interval", "1000"]  # fmt: skip
    metrics = run(parse_args(["-c", str(REPO / "configs" / "demo.yaml"), *args]))
    with open(tmp_path / "dali" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert metrics["num_samples"] == 500


@pytest.mark.slow
def test_broken_images_are_listed_and_skipped_by_both_backends(tmp_path, capsys):
    from conftest import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", [6, 6], size=(24, 24), noise=30)
    make_image_folder(data / "val", [2, 2], size=(24, 24), noise=30)
    (data / "train" / "class_000" / "img_0000.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Image.new("RGB", (24, 24), (1, 2, 3)).save(data / "train" / "class_001" / "png_inside.JPEG", format="PNG")
    listing = tmp_path / "undecodable.txt"
    assert verify_main(["--data-dir", str(data), "--output", str(listing), "-j", "2"]) == 0
    out = capsys.readouterr().out
    assert [line for line in listing.read_text().splitlines() if not line.startswith("#")] == [
        "train/class_000/img_0000.jpg"
    ]
    assert "PNG content in a JPEG-named file: train/class_001/png_inside.JPEG" in out

    common = ["--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b", "4",
              "-j", "1", "--output", str(tmp_path / "out")]  # fmt: skip
    metrics = run(
        parse_args([*common, "--experiment", "torch", "-j", "0"])
    )  # no list: the torch backend skips it
    assert metrics["num_samples"] == 4
    assert "skipping undecodable image" in capsys.readouterr().out
    metrics = run(
        parse_args(
            [*common, "--experiment", "dali", "--data-backend", "dali", "--exclude-list", str(listing)]
        )
    )
    assert metrics["num_samples"] == 4
    assert "excluding 1 undecodable images" in capsys.readouterr().out


def test_missing_dali_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "timm_cskd.data.dali")
    code = main(["--data-dir", str(tmp_path), "--data-backend", "dali"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs NVIDIA DALI" in err and "timm-cskd[dali]" in err
