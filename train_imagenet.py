#!/usr/bin/env python3
"""Train timm models with Class-wise Self-Knowledge Distillation (CS-KD).

    torchrun --nproc_per_node=8 train_imagenet.py -c configs/resnet50_cskd.yaml --data-dir /imagenet
    python train_imagenet.py          # the demo: configs/demo.yaml on the bundled MNIST digits, CPU

Flags override the YAML; `python train_imagenet.py --help` lists them.
"""

import sys
from pathlib import Path

from timm_cskd.train import main

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"

if __name__ == "__main__":
    sys.exit(main(default_config=DEMO_CONFIG))
