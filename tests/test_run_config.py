"""The typed run configuration: every flag is one section's field, typed as its default, frozen, and the
flat form round-trips every packaged config as the namespace holds it."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
from timm.optim import optimizer_kwargs
from timm.scheduler import scheduler_kwargs

from timm_cskd.config import (
    CONFIG_DIR,
    REFUSED,
    ConfigError,
    RunConfig,
    build_parser,
    parse_args,
    timm_namespace,
)
from timm_cskd.config.run_config import REFUSED_FIELDS, SECTIONS


def _dests() -> list[str]:
    return [a.dest for a in build_parser()._actions if a.dest != "help"]


def _fields() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, []).append(name)
    return found


def test_every_flag_is_exactly_one_sections_field():
    fields = _fields()
    expected = [d for d in _dests() if d not in REFUSED or d in REFUSED_FIELDS]
    assert sorted(fields) == sorted(expected)
    assert {name: where for name, where in fields.items() if len(where) != 1} == {}
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)


def _admits(annotation, value) -> bool:
    """``value`` is of the type ``annotation`` spells (an int is a float, PEP 484's numeric tower)."""
    if isinstance(annotation, types.UnionType):
        return any(_admits(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item, _) = typing.get_args(annotation)
        return isinstance(value, tuple) and all(_admits(item, v) for v in value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def test_field_types_agree_with_the_flag_defaults_and_a_config_sets():
    config = RunConfig.from_namespace(parse_args([]))
    recipe = RunConfig.from_namespace(parse_args(["-c", "resnet50_cskd", "--input-size", "3", "64", "64"]))
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for c in (config, recipe):
                value = getattr(getattr(c, name), f.name)
                assert _admits(hints[f.name], value), (f.name, hints[f.name], value)
    # Independently of the annotations: a flag of several values is a tuple, a KEY=VALUE flag a dict.
    assert recipe.model.input_size == (3, 64, 64)
    assert config.data.scale == (0.08, 1.0) and config.optim.decay_milestones == (90, 180, 270)
    assert config.method.method_kwargs == {}


def test_frozen_and_replace_makes_a_new_configuration():
    config = RunConfig.from_namespace(parse_args(["--lr", "0.5"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim = config.optim
    changed = config.replace(lr=0.25, num_classes=7, scale=[0.5, 1.0])
    assert (changed.optim.lr, changed.model.num_classes, changed.data.scale) == (0.25, 7, (0.5, 1.0))
    assert (config.optim.lr, config.model.num_classes) == (0.5, None)
    assert changed.runtime is config.runtime
    with pytest.raises(KeyError):
        config.replace(no_such_flag=1)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if "study" not in p.stem))
def test_to_dict_round_trips_every_packaged_config(name):
    args = parse_args(["-c", name])
    config = RunConfig.from_namespace(args)
    flat = config.to_dict()
    # The namespace's keys in its order (args.yaml's), with its values as the command line gave them.
    assert list(flat) == list(vars(args))
    assert flat == vars(args)
    assert RunConfig.from_dict(flat) == config


def test_study_grids_are_not_trainer_configs():
    # The study configs are grids (their keys are not flags); the trainer refuses them by name.
    with pytest.raises(ConfigError):
        parse_args(["-c", "study_fashion_mnist"])


def test_from_dict_ignores_unknown_keys_and_defaults_missing_ones():
    full = RunConfig.from_namespace(parse_args(["--model", "resnet18", "--epochs", "3"])).to_dict()
    older = {k: v for k, v in full.items() if k not in ("ece_bins", "wandb_tags")}
    older["a_flag_of_an_older_release"] = 1
    config = RunConfig.from_dict(older)
    assert (config.model.model, config.optim.epochs) == ("resnet18", 3)
    assert (config.output.ece_bins, config.output.wandb_tags) == (20, ())


def test_refused_flag_is_refused_at_the_conversion():
    with pytest.raises(ConfigError, match="--tta 2"):
        RunConfig.from_namespace(parse_args(["--tta", "2"]))
    # Refused flags keep timm's default in the flat form.
    flat = RunConfig.from_namespace(parse_args(["--dataset", "folder"])).to_dict()
    assert flat["tta"] == 0 and flat["dataset"] == "folder"


def test_a_configuration_built_in_python_is_refused_a_timm_dataset_before_any_folder(tmp_path):
    """The command line refuses --dataset torch/...; a RunConfig made in Python passes resolve_run."""
    from timm_cskd.experiment import resolve_run

    config = RunConfig.from_dict({"dataset": "torch/cifar10", "output": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="--dataset 'torch/cifar10'"):
        resolve_run(config)
    assert not (tmp_path / "out").exists()
    assert resolve_run(config.replace(dataset="wds/imagenet")).config.data.dataset == "wds/imagenet"


def test_the_flat_form_never_hands_out_a_shared_default():
    flat = RunConfig.from_namespace(parse_args([])).to_dict()
    listed = [k for k, v in flat.items() if isinstance(v, list)]
    assert listed, "some flag defaults are lists"
    for key in listed:
        flat[key].append("changed")
    again = RunConfig.from_namespace(parse_args([])).to_dict()
    assert all("changed" not in again[key] for key in listed)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--opt", "adamw", "--opt-betas", "0.8", "0.9", "--opt-eps", "1e-7", "--layer-decay", "0.7"],
        ["--sched", "multistep", "--decay-milestones", "3", "6", "--lr-noise", "0.2", "0.5", "--seed", "9"],
        ["--sched", "plateau", "--eval-metric", "loss", "--sched-on-updates"],
    ],
)
def test_timm_namespace_gives_timm_what_the_command_line_would(argv):
    args = parse_args(["--lr", "0.3", *argv])
    config = RunConfig.from_namespace(args)
    ns = timm_namespace(config.optim, seed=config.runtime.seed, eval_metric=config.output.eval_metric)
    assert optimizer_kwargs(ns) == optimizer_kwargs(args)
    for decreasing in (None, True):
        assert scheduler_kwargs(ns, decreasing) == scheduler_kwargs(args, decreasing)


def test_wandb_starts_from_a_recipe_whose_tags_are_null(tmp_path, monkeypatch):
    """YAML values skip argparse's nargs: ``wandb_tags: null`` reaches the scalar log as None."""
    from timm_cskd.scalars import ScalarLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("log_wandb: true\nwandb_project: offline-test\nwandb_tags: null\n")
    config = RunConfig.from_namespace(parse_args(["-c", str(recipe), "--experiment", "tags"]))
    assert config.output.wandb_tags is None
    log = ScalarLog(config.output, tmp_path, config.to_dict())
    try:
        assert list(log.wandb.tags) == []
    finally:
        log.close()
