"""Tar shards: the writer's tars read back by tarfile, DALI's and timm's webdataset readers; rank-local
class-pair plans; training from shards, a corrupt member substituted, kill -9 and exact resume."""

import collections
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, make_tiny_dataset
from PIL import Image

from timm_cskd.data import build_index
from timm_cskd.data.shard_index import is_shard_folder, load_shard_index, rank_shards, read_manifest
from timm_cskd.data.shards import main as shards_main
from timm_cskd.data.shards import parse_size
from timm_cskd.sampler import ClassPairSampler
from timm_cskd.shard_sampler import RankClassPairSampler, RankShuffledBatchSampler


def write(data, out, size="6KB", *extra):
    assert (
        shards_main(["--data-dir", str(data), "--output", str(out), "--shard-size", size, "-j", "1", *extra])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    data = tmp_path_factory.mktemp("folder")
    make_image_folder(data / "train", [6, 4, 5], size=(20, 20), noise=40)
    make_image_folder(data / "val", [2, 2, 1], size=(20, 20), noise=40)
    (data / "train" / "class_001" / "img_0003.jpg").write_bytes(b"not a jpeg")
    return data


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return write(folder, tmp_path_factory.mktemp("shards") / "out")


def tar_samples(tar_path):
    """{key: {ext: bytes}} of a tar, read by Python's tarfile."""
    samples = collections.defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples[key][ext] = tar.extractfile(member).read()
    return samples


def test_parse_size():
    assert parse_size("512MB") == 512 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("100000") == 100000
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size("big")


def test_shards_hold_every_decodable_image_once_with_its_label(folder, shards):
    manifest = read_manifest(shards)
    assert manifest["classes"] == ["class_000", "class_001", "class_002"]
    assert [p for p, _ in manifest["excluded"]["train"]] == ["class_001/img_0003.jpg"]
    for split in ("train", "val"):
        expected = collections.Counter()
        source = build_index(folder / split)
        for i in range(len(source)):
            if source.paths[i] != "class_001/img_0003.jpg":
                expected[(Path(source.full_path(i)).read_bytes(), int(source.labels[i]))] += 1
        found = collections.Counter()
        listed = manifest["splits"][split]["shards"]
        assert len(listed) > 1, "the test needs several shards"
        for shard in listed:
            tar = shards / shard["tar"]
            assert shard["bytes"] == tar.stat().st_size
            samples = tar_samples(tar)
            assert len(samples) == shard["samples"]
            for parts in samples.values():
                assert sorted(parts) == ["cls", "jpg"]
                found[(parts["jpg"], int(parts["cls"]))] += 1
            # The index's offsets point at the member data tarfile reads.
            entries = json.loads((shards / shard["index"]).read_text())
            raw = tar.read_bytes()
            for key, offset, size in zip(entries["keys"], entries["offsets"], entries["sizes"], strict=True):
                assert raw[offset : offset + size] == samples[key]["jpg"]
        assert found == expected
        assert manifest["splits"][split]["samples"] == sum(expected.values())
    # Training samples are shuffled over the shards, validation keeps the folder order.
    val = load_shard_index(shards, "val")
    assert list(val.labels) == sorted(val.labels)
    train = load_shard_index(shards, "train")
    assert list(train.labels) != sorted(train.labels)


def test_dali_webdataset_reader_reads_the_shards_with_their_index(shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    listed = read_manifest(shards)["splits"]["train"]["shards"]
    tars = [str(shards / s["tar"]) for s in listed]
    expected = []
    for tar in tars:  # tarfile's view, in member order: DALI reads unshuffled shards in order
        samples = tar_samples(tar)
        expected += [(samples[k]["jpg"], int(samples[k]["cls"])) for k in sorted(samples)]

    @pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=tars, index_paths=[str(shards / s["dali_index"]) for s in listed], ext=["jpg", "cls"],
            missing_component_behavior="error",
        ))  # fmt: skip

    p = pipe()
    p.build()
    images, labels = p.run()
    got = [
        (bytes(np.asarray(images.at(i))), int(bytes(np.asarray(labels.at(i))))) for i in range(len(expected))
    ]
    assert got == expected


