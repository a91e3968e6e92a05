"""timm train.py compatibility: every flag of timm's train.py is accepted or refused by name, timm's own
args.yaml runs unchanged, and each setting builds what timm builds from it (transforms, optimizer groups,
schedule, BCE, model arguments); gradient accumulation, fine-tuning, wandb and TensorBoard."""

import csv
import os

import pytest
import timm
import torch
from conftest import PLAIN_RECIPE, make_image_folder, make_tiny_dataset
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_cskd.config import REFUSED, ConfigError, build_parser, parse_args
from timm_cskd.train import Trainer, main, run

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TIMM_ARGS_YAML = os.path.join(FIXTURES, "timm_train_args.yaml")

# Every option of timm's train.py at huggingface/pytorch-image-models aa4b5850 (2026-08-08), the
# commit whose train.py wrote fixtures/timm_train_args.yaml; "data" is its deprecated positional.
TIMM_TRAIN_FLAGS = [
    "data", "--data-dir", "--dataset", "--train-split", "--val-split", "--train-num-samples",
    "--val-num-samples", "--dataset-download", "--class-map", "--input-img-mode", "--input-key",
    "--target-key", "--dataset-trust-remote-code", "--model", "--pretrained", "--pretrained-path",
    "--initial-checkpoint", "--resume", "--no-resume-opt", "--num-classes", "--gp", "--img-size",
    "--in-chans", "--input-size", "--crop-pct", "--mean", "--std", "--interpolation", "--batch-size",
    "--validation-batch-size", "--channels-last", "--fuser", "--grad-accum-steps", "--grad-checkpointing",
    "--fast-norm", "--model-kwargs", "--head-init-scale", "--head-init-bias", "--torchcompile-mode",
    "--torchscript", "--torchcompile", "--device", "--amp", "--amp-dtype", "--model-dtype", "--no-ddp-bb",
    "--synchronize-step", "--local_rank", "--device-modules", "--opt", "--opt-eps", "--opt-betas",
    "--momentum", "--weight-decay", "--clip-grad", "--clip-mode", "--layer-decay",
    "--layer-decay-min-scale", "--layer-decay-no-opt-scale", "--opt-kwargs", "--sched",
    "--sched-on-updates", "--lr", "--lr-base", "--lr-base-size", "--lr-base-scale", "--lr-noise",
    "--lr-noise-pct", "--lr-noise-std", "--lr-cycle-mul", "--lr-cycle-decay", "--lr-cycle-limit",
    "--lr-k-decay", "--warmup-lr", "--min-lr", "--epochs", "--epoch-repeats", "--start-epoch",
    "--decay-milestones", "--decay-epochs", "--warmup-epochs", "--warmup-prefix", "--cooldown-epochs",
    "--patience-epochs", "--dr", "--no-aug", "--train-crop-mode", "--scale", "--ratio", "--hflip",
    "--vflip", "--color-jitter", "--color-jitter-prob", "--grayscale-prob", "--gaussian-blur-prob", "--aa",
    "--aug-repeats", "--aug-splits", "--jsd-loss", "--bce-loss", "--bce-sum", "--bce-target-thresh",
    "--bce-pos-weight", "--reprob", "--remode", "--recount", "--resplit", "--mixup", "--cutmix",
    "--cutmix-minmax", "--mixup-prob", "--mixup-switch-prob", "--mixup-mode", "--mixup-off-epoch",
    "--smoothing", "--train-interpolation", "--drop", "--drop-connect", "--drop-path", "--drop-block",
    "--bn-momentum", "--bn-eps", "--sync-bn", "--dist-bn", "--split-bn", "--model-ema",
    "--model-ema-force-cpu", "--model-ema-decay", "--model-ema-warmup", "--seed", "--worker-seeding",
    "--log-interval", "--val-interval", "--recovery-interval", "--checkpoint-hist", "--workers",
    "--save-images", "--pin-mem", "--no-prefetcher", "--output", "--experiment", "--eval-metric", "--tta",
    "--use-multi-epochs-loader", "--log-wandb", "--wandb-project", "--wandb-tags", "--wandb-resume-id",
    "--train-img-sizes", "--train-batch-sizes", "--train-size-probs", "--train-size-schedule",
    "--train-size-schedule-spread", "--train-size-random-mix", "--train-steps-per-epoch",
    "--variable-batch-loss-scale", "--naflex-loader", "--naflex-train-seq-lens", "--naflex-max-seq-len",
    "--naflex-patch-sizes", "--naflex-patch-size-probs", "--naflex-loss-scale",
    "--naflex-patchify-channels-first", "--kd-model-name", "--kd-distill-type", "--kd-loss-type",
    "--distill-loss-weight", "--task-loss-weight", "--kd-temperature", "--kd-student-feature-dim",
    "--kd-teacher-feature-dim", "--kd-token-distill-type",
]  # fmt: skip

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("compat"), val_per_class=3, val_split="validation")


