"""Write an ImageFolder (or list-file) dataset as webdataset tar shards with a per-shard index.

    python -m timm_cskd.data.shards --data-dir /imagenet --output /shards --shard-size 512MB -j 16

Each split becomes ``SPLIT-000000.tar``, ``SPLIT-000001.tar``, ... in the webdataset layout
(https://github.com/webdataset/webdataset): a sample is ``KEY.jpg`` (the source image's own extension,
``.jpeg`` written as ``.jpg``) followed by ``KEY.cls`` (its label as decimal text), so timm's
``--dataset wds/`` reader and DALI's ``fn.readers.webdataset`` read the shards as they are. Beside each
tar lie ``SPLIT-000000.json`` (every member's data offset, size and label: the trainer reads images by
offset through it) and ``SPLIT-000000.idx`` (the same offsets in DALI's ``wds2idx`` v1.2 format).
``manifest.json``, written last, names the classes and every shard with its sample count; a folder
without it is an unfinished write. ``_info.json`` says the same in timm's ``ReaderWds`` format, so
timm's own ``--dataset wds/NAME --train-split train`` finds the shards too.

Training samples are shuffled (``--seed``) before they are cut into shards, so that every shard, and
so every rank's share of shards, holds images of all classes. Validation keeps its order. Every image
is decoded before it is written; one that cannot be is reported and left out, as ``verify`` does.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from timm_cskd.data.index import DataIndexError, build_index, find_split
from timm_cskd.data.verify import check_image
from timm_cskd.invocation import program_name

__all__ = ["MANIFEST", "FORMAT", "parse_size", "write_split", "write_shards", "main"]

MANIFEST = "manifest.json"
FORMAT = "timm-cskd-shards"
VERSION = 1
_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_size(text: str) -> int:
    """``512MB``, ``1.5GB`` or a byte count (binary units: 1MB = 2**20 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise DataIndexError(f"--shard-size {text!r}: expected a size such as 512MB, 2GB or 100000")
    unit = match.group(2) if match.group(2).endswith("B") or not match.group(2) else match.group(2) + "B"
    return int(float(match.group(1)) * _UNITS[unit])


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # reproducible bytes: no owner, no time
    return info


class _ShardWriter:
    """One tar being written, with the offsets of its image members."""

    def __init__(self, folder: Path, split: str, number: int):
        self.name = f"{split}-{number:06d}"
        self.tar_path = folder / f"{self.name}.tar"
        self.tar = tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in close()
        self.entries: dict[str, list] = {
            k: [] for k in ("keys", "ext", "offsets", "sizes", "labels", "sources")
        }
        self.dali_lines: list[str] = []

    def _add(self, name: str, data: bytes) -> int:
        info = _member(name, len(data))
        offset = self.tar.offset + len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
        self.tar.addfile(info, io.BytesIO(data))
        return offset

    def add(self, key: str, ext: str, data: bytes, label: int, source: str) -> None:
        image_offset = self._add(f"{key}.{ext}", data)
        cls = str(label).encode()
        cls_offset = self._add(f"{key}.cls", cls)
        for field, value in zip(
            self.entries, (key, ext, image_offset, len(data), label, source), strict=True
        ):
            self.entries[field].append(value)
        self.dali_lines.append(
            f"{ext} {image_offset} {len(data)} {key}.{ext} cls {cls_offset} {len(cls)} {key}.cls"
        )

    @property
    def size(self) -> int:
        return self.tar.offset

    def close(self) -> dict:
        self.tar.close()
        folder = self.tar_path.parent
        (folder / f"{self.name}.json").write_text(json.dumps({"tar": self.tar_path.name, **self.entries}))
        (folder / f"{self.name}.idx").write_text(
            f"v1.2 {len(self.dali_lines)}\n" + "\n".join(self.dali_lines) + "\n"
        )
        return {
            "tar": self.tar_path.name,
            "index": f"{self.name}.json",
            "dali_index": f"{self.name}.idx",
            "samples": len(self.entries["keys"]),
            "bytes": self.tar_path.stat().st_size,
        }


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def write_split(
    index,
    split: str,
    output: Path,
    shard_size: int,
    *,
    max_samples=None,
    shuffle_seed=None,
    workers=1,
    progress=print,
):
    """Write one split's images as shards of at most ``shard_size`` bytes (and ``max_samples`` samples);
    returns (shard entries for the manifest, [(path, error)])."""
    order = np.arange(len(index))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(index))
    paths = [index.full_path(int(i)) for i in order]
    shards, bad, writer = [], [], None
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        for n, (i, (path, error, _)) in enumerate(zip(order, pool.map(check_image, paths, chunksize=64))):
            if error:
                bad.append((index.paths[i], error))
                progress(f"undecodable, left out: {index.paths[i]} ({error})")
                continue
            data = Path(path).read_bytes()
            full = (
                max_samples is not None and writer is not None and len(writer.entries["keys"]) >= max_samples
            )
            if writer is not None and (full or writer.size + len(data) + 2048 > shard_size):
                shards.append(writer.close())
                writer = None
            if writer is None:
                writer = _ShardWriter(output, split, len(shards))
            writer.add(f"{n:08d}", _extension(path), data, int(index.labels[i]), index.paths[i])
    if writer is not None:
        shards.append(writer.close())
    progress(
        f"{split}: {sum(s['samples'] for s in shards)} images in {len(shards)} shard(s), {len(bad)} left out"
    )
    return shards, bad


