"""Finding the files DALI's decoder fails on, which its error does not name.

A file that passes the structural check (``files``) but still fails in DALI's decoder stops the whole
batch with an error that names no file. The loader then decodes the failing batches' files again, in
halves, until each undecodable one is found; it logs each with its path, excludes it, and restarts the
pipeline at the same batch.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from timm_cskd.data.dali.pipelines import decoder_device

__all__ = ["PROBE_WINDOW", "decoder_message", "is_decode_error", "undecodable"]

# Batches past the failing one that may already be in flight when DALI reports a decoder error.
PROBE_WINDOW = 4


def is_decode_error(error: Exception) -> bool:
    """Whether a pipeline's error comes from its decoder (a file), not from anything else."""
    text = str(error)
    return any(marker in text for marker in ("fn.decoders", "nvImageCodec", "Failed to decode"))


def decoder_message(error: Exception) -> str:
    """The line of a decoder error that says what failed."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "failure" in line or "Failed" in line), lines[-1])


def _decodes(files: list[np.ndarray], device_id: int | None) -> bool:
    """Whether DALI's decoder (on the training device) decodes all of ``files`` in one batch."""

    @pipeline_def(batch_size=len(files), num_threads=2, device_id=device_id, prefetch_queue_depth=1)
    def probe():
        data = fn.external_source(source=lambda: files, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device=decoder_device(device_id), output_type=types.RGB)

    pipe = probe()
    try:
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    finally:
        del pipe
    return True


def undecodable(files: dict[int, np.ndarray], device_id: int | None) -> list[int]:
    """The keys of ``files`` DALI cannot decode, by bisection: about 2 log2(n) batch decodes per bad
    file instead of one pipeline per file, so a large window costs seconds while other ranks wait."""
    if not files or _decodes(list(files.values()), device_id):
        return []
    if len(files) == 1:
        return list(files)
    keys = list(files)
    half = len(keys) // 2
    return undecodable({k: files[k] for k in keys[:half]}, device_id) + undecodable(
        {k: files[k] for k in keys[half:]}, device_id
    )
