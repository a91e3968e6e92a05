"""Every bad input to every tool: one ``error:`` line naming the culprit, a non-zero exit (2 for usage and
configuration errors), no traceback, and nothing of the user's destroyed.

Each row of the table is one bad input as a new user would type it. The tools' ``main()`` run in-process
(argparse's own usage errors arrive as SystemExit), so the table costs seconds; the one row that runs
``train_imagenet.py`` in a subprocess checks that the script itself prints no traceback. Rows marked
``early`` fail on the value alone: they must stop before the experiment folder is even created (so
before its lock, the dataset scan and the model build). Rows with ``keep`` name a folder of the user's
files whose checksums must be the same afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import PLAIN_RECIPE, make_tiny_dataset

from timm_cskd import benchmark, compare, evaluate, export, figures, study
from timm_cskd import train as trainer
from timm_cskd.data import prepare, shards, verify
from timm_cskd.data.index import ImageIndex
from timm_cskd.experiment import warn_single_image_classes
from timm_cskd.methods import get_method

REPO = Path(__file__).resolve().parents[1]
TOOLS = {
    "train": trainer.main,
    "evaluate": evaluate.main,
    "export": export.main,
    "compare": compare.main,
    "figures": figures.main,
    "study": study.main,
    "prepare": prepare.main,
    "verify": verify.main,
    "benchmark": benchmark.main,
    "shards": shards.main,
}


@dataclass
class Row:
    id: str
    tool: str
    argv: list[str]
    message: str  # a substring of the error line, after {placeholders} are filled
    setup: object = None  # callable(Env) -> None, writes the bad file or folder
    code: int = 2
    early: bool = False  # fails on the value alone: no experiment folder is created
    keep: str | None = None  # a folder of user files (placeholder) that must stay byte-identical
    skip_if: bool = False
    environ: dict = field(default_factory=dict)  # environment variables set for the row


@dataclass
class Env:
    tmp: Path
    data: Path
    run: Path  # a finished one-epoch training run (a copy per test)
    values: dict = field(default_factory=dict)

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, data=self.data, run=self.run, out=self.tmp / "out", **self.values)


def train_args(*extra, data="{data}", output="{out}", experiment="run"):
    return [
        "--data-dir", data, "--model", "test_resnet", "--img-size", "32", "--crop-pct", "1.0", "--epochs", "1",
        "-b", "8", "--lr", "0.05", "--sched", "cosine", *PLAIN_RECIPE, "-j", "0", "--output", output,
        "--experiment", experiment, "--seed", "1", *extra,
    ]  # fmt: skip


def write(path_template: str, text: str):
    def setup(env: Env):
        path = Path(env.fill(path_template))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


def copy_data(transform):
    """A copy of the tiny dataset at {tmp}/d, changed by ``transform(root)``."""

    def setup(env: Env):
        root = env.tmp / "d"
        shutil.copytree(env.data, root)
        transform(root)

    return setup


def foreign_folder(env: Env):
    folder = env.tmp / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text('{"architecture": "my_model"}')
    (folder / "pytorch_model.bin").write_bytes(b"my weights")


def earlier_export(env: Env):
    assert export.main(["--checkpoint", str(env.run / "last.pth.tar"), "--output", str(env.tmp / "exp")]) == 0


def list_file_with_missing_path(root: Path):
    shutil.move(root / "train", root / "images")
    (root / "train.txt").write_text("images/class_000/img_0000.jpg 0\nimages/class_001/gone.jpg 1\n")


def val_class_not_in_train(root: Path):
    shutil.copytree(root / "val" / "class_000", root / "val" / "class_009")


def empty_one_class(root: Path):
    names = sorted(p.relative_to(root).as_posix() for p in (root / "train" / "class_002").iterdir())
    (root / "undecodable.txt").write_text("\n".join(names) + "\n")


def copies_of_val(root: Path):
    shutil.copytree(root / "val", root / "calib")


def yaml_row(row_id: str, text: str, message: str) -> Row:
    return Row(row_id, "train", ["-c", "{tmp}/c.yaml", *train_args()], message, write("{tmp}/c.yaml", text))


CKPT = "{run}/last.pth.tar"
NO_CUDA = torch.cuda.is_available()

ROWS = [
    # --- train_imagenet.py: value ranges (the tracebacks)
    Row("lr-negative", "train", train_args("--lr", "-1"), "--lr -1.0: must be > 0", early=True),
    Row("lr-nan", "train", train_args("--lr", "nan"), "--lr nan: must be > 0", early=True),
    Row("method-temperature-0", "train", train_args("--method-kwargs", "temperature=0"),
        "temperature=0.0 for method 'cskd': must be > 0", early=True),
    Row("method-lambda-negative", "train", train_args("--method-kwargs", "lambda=-1"),
        "lambda=-1.0 for method 'cskd': must be >= 0", early=True),
    Row("cskd-lambda-negative", "train", train_args("--cskd-lambda", "-1"), "--cskd-lambda -1.0: must be >= 0",
        early=True),
    Row("byot-alpha-above-1", "train", train_args("--method", "byot", "--method-kwargs", "alpha=2"),
        "alpha=2.0 for method 'byot': must be in [0, 1]", early=True),
    Row("img-size-0", "train", train_args("--img-size", "0"), "--img-size 0: must be >= 1", early=True),
    Row("input-size-0", "train", train_args("--input-size", "3", "0", "32"), "--input-size 3 0 32", early=True),
    Row("smoothing-1.5", "train", train_args("--smoothing", "1.5"), "--smoothing 1.5: must be in [0, 1)",
        early=True),
    Row("weight-decay-negative", "train", train_args("--weight-decay", "-1"), "--weight-decay -1.0", early=True),
    Row("seed-negative", "train", train_args("--seed", "-1"), "--seed -1", early=True),
    Row("scale-reversed", "train", train_args("--scale", "0.9", "0.1"), "--scale 0.9 0.1", early=True),
    Row("hflip-2", "train", train_args("--hflip", "2"), "--hflip 2.0: must be in [0, 1]", early=True),
    Row("workers-negative", "train", train_args("-j", "-1"), "--workers -1: must be >= 0", early=True),
    Row("validation-batch-0", "train", train_args("-vb", "0"), "--validation-batch-size 0", early=True),
    # --- names timm or torch would refuse later
    Row("opt-unknown", "train", train_args("--opt", "adamww"), "--opt adamww", early=True),
    Row("opt-kwargs-unknown", "train", train_args("--opt-kwargs", "nosuch=1"), "--opt momentum (with --opt-kwargs",
        early=True),
    Row("sched-unknown", "train", train_args("--sched", "cosin"), "--sched cosin", early=True),
    Row("aa-unknown", "train", train_args("--aa", "randaug-m9"), "--aa randaug-m9: not a timm augmentation policy",
        early=True),
    Row("interpolation-unknown", "train", train_args("--train-interpolation", "cubic"),
        "--train-interpolation cubic", early=True),
    Row("crop-mode-unknown", "train", train_args("--train-crop-mode", "center"), "--train-crop-mode center",
        early=True),
    Row("mean-wrong-length", "train", train_args("--mean", "0.5", "0.5"), "--mean 0.5 0.5: expected 1 or 3 values",
        early=True),
    Row("std-zero", "train", train_args("--std", "0"), "--std 0.0: every value must be > 0", early=True),
    Row("device-cuda-without-one", "train", train_args("--device", "cuda"), "--device cuda: this machine has no cuda",
        early=True, skip_if=NO_CUDA),
    Row("device-nonsense", "train", train_args("--device", "gpu0"), "--device gpu0: not a torch device", early=True),
    # --- YAML
    yaml_row("yaml-syntax", "model: [test_resnet\nepochs: 1\n", "is not valid YAML"),
    yaml_row("yaml-epochs-word", "epochs: ten\n", "epochs: expected a number (int), got 'ten'"),
    yaml_row("yaml-batch-list", "batch_size: [8, 16]\n", "batch_size: expected one value, got the list [8, 16]"),
    yaml_row("yaml-epochs-fraction", "epochs: 2.5\n", "epochs: expected a number (int), got 2.5"),
    yaml_row("yaml-bool-flag-word", "pretrained: maybe\n", "pretrained: expected true or false, got 'maybe'"),
    yaml_row("yaml-learning-rate", "learning_rate: 0.1\n", "unknown key 'learning_rate'; did you mean 'lr'?"),
    yaml_row("yaml-typo", "modle: resnet50\n", "unknown key 'modle'; did you mean 'model'?"),
    yaml_row("yaml-unquoted-off", "cskd_mode: off\n", "quote it"),
    yaml_row("yaml-not-a-mapping", "- a\n- b\n", "expected a mapping"),
    Row("config-missing", "train", ["-c", "{tmp}/nope.yaml", *train_args()], "config file not found"),
    # --- files
    Row("pretrained-path-text", "train", train_args("--pretrained-path", "{tmp}/notes.txt"),
        "cannot create --model test_resnet from --pretrained-path", write("{tmp}/notes.txt", "not weights\n")),
    Row("pretrained-path-missing", "train", train_args("--pretrained-path", "{tmp}/nosuch.pth"),
        "--pretrained-path {tmp}/nosuch.pth: not found", early=True),
    Row("initial-checkpoint-text", "train", train_args("--initial-checkpoint", "{tmp}/notes.txt"),
        "cannot create --model test_resnet from --initial-checkpoint", write("{tmp}/notes.txt", "not weights\n")),
    Row("exclude-list-missing", "train", train_args("--exclude-list", "{tmp}/nosuch.txt"),
        "--exclude-list {tmp}/nosuch.txt: not found", early=True),
    Row("class-map-missing", "train", train_args("--class-map", "{tmp}/nosuch.txt"),
        "--class-map {tmp}/nosuch.txt: not found", early=True),
    Row("output-in-proc", "train", train_args(output="/proc/timm-cskd-x"), "--output /proc/timm-cskd-x"),
    Row("output-is-a-file", "train", train_args(output="{tmp}/file"), "--output {tmp}/file: cannot write",
        write("{tmp}/file", "x")),
    Row("resume-missing", "train", train_args("--resume", "{tmp}/nope.pth.tar"), "checkpoint not found", early=True),
    # --- the dataset
    Row("data-missing", "train", train_args(data="{tmp}/missing"), "does not exist"),
    Row("data-no-train", "train", train_args(data="{tmp}"), "no 'train' folder"),
    Row("val-split-typo", "train", train_args("--val-split", "vall"), "--val-split vall: no 'vall' folder"),
    Row("val-class-not-in-train", "train", train_args(data="{tmp}/d"), "has class folders ['class_009'] that the "
        "training split", copy_data(val_class_not_in_train)),
    Row("val-lacks-a-train-class", "train", train_args(data="{tmp}/d"), "the training split",
        copy_data(lambda r: shutil.rmtree(r / "val" / "class_003"))),
    Row("exclude-list-empties-a-class", "train", train_args("--exclude-list", "{tmp}/d/undecodable.txt",
        data="{tmp}/d"), "removes every training image of class class_002", copy_data(empty_one_class)),
    Row("list-file-missing-path", "train", train_args(data="{tmp}/d"), "names 1 file(s) that do not exist",
        copy_data(list_file_with_missing_path)),
    Row("num-classes-mismatch", "train", train_args("--num-classes", "10"), "--num-classes is 10 but"),
    Row("empty-class-folder", "train", train_args(data="{tmp}/d"), "holds no images",
        copy_data(lambda r: [p.unlink() for p in (r / "train" / "class_001").iterdir()])),
    # --- flags that already behaved (kept from regressing)
    Row("model-typo", "train", train_args("--model", "resnet5O"), "unknown model 'resnet5O'; did you mean"),
    Row("paired-odd-batch", "train", train_args("--cskd-mode", "paired", "-b", "7"), "even --batch-size",
        early=True),
    Row("plain-sampler-with-pairs", "train", train_args("--plain-sampler"), "--plain-sampler", early=True),
    Row("method-unknown", "train", train_args("--method", "cskdd"), "unknown --method 'cskdd'", early=True),
    Row("method-kwarg-unknown", "train", train_args("--method-kwargs", "temp=1"),
        "has no hyper-parameter 'temp'", early=True),
    Row("method-kwarg-type", "train", train_args("--method-kwargs", "temperature=warm"),
        "expected a float", early=True),
    Row("legacy-mode-disagrees", "train", train_args("--cskd-mode", "paired", "--method", "ce"),
        "--cskd-mode paired means --method cskd-paired", early=True),
    Row("refused-timm-flag", "train", train_args("--torchscript"), "--torchscript True", early=True),
    Row("epochs-0", "train", train_args("--epochs", "0"), "--epochs 0: must be >= 1", early=True),
    Row("grad-accum-0", "train", train_args("--grad-accum-steps", "0"), "--grad-accum-steps 0", early=True),
    Row("aug-repeats-half", "train", train_args("--aug-repeats", "0.5"), "--aug-repeats must be 0", early=True),
    Row("mixup-with-ddgsd", "train", train_args("--method", "ddgsd", "--mixup", "0.2"), "does not compose",
        early=True),
    Row("bce-with-adacos", "train", train_args("--bce-loss", "--method", "adacos"),
        "--method adacos does not combine with --bce-loss", early=True),
    Row("loss-weight-without-teacher", "train", train_args("--distill-loss-weight", "0.5"), "need a teacher",
        early=True),
    Row("argparse-bad-int", "train", train_args("-b", "eight"), "argument -b/--batch-size: invalid int value"),
    Row("argparse-bad-choice", "train", train_args("--amp-dtype", "float8"), "argument --amp-dtype: invalid choice"),
    Row("existing-run", "train", train_args(output="{run}/..", experiment="run"), "already holds a training run",
        keep="{run}"),
    # --- the destructive cases: the user's files are left byte-identical
    Row("overwrite-with-bad-lr", "train", train_args("--overwrite", "--lr", "-1", output="{run}/..", experiment="run"),
        "--lr -1.0: must be > 0", keep="{run}"),
    Row("overwrite-with-unloadable-weights", "train",
        train_args("--overwrite", "--pretrained-path", "{tmp}/notes.txt", output="{run}/..", experiment="run"),
        "cannot create --model", write("{tmp}/notes.txt", "not weights\n"), keep="{run}"),
    Row("export-into-foreign-folder", "export", ["--checkpoint", CKPT, "--output", "{tmp}/mine"],
        "is a folder of other files", foreign_folder, keep="{tmp}/mine"),
    Row("export-bad-metrics-over-earlier-export", "export",
        ["--checkpoint", CKPT, "--output", "{tmp}/exp", "--metrics", "{tmp}/bad.json"], "--metrics {tmp}/bad.json",
        lambda env: (earlier_export(env), write("{tmp}/bad.json", "{not json")(env)), keep="{tmp}/exp"),
    Row("export-missing-metrics", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new", "--metrics",
        "{tmp}/nope.json"], "--metrics {tmp}/nope.json: not found"),
    Row("export-output-is-a-file", "export", ["--checkpoint", CKPT, "--output", "{tmp}/file"],
        "is an existing file", write("{tmp}/file", "mine"), keep="{tmp}"),
    Row("export-missing-checkpoint", "export", ["--checkpoint", "{tmp}/nope.pth.tar", "--output", "{tmp}/new"],
        "checkpoint not found"),
    Row("export-push-offline", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new", "--push-to-hub", "me/m"],
        "--push-to-hub: HF_HUB_OFFLINE is set", environ={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}),
    Row("export-push-repo-without-owner", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new",
        "--push-to-hub", "resnet50-cskd"], "--push-to-hub resnet50-cskd: name the repository as ORG/NAME"),
    Row("export-push-bad-repo-id", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new", "--push-to-hub",
        "me/my model"], "--push-to-hub me/my model: not a valid repository id"),
    Row("export-private-without-push", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new", "--private"],
        "--private is for the upload: add --push-to-hub"),
    Row("export-revision-without-push", "export", ["--checkpoint", CKPT, "--output", "{tmp}/new", "--revision", "v1"],
        "--revision is for the upload: add --push-to-hub"),
    Row("export-text-checkpoint", "export", ["--checkpoint", "{tmp}/notes.txt", "--output", "{tmp}/new"],
        "is not a readable PyTorch checkpoint", write("{tmp}/notes.txt", "hello")),
    # --- evaluate
    Row("evaluate-data-missing", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{tmp}/missing"],
        "--data-dir {tmp}/missing does not exist"),
    Row("evaluate-shard-folder", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{tmp}/shards"],
        "is a tar shard folder (manifest.json)", write("{tmp}/shards/manifest.json", "{}")),
    Row("evaluate-checkpoint-missing", "evaluate", ["--checkpoint", "{tmp}/nope.pth", "--data-dir", "{data}"],
        "checkpoint not found"),
    Row("evaluate-split-missing", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--split", "test"],
        "no 'test' folder or list file"),
    Row("evaluate-calib-is-val", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--calib-split", "val",
        "-j", "0"], "shares 20 of its 20 images"),
    Row("evaluate-calib-copies-val", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{tmp}/d", "--calib-split",
        "calib", "-j", "0"], "holds byte-identical copies of 20 of its 20 images", copy_data(copies_of_val)),
    Row("evaluate-batch-0", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "-b", "0"],
        "--batch-size 0: must be >= 1"),
    Row("evaluate-img-size-0", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--img-size", "0"],
        "--img-size 0: must be >= 1"),
    Row("evaluate-device-cuda", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--device", "cuda"],
        "--device cuda: this machine has no cuda", skip_if=NO_CUDA),
    Row("evaluate-results-format-xml", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--results-file",
        "{tmp}/r.xml", "--results-format", "xml"], "argument --results-format: invalid choice: 'xml'"),
    Row("evaluate-results-file-is-a-folder", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}",
        "--results-file", "{tmp}"], "--results-file {tmp} is a folder"),
    Row("evaluate-output-is-a-file", "evaluate", ["--checkpoint", CKPT, "--data-dir", "{data}", "--output",
        "{tmp}/file"], "--output {tmp}/file is an existing file", write("{tmp}/file", "x")),
    # --- compare and figures
    Row("compare-no-metrics", "compare", ["{tmp}"], "metrics.json not found"),
    Row("compare-malformed-metrics", "compare", ["{tmp}/e"], "{tmp}/e/metrics.json is not a readable",
        write("{tmp}/e/metrics.json", '{"top1_err": 3.0,')),
    Row("compare-metrics-not-numbers", "compare", ["{tmp}/e"], "not numbers",
        write("{tmp}/e/metrics.json", '{"top1_err": "three"}')),
    Row("compare-malformed-reliability", "compare", ["{tmp}/e", "--output", "{tmp}/c.png"],
        "reliability.json is not a readable", lambda env: (write("{tmp}/e/metrics.json", '{"top1_err": 3}')(env),
                                                           write("{tmp}/e/reliability.json", "[1, 2]")(env))),
    Row("compare-names-count", "compare", ["{tmp}", "--names", "a", "b"], "2 names for 1 runs"),
    Row("figures-names-count", "figures", ["{tmp}", "--names", "a", "b"], "2 --names for 1 runs"),
    Row("figures-no-predictions", "figures", ["{tmp}/missing", "--output", "{tmp}/f"], "predictions.npz not found"),
    # --- study: refused at plan time, also with --dry-run
    Row("study-seeds-repeated", "study", ["--data-dir", "{data}", "--methods", "ce", "--seeds", "1", "1",
        "--output", "{tmp}/s", "--dry-run"], "seeds must be distinct"),
    Row("study-temperature-0", "study", ["--data-dir", "{data}", "--methods", "cskd:temperature=0", "--output",
        "{tmp}/s", "--dry-run"], "temperature=0.0 for method 'cskd': must be > 0"),
    Row("study-lambda-negative-sweep", "study", ["--data-dir", "{data}", "--sweep", "cskd", "lambda=1,-1",
        "--output", "{tmp}/s", "--dry-run"], "lambda=-1.0 for method 'cskd': must be >= 0"),
    Row("study-unknown-method", "study", ["--data-dir", "{data}", "--methods", "cskdd", "--output", "{tmp}/s",
        "--dry-run"], "unknown --method 'cskdd'"),
    Row("study-eval-results-file", "study", ["--data-dir", "{data}", "--methods", "ce", "--output", "{tmp}/s",
        "--eval-args=--results-file r.csv", "--dry-run"], "--results-file, which the study sets per cell"),
    Row("study-data-missing", "study", ["--data-dir", "{tmp}/missing", "--methods", "ce", "--output", "{tmp}/s",
        "--dry-run"], "does not exist"),
    # --- benchmark
    Row("benchmark-rounds-0", "benchmark", ["--rounds", "0", "--model", "test_resnet", "--device", "cpu"],
        "--rounds 0: must be >= 1"),
    Row("benchmark-data-missing", "benchmark", ["--data-dir", "{tmp}/missing", "--model", "test_resnet",
        "--device", "cpu"], "--data-dir {tmp}/missing does not exist"),
    Row("benchmark-trainer-flag-typo", "benchmark", ["--model", "test_resnet", "--method", "cskdd"],
        "unknown --method 'cskdd'"),
    # --- shards
    Row("shards-size-unit", "shards", ["--data-dir", "{data}", "--output", "{tmp}/s", "--shard-size", "12XB"],
        "--shard-size '12XB': expected a size such as 512MB"),
    Row("shards-samples-0", "shards", ["--data-dir", "{data}", "--output", "{tmp}/s", "--shard-samples", "0"],
        "--shard-samples 0: must be >= 1"),
    Row("shards-data-missing", "shards", ["--data-dir", "{tmp}/missing", "--output", "{tmp}/s"],
        "--data-dir {tmp}/missing does not exist"),
    Row("shards-into-a-user-folder", "shards", ["--data-dir", "{data}", "--output", "{tmp}/mine"],
        "--output {tmp}/mine is not empty", write("{tmp}/mine/notes.txt", "mine\n"), keep="{tmp}/mine"),
    # --- prepare and verify
    Row("prepare-source-missing", "prepare", ["--source", "{tmp}/missing", "--output", "{tmp}/p"], "{tmp}/missing"),
    Row("verify-data-missing", "verify", ["--data-dir", "{tmp}/missing", "--output", "{tmp}/u.txt"],
        "--data-dir {tmp}/missing does not exist"),
    Row("verify-workers-0", "verify", ["--data-dir", "{data}", "--output", "{tmp}/u.txt", "-j", "0"],
        "--workers 0: must be >= 1"),
    Row("verify-output-folder-missing", "verify", ["--data-dir", "{data}", "--output", "{tmp}/no/u.txt"],
        "--output {tmp}/no/u.txt: not a file in an existing folder"),
]  # fmt: skip


def checksums(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256, except the run's log, lock and index cache (appended
    to, rewritten and rebuilt by any run's start, never the user's results)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("log.txt", ".run.lock") and "index-cache" not in p.parts
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished one-epoch cosine run: last.pth.tar, model_best, summary.csv, status.json."""
    out = tmp_path_factory.mktemp("runs")
    assert trainer.main(train_args(data=str(tiny), output=str(out))) == 0
    return out / "run"


