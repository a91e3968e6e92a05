"""Training-step throughput: cross-entropy vs CS-KD anchor vs CS-KD paired, side by side in one process.

Synthetic batches, the same model and optimizer, the modes interleaved round by round so machine noise
hits them alike. Each step trains ``--batch-size`` images with gradient: CE and paired forward exactly
those; anchor mode also forwards as many partners under no_grad (the paper's code), so it loads 2x.

    python benchmarks/train_throughput.py                                  # CPU: resnet18 at 64 px
    python benchmarks/train_throughput.py --device cuda --model resnet50 --img-size 224 \\
        --batch-size 256 --amp --channels-last                              # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import timm
import torch

from timm_cskd.methods import get_method, method_hparams

MODES = ("off", "anchor", "paired")
LABEL = {"off": "CE", "anchor": "CS-KD anchor", "paired": "CS-KD paired"}


def make_batch(mode: str, batch_size: int, img_size: int, num_classes: int, device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    images_loaded = 2 * batch_size if mode == "anchor" else batch_size
    half = images_loaded // 2
    target = torch.randint(0, num_classes, (half,), generator=g).repeat(2)
    images = torch.randn(images_loaded, 3, img_size, img_size, generator=g)
    if mode == "off":
        target = torch.randint(0, num_classes, (batch_size,), generator=g)
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images with gradient per step")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    names = {"off": "ce", "anchor": "cskd", "paired": "cskd-paired"}
    tasks = {
        mode: get_method(names[mode])(model, method_hparams(get_method(names[mode]), {})) for mode in MODES
    }
    batches = {
        m: make_batch(m, args.batch_size, args.img_size, args.num_classes, device, args.channels_last)
        for m in MODES
    }
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
    )

    def steps(mode: str, n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = tasks[mode](*batches[mode])["loss"]
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    model.train()
    for mode in MODES:
        steps(mode, args.warmup)
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(steps(mode, args.steps))

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads"
    )
    print(
        f"{args.model} {args.img_size}px, {args.batch_size} images with gradient per step, "
        f"amp={'bf16' if args.amp else 'off'}, channels_last={args.channels_last}, {name}, torch {torch.__version__}"
    )
    print(f"median of {args.rounds} rounds x {args.steps} steps, modes interleaved")
    print("| mode | step ms | images with grad/s | images loaded/s | step time / CE |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["off"])
    for mode in MODES:
        t = statistics.median(times[mode])
        loaded = 2 * args.batch_size if mode == "anchor" else args.batch_size
        print(
            f"| {LABEL[mode]} | {t * 1e3:.1f} | {args.batch_size / t:.0f} | {loaded / t:.0f} | {t / base:.3f} |"
        )


if __name__ == "__main__":
    main()