def _splits(data_dir: Path, names: list[str]) -> dict[str, Path]:
    """The existing splits among ``names`` (timm's synonyms allowed), by the name found on disk."""
    found = {}
    for name in names:
        path = find_split(data_dir, [name])
        if path is not None:
            found.setdefault(path.name.removesuffix(".txt"), path)
    return found


def write_shards(
    data_dir,
    output,
    shard_size: int,
    splits=("train", "val"),
    seed=0,
    workers=1,
    max_samples=None,
    progress=print,
):
    """Write every split of ``data_dir`` found among ``splits`` as shards under ``output``; returns the
    manifest. The first split found is the training split: its folders name the classes."""
    data_dir, output = Path(data_dir), Path(output)
    if not data_dir.is_dir():
        raise DataIndexError(f"--data-dir {data_dir} does not exist or is not a folder")
    found = _splits(data_dir, list(splits))
    if not found:
        raise DataIndexError(f"--data-dir {data_dir} has none of the splits {', '.join(splits)}")
    if output.exists() and any(output.iterdir()):
        raise DataIndexError(f"--output {output} is not empty: shards are written to a new or empty folder")
    output.mkdir(parents=True, exist_ok=True)
    train_name, train_path = next(iter(found.items()))
    train = build_index(train_path)
    manifest = {"format": FORMAT, "version": VERSION, "classes": train.classes, "source": str(data_dir.resolve()),
                "seed": seed, "splits": {}, "excluded": {}}  # fmt: skip
    for name, path in found.items():
        index = (
            train
            if name == train_name
            else build_index(path, classes=None if path.is_dir() else train.classes)
        )
        if path.is_dir() and index.classes != train.classes:
            index = index.with_classes(train.classes, source=f"the training split {train_path}")
        is_train = name == train_name
        shards, bad = write_split(
            index, name, output, shard_size, max_samples=max_samples, shuffle_seed=seed if is_train else None,
            workers=workers, progress=progress,
        )  # fmt: skip
        manifest["splits"][name] = {
            "samples": sum(s["samples"] for s in shards),
            "shuffled": is_train,
            "shards": shards,
        }
        manifest["excluded"][name] = [list(entry) for entry in bad]
    # timm's ReaderWds finds a split's shards and sample count in _info.json (``--dataset wds/NAME``).
    timm_info = {"name": data_dir.name, "splits": {
        name: {"name": name, "num_samples": split["samples"], "filenames": [s["tar"] for s in split["shards"]],
               "shard_lengths": [s["samples"] for s in split["shards"]]}
        for name, split in manifest["splits"].items()
    }}  # fmt: skip
    (output / "_info.json").write_text(json.dumps(timm_info, indent=1))
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.data.shards"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir", required=True, help="ImageFolder root with train/ and val/ (or list files)"
    )
    parser.add_argument("--output", required=True, help="new or empty folder for the shards")
    parser.add_argument("--shard-size", default="512MB", help="largest tar size (default 512MB)")
    parser.add_argument("--shard-samples", type=int, help="most samples per shard (default: no limit)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the training samples over the shards")
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise DataIndexError(f"--workers {args.workers}: must be >= 1")
        if args.shard_samples is not None and args.shard_samples < 1:
            raise DataIndexError(f"--shard-samples {args.shard_samples}: must be >= 1")
        manifest = write_shards(
            args.data_dir,
            args.output,
            parse_size(args.shard_size),
            args.splits,
            args.seed,
            args.workers,
            args.shard_samples,
        )
    except DataIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"error: --output {args.output}: cannot write shards there ({e.strerror or e})", file=sys.stderr
        )
        return 2
    left_out = sum(len(v) for v in manifest["excluded"].values())
    print(
        f"wrote {args.output}/{MANIFEST}; {left_out} undecodable image(s) left out (listed in the manifest)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
