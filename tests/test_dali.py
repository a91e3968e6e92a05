"""DALI backend on CPU (device_id=None): the plan decides the order, decoding matches the pixels."""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_cskd.config import parse_args
from timm_cskd.data import ImageIndex, build_index
from timm_cskd.data.loader import create_batch_sampler
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
    # No colour jitter: the tests read each image's class and index back from its colour.
    args = parse_args(
        ["--data-dir", "unused", "-b", str(batch), "--cskd-mode", mode, "-j", "1", "--seed", "5",
         "--color-jitter", "0", "--train-interpolation", "bilinear"]
    )  # fmt: skip
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
            dali_args(mode, batch), index, None, DATA_CONFIG, Context(CPU, 2, rank), batches=mode, seed=5
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
    from timm_cskd.data.loader import build_device_preps, build_transforms, create_train_loader

    index = build_index(coded_folder)
    args = dali_args("anchor", 3, workers=0)
    train_tf, _ = build_transforms(args, DATA_CONFIG)
    preps = build_device_preps(args, DATA_CONFIG, None, CPU)
    torch_loader = create_train_loader(
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
    dali_loader, _ = dali.create_dali_loaders(
        dali_args("anchor", 3), index, None, DATA_CONFIG, Context(CPU), seed=5
    )
    for epoch in (0, 4):
        torch_loader.batch_sampler.set_epoch(epoch)
        dali_loader.batch_sampler.set_epoch(epoch)
        torch_labels = [labels.tolist() for _, labels in torch_loader]
        dali_labels = [labels.tolist() for _, labels in dali_loader]
        assert torch_labels == dali_labels


def synthetic_index(n, classes=10):
    labels = np.arange(n) % classes
    paths = [f"class_{y:03d}/img_{i:08d}.JPEG" for i, y in enumerate(labels)]
    return ImageIndex("/nowhere", paths, labels, [f"class_{c:03d}" for c in range(classes)])


def test_each_reader_is_sent_file_names_not_the_index_and_reads_its_ranks_plan():
    payload = {}
    for n in (300, 100_000):
        index = synthetic_index(n)
        sampler = create_batch_sampler(index, "anchor", 4, num_replicas=2, rank=1, seed=5)
        loader = dali.DaliTrainLoader(index, sampler, DATA_CONFIG, dali_args(batch=4), None, seed=5)
        payload[n] = pickle.dumps(loader._source(3, 0))  # what DALI sends each reader process
        reader = pickle.loads(payload[n])
        for epoch_idx in (0, 1):  # a pipeline serves the next epoch after a reset
            sampler.set_epoch(3 + epoch_idx)
            expected = [i for batch in sampler for i in batch]  # the torch backend's order
            plan = reader._plan_for(epoch_idx)
            mapped = reader.files.index
            assert [mapped.paths[i] for i in plan] == [index.paths[i] for i in expected]
            np.testing.assert_array_equal(mapped.labels[plan], index.labels[expected])
    assert len(payload[100_000]) < 2_000, "a reader unpickles file names, not 100k paths"
    assert abs(len(payload[100_000]) - len(payload[300])) < 8


def test_resume_mid_epoch_starts_at_the_saved_batch(coded_folder):
    index = build_index(coded_folder)
    train, _ = dali.create_dali_loaders(dali_args(), index, None, DATA_CONFIG, Context(CPU), seed=5)
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
            dali_args(validation_batch_size=4), index, index, DATA_CONFIG, Context(CPU, 2, rank), seed=5
        )
        for images, labels in val:
            classes, positions = decode(images)
            np.testing.assert_array_equal(classes, labels.numpy())
            seen.extend(positions.tolist())
    assert sorted(seen) == list(range(len(index)))


