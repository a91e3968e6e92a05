"""``timm-cskd benchmark`` at toy sizes on CPU: its lines and numbers, the loader fraction computed from
the printed rates, and the timed step being the method's real training step (the trainer's)."""

import re

import pytest
import torch
import torch.nn as nn
from conftest import make_tiny_dataset

from timm_cskd import benchmark
from timm_cskd.config import RunConfig, parse_args
from timm_cskd.experiment import resolve_run
from timm_cskd.throughput import time_rounds, training_step

TOY = ["--model", "resnet18", "--img-size", "32", "-b", "4", "--device", "cpu", "--rounds", "2", "--steps", "1",
       "--warmup", "1", "--loader-batches", "2", "-j", "0"]  # fmt: skip
NUMBER = r"([0-9.e+-]+)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("bench"), val_per_class=1)


def test_benchmark_prints_step_and_loader_rates_and_the_fraction_of_them(data_dir, capsys):
    assert benchmark.main([*TOY, "--data-dir", str(data_dir), "--method", "cskd"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("timm-cskd benchmark: resnet18 at 32x32, method cskd, -b 4, 4 classes, amp off")
    step_ms = float(re.search(rf"train step: {NUMBER} ms, median of 2 rounds x 1 steps", out).group(1))
    demand, loaded = re.search(rf"train rate: {NUMBER} img/s \(([0-9]+) images loaded per step", out).groups()
    loader = float(
        re.search(rf"loader rate: {NUMBER} img/s \(torch backend, -j 0, median of 2 rounds", out).group(1)
    )
    fraction, per_step = re.search(rf"loader delivers {NUMBER}x of the training step's demand at ([0-9]+) img/step: ", out).groups()  # fmt: skip
    assert step_ms > 0 and float(demand) > 0 and loader > 0
    assert int(loaded) == int(per_step) == 8  # 4 anchors + 4 partners
    assert float(demand) == pytest.approx(8 / (step_ms / 1e3), rel=1e-3)
    assert float(fraction) == pytest.approx(loader / float(demand), rel=1e-2, abs=0.006)
    assert ("it keeps up" in out) == (loader >= float(demand))


def test_without_data_dir_only_the_step_is_measured(capsys):
    # No --device: the trainer's default (CUDA where available, else the CPU).
    toy = [a for a in TOY if a not in ("--device", "cpu")]
    assert (
        benchmark.main([*toy, "--model", "test_resnet", "--method", "cskd-paired", "--num-classes", "10"])
        == 0
    )
    out = capsys.readouterr().out
    assert "10 classes" in out and "(4 images loaded per step;" in out
    assert "loader: not measured (no --data-dir)" in out


@pytest.mark.parametrize("method, grad, no_grad", [("cskd", 4, 4), ("cskd-paired", 4, 0), ("ce", 4, 0)])
def test_the_timed_step_is_the_methods_training_step(method, grad, no_grad):
    """Anchor mode forwards the partners without grad, paired mode both halves with it; each call is one
    optimizer update of the trainer's optimizer."""
    args = parse_args(["--model", "test_resnet", "--img-size", "32", "-b", "4", "--device", "cpu", "--method",
                       method, "--num-classes", "4", "--opt", "sgd", "--lr", "0.1"])  # fmt: skip
    step = training_step(resolve_run(RunConfig.from_namespace(args)), 4, torch.device("cpu"))
    model = step.task.get_eval_model()
    seen = {True: 0, False: 0}
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__(torch.is_grad_enabled(), seen[torch.is_grad_enabled()] + inputs[0].shape[0]))  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    times = time_rounds({"step": step.run}, rounds=2, calls=1, warmup=1, device="cpu")
    assert len(times["step"]) == 2 and all(t > 0 for t in times["step"])
    assert seen == {True: 3 * grad, False: 3 * no_grad}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if b.requires_grad)