def test_every_timm_flag_is_accepted_or_refused_by_name():
    parser = build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    positionals = {action.dest for action in parser._actions if not action.option_strings}
    assert len(TIMM_TRAIN_FLAGS) == 172
    missing = [f for f in TIMM_TRAIN_FLAGS if f not in options and f not in positionals]
    assert not missing, f"timm train.py flags this parser does not know: {missing}"
    dests = {action.dest for action in parser._actions}
    assert set(REFUSED) <= dests
    # A refused flag at a non-default value stops the run naming the flag and why.
    for dest, (default, reason) in REFUSED.items():
        args = parse_args(["--data-dir", "unused"])
        setattr(args, dest, "changed" if not isinstance(default, bool) else not default)
        with pytest.raises(
            ConfigError,
            match=f"--{dest.replace('_', '-')}.*{reason[:20]}".replace("(", ".").replace(")", "."),
        ):
            Trainer(args)


def test_help_groups_flags_as_timm_does(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    groups = ["Dataset parameters", "Model parameters", "Device parameters", "Optimizer parameters",
              "Learning rate schedule parameters", "Augmentation and regularization parameters",
              "Batch norm parameters", "Model exponential moving average parameters", "Miscellaneous parameters"]  # fmt: skip
    positions = [out.index(g + ":") for g in groups]
    assert positions == sorted(positions)


def fixture_args(data_dir, tmp_path, *extra):
    return parse_args(
        ["-c", TIMM_ARGS_YAML, "--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "timm",
         "--model", "test_resnet", "--workers", "0", *extra]
    )  # fmt: skip


def test_timms_own_args_yaml_runs_unchanged_and_builds_what_timm_builds(data_dir, tmp_path):
    args = fixture_args(data_dir, tmp_path)
    assert (args.opt, args.layer_decay, args.aa, args.reprob, args.grad_accum_steps) == (
        "adamw",
        0.75,
        "rand-m9-mstd0.5-inc1",
        0.25,
        2,
    )
    trainer = Trainer(args)
    model = trainer.task.get_eval_model()

    # The model: the same architecture arguments (drop path) as timm's create_model from the same args.
    reference = timm.create_model("test_resnet", num_classes=4, drop_path_rate=args.drop_path)
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in reference.modules()]
    drop = [m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")]
    assert drop and drop == [m.drop_prob for m in reference.modules() if hasattr(m, "drop_prob")]

    # The optimizer: timm's layer-decay parameter groups, AdamW with the args' eps, lr from lr_base.
    expected_lr = 5e-4 * (16 * 1 * 2 / 256) ** 0.5  # adamw scales by sqrt; global batch includes accumulation
    assert args.lr == pytest.approx(expected_lr)
    timm_optimizer = create_optimizer_v2(reference, **optimizer_kwargs(cfg=args))
    ours = [
        (g["lr_scale"], g["weight_decay"], g["eps"], len(g["params"])) for g in trainer.optimizer.param_groups
    ]
    theirs = [
        (g["lr_scale"], g["weight_decay"], g["eps"], len(g["params"])) for g in timm_optimizer.param_groups
    ]
    assert ours == theirs and len({g[0] for g in ours}) > 2, "layer decay gives several lr scales"

    # The schedule: timm's scheduler from the same args gives the same lr at every update.
    theirs_scheduler, epochs = create_scheduler_v2(
        timm_optimizer, **scheduler_kwargs(args), updates_per_epoch=trainer.updates_per_epoch
    )
    assert epochs == trainer.num_epochs
    for update in range(epochs * trainer.updates_per_epoch):
        trainer.scheduler.step_update(update)
        theirs_scheduler.step_update(update)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(timm_optimizer.param_groups[0]["lr"])

    # The training transform: timm's create_transform with create_loader's arguments (its prefetcher
    # path: uint8 out), random erasing with them on the device as timm's PrefetchLoader erases.
    timm_transform = create_transform(
        input_size=trainer.data_config["input_size"], is_training=True, no_aug=False, scale=args.scale,
        ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, mean=trainer.data_config["mean"],
        std=trainer.data_config["std"], re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        use_prefetcher=True,
    )  # fmt: skip
    ours_transform = trainer.train_loader.dataset.transform
    assert repr(ours_transform) == repr(timm_transform)
    assert "RandAugment" in repr(ours_transform)
    (erasing,) = [prep.erasing for prep in trainer.train_loader.preps]
    timm_erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device="cpu")
    assert erasing is not None and vars(erasing) == vars(timm_erasing) | {"device": torch.device("cpu")}
    assert trainer.task.has_ema() and trainer.task.get_trainable_module(ema=True).use_warmup
    assert trainer.mixup_fn is not None and trainer.mixup_fn.label_smoothing == 0.1
    trainer.close()

    metrics = run(fixture_args(data_dir, tmp_path, "--overwrite"))
    assert metrics["num_samples"] == 12, "timm's val_split 'validation' found the validation folder"


