"""A broken file's stand-in is the next member of its class, wrapping round, in both backends."""

from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from timm_cskd.data import build_index
from timm_cskd.data.classmates import Classmates
from timm_cskd.data.loader import ImageIndexDataset
from timm_cskd.data.mapped_index import MappedIndex


def test_each_class_in_index_order_and_round_from_a_member_wraps():
    labels = np.random.default_rng(3).integers(0, 7, 200)
    labels[labels == 4] = 5  # a class with no images
    grouped = Classmates.group(labels)
    for c in range(7):
        members = [i for i, y in enumerate(labels) if y == c]
        assert grouped.of(c).tolist() == members
        for k, i in enumerate(members):
            assert list(grouped.round_from(i, c)) == members[k:] + members[:k]


@pytest.fixture
def broken_folder(tmp_path):
    """Classes of 4 and 3 images; in the first the second and third are truncated, in the second its last."""
    train = make_image_folder(tmp_path / "train", [4, 3], size=(20, 20), noise=30)
    for name in ("class_000/img_0001.jpg", "class_000/img_0002.jpg", "class_001/img_0002.jpg"):
        whole = (train / name).read_bytes()
        (train / name).write_bytes(whole[: len(whole) // 2])
    return build_index(train)


# Dataset index -> its stand-in: the next whole classmate, from the first of its class after the last.
STAND_INS = {0: 0, 1: 3, 2: 3, 3: 3, 4: 4, 5: 5, 6: 4}


def test_the_torch_dataset_substitutes_the_next_whole_classmate(broken_folder):
    dataset = ImageIndexDataset(broken_folder)
    for i, expected in STAND_INS.items():
        image, label = dataset[i]
        with Image.open(broken_folder.full_path(expected)) as stand_in:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(stand_in.convert("RGB")))
        assert label == broken_folder.labels[i]
    assert len(dataset.failures) == 3


def test_the_dali_reader_substitutes_the_same_classmate(broken_folder, tmp_path):
    files = pytest.importorskip("timm_cskd.data.dali.files")
    (tmp_path / "mapped").mkdir()
    (tmp_path / "reports").mkdir()
    mapped = MappedIndex.write(broken_folder, str(tmp_path / "mapped"))
    good = files.GoodFiles(mapped, frozenset(), str(tmp_path / "reports"))
    for i, expected in STAND_INS.items():
        data, used = good.get(i)
        assert used == expected
        assert data.tobytes() == Path(broken_folder.full_path(expected)).read_bytes()
    assert len(list((tmp_path / "reports").iterdir())) == 3, "each broken file reported once"
