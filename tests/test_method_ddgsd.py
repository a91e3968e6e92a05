"""DDGSD: the loss against a float64 reference, two different views per image through the real loader and
trainer, training in float32 and bfloat16, two DDP ranks in step, and an exact kill-and-resume.

Run as a script (by torchrun), this file is tests/ddp_worker.py for a method on plain batches: see
``torchrun_plain``."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import PLAIN_RECIPE, make_image_folder, make_tiny_dataset
from test_ddp import free_port
from test_train import assert_loss_falls_and_adds_up, killed_and_resumed_run, tiny_args, uninterrupted_run

from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import parse_args
from timm_cskd.data import build_index
from timm_cskd.data.loader import build_device_preps, build_transforms, create_train_loader
from timm_cskd.methods import method_hparams
from timm_cskd.methods.ddgsd import DDGSD
from timm_cskd.train import run

HERE = Path(__file__).resolve().parent
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("ddgsd"), val_per_class=3)


class Outputs(torch.nn.Module):
    """A trainable module that returns fixed leaf tensors, so a method's gradients land on them."""

    def __init__(self, *outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        return self.outputs


def kl(target_logits, logits, t):
    q = torch.softmax(target_logits / t, 1)
    return (q * (torch.log(q) - torch.log_softmax(logits / t, 1))).sum(1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradients_match_a_float64_reference_with_detached_targets(smoothing):
    g = torch.Generator().manual_seed(0)
    b, k, c, lam, t, mu = 6, 5, 7, 0.7, 2.5, 0.3
    logits = torch.randn(2 * b, k, generator=g, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2 * b, c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(b) % k
    hp = method_hparams(DDGSD, {"lambda": lam, "temperature": t, "mu": mu})
    task = DDGSD(timm.create_model("test_resnet", num_classes=k), hp, smoothing=smoothing)
    task.trainable_module = Outputs(logits, features)
    views = [torch.zeros(b, 3, 4, 4), torch.ones(b, 3, 4, 4)]
    result = task(views, y)
    result["loss"].backward()

    # The formula, written out: each view's CE, each view distilled towards the other's detached
    # prediction, the squared distance of the views' mean features.
    z, f = logits.detach().requires_grad_(), features.detach().requires_grad_()
    za, zb = z.chunk(2)
    fa, fb = f.chunk(2)
    ce = F.cross_entropy(za, y, label_smoothing=smoothing) + F.cross_entropy(zb, y, label_smoothing=smoothing)
    ref = ce + lam * t * t * (kl(zb.detach(), za, t) + kl(za.detach(), zb, t))
    ref = ref + mu * (fa.mean(0) - fb.mean(0)).pow(2).sum()
    ref_grad_z, ref_grad_f = torch.autograd.grad(ref, (z, f), retain_graph=True)
    assert result["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert result["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert result["reg"].item() == pytest.approx((ref - ce).item(), rel=1e-5)
    torch.testing.assert_close(logits.grad, ref_grad_z, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(features.grad, ref_grad_f, rtol=1e-5, atol=1e-8)

    # In closed form: a view's logits get CE's gradient and lambda T (p_T - sg p'_T) / B from the KL that
    # distils it, nothing from the KL where it is the target; the features +-2 mu (mean f_a - mean f_b) / B.
    onehot = F.one_hot(y, k).double() * (1 - smoothing) + smoothing / k
    for own, other, grad in ((za, zb, logits.grad[:b]), (zb, za, logits.grad[b:])):
        p_t, q_t = torch.softmax(own.detach() / t, 1), torch.softmax(other.detach() / t, 1)
        expected = (torch.softmax(own.detach(), 1) - onehot + lam * t * (p_t - q_t)) / b
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    gap = 2 * mu * (fa.detach().mean(0) - fb.detach().mean(0)) / b
    torch.testing.assert_close(
        features.grad, torch.cat([gap.expand(b, c), -gap.expand(b, c)]), rtol=1e-5, atol=1e-8
    )

    # Without the stop-gradients the gradient would differ: the check above can see them.
    no_sg = ce + lam * t * t * (kl(zb, za, t) + kl(za, zb, t))
    (no_sg_grad,) = torch.autograd.grad(no_sg, z)
    assert (no_sg_grad - ref_grad_z).abs().max() > 1e-3


def loader_for(data_dir, out):
    args = parse_args(tiny_args(data_dir, out, "--method", "ddgsd"))
    data_config = {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "crop_pct": 1.0,
    }
    train_tf, _ = build_transforms(args, data_config, DDGSD.views({}))
    preps = build_device_preps(args, data_config, DDGSD.views({}), "cpu")
    index = build_index(data_dir / "train")
    loader = create_train_loader(
        index,
        train_tf,
        args,
        batches="plain",
        num_replicas=1,
        rank=0,
        seed=args.seed,
        preps=preps,
        pin_memory=False,
    )
    return loader, index


def test_the_real_loader_gives_two_different_views_of_each_image(data_dir, tmp_path):
    loader, index = loader_for(data_dir, tmp_path)
    planned = next(iter(loader_for(data_dir, tmp_path)[0].batch_sampler))
    (view_a, view_b), target = next(iter(loader))
    assert view_a.shape == view_b.shape == (8, 3, 32, 32)
    # Each pair shows one image: the labels of the planned images, the dataset's own item for (index, seed).
    torch.testing.assert_close(target, torch.as_tensor(index.labels[[i for i, _ in planned]]))
    prep_a, prep_b = loader.preps
    for j, item in enumerate(planned):
        (a, b), label, _ = loader.dataset[item]
        assert label == target[j]
        assert torch.equal(prep_a(a[None])[0], view_a[j]) and torch.equal(prep_b(b[None])[0], view_b[j])
    # Two independent draws of the random crop and flip: no image gets the same view twice.
    for j in range(8):
        assert not torch.equal(view_a[j], view_b[j]), f"image {j}: the two views are identical"
    # A fixed seed replays the same views.
    (again_a, again_b), _ = next(iter(loader_for(data_dir, tmp_path)[0]))
    assert torch.equal(again_a, view_a) and torch.equal(again_b, view_b)


@pytest.mark.parametrize("extra", [[], ["--amp", "--amp-dtype", "bfloat16"]], ids=["fp32", "bf16"])
def test_trains_through_the_trainer_on_two_views_and_loss_falls(data_dir, tmp_path, extra, monkeypatch):
    seen = []
    compute = DDGSD.compute

    def recording(self, input, target):
        if not seen:
            seen.append(([v.detach().clone() for v in input], target.clone()))
        return compute(self, input, target)

    monkeypatch.setattr(DDGSD, "compute", recording)
    # 16 images a step: with 8 a batch can miss a colour class, and BatchNorm's batch statistics of these
    # one-colour images then swing a confident model's loss by whole units between epochs.
    args = tiny_args(data_dir, tmp_path, "--method", "ddgsd", "--epochs", "4", "-b", "16", *extra)
    metrics = run(parse_args(args))
    (view_a, view_b), target = seen[0]
    assert view_a.shape == view_b.shape and len(target) == len(view_a) == 16
    assert not torch.equal(view_a, view_b)

    assert_loss_falls_and_adds_up(tmp_path, 4)
    assert metrics["num_samples"] == 12
    state = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    assert state["state_dict"].keys() == timm.create_model("test_resnet", num_classes=4).state_dict().keys()


def torchrun_plain(nproc, args, timeout=300):
    """tests/ddp_worker.py under torchrun, run through this file: the worker's step probe pops the batch its
    ClassPairSampler hook recorded, and a plain-batch method's ShuffledBatchSampler never passes that hook,
    so (below) it iterates through it too. Otherwise test_ddp's ``torchrun``."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", __file__, *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ddp_args(data, out, method):
    return [
        "--data-dir", str(data), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "2", "-b", "4", "--lr", "0.05", *PLAIN_RECIPE, "-j", "0", "--output", str(out), "--experiment", "ddp",
        "--method", method, "--log-interval", "1", "--seed", "2",
    ]  # fmt: skip


def assert_ranks_identical(run_dir):
    w0, w1 = (torch.load(run_dir / f"rank{r}.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between ranks"
    return w0


@pytest.mark.slow
def test_two_ranks_train_identically(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data / "train", [5, 4, 4, 3], size=(20, 20), noise=40)
    make_image_folder(data / "val", [2, 1, 2, 1], size=(20, 20), noise=40)
    proc = torchrun_plain(2, ddp_args(data, tmp_path / "out", "ddgsd"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    weights = assert_ranks_identical(tmp_path / "out" / "ddp")
    # The saved trainable module is WithFeatures: the timm model under "model.", nothing else to train.
    assert weights and all(key.startswith("model.") for key in weights)


EXACT = ["--epochs", "2", "--checkpoint-interval", "2", "-j", "2"]


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_is_bit_identical(data_dir, tmp_path):
    method = ["--method", "ddgsd", *EXACT]
    expected = uninterrupted_run(data_dir, tmp_path / "a", method)
    got = killed_and_resumed_run(data_dir, tmp_path / "b", method)
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    for key in expected["state_dict"]:
        assert torch.equal(got["state_dict"][key], expected["state_dict"][key]), f"{key} differs"


if __name__ == "__main__":
    from timm_cskd.sampler import ClassPairSampler, ShuffledBatchSampler

    # Looked up when iterated, after ddp_worker has put its recording hook on ClassPairSampler.
    ShuffledBatchSampler.__iter__ = lambda self: ClassPairSampler.__iter__(self)
    runpy.run_path(str(HERE / "ddp_worker.py"), run_name="__main__")
