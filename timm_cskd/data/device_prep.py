"""Batches finished where the model runs: the loader workers ship uint8 CHW images (a quarter of the bytes
of normalised float32, and no normalisation on the host that feeds every GPU), and here they become the
float32 that ``ToTensor`` + ``Normalize`` would have made (to float32 rounding), laid out channels_last when asked
and randomly erased (timm's ``--reprob``). On CUDA the copy and this work run one batch ahead on a side
stream, from pinned memory, as timm's ``PrefetchLoader`` does; on the CPU the same code runs in line.

Written beside timm's ``PrefetchLoader`` rather than with it: that one takes a single image tensor per
batch (a multi-view method ships several) and erases from the process's random streams, which a resumed
run cannot replay. Here each sample's erasing is timm's ``RandomErasing`` run on that sample alone, from
``erasing_seed(sample_seed, view)``: like its crop, a function of the sample's place in the epoch plan.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from collections.abc import Sequence

import torch
from timm.data.random_erasing import RandomErasing

__all__ = ["DeviceLoader", "DevicePrep", "erasing_seed"]


def erasing_seed(sample_seed: int, view: int) -> int:
    """The seed of a sample's random erasing in view ``view``: a hash, so that its draws are unrelated to
    the crop and flip drawn from ``sample_seed`` itself (63 bits)."""
    digest = hashlib.blake2b(f"erase/{sample_seed}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator timm's ``RandomErasing`` draws its noise from on ``device`` (its default one)."""
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    generators = getattr(module, "default_generators", None)
    if not generators:
        raise ValueError(f"random erasing (--reprob) on --device {device}: no default generator to seed")
    return generators[device.index if device.index is not None else module.current_device()]


@contextlib.contextmanager
def _random_streams_kept(generator: torch.Generator):
    python_state, state = random.getstate(), generator.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        generator.set_state(state)


class DevicePrep:
    """One view's finishing: a uint8 (N, C, H, W) batch on the device becomes normalised float32 with
    ``mean``/``std`` (on the 0-1 scale, as timm's data config gives them), randomly erased."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        *,
        channels_last: bool = False,
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
    ):
        self.device = torch.device(device)
        # On the 0-255 scale, as timm's PrefetchLoader: one pass fewer than ToTensor's x / 255 first.
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.erasing = None
        if re_prob > 0:
            self.erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device)
            self._generator = _default_generator(self.device)

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | None = None, view: int = 0):
        # (x - 255 mean) / (255 std): ToTensor + Normalize's values to float32 rounding (< 1e-6).
        x = images.to(dtype=torch.float32, memory_format=self.memory_format)
        x = x.sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            if seeds is None or len(seeds) != len(x):
                raise ValueError("random erasing on the device needs each sample's plan seed")
            with _random_streams_kept(self._generator):
                for j, sample_seed in enumerate(seeds):
                    seed = erasing_seed(int(sample_seed), view)
                    random.seed(seed)
                    self._generator.manual_seed(seed)
                    self.erasing(x[j])
        return x

    def __repr__(self) -> str:
        layout = "channels_last" if self.memory_format is torch.channels_last else "contiguous"
        return f"{type(self).__name__}({layout}, erasing={self.erasing!r})"


class DeviceLoader:
    """Iterates ``loader``'s uint8 batches ``(images, target[, seeds])`` as ``(images, target)`` finished
    on ``device`` by ``preps`` (one per view; ``images`` is then a list of views).

    Batches must be consumed on the stream that is current when the iterator is advanced (as timm's).
    ``plan``: a training loader's epoch plan (the batch sampler the loader's seeded one draws from)."""

    def __init__(self, loader: torch.utils.data.DataLoader, preps: Sequence[DevicePrep], device, plan=None):
        self.loader, self.preps, self.device = loader, list(preps), torch.device(device)
        self.plan = plan
        self.stream = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def _finish(self, batch):
        images, target, *rest = batch
        # The seeds stay on the host (never a device sync); read only where erasing needs them.
        wants_seeds = rest and any(prep.erasing is not None for prep in self.preps)
        seeds = rest[0].tolist() if wants_seeds else None
        views = images if isinstance(images, list | tuple) else [images]
        if len(views) != len(self.preps):
            raise ValueError(f"a batch of {len(views)} view(s) for {len(self.preps)} device prep(s)")
        finished = [
            prep(v.to(self.device, non_blocking=True), seeds, k)
            for k, (prep, v) in enumerate(zip(self.preps, views))
        ]
        target = target.to(self.device, non_blocking=True)
        return (finished if isinstance(images, list | tuple) else finished[0]), target

    def __iter__(self):
        # timm's PrefetchLoader scheme: one stream for the loader's lifetime (the caching allocator pools
        # blocks per stream), waiting for the consumer's queued work before it writes into freed blocks.
        if self.device.type == "cuda":
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=self.device)
            stream_context = functools.partial(torch.cuda.stream, self.stream)
            consumer = torch.cuda.current_stream(self.device)
        else:
            stream_context, consumer = contextlib.nullcontext, None
        ready = None
        for batch in self.loader:
            if consumer is not None:
                self.stream.wait_stream(consumer)
            with stream_context():
                upcoming = self._finish(batch)
            if ready is not None:
                yield ready
            if consumer is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_stream(self.stream)
            ready = upcoming
        if ready is not None:
            yield ready