@pytest.fixture
def env(tmp_path, tiny, finished_run):
    work = tmp_path / "w"
    work.mkdir()
    run = tmp_path / "runs" / "run"
    shutil.copytree(finished_run, run)
    return Env(work, tiny, run)


def call(tool: str, argv: list[str]) -> int:
    try:
        return TOOLS[tool](argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input_is_one_clear_error_and_destroys_nothing(row, env, capsys, monkeypatch):
    if row.skip_if:
        pytest.skip("this machine has the device the row says is missing")
    for variable, value in row.environ.items():
        monkeypatch.setenv(variable, value)
    if row.setup is not None:
        row.setup(env)
    kept = Path(env.fill(row.keep)) if row.keep else None
    before = checksums(kept) if kept else None
    argv = [env.fill(a) for a in row.argv]
    capsys.readouterr()
    code = call(row.tool, argv)
    err = capsys.readouterr().err
    assert code == row.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert env.fill(row.message) in errors[0], errors[0]
    if row.early:
        assert not (env.tmp / "out").exists(), "failed only after creating the experiment folder"
    if kept is not None:
        assert checksums(kept) == before


@pytest.mark.slow
def test_the_script_itself_prints_one_line_and_no_traceback(tmp_path, tiny):
    """train_imagenet.py in its own process, on a YAML syntax error."""
    config = tmp_path / "c.yaml"
    config.write_text("epochs: [1\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_imagenet.py"), "-c", str(config), "--data-dir", str(tiny)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: {config}: line ") and "is not valid YAML" in result.stderr


def test_overwrite_still_replaces_the_run_once_it_is_checked(env):
    before = checksums(env.run)
    assert (
        trainer.main(
            train_args("--overwrite", "--epochs", "1", data=str(env.data), output=str(env.run.parent))
        )
        == 0
    )
    after = checksums(env.run)
    assert after.keys() >= {"last.pth.tar", "summary.csv", "status.json"}
    assert after["last.pth.tar"] != before["last.pth.tar"]
    assert len((env.run / "summary.csv").read_text().splitlines()) == 2, "the old summary rows were kept"


def test_export_replaces_its_own_earlier_export_whole(env):
    earlier_export(env)
    folder = env.tmp / "exp"
    (folder / "README.md").write_text("stale card")
    metrics = env.tmp / "metrics.json"
    metrics.write_text(json.dumps({"top1_err": 12.5, "num_samples": 20}))
    assert (
        export.main(
            [
                "--checkpoint",
                str(env.run / "last.pth.tar"),
                "--output",
                str(folder),
                "--metrics",
                str(metrics),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "12.5" in (folder / "README.md").read_text()
    assert not [p for p in env.tmp.iterdir() if p.name.startswith(".exp")], "a staging folder was left behind"


def test_resume_with_more_epochs_rebuilds_the_finished_cosine_schedule(env, capsys):
    """A finished 1-epoch cosine run continued to 2 epochs trains epoch 2 on timm's 2-epoch cosine, not at
    the old schedule's final learning rate 0."""
    argv = train_args("--resume", "auto", "--epochs", "2", data=str(env.data), output=str(env.run.parent))
    assert trainer.main(argv) == 0
    assert "the cosine schedule is rebuilt for 2 epochs" in capsys.readouterr().out
    rows = (env.run / "summary.csv").read_text().splitlines()
    lr_column = rows[0].split(",").index("lr")
    base, t, total = 0.05, 1, 2  # timm's CosineLRScheduler, no warmup, min_lr 0
    assert float(rows[2].split(",")[lr_column]) == pytest.approx(
        0.5 * base * (1 + math.cos(math.pi * t / total))
    )


def test_a_single_image_class_under_a_pair_method_warns_once_naming_it(caplog):
    import numpy as np

    index = ImageIndex("/d", ["a/0", "b/0", "b/1", "c/0"], np.array([0, 1, 1, 2]), ["a", "b", "c"])
    with caplog.at_level("WARNING"):
        warn_single_image_classes(index, get_method("cskd"))
        warn_single_image_classes(index, get_method("ce"))
    assert len(caplog.records) == 1
    assert "2 class(es) have a single training image (a, c)" in caplog.records[0].getMessage()
    assert "--method cskd pairs each with itself" in caplog.records[0].getMessage()


def test_a_dataset_without_validation_split_warns_and_trains(tmp_path, tiny, capsys):
    root = tmp_path / "d"
    shutil.copytree(tiny / "train", root / "train")
    assert trainer.main(train_args(data=str(root), output=str(tmp_path / "out"))) == 0
    assert "no validation split" in capsys.readouterr().out
