"""Label index from ImageFolder trees and list files, its cache, and every bad input."""

import os
import time

import numpy as np
import pytest
from conftest import make_image_folder

from timm_cskd.data import DataIndexError, build_index, read_list_file, scan_image_folder


def test_folder_scan_matches_torchvision_order(image_folder):
    from torchvision.datasets import ImageFolder

    (image_folder / "class_000" / "notes.txt").write_text("not an image")
    index, _ = scan_image_folder(image_folder)
    reference = ImageFolder(str(image_folder))
    assert index.classes == reference.classes
    assert [index.full_path(i) for i in range(len(index))] == [p for p, _ in reference.samples]
    assert index.labels.tolist() == [y for _, y in reference.samples]
    assert index.num_classes == 3


def test_cache_is_reused_then_invalidated_when_tree_changes(tmp_path, image_folder, monkeypatch):
    cache = tmp_path / "out"
    first = build_index(image_folder, cache_dir=cache)
    assert len(list(cache.glob("index-*.json"))) == 1

    import timm_cskd.data.index as index_module

    calls = []
    real_scan = index_module.scan_image_folder
    monkeypatch.setattr(index_module, "scan_image_folder", lambda root: calls.append(root) or real_scan(root))
    again = build_index(image_folder, cache_dir=cache)
    assert calls == [] and again.paths == first.paths

    time.sleep(0.01)
    (image_folder / "class_001" / "img_0000.jpg").rename(image_folder / "class_001" / "img_0009.jpg")
    os.utime(image_folder / "class_001", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build_index(image_folder, cache_dir=cache)
    assert len(calls) == 1
    assert "class_001/img_0009.jpg" in changed.paths


def test_list_file(tmp_path, image_folder):
    lst = image_folder / "train.txt"
    lst.write_text("# comment\nclass_000/img_0000.jpg 0\n\nclass_002/img_0001.jpg 2\n")
    index = build_index(lst)
    assert index.paths == ["class_000/img_0000.jpg", "class_002/img_0001.jpg"]
    assert index.labels.tolist() == [0, 2]
    assert index.num_classes == 3
    assert os.path.isfile(index.full_path(1))
    named = read_list_file(lst, classes=["a", "b", "c", "d"])
    assert named.classes == ["a", "b", "c", "d"]


def test_list_file_with_spaces_in_path(tmp_path):
    lst = tmp_path / "l.txt"
    (tmp_path / "dir with space").mkdir()
    (tmp_path / "dir with space" / "a b.jpg").write_bytes(b"")
    lst.write_text("dir with space/a b.jpg 1\n")
    assert read_list_file(lst).paths == ["dir with space/a b.jpg"]


def test_without_excludes_listed_files(image_folder):
    index, _ = scan_image_folder(image_folder)
    smaller = index.without({"class_002/img_0000.jpg"})
    assert len(smaller) == len(index) - 1
    assert "class_002/img_0000.jpg" not in smaller.paths
    assert smaller.excluded == ["class_002/img_0000.jpg"]
    np.testing.assert_array_equal(
        smaller.labels, np.delete(index.labels, index.paths.index("class_002/img_0000.jpg"))
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: root / "missing", "not found"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no class sub-folders"),
        (lambda root: make_image_folder(root / "d", [2, 0]), "class_001 holds no images"),
    ],
)
def test_bad_folders_name_the_culprit(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataIndexError, match=message):
        build_index(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a.jpg 0\nb.jpg\n", r":2: expected 'relative/path label'"),
        ("a.jpg zero\n", r":1: expected"),
        ("a.jpg 0\nb.jpg 7\n", r":2: label 7 outside \[0, 5\)"),
        ("a.jpg -1\n", r":1: label -1 outside"),
        ("# only a comment\n", "no entries"),
    ],
)
def test_bad_list_files_name_the_line(tmp_path, content, message):
    lst = tmp_path / "list.txt"
    lst.write_text(content)
    with pytest.raises(DataIndexError, match=message):
        build_index(lst, num_classes=5)


def test_num_classes_mismatch(image_folder):
    with pytest.raises(DataIndexError, match="--num-classes is 10 but .* has 3 class folders"):
        build_index(image_folder, num_classes=10)
