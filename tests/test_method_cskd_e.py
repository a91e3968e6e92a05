"""CS-KD-E (``--method cskd-e``): the loss against a float64 plain-PyTorch reference of the paper's formula,
the two views through the real loader, training through the real trainer, and exact resume."""

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import COLOURS
from PIL import Image
from test_train import (
    _assert_identical,
    assert_loss_falls_and_adds_up,
    killed_and_resumed_run,
    tiny_args,
    uninterrupted_run,
)

from timm_cskd.config import parse_args
from timm_cskd.methods import get_method, method_hparams, resolve_method
from timm_cskd.train import Trainer, main, run

HP = {"temperature": 3.0, "lambda": 0.7, "lambda_e": 1.9}


def make_pattern_folder(root, per_class, seed):
    """Four classes told apart by a pattern (flat, horizontal or vertical stripes, checks) as well as by
    colour: RandAugment's colour operations (invert, solarize, posterize) leave a pattern to learn from.
    Square images: with --scale 1 1 --ratio 1 1 the training crop is the whole image (deterministic)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:24, :24] // 4 % 2
    patterns = [np.zeros_like(x), y, x, x ^ y]
    for c, (pattern, colour) in enumerate(zip(patterns, COLOURS)):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shade = np.where(pattern[..., None], np.asarray(colour), 255 - np.asarray(colour))
            pixels = shade + rng.integers(-40, 41, shade.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    make_pattern_folder(root / "train", 12, seed=0)
    make_pattern_folder(root / "val", 5, seed=1)
    return root


class Recorder(nn.Module):
    """The model, remembering each forward's input and whether it ran with grad."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        self.calls.append((x.detach().clone(), torch.is_grad_enabled()))
        return self.model(x)


def reference_loss(weight, bias, strong, standard, target, T, lam, lam_e, smoothing):
    """The paper's L_CS-KD(x_aug, x'_aug) + lambda_E T^2 KL(sg P(x) || P(x_aug)), float64, plain autograd."""
    k = len(target) // 2

    def f(x):
        return x.flatten(1) @ weight.T + bias

    def kl(target_logits, logits):  # KL(softmax(t / T) || softmax(z / T)), summed over classes, batch mean
        log_q = F.log_softmax(target_logits / T, dim=1)
        return (log_q.exp() * (log_q - F.log_softmax(logits / T, dim=1))).sum(1).mean()

    z = f(strong[:k])
    partner, sample = f(strong[k:]).detach(), f(standard[:k]).detach()
    ce = F.cross_entropy(z, target[:k], label_smoothing=smoothing)
    return ce + lam * T * T * kl(partner, z) + lam_e * T * T * kl(sample, z), ce


@pytest.mark.parametrize(("dtype", "smoothing"), [(torch.float64, 0.0), (torch.float32, 0.1)])
def test_loss_and_gradient_match_a_float64_reference(dtype, smoothing):
    torch.manual_seed(0)
    k, classes = 6, 5
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, classes)).to(dtype)
    model = Recorder(linear)
    cls = get_method("cskd-e")
    task = cls(model, method_hparams(cls, HP), smoothing=smoothing)
    task.train()
    labels = torch.randint(0, classes, (k,))
    target = labels.repeat(2)
    strong = 3 * torch.randn(2 * k, 3, 4, 4, dtype=dtype)
    standard = 3 * torch.randn(2 * k, 3, 4, 4, dtype=dtype)

    result = task([strong, standard], target)
    result["loss"].backward()

    # The anchors' strong view with grad, then partners' strong + anchors' standard in one no_grad forward.
    (x_grad, with_grad), (x_nograd, without_grad) = model.calls
    assert with_grad and not without_grad
    assert torch.equal(x_grad, strong[:k])
    assert torch.equal(x_nograd, torch.cat([strong[k:], standard[:k]]))

    weight = linear[1].weight.detach().double().requires_grad_()
    bias = linear[1].bias.detach().double().requires_grad_()
    T, lam, lam_e = HP["temperature"], HP["lambda"], HP["lambda_e"]
    expected, ce = reference_loss(
        weight, bias, strong.double(), standard.double(), target, T, lam, lam_e, smoothing
    )
    expected.backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(result["loss"].double(), expected.detach(), **tol)
    torch.testing.assert_close(result["ce"].double(), ce.detach(), **tol)
    torch.testing.assert_close(result["reg"].double(), (expected - ce).detach(), **tol)
    torch.testing.assert_close(linear[1].weight.grad.double(), weight.grad, **tol)
    torch.testing.assert_close(linear[1].bias.grad.double(), bias.grad, **tol)
    assert torch.equal(result["output"], linear(strong[:k]).detach())


def test_hyper_parameters_views_and_clear_errors(data_dir, tmp_path, capsys):
    cls = get_method("cskd-e")
    assert cls.batches == "anchor" and not cls.mixup
    args = parse_args(["--method", "cskd-e", "--method-kwargs", "auto_augment=augmix-m5-w3", "lambda_e=2"])
    _, hp = resolve_method(args)
    assert hp == {"temperature": 4.0, "lambda": 1.0, "lambda_e": 2.0, "auto_augment": "augmix-m5-w3"}
    assert cls.views(hp) == [{"auto_augment": "augmix-m5-w3"}, {}], "strong view first, then the standard one"

    for extra, message in (
        (["--mixup", "0.2"], "does not compose with Mixup"),
        (["--method-kwargs", "auto_augment=rnd-m9"], "auto_augment='rnd-m9' is not a timm auto_augment"),
    ):
        assert main(tiny_args(data_dir, tmp_path / "err", "--method", "cskd-e", *extra)) == 2
        assert message in capsys.readouterr().err


