"""Virtual Softmax: the loss and its gradient against a float64 reference of the paper's formula, the
bias-free classifier and its export, training through the real trainer and two DDP ranks."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_tiny_dataset
from test_method_adacos import train_args, train_losses, train_two_ranks

from timm_cskd import export
from timm_cskd.checkpoint import load_model
from timm_cskd.config import parse_args
from timm_cskd.methods import get_method
from timm_cskd.train import main, run

NUM_CLASSES = 5
VirtualSoftmax = get_method("virtual-softmax")


def adapted_model(seed=0):
    torch.manual_seed(seed)
    return VirtualSoftmax.adapt_model(timm.create_model("test_resnet", num_classes=NUM_CLASSES), {})


def reference(model, x, y, smoothing=0.0, batch_norms=False):
    """From a float64 copy of the model: the loss, the plain CE over the C logits and every parameter's
    gradient of

        L = mean_i CE([W x_i, ||W_{y_i}|| ||x_i||], y_i)   over C + 1 columns,

    the target (1 - eps) on y_i plus eps / C on each real class. ``batch_norms``: the virtual logit as
    the norm of the whole batch's W_y rows times that of its feature matrix, one value for every sample.
    """
    ref = copy.deepcopy(model).double()
    features = ref.forward_head(ref.forward_features(x.double()), pre_logits=True)
    weight = ref.get_classifier().weight
    logits = features @ weight.T
    if batch_norms:
        virtual = (torch.linalg.norm(weight[y]) * torch.linalg.norm(features)).expand(len(y))
    else:
        virtual = torch.stack(
            [torch.linalg.norm(weight[c]) * torch.linalg.norm(f) for c, f in zip(y, features)]
        )
    log_p = torch.cat([logits, virtual[:, None]], dim=1).log_softmax(dim=1)
    target = F.one_hot(y, NUM_CLASSES + 1).double() * (1 - smoothing)
    target[:, :NUM_CLASSES] += smoothing / NUM_CLASSES
    loss = -(target * log_p).sum(dim=1).mean()
    loss.backward()
    plain_ce = F.cross_entropy(logits.detach(), y, label_smoothing=smoothing)
    return loss.item(), plain_ce.item(), {name: p.grad for name, p in ref.named_parameters()}


def test_classifier_loses_its_bias_and_export_gives_it_back_as_zeros():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=NUM_CLASSES).eval()
    weight = model.fc.weight.detach().clone()
    model = VirtualSoftmax.adapt_model(model, {})
    assert model.fc.bias is None and torch.equal(model.fc.weight, weight)
    assert "fc.bias" not in model.state_dict()
    plain = timm.create_model("test_resnet", num_classes=NUM_CLASSES).eval()
    plain.load_state_dict(VirtualSoftmax.export_state_dict(model.state_dict(), {}))
    assert torch.equal(plain.fc.bias, torch.zeros(NUM_CLASSES))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    with pytest.raises(ValueError, match="cannot tell its bias-free classifier"):
        VirtualSoftmax.export_state_dict({"a.weight": weight, "b.weight": weight}, {})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_match_the_float64_reference(smoothing):
    model = adapted_model()
    task = VirtualSoftmax(model, {}, smoothing=smoothing).train()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    loss, plain_ce, grads = reference(model, x, y, smoothing)
    batch_norm_loss, _, _ = reference(model, x, y, smoothing, batch_norms=True)
    result = task(x, y)
    result["loss"].backward()
    assert result["loss"].item() == pytest.approx(loss, rel=1e-5)
    # The batch-norm variant is far outside that tolerance: the check tells the two apart.
    assert abs(batch_norm_loss - loss) > 1e-2 * loss
    assert result["ce"].item() == pytest.approx(plain_ce, rel=1e-5)
    assert result["reg"].item() == pytest.approx(loss - plain_ce, rel=1e-4)
    assert result["output"].shape == (8, NUM_CLASSES)
    for name, p in task.get_trainable_module().named_parameters():
        reference_grad = grads[name.removeprefix("model.")].float()
        torch.testing.assert_close(p.grad, reference_grad, rtol=1e-3, atol=1e-6, msg=name)


def test_evaluation_sees_the_plain_model():
    model = adapted_model()
    task = VirtualSoftmax(model, {})
    assert task.get_eval_model() is model
    assert task.get_checkpoint_state()["state_dict"].keys() == model.state_dict().keys()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("virtual-softmax-data"))


def args_for(data_dir, out, *extra):
    return train_args(data_dir, out, *extra, method="virtual-softmax")


@pytest.mark.parametrize(
    "extra", [["--epochs", "3"], ["--epochs", "2", "--amp", "--amp-dtype", "bfloat16"]], ids=["fp32", "bf16"]
)
def test_trains_through_the_trainer_and_exports_into_timm(data_dir, tmp_path, extra):
    metrics = run(parse_args(args_for(data_dir, tmp_path, *extra)))
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0]
    assert metrics["num_samples"] == 20
    checkpoint = tmp_path / "run" / "last.pth.tar"
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "exported")]) == 0
    exported = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    trained = load_model(checkpoint).model.eval()
    assert trained.fc.bias is None and torch.equal(exported.fc.bias, torch.zeros(4))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained(x), rtol=0, atol=0)


def test_mixup_is_refused_naming_the_method(data_dir, tmp_path, capsys):
    assert main(args_for(data_dir, tmp_path, "--mixup", "0.2")) == 2
    err = capsys.readouterr().err
    assert "--method virtual-softmax does not compose with Mixup/CutMix" in err and "true class" in err, err


@pytest.mark.slow
def test_two_ranks_train_identically(data_dir, tmp_path):
    # The virtual logit reads the classifier weight outside the DDP forward: its gradient must still be
    # reduced with the rest, or the ranks' classifiers drift apart.
    (w0, _), (w1, _) = train_two_ranks(
        args_for(data_dir, tmp_path, "--epochs", "2", "-b", "4", "--model-ema"), tmp_path
    )
    assert "model.fc.weight" in w0 and "model.fc.bias" not in w0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between ranks"