def test_timm_webdataset_reader_reads_the_shards(shards):
    pytest.importorskip("webdataset", reason="timm's wds/ reader needs the 'webdataset' package")
    from timm.data import create_dataset

    dataset = create_dataset("wds/tiny", root=str(shards), split="train", is_training=False)
    labels = sorted(int(target) for _, target in dataset)
    assert labels == sorted(load_shard_index(shards, "train").labels.tolist())


def test_timm_finds_each_split_shards_and_count_in_its_info_file(shards):
    # timm's parsing of the info file, importable without webdataset (its _load_info is not: wds.gopen).
    from timm.data.readers.reader_wds import _parse_split_info

    manifest = read_manifest(shards)
    for split, entry in manifest["splits"].items():
        info = _parse_split_info(split, json.loads((shards / "_info.json").read_text()))
        assert info.filenames == tuple(s["tar"] for s in entry["shards"])
        assert info.num_samples == sum(len(tar_samples(shards / f)) for f in info.filenames)


def test_each_rank_reads_only_its_shards(shards):
    num = len(read_manifest(shards)["splits"]["train"]["shards"])
    shares = [rank_shards(num, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(num)) and not set(shares[0]) & set(shares[1])
    with pytest.raises(ValueError, match="cannot give each of"):
        rank_shards(num, 0, num + 1)
    index = load_shard_index(shards, "train", shares[1])
    assert set(index.shard.tolist()) == set(shares[1])
    # A sample reads back as the bytes tarfile finds under its name.
    for i in range(len(index)):
        tar, name = index.paths[i].split("/")
        key, ext = name.split(".")
        assert index.read_bytes(i) == tar_samples(shards / tar)[key][ext]
        assert Image.open(index.image_source(i)).size == (20, 20)


def test_a_missing_shard_names_the_file(shards, tmp_path):
    for f in shards.iterdir():
        if not f.name.startswith("train-000001."):
            (tmp_path / f.name).symlink_to(f)
    assert is_shard_folder(tmp_path)
    with pytest.raises(ValueError, match="train-000001.tar is missing on this node"):
        load_shard_index(tmp_path, "train", [1])


def rank_plans(labels_per_rank, batch_size, mode="anchor", epoch=0, **kwargs):
    samplers = [
        RankClassPairSampler(labels, batch_size, mode=mode, rank=r, world_size=len(labels_per_rank), **kwargs)
        for r, labels in enumerate(labels_per_rank)
    ]
    units = [s.local_units for s in samplers]
    for s in samplers:
        s.set_rank_units(units)
        s.set_epoch(epoch)
    return samplers


@pytest.mark.parametrize("mode", ["anchor", "paired"])
def test_rank_local_plan_covers_each_share_once_with_same_class_partners(mode):
    rng = np.random.default_rng(3)
    shares = [rng.integers(0, 5, 24), rng.integers(0, 5, 24)]
    samplers = rank_plans(shares, 4, mode)
    assert len(samplers[0]) == len(samplers[1])
    for labels, sampler in zip(shares, samplers, strict=True):
        k = sampler.units_per_batch
        batches = list(sampler)
        firsts = [i for b in batches for i in b[:k]]
        partners = [j for b in batches for j in b[k:]]
        assert all(labels[i] == labels[j] for i, j in zip(firsts, partners, strict=True))
        covered = collections.Counter(firsts + (partners if mode == "paired" else []))
        if mode == "anchor":
            assert sorted(firsts) == list(range(len(labels)))
        else:
            assert set(covered) == set(range(len(labels)))


def test_unequal_shares_take_equal_steps_and_the_smaller_wraps():
    samplers = rank_plans([np.arange(20) % 4, np.arange(13) % 4], 4)
    assert len(samplers[0]) == len(samplers[1]) == 5
    small = [i for b in samplers[1] for i in b[:4]]
    assert set(small) == set(range(13)) and len(small) == 20
    assert sorted(small[:13]) == list(range(13)), "the first pass of the share is complete"


def test_rank_plan_resumes_exactly_and_refuses_another_rank_count():
    (full,) = rank_plans([np.arange(30) % 3], 4, epoch=2)
    batches = list(full)
    (first,) = rank_plans([np.arange(30) % 3], 4, epoch=2)
    it = iter(first)
    done = [next(it) for _ in range(3)]
    state = first.state_dict()
    (resumed,) = rank_plans([np.arange(30) % 3], 4)
    resumed.load_state_dict(state)
    assert done + list(resumed) == batches
    other = RankClassPairSampler(np.arange(30) % 3, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="shards are pinned to ranks"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "units_consumed": 0})  # an epoch boundary is fine
    with pytest.raises(ValueError, match="aug-repeats"):
        RankShuffledBatchSampler(10, 2, rank=0, world_size=1, repeats=3)