@pytest.mark.slow
def test_trains_on_the_demo_dataset_and_loss_falls(tmp_path):
    import csv

    args = ["--data-backend", "dali", "--model", "test_resnet", "--epochs", "2", "--img-size", "28", "-j", "2", "--output", str(tmp_path),
            "--experiment", "dali", "--log-interval", "1000"]  # fmt: skip
    metrics = run(parse_args(["-c", str(REPO / "configs" / "demo.yaml"), *args]))
    with open(tmp_path / "dali" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert metrics["num_samples"] == 500


def _broken_files(train):
    """The bad files a real ImageNet folder holds: truncated, foreign, corrupt inside a whole JPEG."""
    good = (train / "class_000" / "img_0001.jpg").read_bytes()
    truncated = train / "class_000" / "img_0000.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = train / "class_001" / "img_0002.JPEG"
    garbage.write_bytes(b"<html>404 Not Found</html>" * 20)
    corrupt = bytearray(good)
    corrupt[200:-10] = b"\xab" * (len(corrupt) - 210)  # markers intact, entropy-coded data wrong
    inside = train / "class_001" / "img_0003.jpg"
    inside.write_bytes(bytes(corrupt))
    return truncated, garbage, inside


def test_broken_files_never_stop_the_reader_and_are_named(tmp_path, caplog):
    from conftest import make_image_folder

    train = make_image_folder(tmp_path / "train", [6, 6, 6], size=(40, 40), noise=30)
    truncated, garbage, inside = _broken_files(train)
    index = build_index(train)
    loader, val = dali.create_dali_loaders(
        dali_args("anchor", 3), index, index, DATA_CONFIG, Context(CPU), seed=5
    )
    with caplog.at_level("WARNING", logger="timm_cskd.data.dali"):
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            first, partner = loader.batch_sampler.rank_plan()
            expected = [
                np.concatenate(
                    (index.labels[first[b * 3 : b * 3 + 3]], index.labels[partner[b * 3 : b * 3 + 3]])
                )
                for b in range(len(loader))
            ]
            got = [labels.numpy() for _, labels in loader]
            assert len(got) == len(loader), "an epoch lost batches"
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)
        assert sum(len(labels) for _, labels in val) == len(index), "validation counts each image once"
    messages = [r.getMessage() for r in caplog.records]
    for path in (truncated, garbage):
        assert any(str(path) in m and "a classmate stands in" in m for m in messages), messages
    assert any(str(inside) in m and "DALI cannot decode" in m for m in messages), messages
    assert sum(str(inside) in m for m in messages) == 2, "logged once by the train and once by the val loader"


def test_workers_are_spawned_and_decode_on_the_process_gpu(coded_folder):
    index = build_index(coded_folder)
    train, val = dali.create_dali_loaders(
        dali_args(), index, index, DATA_CONFIG, Context(torch.device("cuda", 1)), seed=5
    )
    assert (train.device_id, val.device_id) == (1, 1), "--device cuda:1 must decode on GPU 1"
    train, _ = dali.create_dali_loaders(dali_args(), index, None, DATA_CONFIG, Context(CPU), seed=5)
    next(iter(train))
    # Forking a process that holds a CUDA context is refused by DALI: the trainer has one by now.
    assert train._iterator._pipes[0]._py_start_method == "spawn"


@pytest.mark.parametrize(("size", "crop_pct"), [(16, 0.9), (224, 0.875), (224, 0.95), (288, 1.0), (100, 0.7)])
def test_validation_resize_rounds_as_timm(size, crop_pct):
    from timm.data import create_transform
    from torchvision.transforms import Resize

    timm_tf = create_transform(input_size=(3, size, size), is_training=False, crop_pct=crop_pct)
    resize = next(t for t in timm_tf.transforms if isinstance(t, Resize))
    expected = resize.size if isinstance(resize.size, int) else resize.size[0]
    assert dali.val_resize_shorter((size, size), crop_pct) == expected


