"""``python -m timm_cskd COMMAND ...``, also under ``torchrun -m timm_cskd train ...``: the ``timm-cskd`` command."""

import sys

from timm_cskd.cli import main

if __name__ == "__main__":
    sys.exit(main())
