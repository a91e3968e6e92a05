"""The GPU check's entry point: ``python3 benchmarks/gpu_check.py --output DIR`` (``--help``, ``--smoke``).

The rows live in the ``gpu_check`` package beside this file (``benchmarks/gpu_check/``); the device
machine runs this from a checkout without ``pip install``, so the repository root goes on the path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check.cli import main  # noqa: E402  (benchmarks/ is this script's folder: the package beside it)

if __name__ == "__main__":
    sys.exit(main())
