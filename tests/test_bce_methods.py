"""CS-KD with timm's BCE recipes: under --bce-loss the task term is timm's BinaryCrossEntropy (its --bce-*
options, Mixup/CutMix soft targets) and the class-wise KL stays on the softmax at T; a timm ResNet Strikes
Back args.yaml trains with --method cskd unchanged; methods that cannot combine with BCE say why."""

import os

import pytest
import torch
from conftest import make_tiny_dataset
from timm.loss import BinaryCrossEntropy

from timm_cskd.config import ConfigError, parse_args
from timm_cskd.methods import METHODS
from timm_cskd.train import Trainer

RSB_ARGS_YAML = os.path.join(os.path.dirname(__file__), "fixtures", "timm_rsb_a2_args.yaml")
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("bce"), val_per_class=2)


def bce_trainer(data_dir, tmp_path, method, *extra, kwargs=("temperature=3", "lambda=2"), model="test_vit"):
    # test_vit: no BatchNorm or dropout, so forwarding the same images again gives the same logits.
    return Trainer(
        parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", method,
                    "--model", model, "--img-size", "32", "-j", "0", "--method", method, "-b", "4",
                    "--bce-loss", "--method-kwargs", *kwargs, *extra])
    )  # fmt: skip


def smoothed_onehot(y, eps):
    """timm's smoothing: eps / K off the true class, 1 - eps + eps / K on it."""
    return torch.full((len(y), NUM_CLASSES), eps / NUM_CLASSES).scatter_(
        1, y[:, None], 1 - eps + eps / NUM_CLASSES
    )


def explicit_bce(z, t, threshold=None, pos_weight=1.0, sum_classes=False):
    """-(w t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))) per class, then timm's reduction."""
    z = z.double()
    if threshold is not None:
        t = (t > threshold).double()
    s = torch.sigmoid(z)
    per = -(pos_weight * t * torch.log(s) + (1 - t) * torch.log(1 - s))
    return per.sum(1).mean() if sum_classes else per.mean()


def explicit_kl(z, target_probs, temperature):
    """T^2 * sum_c q_c (log q_c - log p_c) / B, p = softmax(z / T)."""
    p = torch.softmax(z.double() / temperature, dim=1)
    q = target_probs.double()
    return temperature**2 * (q * (q.log() - p.log())).sum() / z.shape[0]


def grads(module):
    return torch.cat([p.grad.flatten().clone() for p in module.parameters() if p.grad is not None])


