#!/usr/bin/env python3
"""Train timm models with Class-wise Self-Knowledge Distillation (CS-KD).

    torchrun --nproc_per_node=8 train_imagenet.py -c resnet50_cskd --data-dir /imagenet
    python train_imagenet.py          # the demo: the packaged demo config on the bundled MNIST digits, CPU

The same command as ``timm-cskd train`` and ``python -m timm_cskd.train``; flags override the YAML,
`python train_imagenet.py --help` lists them.
"""

import sys

from timm_cskd.invocation import invoked_as
from timm_cskd.train import cli

if __name__ == "__main__":
    with invoked_as("train_imagenet.py"):
        sys.exit(cli())