def test_bce_loss_is_timms_binary_cross_entropy(data_dir, tmp_path):
    from timm.loss import BinaryCrossEntropy

    args = parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "bce", "--model",
                       "test_resnet", "--img-size", "32", "-j", "0", "--method", "ce", "--bce-loss",
                       "--bce-target-thresh", "0.2", "--smoothing", "0.1", "-b", "8"])  # fmt: skip
    trainer = Trainer(args)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    out = trainer.task(x, y)
    expected = BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(out["output"].float(), y)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    trainer.close()
    with pytest.raises(ConfigError, match="--method adacos does not combine with --bce-loss"):
        Trainer(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "b2",
                            "--bce-loss", "--method", "adacos"]))  # fmt: skip


def test_gradient_accumulation_equals_the_large_batch_step_float64(data_dir, tmp_path):
    """Two accumulated batches of whole pairs give the update of one batch twice their size (a model without
    BatchNorm, whose statistics would differ by batch; float64, so only summation order differs)."""
    common = ["--data-dir", str(data_dir), "--output", str(tmp_path), "--model", "test_vit", "--img-size", "32",
              "-j", "0", "--lr", "0.1", "--opt", "momentum", "--weight-decay", "0", "--method", "cskd",
              "--smoothing", "0", "--warmup-epochs", "0"]  # fmt: skip
    small = Trainer(parse_args([*common, "--experiment", "small", "-b", "4", "--grad-accum-steps", "2"]))
    large = Trainer(parse_args([*common, "--experiment", "large", "-b", "8"]))
    for trainer in (small, large):
        trainer.task.double()
    large.task.get_trainable_module().load_state_dict(small.task.get_trainable_module().state_dict())
    g = torch.Generator().manual_seed(0)
    anchors, partners = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.arange(8) % 4
    # The sampler's [anchors; partners] layout: two batches of 4 pairs, or one of 8.
    for part in (slice(0, 4), slice(4, 8)):
        batch = torch.cat([anchors[part], partners[part]]), labels[part].repeat(2)
        small._train_step(*batch, accum=2, update=part.start == 4)
    large._train_step(torch.cat([anchors, partners]), labels.repeat(2), accum=1, update=True)
    for (name, a), b in zip(
        small.task.get_trainable_module().state_dict().items(),
        large.task.get_trainable_module().state_dict().values(),
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    small.close()
    large.close()


def test_fine_tuning_from_a_saved_checkpoint_with_a_new_head(data_dir, tmp_path):
    from timm_cskd.checkpoint import load_checkpoint_file

    run(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "source", "--model",
                    "test_resnet", "--img-size", "32", "-j", "0", "--epochs", "1", "-b", "8", *PLAIN_RECIPE]))  # fmt: skip
    source = tmp_path / "source" / "model_best.pth.tar"
    fine = tmp_path / "fine"
    make_image_folder(fine / "train", [8, 8, 8], size=(24, 20), colours=COLOURS[:3], noise=60)
    make_image_folder(fine / "val", [2, 2, 2], size=(24, 20), colours=COLOURS[:3], noise=60)
    common = ["--data-dir", str(fine), "--output", str(tmp_path), "--model", "test_resnet", "--img-size", "32",
              "-j", "0", "-b", "4", "--epochs", "1", "--method-kwargs", "lambda=3"]  # fmt: skip
    trainer = Trainer(parse_args([*common, "--experiment", "ft", "--pretrained-path", str(source)]))
    loaded, saved = trainer.task.get_eval_model().state_dict(), load_checkpoint_file(source)["state_dict"]
    assert loaded["fc.weight"].shape == (3, saved["fc.weight"].shape[1]), "a new 3-class head"
    for key in saved:
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], saved[key]), f"{key} not taken from the checkpoint"
    metrics = trainer.fit()
    trainer.close()
    assert metrics["num_samples"] == 6
    # --initial-checkpoint loads every weight of a same-shaped model, as timm does.
    trainer = Trainer(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "init",
                                  "--model", "test_resnet", "--img-size", "32", "-j", "0", "-b", "8",
                                  "--initial-checkpoint", str(source)]))  # fmt: skip
    for key, value in trainer.task.get_eval_model().state_dict().items():
        assert torch.equal(value, saved[key]), key
    trainer.close()
    assert main(["--data-dir", str(fine), "--output", str(tmp_path), "--experiment", "bad", "--model", "test_resnet",
                 "--initial-checkpoint", str(source)]) == 2  # fmt: skip