def test_cskd_with_bce_and_mixup_is_bce_plus_the_softmax_kl(data_dir, tmp_path, monkeypatch):
    trainer = bce_trainer(data_dir, tmp_path, "cskd", "--mixup", "0.5", "--cutmix", "0", "--smoothing", "0.1",
                          "--bce-target-thresh", "0.2", "--bce-pos-weight", "2")  # fmt: skip
    task, model = trainer.task, trainer.task.get_eval_model()
    assert isinstance(task.bce, BinaryCrossEntropy) and task.bce.target_threshold == 0.2
    lam = 0.7
    monkeypatch.setattr(task.mixup_fn, "_params_per_batch", lambda: (lam, False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = task(x, y)
    out["loss"].backward()
    task_grads = grads(model)
    model.zero_grad()

    anchors, partners = x[:4], x[4:]
    mixed = lam * anchors + (1 - lam) * anchors.flip(0)
    onehot = smoothed_onehot(y[:4], 0.1)
    soft = lam * onehot + (1 - lam) * onehot.flip(0)  # Mixup's targets carry the smoothing
    z = model(mixed)
    with torch.no_grad():
        q = torch.softmax(model(partners) / 3, dim=1)
    q = lam * q + (1 - lam) * q.flip(0)
    bce = explicit_bce(z, soft, threshold=0.2, pos_weight=2.0)
    expected = bce + 2 * explicit_kl(z, q, 3)
    expected.backward()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(bce.item(), rel=1e-5)
    torch.testing.assert_close(task_grads, grads(model).float(), rtol=1e-4, atol=1e-6)
    trainer.close()


def test_cskd_paired_with_bce_sum_is_bce_on_both_halves_plus_the_symmetric_kl(data_dir, tmp_path):
    trainer = bce_trainer(data_dir, tmp_path, "cskd-paired", "--bce-sum", "--smoothing", "0.1")
    task, model = trainer.task, trainer.task.get_eval_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    y = torch.tensor([0, 2, 0, 2])
    out = task(x, y)

    with torch.no_grad():
        z = model(x)
    bce = explicit_bce(z, smoothed_onehot(y, 0.1), sum_classes=True)
    q_other = torch.softmax(z.double() / 3, dim=1).roll(2, dims=0)
    expected = bce + 2 * explicit_kl(z, q_other, 3)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(bce.item(), rel=1e-5)
    trainer.close()


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if cls.bce_loss))
def test_every_method_that_takes_bce_logs_the_bce_of_its_logits_as_its_task_term(data_dir, tmp_path, name):
    cls = METHODS[name]
    trainer = bce_trainer(
        data_dir, tmp_path, name, "--bce-target-thresh", "0.3", kwargs=(), model="test_resnet"
    )
    views = len(cls.views(trainer.config.method.method_kwargs))
    y = torch.tensor([0, 2, 0, 2]) if cls.batches == "paired" else torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y = y[:4] if cls.batches == "plain" else y
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(len(y), 3, 32, 32, generator=g) for _ in range(views)]
    out = trainer.task(images[0] if views == 1 else images, y)
    trainer.close()
    # The logits are the anchors' (anchor layout) or every image's; ddgsd's are both views', and its task
    # term is CE(a) + CE(b), twice their mean.
    logit_targets = y[:4] if cls.batches == "anchor" else torch.cat([y] * views)
    per_view = views if cls.batches == "plain" else 1
    expected = per_view * explicit_bce(out["output"], smoothed_onehot(logit_targets, 0.1), threshold=0.3)
    assert out["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if not cls.bce_loss))
def test_a_method_that_cannot_take_bce_says_why(data_dir, tmp_path, name):
    assert name in ("adacos", "ls", "virtual-softmax")
    with pytest.raises(ConfigError, match=f"--method {name} does not combine with --bce-loss: .*softmax"):
        bce_trainer(data_dir, tmp_path, name, kwargs=())


def test_a_timm_resnet_strikes_back_args_yaml_trains_with_cskd(data_dir, tmp_path):
    """The A2 recipe's args.yaml as timm writes it, with only the sizes, device and folders changed."""
    args = parse_args(["-c", RSB_ARGS_YAML, "--method", "cskd", "--data-dir", str(data_dir), "--output",
                       str(tmp_path), "--model", "test_resnet", "--img-size", "32", "--epochs", "1", "-b", "8",
                       "-j", "0", "--device", "cpu", "--amp-dtype", "bfloat16"])  # fmt: skip
    assert (args.opt, args.sched, args.aa, args.drop_path, args.mixup, args.cutmix) == (
        "lamb", "cosine", "rand-m7-mstd0.5-inc1", 0.05, 0.1, 1.0,
    )  # fmt: skip
    trainer = Trainer(args)
    try:
        assert trainer.config.method.method == "cskd" and trainer.task.has_ema()
        assert isinstance(trainer.task.bce, BinaryCrossEntropy) and trainer.task.bce.target_threshold == 0.2
        assert trainer.mixup_fn is not None and trainer.mixup_fn.mixup_enabled
        assert "RandAugment" in repr(trainer.train_loader.dataset.transform)
        metrics = trainer.fit()
    finally:
        trainer.close()
    assert metrics["num_samples"] == 2 * NUM_CLASSES
    rows = (tmp_path / "resnet50-a2" / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and "nan" not in rows[1]
