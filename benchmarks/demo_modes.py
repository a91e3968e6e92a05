"""CE vs CS-KD anchor vs CS-KD paired on the bundled demo dataset (MNIST 5k, CPU), then evaluate and compare.

Trains configs/demo.yaml once per mode with the same seed, evaluates each final checkpoint with
``timm_cskd.evaluate`` and prints ``timm_cskd.compare``'s table; writes the overlaid reliability
diagram and each run's own diagram under --output. A toy-scale sanity check of the whole pipeline,
not evidence about ImageNet: one seed, 4 epochs, 500 validation digits.

    python benchmarks/demo_modes.py --output output/demo_modes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from timm_cskd import compare, evaluate
from timm_cskd.config import parse_args
from timm_cskd.data.demo import demo_data_dir
from timm_cskd.train import run

REPO = Path(__file__).resolve().parents[1]
MODES = {"CE": "off", "CS-KD anchor": "anchor", "CS-KD paired": "paired"}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="output/demo_modes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = Path(args.output)
    data = demo_data_dir()
    eval_dirs = []
    for name, mode in MODES.items():
        start = time.perf_counter()
        run(parse_args([
            "-c", str(REPO / "configs" / "demo.yaml"), "--data-dir", str(data), "--cskd-mode", mode,
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--output", str(out), "--experiment", mode,
            "--log-interval", "1000", "--overwrite",
        ]))  # fmt: skip
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s")
        eval_dir = out / mode / "eval-val"
        evaluate.main(
            [
                "--checkpoint",
                str(out / mode / "last.pth.tar"),
                "--data-dir",
                str(data),
                "--output",
                str(eval_dir),
            ]
        )
        eval_dirs.append(str(eval_dir))
    compare.main([*eval_dirs, "--names", *MODES, "--output", str(out / "reliability_compare.png")])


if __name__ == "__main__":
    main()
