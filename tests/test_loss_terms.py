"""Each method's own loss terms by name: in summary.csv as train_<term> columns next to train_loss,
train_ce and train_reg, adding up to the loss with the weights of the method's formula, and (BYOT's, on
fixed outputs) equal to the formula's parts written out in float64."""

import csv

import pytest
import timm
import torch
from conftest import make_tiny_dataset
from test_method_ddgsd import Outputs, kl
from test_train import tiny_args

from timm_cskd.config import parse_args
from timm_cskd.methods import method_hparams
from timm_cskd.methods.byot import BYOT
from timm_cskd.train import run

# Per method: non-default hyper-parameters, its own terms, and the loss its formula makes of them.
FORMULAS = {
    "ce": ([], (), lambda r: r["ce"]),
    "maxent": (["beta=0.3"], ("entropy",), lambda r: r["ce"] - 0.3 * r["entropy"]),
    "cskd": (["lambda=2", "temperature=3"], ("kl",), lambda r: r["ce"] + 2 * 9 * r["kl"]),
    "cskd-e": (
        ["lambda=2", "temperature=3", "lambda_e=0.5"],
        ("kl", "kl_e"),
        lambda r: r["ce"] + 9 * (2 * r["kl"] + 0.5 * r["kl_e"]),
    ),
    "ddgsd": (
        ["lambda=2", "temperature=3", "mu=0.1"],
        ("kl", "mmd"),
        lambda r: r["ce"] + 2 * 9 * r["kl"] + 0.1 * r["mmd"],
    ),
    "byot": (
        ["alpha=0.4", "temperature=2", "lambda=0.05"],
        ("aux_ce", "kl", "feature"),
        lambda r: r["ce"] + 0.6 * r["aux_ce"] + 0.4 * 4 * r["kl"] + 0.05 * r["feature"],
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("terms"), val_per_class=2)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_summary_has_the_methods_terms_and_they_make_its_loss(data_dir, tmp_path, name):
    kwargs, terms, formula = FORMULAS[name]
    extra = ["--method-kwargs", *kwargs] if kwargs else []
    run(parse_args(tiny_args(data_dir, tmp_path, "--method", name, "--epochs", "2", *extra)))
    with open(tmp_path / "run" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    columns = [c.removeprefix("train_") for c in rows[0] if c.startswith("train_")]
    assert columns == ["loss", "ce", "reg", *terms, "img_per_sec"]
    for row in rows:
        r = {c: float(row[f"train_{c}"]) for c in columns}
        assert all(r[t] != 0.0 for t in terms), r
        assert r["loss"] == pytest.approx(formula(r), rel=1e-5, abs=1e-6)
        assert r["reg"] == pytest.approx(r["loss"] - r["ce"], rel=1e-5, abs=1e-6)


def test_byot_terms_are_the_formulas_parts():
    g = torch.Generator().manual_seed(0)
    b, k, c, heads, alpha, t, lam = 6, 5, 8, 3, 0.4, 2.0, 0.05
    logits, features, aux_logits, aux_features = (
        torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in ((b, k), (b, c), (heads, b, k), (heads, b, c))
    )
    target = torch.arange(b) % k
    model = timm.create_model("test_resnet", num_classes=k)
    task = BYOT(model, method_hparams(BYOT, {"alpha": alpha, "temperature": t, "lambda": lam}))
    task.trainable_module = Outputs(logits, features, aux_logits, aux_features)
    got = task(torch.zeros(b, 3, 4, 4), target)["terms"]

    z, f, q, aux_f = (v.detach() for v in (logits, features, aux_logits, aux_features))
    ce = torch.nn.functional.cross_entropy
    expected = {
        "ce": ce(z, target),
        "aux_ce": sum(ce(q[i], target) for i in range(heads)),
        "kl": sum(kl(z, q[i], t) for i in range(heads)),
        "feature": sum((aux_f[i] - f).pow(2).sum(1).mean() for i in range(heads)),
    }
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value.item(), rel=1e-6), name
