"""BYOT: the loss against a float64 reference, heads built from timm's feature API, training with Mixup and
bfloat16, the heads saved as task state and left out of evaluation and export, two DDP ranks in step, and
an exact kill-and-resume of model and heads."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_image_folder, make_tiny_dataset
from safetensors.torch import load_file
from test_method_ddgsd import Outputs, assert_ranks_identical, ddp_args, kl, torchrun_plain
from test_train import assert_loss_falls_and_adds_up, killed_and_resumed_run, tiny_args, uninterrupted_run

from timm_cskd import evaluate, export
from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import ConfigError, parse_args
from timm_cskd.methods import method_hparams
from timm_cskd.methods.byot import BYOT, BYOTModule
from timm_cskd.train import run

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("byot"), val_per_class=3)


def task_for(model, **kwargs):
    return BYOT(model, method_hparams(BYOT, kwargs))


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft-targets"])
def test_loss_and_gradients_match_a_float64_reference_with_detached_teachers(soft):
    g = torch.Generator().manual_seed(0)
    b, k, c, heads, alpha, t, lam = 6, 5, 8, 3, 0.4, 2.0, 0.05

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    logits, features, aux_logits, aux_features = leaf(b, k), leaf(b, c), leaf(heads, b, k), leaf(heads, b, c)
    labels = torch.arange(b) % k
    target = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), 1) if soft else labels
    task = task_for(
        timm.create_model("test_resnet", num_classes=k), alpha=alpha, temperature=t, **{"lambda": lam}
    )
    task.trainable_module = Outputs(logits, features, aux_logits, aux_features)
    result = task(torch.zeros(b, 3, 4, 4), target)
    result["loss"].backward()

    # The formula, written out: the deepest classifier learns from the targets, each auxiliary head from
    # the targets, the deepest's detached prediction and its detached pooled features.
    y = target if soft else F.one_hot(labels, k).double()
    z, f, q, aux_f = (v.detach().requires_grad_() for v in (logits, features, aux_logits, aux_features))

    def ce(x):
        return -(y * torch.log_softmax(x, 1)).sum(1).mean()

    ref = ce(z)
    for i in range(heads):
        ref = ref + (1 - alpha) * ce(q[i]) + alpha * t * t * kl(z.detach(), q[i], t)
        ref = ref + lam * (aux_f[i] - f.detach()).pow(2).sum(1).mean()
    ref_grads = torch.autograd.grad(ref, (z, q, aux_f))
    assert result["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert result["ce"].item() == pytest.approx(ce(z).item(), rel=1e-6)
    for got, expected in zip((logits.grad, aux_logits.grad, aux_features.grad), ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)

    # In closed form: the deepest logits get CE's gradient only (the heads' KL targets are detached), the
    # deepest features none; a head gets (1 - alpha) CE + alpha T (p_T - sg p_deep,T) and 2 lambda (F_i - F).
    softmax = torch.softmax
    torch.testing.assert_close(logits.grad, (softmax(z.detach(), 1) - y) / b, rtol=1e-5, atol=1e-8)
    assert features.grad is None or not features.grad.any()
    for i in range(heads):
        qi = q[i].detach()
        expected = (1 - alpha) * (softmax(qi, 1) - y) + alpha * t * (
            softmax(qi / t, 1) - softmax(z.detach() / t, 1)
        )
        torch.testing.assert_close(aux_logits.grad[i], expected / b, rtol=1e-5, atol=1e-8)
        expected = 2 * lam * (aux_f[i].detach() - f.detach()) / b
        torch.testing.assert_close(aux_features.grad[i], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("name", "channels", "width"),
    [
        ("resnet50", (256, 512, 1024), 2048),
        ("resnet101", (256, 512, 1024), 2048),
        ("resnext101_32x8d", (256, 512, 1024), 2048),
        ("test_resnet", (32, 48, 192), 96),
        ("test_convnext", (24, 32, 48), 64),
        ("test_efficientnet", (24, 32, 48), 256),
    ],
)
def test_heads_sit_on_the_stages_before_the_last_at_its_resolution(name, channels, width):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    module = BYOTModule(model, 3)
    for head, chs, stride in zip(module.heads, channels, (8, 4, 2)):
        first, reduce, last = (m for m in head["bottleneck"] if isinstance(m, torch.nn.Conv2d))
        assert (first.in_channels, first.out_channels) == (chs, width // 4)
        assert reduce.kernel_size == reduce.stride == (stride, stride)
        assert last.out_channels == width and head["fc"].in_features == width
    x = torch.randn(2, 3, 64, 64)
    logits, features, aux_logits, aux_features = module(x)
    assert aux_logits.shape == (3, 2, 7) and aux_features.shape == (3, 2, width)
    assert features.shape == (2, width)
    # The deepest classifier is the timm model's own: the same logits as its forward.
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], model(x))


def test_a_transformer_gets_stride_one_heads():
    model = timm.create_model("test_vit", num_classes=3)
    module = BYOTModule(model, 2)
    size = model.pretrained_cfg["input_size"][1]
    logits, _, aux_logits, aux_features = module(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and aux_logits.shape == (2, 2, 3) and aux_features.shape == (2, 2, 64)
    assert all(head["bottleneck"][3].stride == (1, 1) for head in module.heads)


def test_a_model_without_the_feature_api_or_too_many_heads_is_a_clear_error():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(ConfigError, match="needs a timm model with forward_intermediates and feature_info"):
        task_for(plain)
    with pytest.raises(ConfigError, match="heads=5: the model has 5 feature stages, so 1 to 4 heads"):
        task_for(timm.create_model("test_resnet", num_classes=3), heads=5)


@pytest.mark.parametrize(
    "extra",
    [["--mixup", "0.2", "--cutmix", "1.0", "--model-ema"], ["--amp", "--amp-dtype", "bfloat16"]],
    ids=["mixup-ema", "bf16"],
)
def test_trains_and_saves_the_heads_as_task_state_only(data_dir, tmp_path, extra):
    metrics = run(parse_args(tiny_args(data_dir, tmp_path, "--method", "byot", "--epochs", "4", *extra)))
    assert_loss_falls_and_adds_up(tmp_path, 4)
    assert metrics["num_samples"] == 12

    state = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    plain_keys = timm.create_model("test_resnet", num_classes=4).state_dict().keys()
    suffixes = ["_ema"] if "--model-ema" in extra else []
    for suffix in ["", *suffixes]:
        assert state[f"state_dict{suffix}"].keys() == plain_keys
        heads = state[f"task_state{suffix}"]["extra"]
        assert heads and all(key.startswith("heads.") for key in heads)
        assert {key.split(".")[1] for key in heads} == {"0", "1", "2"}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("byot-run")
    metrics = run(parse_args(tiny_args(data_dir, out, "--method", "byot", "--epochs", "2")))
    return out / "run", metrics


def test_export_is_the_plain_timm_model_and_evaluation_matches_training(data_dir, trained, tmp_path):
    run_dir, train_metrics = trained
    folder = export.export(run_dir / "last.pth.tar", tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    trained_model = timm.create_model("test_resnet", num_classes=4)
    trained_model.load_state_dict(load_checkpoint_file(run_dir / "last.pth.tar")["state_dict"])
    assert load_file(folder / "model.safetensors").keys() == trained_model.state_dict().keys(), "no heads"
    exported = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained_model.eval()(x), rtol=0, atol=0)

    out = tmp_path / "eval"
    checkpoint = str(run_dir / "last.pth.tar")
    code = evaluate.main(
        ["--checkpoint", checkpoint, "--data-dir", str(data_dir), "--output", str(out), "-j", "0"]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1_err", "nll", "ece"):
        assert metrics[key] == pytest.approx(train_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_two_ranks_train_model_and_heads_identically(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data / "train", [5, 4, 4, 3], size=(20, 20), noise=40)
    make_image_folder(data / "val", [2, 1, 2, 1], size=(20, 20), noise=40)
    proc = torchrun_plain(2, ddp_args(data, tmp_path / "out", "byot"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "out" / "ddp"
    weights = assert_ranks_identical(run_dir)
    assert any(key.startswith("heads.") for key in weights), "the heads are part of the trainable module"
    checkpoint = load_checkpoint_file(run_dir / "last.pth.tar")
    for key, value in checkpoint["task_state"]["extra"].items():
        assert torch.equal(value, weights[key]), key
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, weights[f"model.{key}"]), key


EXACT = ["--mixup", "0.4", "--epochs", "2", "--checkpoint-interval", "2", "-j", "2"]


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_is_bit_identical_heads_included(data_dir, tmp_path):
    method = ["--method", "byot", *EXACT]
    expected = uninterrupted_run(data_dir, tmp_path / "a", method)
    got = killed_and_resumed_run(data_dir, tmp_path / "b", method)
    for part in (lambda s: s["state_dict"], lambda s: s["task_state"]["extra"]):
        assert part(expected).keys() == part(got).keys() and part(expected)
        for key, value in part(expected).items():
            assert torch.equal(part(got)[key], value), f"{key} differs"
