"""Pre-flight check: decode every image once and list the ones that cannot be decoded.

    python -m timm_cskd.data.verify --data-dir /imagenet --output undecodable.txt -j 16
    torchrun ... -m timm_cskd.train ... --exclude-list undecodable.txt

ImageNet's train set holds files a strict decoder trips on (a PNG saved as .JPEG, CMYK JPEGs); a
90-epoch run must not die on one of them. Undecodable files are written one per line, relative to
--data-dir, and both data backends skip them. Files that decode but are not what their name says (PNG
or CMYK content in a .JPEG) are reported, not excluded: PIL and DALI's decoders both read them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from timm_cskd.data.index import DataIndexError, build_index
from timm_cskd.invocation import program_name

__all__ = ["check_image", "verify", "main"]


def check_image(path: str) -> tuple[str, str | None, str | None]:
    """(path, error or None, note on unusual content or None)."""
    try:
        with Image.open(path) as img:
            note = None
            if img.format == "PNG" and path.lower().endswith((".jpg", ".jpeg")):
                note = "PNG content in a JPEG-named file"
            elif img.mode == "CMYK":
                note = "CMYK JPEG"
            img.convert("RGB").load()
        return path, None, note
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return path, f"{type(e).__name__}: {e}", None


def _split_paths(data_dir: Path, splits: list[str]) -> list[str]:
    if not data_dir.is_dir():
        raise DataIndexError(f"--data-dir {data_dir} does not exist or is not a folder")
    paths = []
    for split in splits:
        source = data_dir / split
        if not source.exists():
            continue
        index = build_index(source)
        paths.extend(index.full_path(i) for i in range(len(index)))
    if not paths:
        raise DataIndexError(f"no images found under {data_dir} in {', '.join(splits)}")
    return paths


def verify(
    data_dir: str | os.PathLike, splits=("train", "val", "validation"), workers: int = 4, progress=print
):
    """Decode every image of the splits; returns (undecodable [(path, error)], unusual [(path, note)])."""
    data_dir = Path(data_dir)
    paths = _split_paths(data_dir, list(splits))
    bad, unusual = [], []
    start, report_every = time.perf_counter(), max(len(paths) // 20, 1)
    with ProcessPoolExecutor(max_workers=max(workers, 1)) as pool:
        for done, (path, error, note) in enumerate(pool.map(check_image, paths, chunksize=64), 1):
            if error:
                bad.append((os.path.relpath(path, data_dir), error))
            if note:
                unusual.append((os.path.relpath(path, data_dir), note))
            if done % report_every == 0 or done == len(paths):
                rate = done / (time.perf_counter() - start)
                eta = (len(paths) - done) / rate
                progress(f"verified {done}/{len(paths)} ({100 * done / len(paths):.0f}%), {rate:.0f} img/s, "
                         f"{len(bad)} undecodable, eta {eta:.0f} s")  # fmt: skip
    return sorted(bad), sorted(unusual)


def read_exclude_list(path: str | os.PathLike) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m timm_cskd.data.verify"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--splits", nargs="+", default=["train", "val", "validation"])
    parser.add_argument(
        "--output", default="undecodable.txt", help="list of undecodable files, relative to --data-dir"
    )
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        if args.workers < 1:
            raise DataIndexError(f"--workers {args.workers}: must be >= 1")
        # Checked before hours of decoding, not after.
        if output.is_dir() or not output.absolute().parent.is_dir():
            raise DataIndexError(f"--output {output}: not a file in an existing folder")
        if not os.access(output.absolute().parent, os.W_OK):
            raise DataIndexError(f"--output {output}: its folder is not writable")
        bad, unusual = verify(args.data_dir, args.splits, args.workers)
        with open(output, "w", encoding="utf-8") as f:
            f.write(
                f"# undecodable images under {Path(args.data_dir).resolve()}, from timm_cskd.data.verify\n"
            )
            f.writelines(f"{path}\n" for path, _ in bad)
    except DataIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --output {output}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    for path, error in bad:
        print(f"undecodable: {path} ({error})")
    for path, note in unusual:
        print(f"decodes, but {note}: {path}")
    print(f"{len(bad)} undecodable file(s) written to {args.output}; pass it to the trainer's --exclude-list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