DEFAULT_POLICY = get_method("cskd-e").hparams["auto_augment"].default
# Whole-image crops, no flip, no colour jitter, bilinear: the standard view is a plain resize, the strong
# one differs from it by the stronger augmentation alone.
FIXED_CROP = ["--method", "cskd-e", "--scale", "1", "1", "--ratio", "1", "1", "--hflip", "0"] + [
    "--color-jitter", "0", "--train-interpolation", "bilinear"
]  # fmt: skip


def _trainer(data_dir, out, policy):
    args = tiny_args(data_dir, out, *FIXED_CROP, "--method-kwargs", f"auto_augment={policy}")
    trainer = Trainer(parse_args(args))
    trainer.close()
    return trainer


def _first_batches(loader, n):
    """The first ``n`` batches of epoch 0 from the trainer's own loader, each with its plan (index, seed)."""
    loader.batch_sampler.set_epoch(0)
    plan = list(loader.batch_sampler)[:n]
    return list(zip([batch for batch, _ in zip(loader, plan)], plan))


def _replay(transforms, path, seed):
    """Both views of one file, run from the sample's plan seed as the loader seeds them: python's and
    NumPy's global RNGs and torch's CPU generator (timm's RandAugment picks its operations with NumPy)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.default_generator.manual_seed(seed)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return [t(img) for t in transforms]
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])


# RandAugment (the default) and AutoAugment ("original"), which draw from different RNGs.
@pytest.mark.parametrize("policy", [DEFAULT_POLICY, "original"])
def test_loader_gives_a_strong_and_a_standard_view_of_the_same_image(data_dir, tmp_path, policy):
    trainer = _trainer(data_dir, tmp_path, policy)
    batches = _first_batches(trainer.train_loader, 2)
    index = trainer.train_index
    mean = torch.tensor(trainer.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(trainer.data_config["std"]).view(3, 1, 1)
    differ = total = 0
    for (images, target), items in batches:
        assert isinstance(images, list) and len(images) == 2
        strong, standard = images
        k = len(items) // 2
        assert strong.shape == standard.shape == (2 * k, 3, 32, 32)
        assert target.tolist() == [int(index.labels[i]) for i, _ in items]
        assert torch.equal(target[:k], target[k:]), "anchors then same-class partners"
        for j, (i, seed) in enumerate(items):
            path = index.full_path(i)
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
            plain = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / std
            torch.testing.assert_close(standard[j], plain, rtol=0, atol=1e-5)
            # The workers' uint8 views, finished on the device as ToTensor + Normalize would have.
            expected = [
                (v / 255 - mean) / std for v in _replay(trainer.train_loader.dataset.transform, path, seed)
            ]
            torch.testing.assert_close(strong[j], expected[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(standard[j], expected[1], rtol=0, atol=1e-6)
            differ += not torch.allclose(strong[j], standard[j], atol=1e-3)
            total += 1
    # Each augmentation op applies with some probability (RandAugment: 2 ops at 0.5): most images change.
    assert total == 32 and differ >= total // 2, f"only {differ} of {total} strong views differ"


def test_the_strong_view_is_a_function_of_the_plan_position(data_dir, tmp_path):
    """Not of the process's RNG streams, which differ between loader workers and after a resume."""
    loader = _trainer(data_dir, tmp_path, DEFAULT_POLICY).train_loader
    views = []
    for seed in (1, 2):
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - the global RNG timm's RandAugment draws from
        torch.manual_seed(seed)
        ((images, _), _), *_ = _first_batches(loader, 1)
        views.append(images)
    assert torch.equal(views[0][0], views[1][0]) and torch.equal(views[0][1], views[1][1])


@pytest.mark.parametrize("extra", [[], ["--amp", "--amp-dtype", "bfloat16"]], ids=["fp32", "bf16"])
def test_trains_through_the_trainer_and_loss_falls(data_dir, tmp_path, extra):
    # lr 0.01, not tiny_args' 0.05: the two KL terms start at zero (a fresh network's predictions all
    # agree) and grow as predictions sharpen; at 0.05 they outgrow CE's fall on RandAugment views within
    # these 24 steps, and the epoch means swing by more than the trend.
    args = tiny_args(data_dir, tmp_path, "--method", "cskd-e", "--epochs", "4", "--lr", "0.01", *extra)
    metrics = run(parse_args(args))
    rows = assert_loss_falls_and_adds_up(tmp_path, 4)
    assert metrics["num_samples"] == 20
    first, last = rows[0], rows[-1]
    for key in ("train_ce", "eval_nll"):
        assert float(last[key]) < float(first[key]), key
    assert float(last["eval_top1_err"]) < 50.0, "chance is 75%"


# Loader workers included (RandAugment in each), as test_train's exact-resume runs.
EXACT = ["--method", "cskd-e", "--epochs", "2", "--checkpoint-interval", "2", "-j", "2"]


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_is_bit_identical(data_dir, tmp_path):
    expected = uninterrupted_run(data_dir, tmp_path / "a", EXACT)
    _assert_identical(
        killed_and_resumed_run(data_dir, tmp_path / "b", EXACT)["state_dict"], expected["state_dict"]
    )


def test_timms_aa_flag_is_refused_with_cskd_e(data_dir, tmp_path, capsys):
    """The method sets the strong view's policy itself; --aa would silently augment its standard view too."""
    assert main(tiny_args(data_dir, tmp_path, "--method", "cskd-e", "--aa", "rand-m9-mstd0.5-inc1")) == 2
    assert "drop --aa" in capsys.readouterr().err