def test_finetune_config_is_the_fine_grained_recipe():
    args = parse_args(["-c", os.path.join(os.path.dirname(FIXTURES), "..", "configs", "finetune_cskd.yaml")])
    assert (
        args.pretrained
        and args.method == "cskd"
        and args.method_kwargs == {"temperature": 4.0, "lambda": 3.0}
    )


def test_tensorboard_and_wandb_get_the_summary_scalars(data_dir, tmp_path, monkeypatch):
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *a, **kw):
        logged.append(dict(data))
        return real_log(self, data, *a, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    run(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "logs", "--model",
                    "test_resnet", "--img-size", "32", "-j", "0", "--epochs", "2", "-b", "8", "--log-tensorboard",
                    "--log-wandb", "--wandb-project", "offline-test", *PLAIN_RECIPE]))  # fmt: skip
    with open(tmp_path / "logs" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "train_ce", "train_reg", "eval_top1_err", "eval_ece", "lr"):
        assert [e.value for e in events.Scalars(key)] == pytest.approx(
            [float(r[key]) for r in rows], rel=1e-6
        ), key
        assert [entry[key] for entry in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-9), key
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*")), "the offline run was written"


@pytest.mark.parametrize(
    ("model", "flags", "kwargs"),
    [
        ("resnet18", ["--drop", "0.3", "--drop-path", "0.1", "--gp", "max", "--model-kwargs", "stem_width=16"],
         dict(drop_rate=0.3, drop_path_rate=0.1, global_pool="max", stem_width=16)),
        ("test_efficientnet", ["--bn-momentum", "0.05", "--bn-eps", "1e-3", "--drop-connect", "0.2"],
         dict(bn_momentum=0.05, bn_eps=1e-3, drop_path_rate=0.2)),
    ],
    ids=["resnet", "efficientnet-bn"],
)  # fmt: skip
def test_model_flags_build_what_timm_create_model_builds(data_dir, tmp_path, model, flags, kwargs):
    extra = ["--head-init-scale", "0.5", "--head-init-bias", "0.25", "--grad-checkpointing"]
    trainer = Trainer(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "m",
                                  "--model", model, "--img-size", "32", "-j", "0", "-b", "8", *flags, *extra]))  # fmt: skip
    built = trainer.task.get_eval_model()
    trainer.close()
    torch.manual_seed(42)  # the trainer creates its model right after seeding with --seed (42)
    reference = timm.create_model(model, num_classes=4, **kwargs)
    with torch.no_grad():  # timm train.py's head initialisation
        reference.get_classifier().weight.mul_(0.5)
        reference.get_classifier().bias.fill_(0.25)
    assert repr(built) == repr(reference)
    assert built.grad_checkpointing
    for (name, ours), theirs in zip(built.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_checkpoint_history_keeps_the_best_epochs_by_eval_metric(data_dir, tmp_path):
    args = ["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "hist", "--model", "test_resnet",
            "--img-size", "32", "-j", "0", "-b", "8", "--epochs", "4", "--checkpoint-hist", "2", "--eval-metric", "loss",
            *PLAIN_RECIPE]  # fmt: skip
    run(parse_args(args))
    with open(tmp_path / "hist" / "summary.csv") as f:
        losses = {int(r["epoch"]): float(r["eval_nll"]) for r in csv.DictReader(f)}
    best_two = sorted(losses, key=losses.get)[:2]
    kept = sorted(
        int(p.name.split("-")[1].split(".")[0]) for p in (tmp_path / "hist").glob("checkpoint-*.pth.tar")
    )
    assert kept == sorted(best_two)
    from timm_cskd.checkpoint import load_checkpoint_file

    best = load_checkpoint_file(tmp_path / "hist" / "model_best.pth.tar")
    assert best["metric"] == pytest.approx(min(losses.values())) and best["epoch"] == min(
        losses, key=losses.get
    )


def test_aug_repeats_puts_each_pairs_copies_on_different_ranks():
    import numpy as np

    from timm_cskd.sampler import ClassPairSampler

    labels = np.arange(48) % 4
    ranks = [ClassPairSampler(labels, 4, num_replicas=3, rank=r, seed=0, repeats=3) for r in range(3)]
    batches = [list(sampler) for sampler in ranks]
    assert all(len(b) == len(ranks[0]) == 48 // 12 for b in batches), "the epoch keeps its length"
    anchors = [[a for batch in per_rank for a in batch[:4]] for per_rank in batches]
    for i in range(len(anchors[0])):
        trio = {anchors[r][i] for r in range(3)}
        assert len(trio) == 1, "the three copies of a unit go to the three ranks at the same step"
    assert len({a for per_rank in anchors for a in per_rank}) == 16, "an epoch covers a third of the units"


def test_class_map_and_timm_split_synonyms(data_dir, tmp_path):
    class_map = tmp_path / "classes.txt"
    class_map.write_text("class_002\nclass_000\n")
    trainer = Trainer(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "cm",
                                  "--model", "test_resnet", "--img-size", "32", "-j", "0", "-b", "4",
                                  "--class-map", str(class_map), "--val-split", "val"]))  # fmt: skip
    trainer.close()
    assert trainer.train_index.classes == ["class_002", "class_000"] and len(trainer.train_index) == 24
    assert set(trainer.train_index.labels.tolist()) == {0, 1}
    assert len(trainer.val_index) == 6, "--val-split val found the validation folder (timm's synonyms)"


