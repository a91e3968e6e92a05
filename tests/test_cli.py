"""The ``timm-cskd`` command and the packaged configs: subcommands forward to each tool, ``-c NAME``
finds the shipped recipes from any folder."""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from timm_cskd import cli, study
from timm_cskd import train as trainer
from timm_cskd.config import (
    CONFIG_DIR,
    ConfigError,
    build_parser,
    config_names,
    load_yaml_defaults,
    parse_args,
)

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_installed_tool_with_its_main(capsys):
    assert cli.main(["--help"]) == 0
    printed = capsys.readouterr().out
    listed = [line.split()[0] for line in printed.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    for name in ("train", "evaluate", "export", "compare", "figures", "study", "prepare", "verify"):
        assert name in listed
    for name in listed:
        module, _, function = cli.COMMANDS[name][0].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
    # With no command: the same listing, as an error.
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_unknown_command_is_an_error_listing_the_valid_ones(capsys):
    assert cli.main(["trian", "-c", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'; did you mean 'train'?")
    assert "evaluate" in err and "study" in err and "Traceback" not in err


def test_a_subcommand_gets_the_rest_of_the_command_line(capsys):
    assert cli.main(["train", "--list-methods"]) == 0
    via_cli = capsys.readouterr().out
    assert trainer.main(["--list-methods"]) == 0
    assert via_cli == capsys.readouterr().out and "cskd-paired" in via_cli
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--help"])
    assert stop.value.code == 0 and "--checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_a_tools_usage_line_names_the_command_the_user_typed(name, capsys):
    """``timm-cskd evaluate --help`` and a bad flag say ``timm-cskd evaluate``; the tool run on its own
    keeps its own spelling, and the dispatcher's name does not outlive the call."""
    module, _, function = cli.COMMANDS[name][0].partition(":")
    tool = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit):
        cli.main([name, "--no-such-flag"])
    err = capsys.readouterr().err
    assert err.startswith(f"usage: timm-cskd {name} "), err[:200]
    assert f"\ntimm-cskd {name}: error: " in err
    with pytest.raises(SystemExit):
        tool(["--no-such-flag"])
    direct = capsys.readouterr().err
    # On its own the tool names a command that exists in the installed package: python -m MODULE.
    assert direct.startswith("usage: python -m timm_cskd"), direct[:200]
    runnable = direct.split()[3]
    spec = importlib.util.find_spec(runnable)
    if spec.submodule_search_locations:  # a package runs its __main__ module
        assert importlib.util.find_spec(f"{runnable}.__main__") is not None, runnable
    else:
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), runnable
    assert f"\n{direct.split()[1]} -m {runnable}: error: " in direct


def test_the_checkout_script_names_itself(tmp_path):
    """``python train_imagenet.py --bad-flag`` says train_imagenet.py, the command the user typed."""
    result = subprocess.run(
        [sys.executable, str(REPO / "train_imagenet.py"), "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: train_imagenet.py "), result.stderr[:200]
    assert "\ntrain_imagenet.py: error: unrecognized arguments: --no-such-flag" in result.stderr


def test_the_repository_configs_folder_is_the_packaged_one():
    assert (REPO / "configs").resolve() == CONFIG_DIR
    assert config_names() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"demo", "resnet50_cskd", "finetune_cskd", "study_fashion_mnist"} <= set(config_names())


def test_a_config_name_means_the_packaged_file_from_any_folder(tmp_path, monkeypatch):
    by_path = vars(parse_args(["-c", str(REPO / "configs" / "resnet50_cskd.yaml")]))
    monkeypatch.chdir(tmp_path)
    by_name = vars(parse_args(["-c", "resnet50_cskd"]))
    assert by_name.pop("config") == str(CONFIG_DIR / "resnet50_cskd.yaml")
    by_path.pop("config")
    assert by_name == by_path and by_name["model"] == "resnet50"

    with pytest.raises(ConfigError, match=r"config 'resnet50_ksdc' is neither .*packaged: demo, ") as e:
        parse_args(["-c", "resnet50_ksdc"])
    assert all(name in str(e.value) for name in config_names())
    # A path is a path: no fallback to the package.
    with pytest.raises(ConfigError, match="config file not found: resnet50_cskd.yaml"):
        parse_args(["-c", "resnet50_cskd.yaml"])
    # A file in the current folder wins over the packaged config of the same name.
    Path("resnet50_cskd").write_text("epochs: 7\n")
    assert parse_args(["-c", "resnet50_cskd"]).epochs == 7


def test_packaged_grids_and_their_base_configs_resolve_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grids = [
        n for n in config_names() if "base_config" in yaml.safe_load((CONFIG_DIR / f"{n}.yaml").read_text())
    ]
    assert grids
    for name in grids:
        grid = study.load_grid(name)
        assert load_yaml_defaults(grid["base_config"], build_parser())["model"] == "resnet18"
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    planned = study.plan_study(tmp_path / "out", {"d": data}, ["ce"], base_config="demo")
    assert planned.base_config == CONFIG_DIR / "demo.yaml"
    assert planned.cells[0].train_command()[:3] == [sys.executable, "-m", "timm_cskd.train"]
    with pytest.raises(study.StudyError, match="base config: config 'dmeo' is neither"):
        study.plan_study(tmp_path / "out", {"d": data}, ["ce"], base_config="dmeo")


def test_train_without_config_or_data_is_the_packaged_demo_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("model: not_the_demo\n")  # a file named like the config does not replace it
    started = []
    monkeypatch.setattr(trainer, "run", started.append)
    assert cli.main(["train", "--epochs", "1"]) == 0
    (args,) = started
    assert args.config == str(CONFIG_DIR / "demo.yaml") and args.data_dir is None
    assert (args.model, args.experiment, args.epochs) == ("resnet18", "demo", 1)