def test_a_share_below_one_batch_waits_for_the_agreed_epoch_length():
    small = RankShuffledBatchSampler(100, 256, rank=1, world_size=2)  # the other rank's share is larger
    small.set_epoch_units(300)
    (batch,) = list(small)
    assert len(batch) == 256 and set(batch) == set(range(100)), "the small share wraps to fill its batch"
    pairs = RankClassPairSampler(np.arange(4) % 2, 8, mode="paired", rank=0, world_size=2)  # 2 pairs < 4
    with pytest.raises(ValueError, match="largest rank's shards hold 2 pairs, too few for one batch of 4"):
        pairs.set_epoch_units(2)
    with pytest.raises(ValueError, match="100 samples, too few for one batch of 256 on each of 1 rank"):
        RankShuffledBatchSampler(100, 256, rank=0, world_size=1)  # one rank's share is the world's


def test_a_world_below_one_batch_or_aug_repeats_on_shards_is_one_clear_error(tmp_path, capsys):
    from timm_cskd.train import main

    shards = write(make_tiny_dataset(tmp_path / "data"), tmp_path / "shards", "8KB")
    common = [
        "--data-dir",
        str(shards),
        "--model",
        "test_resnet",
        "--img-size",
        "32",
        "--epochs",
        "1",
        "-j",
        "0",
    ]
    for extra, message in (
        (["-b", "512"], "too few for one batch of 512"),
        (["-b", "4", "--aug-repeats", "3"], "--aug-repeats 3 spreads a sample's copies over ranks"),
    ):
        assert main([*common, *extra, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err and "Traceback" not in err, err


def test_aug_repeats_1_is_a_no_op_on_shards():
    plain = RankShuffledBatchSampler(10, 2, rank=0, world_size=1)
    once = RankShuffledBatchSampler(10, 2, rank=0, world_size=1, repeats=1)
    assert list(once) == list(plain)


def test_the_folder_plan_refuses_a_mid_epoch_shard_state_and_takes_its_end():
    (shard,) = rank_plans([np.arange(30) % 3], 4, epoch=1)
    folder = ClassPairSampler(np.arange(30) % 3, 4, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="saved mid-epoch from rank-pinned shards; resume on the shards"):
        folder.load_state_dict(shard.state_dict(2))
    folder.load_state_dict(shard.state_dict(len(shard)))
    assert folder.position == len(folder) and list(folder) == [], "nothing of the epoch is left"


def test_a_stop_on_the_epochs_last_batch_resumes_on_another_rank_count():
    (one,) = rank_plans([np.arange(30) % 3], 4, epoch=2)  # 7 batches; drop_last leaves 2 samples over
    end = one.state_dict(len(one))
    two = rank_plans([np.arange(15) % 3, np.arange(15) % 3], 4, epoch=0)
    for sampler in two:
        sampler.load_state_dict(end)
        assert sampler.epoch == 2 and sampler.position == len(sampler) and list(sampler) == []
    with pytest.raises(ValueError, match="resume on 1 ranks, or from an epoch checkpoint"):
        two[0].load_state_dict(one.state_dict(3))


def test_a_same_rank_count_resume_refuses_another_plan_and_accepts_an_older_state():
    saved = rank_plans([np.arange(30) % 3, np.arange(28) % 3], 4)[0].state_dict(
        2
    )  # every rank loads rank 0's
    for sampler in rank_plans([np.arange(30) % 3, np.arange(28) % 3], 4):
        sampler.load_state_dict(saved)
        assert sampler.position == 2
    restaged = rank_plans([np.arange(30) % 3, np.arange(29) % 3], 4)
    for sampler in restaged:
        with pytest.raises(ValueError, match=r"shares 30, 28\); these shards give .*shares 30, 29\)"):
            sampler.load_state_dict(saved)
    (fewer,) = rank_plans([np.arange(29) % 3], 4)
    with pytest.raises(ValueError, match="epoch of 30 samples .* these shards give an epoch of 29"):
        fewer.load_state_dict(rank_plans([np.arange(30) % 3], 4)[0].state_dict(2))
    older = {k: v for k, v in saved.items() if k not in ("epoch_units", "rank_units")}
    restaged[1].load_state_dict(older)
    assert restaged[1].position == 2


def test_benchmark_reads_a_shard_folder(shards, capsys):
    from timm_cskd.benchmark import main

    argv = ["--data-dir", str(shards), "--model", "test_resnet", "--img-size", "32", "--device", "cpu",
            "-b", "4", "-j", "0", "--rounds", "1", "--steps", "1", "--warmup", "0", "--loader-batches", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "loader rate:" in capsys.readouterr().out


def test_trains_from_shards_and_substitutes_a_corrupt_member(tmp_path):
    from timm_cskd.train import main

    data = make_tiny_dataset(tmp_path / "data")
    shards = write(data, tmp_path / "shards", "8KB")
    index = load_shard_index(shards, "train", [0])
    with open(shards / index.tars[0], "r+b") as f:  # a member garbled after the writer verified it
        f.seek(int(index.offsets[0]))
        f.write(b"\0" * int(index.sizes[0]))
    args = [
        "--data-dir", str(shards), "--dataset", "wds/tiny", "--model", "test_resnet", "--img-size", "32",
        "--epochs", "1", "-b", "8", "-j", "0", "--output", str(tmp_path / "out"), "--experiment", "run",
    ]  # fmt: skip
    assert main(args) == 0
    log = (tmp_path / "out" / "run" / "log.txt").read_text()
    assert f"skipping undecodable image {shards / index.paths[0]}" in log
    assert "(20 images)" in log, "validation reads every image of the val shards"


def stage_per_node(shards, nodes, world_size):
    """Each node folder gets the manifest, every validation shard and its ranks' training shards only."""
    manifest = read_manifest(shards)
    train = manifest["splits"]["train"]["shards"]
    for rank in range(world_size):
        node = nodes / f"node{rank}"
        node.mkdir(parents=True)
        files = [shards / "manifest.json"]
        for split, entry in manifest["splits"].items():
            listed = entry["shards"]
            owned = rank_shards(len(train), rank, world_size) if split == "train" else range(len(listed))
            files += [shards / listed[s][k] for s in owned for k in ("tar", "index", "dali_index")]
        for f in files:
            shutil.copy(f, node / f.name)


@pytest.mark.slow
def test_two_ranks_each_reading_only_its_shards_cover_the_epoch_once_with_own_classmates(tmp_path):
    from test_ddp import HERE, free_port

    data = tmp_path / "data"
    make_image_folder(data / "train", [10, 8, 8, 6], size=(20, 20), noise=40)
    make_image_folder(data / "val", [3, 2, 1, 1], size=(20, 20), noise=40)
    shards = write(data, tmp_path / "shards", "1MB", "--shard-samples", "8")  # 4 shards: 16 images a rank
    stage_per_node(shards, tmp_path / "nodes", 2)
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(HERE / "ddp_worker.py"), "--data-dir", str(tmp_path / "nodes"),
        "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0", "--epochs", "2", "-b", "4",
        "--lr", "0.05", "--warmup-epochs", "0", "-j", "1", "--output", str(out), "--experiment", "ddp",
    ]  # fmt: skip
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(HERE.parent),
        PER_RANK_DATA="1",
        RECORD_DIR=str(record),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    every_key = set()
    for rank in range(2):
        node = tmp_path / "nodes" / f"node{rank}"
        # The rank's samples as tarfile lists its own shards, in the order its index numbers them.
        own = []
        for tar in sorted(node.glob("train-*.tar")):
            samples = tar_samples(tar)
            own += [(f"{tar.name}/{k}", int(samples[k]["cls"])) for k in sorted(samples)]
        every_key |= {key for key, _ in own}
        epochs = collections.defaultdict(list)
        for line in (record / f"rank{rank}.jsonl").read_text().splitlines():
            epoch, batch = json.loads(line)
            epochs[epoch].append(batch)
        assert sorted(epochs) == [0, 1]
        for batches in epochs.values():
            anchors = [i for b in batches for i in b[:4]]
            assert sorted(anchors) == list(range(len(own))), f"rank {rank}: each own sample an anchor once"
            for b in batches:
                assert [own[i][1] for i in b[:4]] == [own[j][1] for j in b[4:]], "partners are classmates"
    assert len(every_key) == 32, "the two shares together are the whole training split"
    m0, m1 = (json.loads((out / "ddp" / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and m0["num_samples"] == 7, "every validation image counted once over the ranks"


@pytest.mark.slow
def test_a_rank_whose_shards_hold_less_than_a_batch_trains_with_the_others(tmp_path):
    from test_ddp import HERE, free_port

    data = tmp_path / "data"
    make_image_folder(data / "train", [4, 4, 4], size=(20, 20), noise=40)
    make_image_folder(data / "val", [1, 1, 1], size=(20, 20), noise=40)
    shards = write(data, tmp_path / "shards", "1MB", "--shard-samples", "8")  # rank 0: 8 images, rank 1: 4
    stage_per_node(shards, tmp_path / "nodes", 2)
    record = tmp_path / "record"
    record.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(HERE / "ddp_worker.py"), "--data-dir", str(tmp_path / "nodes"),
        "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b", "6", "-j", "0",
        "--output", str(tmp_path / "out"), "--experiment", "ddp",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), PER_RANK_DATA="1")
    proc = subprocess.run(
        cmd, env={**env, "RECORD_DIR": str(record)}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank, share in ((0, 8), (1, 4)):
        (line,) = (record / f"rank{rank}.jsonl").read_text().splitlines()
        anchors = json.loads(line)[1][:6]
        # Rank 1 wraps around its 4 samples to fill its batch of 6.
        assert set(anchors) <= set(range(share)) and len(set(anchors)) == min(share, 6), rank


@pytest.mark.slow
def test_killed_mid_epoch_on_shards_then_resumed_is_bit_identical(tmp_path):
    from test_train import EXACT, _assert_identical, killed_and_resumed_run, uninterrupted_run

    shards = write(make_tiny_dataset(tmp_path / "data"), tmp_path / "shards", "8KB")
    whole = uninterrupted_run(shards, tmp_path / "whole", EXACT)["state_dict"]
    _assert_identical(killed_and_resumed_run(shards, tmp_path / "killed", EXACT)["state_dict"], whole)


def test_wds_dataset_without_a_manifest_and_a_single_image_class_on_a_rank(tmp_path, capsys):
    from timm_cskd.train import main

    data = make_tiny_dataset(tmp_path / "data")
    common = ["--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b", "4", "-j", "0"]
    args = ["--data-dir", str(data), "--dataset", "wds/tiny", *common, "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    make_image_folder(tmp_path / "one" / "train", [9, 1], size=(20, 20), noise=40)
    shards = write(tmp_path / "one", tmp_path / "shards", "1MB")
    out = ["--output", str(tmp_path / "p"), "--experiment", "run", "--val-split", ""]
    assert main(["--data-dir", str(shards), *common, *out]) == 0
    log = (tmp_path / "p" / "run" / "log.txt").read_text()
    assert "rank 0: 1 class(es) have a single image on its shards (class_001)" in log
