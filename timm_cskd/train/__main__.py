"""``python -m timm_cskd.train ...``, also under ``torchrun -m timm_cskd.train ...``: the trainer's command."""

import sys

from timm_cskd.train import cli

sys.exit(cli())
