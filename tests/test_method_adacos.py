"""AdaCos: the loss, its gradient and the scale's updates against a float64 reference of the paper's
formulas; training, evaluation, the export refusal and two DDP ranks through the real tools."""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import PLAIN_RECIPE, make_tiny_dataset
from test_ddp import free_port

from timm_cskd import evaluate, export
from timm_cskd.config import ConfigError, parse_args
from timm_cskd.methods import get_method
from timm_cskd.train import main, run

HERE = Path(__file__).resolve().parent
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]
NUM_CLASSES = 5
AdaCos = get_method("adacos")


def adapted_model(seed=0):
    torch.manual_seed(seed)
    return AdaCos.adapt_model(timm.create_model("test_resnet", num_classes=NUM_CLASSES), {})


def batch(seed, n=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    return x, torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def reference(model, x, y, s_old, s_has_grad=False):
    """From a float64 copy of the model: s_new, the loss CE(s_new cos, y), the logits s_new cos and every
    parameter's gradient. With ``s_has_grad`` s_new is differentiated as well (what the no_grad prevents).

        cos_ik = <x_i / ||x_i||, W_k / ||W_k||>,  B_avg = mean_i sum_{k != y_i} exp(s_old cos_ik)
        s_new = log(B_avg) / cos(min(pi / 4, lower median_i arccos cos_{i, y_i}))
    """
    ref = copy.deepcopy(model).double()
    features = ref.forward_head(ref.forward_features(x.double()), pre_logits=True)
    weight = ref.get_classifier().weight
    cos = (features / features.norm(dim=1, keepdim=True)) @ (weight / weight.norm(dim=1, keepdim=True)).T
    c = cos if s_has_grad else cos.detach()
    is_target = F.one_hot(y, NUM_CLASSES).bool()
    b_avg = torch.exp(s_old * c).masked_fill(is_target, 0.0).sum() / len(y)
    theta_med = torch.acos(c[is_target]).sort().values[(len(y) - 1) // 2]
    s_new = torch.log(b_avg) / torch.cos(torch.clamp(theta_med, max=math.pi / 4))
    loss = F.cross_entropy(s_new * cos, y)
    loss.backward()
    grads = {name: p.grad for name, p in ref.named_parameters()}
    return s_new.item(), loss.item(), (s_new * cos).detach(), grads


def test_cosine_head_replaces_the_classifier_with_the_initial_scale():
    for classes in (5, 1000):
        model = AdaCos.adapt_model(timm.create_model("test_resnet", num_classes=classes), {})
        head = model.get_classifier()
        assert head.scale.item() == pytest.approx(math.sqrt(2) * math.log(classes - 1), rel=1e-7)
        assert {k for k in model.state_dict() if k.startswith("fc.")} == {"fc.weight", "fc.scale"}
        bound = math.sqrt(6 / (classes + 96))  # xavier uniform over (classes, 96 features)
        assert head.weight.abs().max() <= bound and head.weight.std() > bound / 3
    with pytest.raises(ConfigError, match="3 or more classes"):
        AdaCos.adapt_model(timm.create_model("test_resnet", num_classes=2), {})


def test_loss_gradient_and_scale_follow_the_formula_over_two_steps():
    model = adapted_model()
    task = AdaCos(model, {}).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    s_initial = model.fc.scale.item()
    for step in range(2):
        x, y = batch(step)
        s_old = model.fc.scale.item()
        s_new, loss, logits, grads = reference(model, x, y, s_old)
        _, _, _, grads_through_s = reference(model, x, y, s_old, s_has_grad=True)
        result = task(x, y)
        result["loss"].backward()
        assert model.fc.scale.item() == pytest.approx(s_new, rel=1e-5)
        assert result["loss"].item() == pytest.approx(loss, rel=1e-5)
        assert result["reg"].item() == 0.0
        torch.testing.assert_close(result["output"], logits.float(), rtol=1e-4, atol=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].float(), rtol=1e-3, atol=1e-6, msg=name)
        # The gradient through s fails even a 10x looser check: this one would catch a missing no_grad.
        through_s = grads_through_s["fc.weight"].float()
        assert not torch.allclose(model.fc.weight.grad, through_s, rtol=1e-2, atol=1e-5)
        optimizer.step()
        optimizer.zero_grad()
    assert len({s_initial, s_old, model.fc.scale.item()}) == 3, "s changes at every step"


def test_evaluation_uses_the_stored_scale_and_never_updates_it():
    model = adapted_model()
    task = AdaCos(model, {}).train()
    x, y = batch(0)
    task(x, y)
    s = model.fc.scale.clone()
    task.eval()
    x1, y1 = batch(1)
    result = task(x1, y1)
    assert torch.equal(model.fc.scale, s)
    with torch.no_grad():
        logits = model(x)
    ref = copy.deepcopy(model).double()
    features = ref.forward_head(ref.forward_features(x.double()), pre_logits=True)
    cos = F.normalize(features, dim=1) @ F.normalize(ref.fc.weight, dim=1).T
    torch.testing.assert_close(logits, (s.double() * cos).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.fc.scale, s)
    assert result["loss"].item() == pytest.approx(F.cross_entropy(model(x1), y1).item())


def test_head_runs_in_float32_under_bfloat16_autocast():
    head = adapted_model().get_classifier()
    head.scale.fill_(30.0)  # a learned scale's size, at which bfloat16 visibly rounds the logits
    features = torch.randn(8, 96)
    expected = 30.0 * F.normalize(features.double(), dim=1) @ F.normalize(head.weight.double(), dim=1).T
    with torch.no_grad():
        plain = head(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = head(features)
            from_bf16 = head(features.bfloat16())
    assert autocast.dtype == from_bf16.dtype == torch.float32
    assert torch.equal(autocast, plain)
    torch.testing.assert_close(plain, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_bf16, head(features.bfloat16().float()), rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lossy = F.linear(F.normalize(features, dim=1), F.normalize(head.weight, dim=1)) * 30
    assert (lossy.float() - expected.float()).abs().max() > 1e-3, "bfloat16 would be visibly worse"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("adacos-data"))


def train_args(data_dir, out, *extra, method="adacos"):
    return [
        "--data-dir", str(data_dir), "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0",
        "--epochs", "4", "-b", "8", "--lr", "0.05", *PLAIN_RECIPE, "--sched", "cosine", "-j", "0", "--log-interval", "2",
        "--output", str(out), "--experiment", "run", "--seed", "1", "--method", method, *extra,
    ]  # fmt: skip


def train_losses(out):
    with open(Path(out) / "run" / "summary.csv") as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adacos-run")
    metrics = run(parse_args(train_args(data_dir, out)))
    return out, metrics


def test_trains_through_the_trainer_and_loss_falls(trained):
    out, metrics = trained
    losses = train_losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert metrics["num_samples"] == 20
    state_dict = torch.load(out / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    assert state_dict["fc.scale"].item() != pytest.approx(math.sqrt(2) * math.log(3), rel=1e-3)


def test_trains_under_bfloat16_autocast(data_dir, tmp_path):
    run(parse_args(train_args(data_dir, tmp_path, "--epochs", "2", "--amp", "--amp-dtype", "bfloat16")))
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0]
    state_dict = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    assert state_dict["fc.scale"].dtype == torch.float32 and torch.isfinite(state_dict["fc.scale"])


def test_evaluate_reproduces_the_last_validation_and_export_refuses(trained, data_dir, tmp_path, capsys):
    out, train_metrics = trained
    checkpoint = str(out / "run" / "last.pth.tar")
    argv = [
        "--checkpoint",
        checkpoint,
        "--data-dir",
        str(data_dir),
        "--output",
        str(tmp_path / "eval"),
        "-j",
        "0",
    ]
    assert evaluate.main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("top1_err", "top5_err", "nll", "ece", "brier", "num_samples"):
        assert metrics[key] == pytest.approx(train_metrics[key], rel=1e-5, abs=1e-6), key
    capsys.readouterr()
    assert export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export a --method adacos model") and "cosine head" in err, err
    assert not (tmp_path / "exported").exists()


def test_mixup_is_refused_naming_the_method(data_dir, tmp_path, capsys):
    assert main(train_args(data_dir, tmp_path, "--mixup", "0.2")) == 2
    err = capsys.readouterr().err
    assert "--method adacos does not compose with Mixup/CutMix" in err and "true class" in err, err


# ddp_worker.py records the batches of ClassPairSampler and takes one record per step; plain-batch
# methods train on ShuffledBatchSampler's, so this launcher sends those through the same recorder first.
LAUNCHER = """
import runpy, sys
from timm_cskd.sampler import ClassPairSampler, ShuffledBatchSampler
ShuffledBatchSampler.__iter__ = lambda self: ClassPairSampler.__iter__(self)
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def train_two_ranks(args, tmp_path):
    """Two gloo ranks of tests/ddp_worker.py under torchrun; each rank's trainable and EMA state_dicts."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(launcher), str(HERE / "ddp_worker.py"), *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    return [(torch.load(run_dir / f"rank{r}.pt"), torch.load(run_dir / f"ema{r}.pt")) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_end_with_the_same_scale(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path, "--epochs", "2", "-b", "4", "--model-ema")
    (w0, e0), (w1, e1) = train_two_ranks(args, tmp_path)
    # Each rank's last step computes s from its own batch: only statistics over all ranks' batches agree.
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between ranks"
    assert "module.fc.scale" in e0
    for key in e0:
        assert torch.equal(e0[key], e1[key]), f"EMA {key} differs between ranks"
    assert w0["fc.scale"].item() != pytest.approx(math.sqrt(2) * math.log(3), rel=1e-3)
