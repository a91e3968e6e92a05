"""The NVIDIA DALI data backend, driven by the sampler's epoch plan (class pairs or plain batches).

DALI's file reader cannot express class pairs, and its shuffle only mixes within a buffer, so the plan
decides the order: a parallel per-sample ``fn.external_source`` reads the encoded bytes of plan position
i (worker processes, ``source``), DALI decodes with a random crop (``device="mixed"``: nvJPEG on the GPU;
CPU operators with ``device_id=None`` on machines without one), flips, normalises with the model's
mean/std (``pipelines``) and hands over NCHW batches ``[first; partners]`` exactly like the torch
backend (``loaders``). Resuming mid-epoch starts the plan at the saved position. Validation shards the
images over ranks without padding, so each image is counted once.

Broken files never stop a run: a file whose structure is wrong is replaced by a classmate as it is read
(``files``), and one that passes the check but still fails in DALI's decoder is found, named and
excluded (``probe``).
"""

try:  # DALI's operators and its torch iterator, which the modules here import
    import nvidia.dali  # noqa: F401
    import nvidia.dali.plugin.pytorch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by hiding the module in the tests
    from timm_cskd.errors import ConfigError

    raise ConfigError(
        "--data-backend dali needs NVIDIA DALI: pip install 'timm-cskd[dali]' (the nvidia-dali-cuda130 wheel; "
        f"use nvidia-dali-cuda120 for drivers older than CUDA 13) [{e}]"
    ) from e

from timm_cskd.data.dali.files import structural_problem
from timm_cskd.data.dali.loaders import DaliTrainLoader, DaliValLoader, create_dali_loaders
from timm_cskd.data.dali.pipelines import dali_device_id, val_resize_shorter

__all__ = [
    "DaliTrainLoader",
    "DaliValLoader",
    "create_dali_loaders",
    "dali_device_id",
    "structural_problem",
    "val_resize_shorter",
]
