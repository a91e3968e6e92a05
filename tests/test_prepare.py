"""prepare: synthetic MNIST-format and CIFAR files in, ImageFolder PNGs out, checked pixel for pixel."""

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timm_cskd.data import build_index
from timm_cskd.data.prepare import PrepareError, class_folder_names, main, prepare_dataset

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx(path, array, gz=False, magic_type=0x08):
    """The idx layout written from its definition: 00 00 type ndim, big-endian uint32 sizes, data."""
    payload = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def balanced_labels(rng, num_classes, per_class):
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def make_mnist(folder, gz, train_per_class=8, test_per_class=3, size=(6, 5)):
    """Random pixels (distinct images) of a non-square size, so a transposed write would show."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = balanced_labels(rng, 10, per_class)
        images = rng.integers(0, 256, (len(labels), *size), dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
        arrays[split] = (images, labels)
    return arrays["train"], arrays["t10k"]


def cifar_rows(images):
    """(N, 32, 32, 3) -> CIFAR's rows: the red, green and blue planes, each row-major."""
    return np.stack([images[..., ch].reshape(len(images), -1) for ch in range(3)], axis=1).reshape(
        len(images), -1
    )


def make_cifar(root, num_classes, train_per_class, test_per_class):
    rng = np.random.default_rng(num_classes)
    train_labels = balanced_labels(rng, num_classes, train_per_class)
    test_labels = balanced_labels(rng, num_classes, test_per_class)
    train = rng.integers(0, 256, (len(train_labels), 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (len(test_labels), 32, 32, 3), dtype=np.uint8)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        dump = lambda obj, name: (folder / name).write_bytes(pickle.dumps(obj, protocol=2))  # noqa: E731
        dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": 10000}, "batches.meta")
        for i, part in enumerate(np.array_split(np.arange(len(train)), 5), 1):
            dump({"data": cifar_rows(train[part]), "labels": train_labels[part].tolist()}, f"data_batch_{i}")
        dump({"data": cifar_rows(test), "labels": test_labels.tolist()}, "test_batch")
        names = CIFAR10_NAMES
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump = lambda obj, name: (folder / name).write_bytes(pickle.dumps(obj))  # noqa: E731
        # Names in reverse alphabetical order: folder order must follow the labels, not the names.
        names = [f"c{num_classes - 1 - i:03d}" for i in range(num_classes)]
        dump({"fine_label_names": names, "coarse_label_names": ["all"]}, "meta")
        for split, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
            dump({"data": cifar_rows(images), "fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels)}, split)  # fmt: skip
    return (train, train_labels), (test, test_labels), names


def read_split(folder: Path, source_images, source_labels, classes):
    """Decode every PNG of a split and find it among ALL source images by its pixels; returns the
    matched source indices per class after checking pixels, label and file name agree."""
    lookup = {img.tobytes(): i for i, img in enumerate(source_images)}
    assert len(lookup) == len(source_images), "synthetic images must be distinct"
    found = {}
    for label, name in enumerate(classes):
        found[label] = []
        for png in sorted((folder / name).iterdir()):
            with Image.open(png) as img:
                assert img.format == "PNG"
                pixels = np.asarray(img)
            i = lookup[pixels.tobytes()]
            np.testing.assert_array_equal(pixels, source_images[i])
            assert source_labels[i] == label, png
            assert int(png.stem) == i, png
            found[label].append(i)
    assert sorted(p.name for p in folder.iterdir()) == classes
    return found


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    (train_x, train_y), (test_x, test_y) = make_mnist(tmp_path / "src", gz)
    out = tmp_path / "out"
    record = prepare_dataset(tmp_path / "src", out, fmt="mnist", calib_per_class=2, progress=None)
    classes = class_folder_names(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    assert classes[0] == "00_zero" and record["classes"] == classes
    train = read_split(out / "train", train_x, train_y, classes)
    calib = read_split(out / "calib", train_x, train_y, classes)
    val = read_split(out / "val", test_x, test_y, classes)
    for c in range(10):
        assert len(calib[c]) == 2 and len(train[c]) == 6 and len(val[c]) == 3
        assert not set(calib[c]) & set(train[c])
    # No --train-per-class: train and calib together are the whole training set, val the whole test set.
    assert sorted(sum(train.values(), []) + sum(calib.values(), [])) == list(range(len(train_y)))
    assert sorted(sum(val.values(), [])) == list(range(len(test_y)))
    saved = json.loads((out / "prepare.json").read_text())
    assert saved == record
    assert saved["format"] == "mnist" and saved["seed"] == 0
    assert saved["num_images"] == {"train": 60, "calib": 20, "val": 30}
    assert saved["counts"]["calib"] == dict.fromkeys(classes, 2)
    index = build_index(out / "train")
    assert index.classes == classes
    for path, label in zip(index.paths, index.labels):
        assert train_y[int(Path(path).stem)] == label


@pytest.mark.parametrize(("num_classes", "source_below"), [(10, False), (100, True)])
def test_cifar_round_trip_with_subsampling(tmp_path, num_classes, source_below):
    (train_x, train_y), (test_x, test_y), names = make_cifar(tmp_path / "src", num_classes, 7, 3)
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    source = tmp_path / "src" / (folder if source_below else "")
    out = tmp_path / "out"
    record = prepare_dataset(
        source, out, train_per_class=3, calib_per_class=2, val_per_class=2, seed=5, progress=None
    )
    assert record["format"] == f"cifar{num_classes}", "detected from the files"
    classes = record["classes"]
    assert [c.split("_", 1)[1] for c in classes] == names
    assert classes == sorted(classes)
    train = read_split(out / "train", train_x, train_y, classes)
    calib = read_split(out / "calib", train_x, train_y, classes)
    val = read_split(out / "val", test_x, test_y, classes)
    for c in range(num_classes):
        assert (len(train[c]), len(calib[c]), len(val[c])) == (3, 2, 2)
        assert not set(train[c]) & set(calib[c])
    assert record["counts"]["train"] == dict.fromkeys(classes, 3)
    index = build_index(out / "val")
    assert index.classes == classes
    np.testing.assert_array_equal(index.labels, np.repeat(np.arange(num_classes), 2))


def test_subsets_are_seeded_and_nested(tmp_path):
    make_mnist(tmp_path / "src", gz=False, train_per_class=10)

    def files(name, **kwargs):
        prepare_dataset(tmp_path / "src", tmp_path / name, fmt="fashion-mnist", progress=None, **kwargs)
        return {
            split: sorted(
                str(p.relative_to(tmp_path / name)) for p in (tmp_path / name / split).rglob("*.png")
            )
            for split in ("train", "calib", "val")
            if (tmp_path / name / split).is_dir()
        }

    a = files("a", train_per_class=3, calib_per_class=2, val_per_class=1, seed=7)
    assert a == files("b", train_per_class=3, calib_per_class=2, val_per_class=1, seed=7)
    other_seed = files("c", train_per_class=3, calib_per_class=2, val_per_class=1, seed=8)
    assert other_seed["train"] != a["train"] and other_seed["calib"] != a["calib"]
    larger = files("d", train_per_class=5, calib_per_class=2, val_per_class=1, seed=7)
    assert larger["calib"] == a["calib"], "the calibration split does not depend on --train-per-class"
    assert set(a["train"]) < set(larger["train"])
    assert a["train"][0].startswith("train/00_t-shirt_top/")


def test_bad_idx_files_name_the_file(tmp_path):
    make_mnist(tmp_path / "src", gz=True)
    images = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    pixels = np.zeros((80, 6, 5), dtype=np.uint8)
    write_idx(images, pixels, gz=True, magic_type=0x07)
    with pytest.raises(
        PrepareError, match=r"train-images-idx3-ubyte.gz: not an idx file \(magic number 00000703"
    ):
        prepare_dataset(tmp_path / "src", tmp_path / "out", fmt="mnist", progress=None)
    write_idx(images, pixels, gz=True)
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-7]))
    with pytest.raises(
        PrepareError, match=r"idx3-ubyte.gz: header says 80x6x5 uint8 \(2400 bytes\) but 2393"
    ):
        prepare_dataset(tmp_path / "src", tmp_path / "out", fmt="mnist", progress=None)
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(images, pixels, gz=True)
    with pytest.raises(PrepareError, match="no t10k-labels-idx1-ubyte"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", fmt="mnist", progress=None)
    assert not (tmp_path / "out").exists()


def test_idx_folder_without_a_name_hint_needs_format(tmp_path):
    make_mnist(tmp_path / "digits", gz=False)
    with pytest.raises(PrepareError, match="pass --format mnist or --format fashion-mnist"):
        prepare_dataset(tmp_path / "digits", tmp_path / "out", progress=None)
    (tmp_path / "digits").rename(tmp_path / "fashion")
    assert prepare_dataset(tmp_path / "fashion", tmp_path / "out", progress=None)["format"] == "fashion-mnist"


def test_output_rules_and_cli(tmp_path, capsys):
    make_mnist(tmp_path / "src", gz=False)
    source = ["--source", str(tmp_path / "src"), "--format", "mnist"]
    args = [*source, "--output", str(tmp_path / "out")]
    assert main([*args, "--val-per-class", "2"]) == 0
    assert "mnist: 80 train, 20 val images in 10 classes" in capsys.readouterr().out
    assert main(args) == 2
    assert "out is not empty: pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["num_images"]["val"] == 30
    assert not list(tmp_path.glob(".out.partial")), "the staging folder is renamed into place"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*source, "--output", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "holds no prepare.json: refusing" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (
        main([*source, "--output", str(tmp_path / "o2"), "--train-per-class", "8", "--calib-per-class", "1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "class 0 (zero) has 8 images, too few for --calib-per-class 1 plus --train-per-class 8" in err


def test_cifar_pickle_with_code_is_refused(tmp_path):
    make_cifar(tmp_path, 10, 1, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(
        PrepareError, match=r"test_batch: not a CIFAR python pickle .*refusing to load builtins.print"
    ):
        prepare_dataset(tmp_path, tmp_path / "out", progress=None)