WORKER_SCRIPT = """
import os, sys, time, torch
from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data import dali
from timm_cskd.distributed import Context

if __name__ == "__main__":
    index = build_index(sys.argv[1])
    args = parse_args(["--data-dir", "unused", "-b", "3", "-j", "2"])
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0,
           "interpolation": "bilinear"}
    train, _ = dali.create_dali_loaders(args, index, None, cfg, Context(torch.device("cpu")), seed=args.seed)
    next(iter(train))
    print("ready", flush=True)
    if sys.argv[2] == "raise":  # a trainer that dies of an exception: its exit must not wait on readers
        raise RuntimeError("the training step failed")
    time.sleep(600)
"""


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_reader_workers_exit_when_the_trainer_is_killed(coded_folder, tmp_path):
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "reader.py"
    script.write_text(WORKER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(coded_folder), "sleep"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "ready"
    # The spawned readers (not multiprocessing's resource tracker or a library's passing subprocess).
    workers = [
        pid for pid in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2, "expected the two spawned reader processes"
    for pid in workers:  # a scheduler's TERM to the whole group: readers ignore it, they wait for the trainer
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)
    proc.kill()  # a segfault or an OOM kill gives no chance to clean up
    proc.wait()
    deadline = time.time() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "DALI reader processes outlived their trainer"


@pytest.mark.slow
def test_broken_images_are_listed_and_skipped_by_both_backends(tmp_path, capsys):
    from conftest import make_image_folder

    data = tmp_path / "data"
    make_image_folder(data / "train", [6, 6], size=(40, 40), noise=30)
    make_image_folder(data / "val", [2, 2], size=(24, 24), noise=30)
    truncated, garbage, inside = _broken_files(data / "train")
    Image.new("RGB", (24, 24), (1, 2, 3)).save(data / "train" / "class_001" / "png_inside.JPEG", format="PNG")
    listing = tmp_path / "undecodable.txt"
    assert verify_main(["--data-dir", str(data), "--output", str(listing), "-j", "2"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in listing.read_text().splitlines() if not line.startswith("#")]
    assert "train/class_000/img_0000.jpg" in listed and "train/class_001/img_0002.JPEG" in listed
    assert "PNG content in a JPEG-named file: train/class_001/png_inside.JPEG" in out

    common = ["--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b", "4",
              "-j", "1", "--output", str(tmp_path / "out")]  # fmt: skip
    # No exclude list: both backends meet the bad files in the folder and go on.
    metrics = run(parse_args([*common, "--experiment", "torch", "-j", "0"]))
    assert metrics["num_samples"] == 4
    assert "skipping undecodable image" in capsys.readouterr().out
    metrics = run(parse_args([*common, "--experiment", "dali", "--data-backend", "dali"]))
    assert metrics["num_samples"] == 4
    log = (tmp_path / "out" / "dali" / "log.txt").read_text()
    assert str(truncated) in log and str(garbage) in log
    metrics = run(
        parse_args(
            [*common, "--experiment", "dali-listed", "--data-backend", "dali", "--exclude-list", str(listing)]
        )
    )
    assert metrics["num_samples"] == 4
    assert f"excluding {len(listed)} undecodable images" in capsys.readouterr().out


def test_missing_dali_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "timm_cskd.data.dali")
    code = main(["--data-dir", str(tmp_path), "--data-backend", "dali"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs NVIDIA DALI" in err and "timm-cskd[dali]" in err


def test_resume_saved_at_the_last_batch_of_an_epoch_yields_nothing_then_continues(coded_folder):
    """A preemption in an epoch's last steps saves position == len: the resumed epoch is empty (as with
    the torch loader), and the next epoch reads whole."""
    index = build_index(coded_folder)
    train, _ = dali.create_dali_loaders(dali_args(), index, None, DATA_CONFIG, Context(CPU), seed=5)
    sampler = train.batch_sampler
    sampler.load_state_dict(sampler.state_dict(batches_consumed=len(sampler)) | {"epoch": 3})
    sampler.set_epoch(3)
    assert list(train) == []
    sampler.set_epoch(4)
    assert len(epoch_indices(train, index)) == len(sampler)


@pytest.mark.slow
def test_a_trainer_failing_with_live_readers_exits(coded_folder, tmp_path):
    """The readers ignore SIGTERM, which multiprocessing's exit sends before waiting for them: the
    trainer kills them itself at exit, so it does not hang."""
    import subprocess

    script = tmp_path / "reader.py"
    script.write_text(WORKER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(coded_folder), "raise"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0 and "the training step failed" in proc.stderr


def test_reads_a_ranks_tar_shards_by_offset_in_plan_order(coded_folder, tmp_path):
    from timm_cskd.data.shard_index import load_shard_index, rank_shards
    from timm_cskd.data.shards import main as shards_main

    args = [
        "--data-dir",
        str(coded_folder.parent),
        "--output",
        str(tmp_path),
        "--shard-samples",
        "5",
        "-j",
        "1",
    ]
    assert shards_main([*args, "--splits", "train"]) == 0
    source = build_index(coded_folder)
    shards = load_shard_index(tmp_path, "train", rank_shards(4, 1, 2))  # 20 images: 4 shards
    origin = []  # each shard sample's position in the folder scan, from the writer's per-shard record
    for s in sorted(set(shards.shard.tolist())):
        origin += json.loads((tmp_path / f"train-{s:06d}.json").read_text())["sources"]
    origin = np.asarray([source.paths.index(p) for p in origin])
    train, _ = dali.create_dali_loaders(
        dali_args("anchor", 3), shards, None, DATA_CONFIG, Context(CPU, 2, 1), seed=5
    )
    sampler = train.batch_sampler
    sampler.set_epoch_units(sampler.local_units)
    sampler.set_epoch(1)
    first, partner = sampler.rank_plan()
    got = epoch_indices(train, source)
    assert len(got) == len(sampler) == len(first) // 3
    for b, positions in enumerate(got):
        planned = np.concatenate((first[b * 3 : (b + 1) * 3], partner[b * 3 : (b + 1) * 3]))
        np.testing.assert_array_equal(positions, origin[planned])
