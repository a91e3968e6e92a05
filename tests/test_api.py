"""The Python API (timm_cskd.api): the README's example runs as written, the API trains what the command
line trains, refusals are exceptions raised before any folder, and sys.argv is neither read nor changed."""

import argparse
import csv
import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from timm_cskd import api, evaluate, export
from timm_cskd.checkpoint import CheckpointError
from timm_cskd.config import ConfigError
from timm_cskd.data.demo import LAYOUT_VERSION

REPO = Path(__file__).resolve().parent.parent
# The README example's training settings, as flags.
DEMO_FLAGS = ["-c", "demo", "--epochs", "1", "--model", "test_resnet", "--workers", "0"]


def readme_example() -> str:
    section = (
        (REPO / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    )
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one runnable example"
    return blocks[0]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A stand-in for the demo dataset in a cache of the module's own: its layout (ten digit classes,
    train/ and val/, the completion marker) with 8 + 2 images a class (one batch of the demo's 64), so
    the README example runs as written in seconds rather than over the 5,000 digits."""
    cache = tmp_path_factory.mktemp("cache")
    root = cache / "mnist_5k"
    make_image_folder(root / "train", [8] * 10, size=(28, 28), noise=60)
    make_image_folder(root / "val", [2] * 10, size=(28, 28), noise=60)
    (root / ".complete").write_text(LAYOUT_VERSION)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIMM_CSKD_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def example(demo_cache, tmp_path_factory):
    """The README example run in a fresh folder: its variables and that folder."""
    cwd = tmp_path_factory.mktemp("readme")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        scope: dict = {"__name__": "readme_example"}
        exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)
    finally:
        os.chdir(before)
    return scope, cwd


def test_readme_example_trains_evaluates_exports_and_timm_loads_it(example, demo_cache):
    scope, cwd = example
    trained, metrics, folder, model = scope["trained"], scope["metrics"], scope["folder"], scope["model"]
    assert trained.folder == Path("runs") / "demo" and (cwd / trained.folder / "args.yaml").is_file()
    assert trained.data_dir == demo_cache / "mnist_5k"
    val_images = sum(1 for p in (trained.data_dir / "val").rglob("*.jpg"))
    assert trained.metrics["num_samples"] == metrics["num_samples"] == val_images
    # The evaluation of the checkpoint the run validated last gives the run's own validation error.
    assert metrics["top1_err"] == pytest.approx(trained.metrics["top1_err"], abs=1e-6)
    assert (cwd / metrics["output"] / "metrics.json").is_file()
    assert (cwd / folder / "model.safetensors").is_file()
    # timm's rebuild from the export holds the checkpoint's weights.
    state = torch.load(cwd / trained.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    loaded = model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert scope["logits"].shape == (1, 10)


def test_the_api_trains_what_the_command_line_trains(example, demo_cache, tmp_path):
    scope, cwd = example
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIMM_CSKD_CACHE": str(demo_cache)}
    subprocess.run(
        [sys.executable, "-m", "timm_cskd", "train", *DEMO_FLAGS, "--output", "runs"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )

    def rows(run_dir):  # every column but the measured speed
        with open(run_dir / "summary.csv", newline="") as f:
            return [{k: v for k, v in row.items() if k != "train_img_per_sec"} for row in csv.DictReader(f)]

    api_rows, cli_rows = rows(cwd / "runs/demo"), rows(tmp_path / "runs/demo")
    assert api_rows == cli_rows and len(cli_rows) == 1
    assert float(cli_rows[0]["eval_top1_err"]) == pytest.approx(scope["trained"].metrics["top1_err"])
    api_weights = torch.load(cwd / "runs/demo/last.pth.tar", map_location="cpu", weights_only=False)
    cli_weights = torch.load(tmp_path / "runs/demo/last.pth.tar", map_location="cpu", weights_only=False)
    assert all(torch.equal(v, cli_weights["state_dict"][k]) for k, v in api_weights["state_dict"].items())


def test_keywords_are_flags_over_the_yaml_as_on_the_command_line():
    assert api.train_config("demo", epochs=1, model="test_resnet", workers=0) == api.train_config_from_argv(
        DEMO_FLAGS
    )
    # A new method drops the YAML's method_kwargs, as --method does; lists become the section's tuples.
    given = api.train_config("demo", method="ce", scale=[0.25, 1.0], method_kwargs={})
    assert given == api.train_config_from_argv(["-c", "demo", "--method", "ce", "--scale", "0.25", "1.0"])
    assert given.data.scale == (0.25, 1.0) and given.method.method == "ce"
    assert api.train_config(None).model.model == "resnet50"  # no config: the flag defaults


def test_keywords_take_what_the_command_line_would_make_of_them(tmp_path):
    """A path, one value for a many-valued flag, and a bare optional-value flag, as argv would give them."""
    given = api.train_config("demo", output=tmp_path / "runs", decay_milestones=30, torchcompile=True)
    expected = api.train_config_from_argv(
        ["-c", "demo", "--output", str(tmp_path / "runs"), "--decay-milestones", "30", "--torchcompile"]
    )
    assert given == expected
    assert (given.output.output, given.optim.decay_milestones, given.runtime.torchcompile) == (
        str(tmp_path / "runs"),
        (30,),
        "inductor",
    )
    assert api.train_config("demo", torchcompile=False).runtime.torchcompile is None
    # A flag that takes exactly three values refuses two, as --input-size 224 224 does.
    with pytest.raises(ConfigError, match=r"^train_config: input_size: expected 3 values, got \[3, 224\]$"):
        api.train_config("demo", input_size=(3, 224))


def test_training_in_a_notebook_leaves_its_logging_as_it_was(demo_cache, tmp_path):
    """The trainer's handlers (stdout, log.txt) come off when it ends and the caller's come back."""
    root = logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())
    root.addHandler(mine)
    before, level = list(root.handlers), root.level
    try:
        trained = api.train(api.train_config_from_argv([*DEMO_FLAGS, "--output", str(tmp_path)]))
        assert list(root.handlers) == before and root.level == level
        logging.getLogger("timm_cskd.test").warning("after the run")
        assert "after the run" not in (tmp_path / trained.folder.name / "log.txt").read_text()
        assert "after the run" in mine.stream.getvalue()
    finally:
        root.removeHandler(mine)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 1}, r"^train_config: unknown key 'epoch'; did you mean 'epochs'\?$"),
        ({"epochs": "many"}, r"^train_config: epochs: expected a number \(int\), got 'many'$"),
        ({"clip_mode": "max"}, r"^train_config: clip_mode: 'max' is not one of norm, value, agc$"),
        ({"batch_size": 3, "method": "cskd-paired"}, r"^--method cskd-paired needs an even --batch-size"),
    ],
)
def test_a_bad_value_raises_config_error_before_any_folder(tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        api.train_config("demo", output=str(out), **overrides)
    assert not out.exists()


def test_train_refuses_a_changed_configuration_before_any_folder(tmp_path):
    config = api.train_config("demo", output=str(tmp_path / "out")).replace(
        batch_size=3, method="cskd-paired"
    )
    with pytest.raises(ConfigError, match="needs an even --batch-size"):
        api.train(config)
    assert not (tmp_path / "out").exists()


def test_evaluate_and_export_refuse_before_writing(example, tmp_path):
    scope, cwd = example
    checkpoint, data_dir = cwd / scope["trained"].checkpoint, scope["trained"].data_dir
    with pytest.raises(ConfigError, match="--batch-size 0: must be >= 1"):
        api.evaluate(checkpoint, data_dir, batch_size=0, output=str(tmp_path / "eval"))
    with pytest.raises(ConfigError, match="--results-format xml: must be one of csv, json"):
        api.evaluate(checkpoint, data_dir, results_format="xml", output=str(tmp_path / "eval"))
    with pytest.raises(CheckpointError, match="--revision is for the upload"):
        api.export(checkpoint, tmp_path / "exported", revision="v1")
    with pytest.raises(TypeError):
        api.export(checkpoint, tmp_path / "exported", push="me/model")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "exported").exists()


def test_the_api_neither_reads_nor_changes_sys_argv(monkeypatch):
    argv = ["notebook-kernel", "--epochs", "7", "--method", "nonsense", "-f", "/run/kernel.json"]
    monkeypatch.setattr(sys, "argv", list(argv))
    config = api.train_config("demo", epochs=2)
    assert (config.optim.epochs, config.method.method) == (2, "cskd")
    assert api.train_config_from_argv(["-c", "demo"]).optim.epochs == 4
    assert sys.argv == argv


@pytest.mark.parametrize(
    "tool, config_cls", [(evaluate, evaluate.EvaluateConfig), (export, export.ExportConfig)]
)
def test_tool_configurations_are_the_parsers_flags_with_their_defaults(tool, config_cls):
    actions = [a for a in tool.build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    fields = dataclasses.fields(config_cls)
    assert [f.name for f in fields] == [a.dest for a in actions]
    for field, action in zip(fields, actions):
        if action.required:
            assert field.default is dataclasses.MISSING, field.name
        else:
            assert field.default == action.default, field.name
    parsed = tool.build_parser().parse_args(
        ["--checkpoint", "c", "--data-dir" if tool is evaluate else "--output", "d"]
    )
    assert dataclasses.asdict(config_cls.from_namespace(parsed)) == vars(parsed)