def test_mixup_stops_at_mixup_off_epoch_and_keeps_smoothed_targets(data_dir, tmp_path, monkeypatch):
    from timm_cskd.methods.ce import CrossEntropy

    seen = []
    compute = CrossEntropy.compute

    def record(self, input, target):
        mixed, soft, _ = self.mix(input, target)
        seen.append((self.mixup_fn.mixup_enabled, soft.max().item()))
        return compute(self, input, target)

    monkeypatch.setattr(CrossEntropy, "compute", record)
    run(parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "mix", "--model",
                    "test_resnet", "--img-size", "32", "-j", "0", "-b", "8", "--epochs", "2", "--method", "ce",
                    "--mixup", "0.5", "--mixup-off-epoch", "1", "--smoothing", "0.1", "--warmup-epochs", "0"]))  # fmt: skip
    first, second = seen[:6], seen[6:]
    assert all(enabled for enabled, _ in first) and not any(enabled for enabled, _ in second)
    assert all(peak == pytest.approx(1 - 0.1 + 0.1 / 4) for _, peak in second), "smoothed one-hot targets"


@pytest.mark.parametrize("method", ["virtual-softmax", "byot"])
def test_wrapper_methods_get_timms_layer_decay_groups(data_dir, tmp_path, method):
    """A method that wraps the model (extra heads, features) still gets timm's no-weight-decay and
    layer-decay groups for the model's parameters, and agc clipping leaves the classifier out."""
    common = ["--data-dir", str(data_dir), "--output", str(tmp_path), "--model", "test_vit", "--img-size", "32",
              "-j", "0", "-b", "8", "--opt", "adamw", "--layer-decay", "0.65", "--weight-decay", "0.05"]  # fmt: skip
    plain = Trainer(parse_args([*common, "--experiment", "ce", "--method", "ce"]))
    wrapped = Trainer(parse_args([*common, "--experiment", "w", "--method", method]))

    def groups(trainer):
        names = {
            id(p): n.removeprefix("model.") for n, p in trainer.task.get_trainable_module().named_parameters()
        }
        return {
            names[id(p)]: (g["lr_scale"], g["weight_decay"])
            for g in trainer.optimizer.param_groups
            for p in g["params"]
        }

    ours, reference = groups(wrapped), groups(plain)
    for name, setting in reference.items():
        if name.startswith("head."):
            continue  # virtual-softmax's classifier has no bias
        assert ours[name] == setting, name
    assert len({scale for scale, _ in ours.values()}) > 2
    clipped = {id(p) for p in wrapped.task.get_clip_parameters(exclude_head=True)}
    head = wrapped.task.get_eval_model().get_classifier()
    assert not clipped & {id(p) for p in head.parameters()}
    assert len(clipped) == len(list(wrapped.task.get_trainable_module().parameters())) - len(
        list(head.parameters())
    )
    plain.close()
    wrapped.close()


def test_our_args_yaml_loads_back_and_an_empty_val_split_means_no_validation(data_dir, tmp_path):
    import yaml

    first = parse_args(["--data-dir", str(data_dir), "--output", str(tmp_path), "--experiment", "a", "--model",
                        "test_resnet", "--img-size", "32", "-j", "0", "-b", "8", "--epochs", "1", "--val-split", "",
                        *PLAIN_RECIPE])  # fmt: skip
    metrics = run(first)
    assert metrics == {}, "no validation split, no validation"
    saved = tmp_path / "a" / "args.yaml"
    again = parse_args(["-c", str(saved), "--experiment", "b"])
    recorded = yaml.safe_load(saved.read_text())
    for key, value in recorded.items():
        if key != "experiment":
            assert getattr(again, key) == value, key
    status = (tmp_path / "a" / "status.json").read_text()
    assert '"finished": true' in status and '"epochs_planned": 1' in status
