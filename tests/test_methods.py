"""The method registry through the real trainer: every registered method trains, evaluates and exports
(or refuses export clearly); flags, YAML and the first release's --cskd-* spellings resolve as documented."""

import csv
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import PLAIN_RECIPE, make_tiny_dataset

from timm_cskd import evaluate, export
from timm_cskd.checkpoint import load_model
from timm_cskd.config import ConfigError, parse_args
from timm_cskd.methods import METHODS, get_method, method_hparams, resolve_method
from timm_cskd.train import main, run

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("methods"), val_per_class=3)


def args_for(data_dir, out, *extra):
    return [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "3", "-b", "8", "--lr", "0.05", *PLAIN_RECIPE, "--sched", "cosine", "-j", "0", "--log-interval", "100",
        "--output", str(out), "--experiment", "run", "--seed", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_under_bf16_autocast_and_evaluates(data_dir, tmp_path, name):
    metrics = run(
        parse_args(args_for(data_dir, tmp_path, "--method", name, "--amp", "--amp-dtype", "bfloat16"))
    )
    with open(tmp_path / "run" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # The cross-entropy part: a self-distillation term grows while the predictions sharpen.
    assert float(rows[-1]["train_ce"]) < float(rows[0]["train_ce"]), "the loss must fall"
    for row in rows:
        assert float(row["train_loss"]) == pytest.approx(
            float(row["train_ce"]) + float(row["train_reg"]), rel=1e-6
        )
    assert metrics["num_samples"] == 12

    # Evaluation rebuilds the method's model from the checkpoint: the trainer's last validation again.
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "run" / "last.pth.tar"), "--data-dir", str(data_dir), "--output", str(out),
         "-j", "0", "--amp"]
    )  # fmt: skip
    assert code == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("top1_err", "nll", "ece"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_gives_the_evaluated_logits_or_refuses_clearly(data_dir, tmp_path, name, capsys):
    run(parse_args(args_for(data_dir, tmp_path, "--method", name, "--epochs", "1")))
    checkpoint = tmp_path / "run" / "last.pth.tar"
    code = export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "exported")])
    if code != 0:
        assert code == 2
        err = capsys.readouterr().err
        assert f"cannot export a --method {name} model" in err
        return
    trained = load_model(checkpoint).model.eval()
    exported = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if not cls.mixup))
def test_mixup_with_a_method_that_cannot_take_it_is_a_clear_error(data_dir, tmp_path, capsys, name):
    assert main(args_for(data_dir, tmp_path, "--method", name, "--mixup", "0.2")) == 2
    err = capsys.readouterr().err
    assert f"--method {name} does not compose with Mixup/CutMix" in err


def test_list_methods_names_every_method_and_hyperparameter(capsys):
    assert main(["--list-methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in METHODS.items():
        assert f"{name}: {cls.formula}" in out
        for key, hyper in cls.hparams.items():
            assert f"{key}={hyper.default!r}" in out
    expected = {"ce", "ls", "maxent", "cskd", "cskd-paired"}
    assert expected <= set(METHODS)


def resolved(*argv):
    args = parse_args(["--data-dir", "unused", *argv])
    cls, hp = resolve_method(args)
    return cls.name, hp


def test_method_flags_yaml_and_the_first_release_spellings(tmp_path):
    assert resolved() == ("cskd", {"temperature": 4.0, "lambda": 1.0})
    assert resolved("--cskd-mode", "paired", "--cskd-lambda", "3") == (
        "cskd-paired",
        {"temperature": 4.0, "lambda": 3.0},
    )
    assert resolved("--cskd-mode", "off") == ("ce", {})
    assert resolved("--method", "cskd", "--method-kwargs", "temperature=1", "lambda=2") == (
        "cskd",
        {"temperature": 1.0, "lambda": 2.0},
    )
    assert resolved("--method", "maxent", "--method-kwargs", "beta=1") == ("maxent", {"beta": 1.0})
    config = tmp_path / "c.yaml"
    config.write_text("method: ls\nmethod_kwargs:\n  smoothing: 0.2\n")
    assert resolved("-c", str(config)) == ("ls", {"smoothing": 0.2})
    config.write_text("method: cskd\nmethod_kwargs: [lambda=3]\n")
    assert resolved("-c", str(config))[1]["lambda"] == 3.0


def test_the_command_line_overrides_the_yaml_method_in_either_spelling(tmp_path):
    """A shipped config names its method; a run on top of it that names another (the CE baseline, the
    first release's --cskd-mode) or changes one hyper-parameter gets what the command line says."""
    config = tmp_path / "c.yaml"
    config.write_text("method: cskd\nmethod_kwargs: {temperature: 3.0, lambda: 3.0}\n")
    c = ["-c", str(config)]
    assert resolved(*c, "--cskd-mode", "paired") == ("cskd-paired", {"temperature": 4.0, "lambda": 1.0})
    assert resolved(*c, "--cskd-mode", "anchor") == ("cskd", {"temperature": 3.0, "lambda": 3.0})
    assert resolved(*c, "--method", "ce") == ("ce", {})
    assert resolved(*c, "--cskd-mode", "off") == ("ce", {})
    assert resolved(*c, "--cskd-lambda", "1") == ("cskd", {"temperature": 3.0, "lambda": 1.0})
    config.write_text("cskd_mode: paired\ncskd_lambda: 2.0\n")
    assert resolved(*c, "--method", "cskd-paired", "--method-kwargs", "lambda=3") == (
        "cskd-paired",
        {"temperature": 4.0, "lambda": 3.0},
    )
    assert resolved(*c, "--method", "ls") == ("ls", {"smoothing": 0.1})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--method", "cskd", "--method-kwargs", "lamda=2"],
            "has no hyper-parameter 'lamda' (valid: temperature, lambda)",
        ),
        (["--method", "cskd", "--method-kwargs", "lambda=high"], "expected a float"),
        (
            ["--method", "ce", "--method-kwargs", "beta=1"],
            "method 'ce' has no hyper-parameter 'beta' (valid: none)",
        ),
        (["--method", "nope"], "unknown --method 'nope'; choose one of"),
        (["--method", "ce", "--cskd-mode", "anchor"], "--cskd-mode anchor means --method cskd"),
        (["--method", "ce", "--cskd-lambda", "2"], "--cskd-lambda applies to the CS-KD methods"),
        (["--cskd-lambda", "2", "--method-kwargs", "lambda=3"], "disagrees with --method-kwargs lambda=3"),
        (["--method", "cskd", "--plain-sampler"], "--plain-sampler gives no class pairs"),
        (["--distill-loss-weight", "0.5"], "need a teacher: --kd-model-name"),
    ],
)
def test_bad_method_settings_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolved_with_kd(*argv)


def resolved_with_kd(*argv):
    from timm_cskd.methods import kd_config

    args = parse_args(["--data-dir", "unused", *argv])
    kd_config(args)
    return resolve_method(args)


def method(name, model, **kwargs):
    cls = get_method(name)
    return cls(model, method_hparams(cls, kwargs))


@pytest.mark.parametrize("name", ["adacos", "virtual-softmax"])
def test_a_head_replacing_method_sizes_its_head_by_the_classifier_and_refuses_a_non_linear_one(name):
    method = get_method(name)
    # MobileNetV3's classifier reads its 1024-wide pre-logits layer, not the 288 pooled features.
    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    assert model.num_features != model.get_classifier().in_features == 1024
    model = method.adapt_model(model, {}).eval()
    head = model.get_classifier()
    assert model.classifier is head and head.weight.shape == (5, 1024) and getattr(head, "bias", None) is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    headless = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(ConfigError, match=f"--method {name} needs a Linear classifier, not Identity"):
        method.adapt_model(headless, {})


def test_label_smoothing_and_maxent_losses_match_their_formulas():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 5

    def loss_and_grad(task):
        model.zero_grad()
        loss = task(x, y)["loss"]
        loss.backward()
        return loss.item(), model.weight.grad.clone()

    loss, grad = loss_and_grad(method("ls", model, smoothing=0.2))
    z = model(x)
    soft = torch.full((8, 5), 0.2 / 5, dtype=torch.float64)
    soft[torch.arange(8), y] += 0.8
    ref = -(soft * torch.log_softmax(z, 1)).sum(1).mean()
    (ref_grad,) = torch.autograd.grad(ref, model.weight)
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)

    loss, grad = loss_and_grad(method("maxent", model, beta=0.7))
    z = model(x)
    p = torch.softmax(z, 1)
    entropy = -(p * torch.log(p)).sum(1).mean()
    ref = F.cross_entropy(z, y) - 0.7 * entropy
    (ref_grad,) = torch.autograd.grad(ref, model.weight)
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert math.isfinite(loss)


def test_ce_weight_scales_only_the_cross_entropy_of_the_fused_loss():
    from timm_cskd.loss import cskd_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    partner = torch.randn(6, 7, generator=g, dtype=torch.float64)
    y = torch.arange(6) % 7
    total, ce, kl = cskd_loss(z, y, partner, temperature=2.0, lambda_cls=3.0, ce_weight=0.25)
    (grad,) = torch.autograd.grad(total, z)
    ref_z = z.detach().clone().requires_grad_()
    log_p = torch.log_softmax(ref_z / 2.0, 1)
    q = torch.softmax(partner / 2.0, 1)
    ref = 0.25 * F.cross_entropy(ref_z, y) + 3.0 * 4.0 * (q * (torch.log(q) - log_p)).sum(1).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_z)
    assert total.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert ce.item() == pytest.approx(F.cross_entropy(z.detach(), y).item(), rel=1e-10)
    assert np.isfinite(kl.item())
