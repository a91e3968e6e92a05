"""Knowledge distillation from a teacher (``--kd-model-name``), composed with any method in
``timm_cskd.methods.base``: the loss against a float64 reference from the same logits, teachers from every
source a timm-cskd user has, the teacher kept frozen and out of the optimizer and checkpoint, clear errors,
and exact resume."""

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import make_image_folder, make_tiny_dataset
from test_train import (
    _assert_identical,
    killed_and_resumed_run,
    summary,
    tiny_args,
    uninterrupted_run,
)
from timm.task.distillation import DistillationTeacher

from timm_cskd.checkpoint import load_checkpoint_file
from timm_cskd.config import ConfigError, parse_args
from timm_cskd.export import export
from timm_cskd.methods import KDConfig, get_method, kd_config, method_hparams
from timm_cskd.teacher import load_teacher
from timm_cskd.train import Trainer, main, run

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def teacher_checkpoint(data_dir, tmp_path_factory):
    """A tiny cross-entropy run's training checkpoint."""
    out = tmp_path_factory.mktemp("teacher")
    run(parse_args(tiny_args(data_dir, out, "--method", "ce", "--epochs", "2", "--seed", "7")))
    return out / "run" / "last.pth.tar"


@pytest.fixture(scope="module")
def teacher_sources(teacher_checkpoint, tmp_path_factory):
    """The same teacher as --kd-model-name (and --kd-model-arch) values, one per kind of source."""
    folder = tmp_path_factory.mktemp("sources")
    state_dict = folder / "teacher_state_dict.pth"
    torch.save(load_checkpoint_file(teacher_checkpoint)["state_dict"], state_dict)
    exported = export(teacher_checkpoint, folder / "exported")
    return {
        "checkpoint": [str(teacher_checkpoint)],
        "state_dict": [str(state_dict), "--kd-model-arch", "test_resnet"],
        "exported": [str(exported)],
    }


# ----------------------------------------------------------------------------- the loss


def kl(teacher_logits, logits, T):
    """KL(softmax(t / T) || softmax(z / T)), summed over classes, batch mean."""
    log_q = F.log_softmax(teacher_logits / T, dim=1)
    return (log_q.exp() * (log_q - F.log_softmax(logits / T, dim=1))).sum(1).mean()


def _record_outputs(module, store):
    """Keep every forward's output (the one with grad retains its gradient) and input."""

    def hook(_module, args, output):
        if output.requires_grad:
            output.retain_grad()
        store.append((args[0].detach().clone(), output))

    return module.register_forward_hook(hook)


def _task(method, hp, kd):
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    teacher = DistillationTeacher(timm.create_model("test_resnet", num_classes=NUM_CLASSES))
    teacher.requires_grad_(False)
    cls = get_method(method)
    task = cls(student, method_hparams(cls, hp), teacher=teacher, kd=kd)
    task.train()
    student_calls, teacher_calls = [], []
    _record_outputs(student, student_calls)
    _record_outputs(teacher.model, teacher_calls)
    return task, student_calls, teacher_calls


KD = KDConfig(temperature=2.0, distill_weight=0.6, task_weight=0.3)


def test_ce_with_a_teacher_is_task_weighted_ce_plus_the_kd_term():
    task, student_calls, teacher_calls = _task("ce", {}, KD)
    images = torch.randn(8, 3, 32, 32)
    target = torch.randint(0, NUM_CLASSES, (8,))
    result = task(images, target)
    result["loss"].backward()

    (_, output), (teacher_input, teacher_logits) = student_calls[0], teacher_calls[0]
    assert len(student_calls) == len(teacher_calls) == 1
    assert torch.equal(teacher_input, images), "the teacher sees the student's images (same normalisation)"
    assert not task.teacher.training and not teacher_logits.requires_grad
    z = output.detach().double().requires_grad_()
    ce = F.cross_entropy(z, target)
    expected = KD.task_weight * ce + KD.distill_weight * KD.temperature**2 * kl(
        teacher_logits.double(), z, KD.temperature
    )
    expected.backward()
    torch.testing.assert_close(result["loss"].double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["ce"].double(), KD.task_weight * ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        result["reg"].double(), (expected - KD.task_weight * ce).detach(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(output.grad.double(), z.grad, rtol=1e-5, atol=1e-7)


def test_cskd_with_a_teacher_is_cskd_with_weighted_ce_plus_kd_on_the_anchors():
    hp = {"temperature": 4.0, "lambda": 0.7}
    task, student_calls, teacher_calls = _task("cskd", hp, KD)
    k = 6
    images = torch.randn(2 * k, 3, 32, 32)
    target = torch.randint(0, NUM_CLASSES, (k,)).repeat(2)
    result = task(images, target)
    result["loss"].backward()

    (_, output), (partner_input, partner_logits) = student_calls
    (teacher_input, teacher_logits) = teacher_calls[0]
    assert len(teacher_calls) == 1 and torch.equal(teacher_input, images[:k]), "the teacher sees the anchors"
    assert torch.equal(partner_input, images[k:]) and not partner_logits.requires_grad
    z = output.detach().double().requires_grad_()
    T = hp["temperature"]
    ce = F.cross_entropy(z, target[:k])
    expected = (
        KD.task_weight * ce
        + hp["lambda"] * T * T * kl(partner_logits.double(), z, T)
        + KD.distill_weight * KD.temperature**2 * kl(teacher_logits.double(), z, KD.temperature)
    )
    expected.backward()
    torch.testing.assert_close(result["loss"].double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["ce"].double(), KD.task_weight * ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.grad.double(), z.grad, rtol=1e-5, atol=1e-7)


def _kd_args(*flags):
    return parse_args(["--kd-model-name", "teacher.pth", *flags])


@pytest.mark.parametrize(
    ("flags", "distill", "task"),
    [
        ([], 0.9, 0.1),  # Hinton's alpha form (timm's train.py would weight both 1)
        (["--distill-loss-weight", "0.5"], 0.5, 1.0),  # timm: independent weights, task 1
        (["--task-loss-weight", "0.3"], 0.7, 0.3),  # timm: complementary, distill = 1 - task
        (["--distill-loss-weight", "2", "--task-loss-weight", "0.5"], 2.0, 0.5),
    ],
)
def test_loss_weights_follow_timm_rules(flags, distill, task):
    kd = kd_config(_kd_args("--kd-temperature", "3", *flags))
    assert (kd.temperature, kd.distill_weight, kd.task_weight) == pytest.approx((3.0, distill, task))
    assert kd_config(parse_args([])) is None
    with pytest.raises(ConfigError, match="kd-temperature"):
        kd_config(_kd_args("--kd-temperature", "0"))


# ----------------------------------------------------------------------------- teachers through the trainer


@pytest.fixture
def trainers(monkeypatch):
    """The Trainer each ``run`` built, kept for inspection when it closes."""
    kept = []
    close = Trainer.close

    def keep(self):
        kept.append(self)
        close(self)

    monkeypatch.setattr(Trainer, "close", keep)
    return kept


@pytest.mark.parametrize("source", ["checkpoint", "state_dict", "exported"])
def test_teacher_from_each_source_trains_frozen_and_outside_optimizer_and_checkpoint(
    data_dir, tmp_path, teacher_sources, trainers, source
):
    kd_flags = ["--kd-model-name", *teacher_sources[source]]
    # Two epochs: the first one's mean loss is the distance from the teacher at initialisation; later
    # epochs' means on 8-image batches move with BatchNorm's batch statistics more than with learning.
    run(parse_args(tiny_args(data_dir, tmp_path, "--method", "ce", "--epochs", "2", *kd_flags)))
    rows = summary(tmp_path)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    trainer = trainers[-1]
    task, teacher = trainer.task, trainer.task.teacher
    assert task.kd == KDConfig(4.0, 0.9, 0.1), "Hinton's weights by default"
    task.train()
    assert not any(m.training for m in teacher.modules()), "the teacher stays in eval mode"
    assert not any(p.requires_grad for p in teacher.parameters())
    # Untouched weights and BatchNorm statistics: never stepped, never forwarded in train mode.
    reference, _ = load_teacher(kd_flags[1], NUM_CLASSES, *kd_flags[3:])
    _assert_identical(teacher.state_dict(), reference.state_dict())

    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    student = [p for p in task.get_trainable_module().parameters() if p.requires_grad]
    assert {id(p) for p in optimized} == {id(p) for p in student}
    assert sum(p.numel() for p in optimized) == sum(p.numel() for p in student)
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in optimized}

    checkpoint = load_checkpoint_file(tmp_path / "run" / "last.pth.tar")
    plain = timm.create_model("test_resnet", num_classes=NUM_CLASSES).state_dict()
    assert checkpoint["state_dict"].keys() == plain.keys(), "the student's weights only"
    assert "task_state" not in checkpoint
    assert checkpoint["args"]["kd_model_name"] == kd_flags[1]
    assert yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())["kd_model_name"] == kd_flags[1]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert re.search(r"knowledge distillation from .*\(T 4, task weight 0\.1, distill weight 0\.9\)", log)


def test_exported_folder_as_a_local_dir_id_is_the_same_teacher(teacher_sources, teacher_checkpoint):
    exported = teacher_sources["exported"][0]
    teacher, source = load_teacher(f"local-dir:{exported}", NUM_CLASSES)
    assert source == f"local-dir:{exported}"
    _assert_identical(
        {f"model.{k}": v for k, v in load_checkpoint_file(teacher_checkpoint)["state_dict"].items()},
        teacher.state_dict(),
    )
    data_config = load_checkpoint_file(teacher_checkpoint)["data_config"]
    assert teacher.mean_kd.flatten().tolist() == pytest.approx(data_config["mean"])
    assert not any(m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--kd-model-name", "no_such_teacher_model"],
            "--kd-model-name no_such_teacher_model: neither a file",
        ),
        (["--distill-loss-weight", "0.5"], "--distill-loss-weight"),
        (["--task-loss-weight", "0.5"], "--task-loss-weight"),
        (["--kd-model-name", "{checkpoint}", "--kd-temperature", "-1"], "--kd-temperature must be > 0"),
        (["--kd-model-name", "{state_dict}", "--kd-model-arch", "resnet18"], "does not fit resnet18"),
    ],
)
def test_bad_teacher_flags_are_clear_errors(data_dir, tmp_path, teacher_sources, capsys, flags, message):
    values = {kind: source[0] for kind, source in teacher_sources.items()}
    argv = tiny_args(data_dir, tmp_path, *(f.format(**values) for f in flags))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_teacher_with_another_class_count_is_a_clear_error(tmp_path, teacher_checkpoint, capsys):
    three = make_image_folder(tmp_path / "three" / "train", [4, 4, 4], size=(24, 20)).parent
    assert main(tiny_args(three, tmp_path / "out", "--kd-model-name", str(teacher_checkpoint))) == 2
    err = capsys.readouterr().err
    assert f"--kd-model-name {teacher_checkpoint} predicts 4 classes, the student 3" in err


def test_state_dict_without_arch_names_the_kd_arch_flag(data_dir, tmp_path, teacher_sources, capsys):
    assert main(tiny_args(data_dir, tmp_path, "--kd-model-name", teacher_sources["state_dict"][0])) == 2
    assert "--kd-model-arch" in capsys.readouterr().err


def test_teacher_input_is_renormalised_from_the_students_mean_and_std(data_dir, tmp_path, teacher_checkpoint):
    # The teacher was trained with test_resnet's own mean/std (its checkpoint's data_config); the student
    # normalises with others, given as flags.
    mean, std = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.3, 0.25, 0.2])
    flags = ["--method", "ce", "--kd-model-name", str(teacher_checkpoint)]
    flags += ["--mean", *map(str, mean.tolist()), "--std", *map(str, std.tolist())]
    trainer = Trainer(parse_args(tiny_args(data_dir, tmp_path, *flags)))
    trainer.close()
    assert trainer.data_config["mean"] == pytest.approx(mean.tolist())
    calls = []
    _record_outputs(trainer.task.teacher.model, calls)
    images = torch.randn(8, 3, 32, 32)
    trainer.task(images, torch.zeros(8, dtype=torch.long))
    teacher_config = load_checkpoint_file(teacher_checkpoint)["data_config"]
    teacher_mean, teacher_std = (torch.tensor(teacher_config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    torch.testing.assert_close(calls[0][0], (pixels - teacher_mean) / teacher_std)


# Calls that wait for the device on a GPU (and are plain calls on the CPU, where they can be counted).
HOST_SYNCS = {
    torch: ("equal", "nonzero", "unique", "masked_select"),
    torch.Tensor: ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"),
}


# The loss's target check branches on the device: on the CPU it reads the check's result, on a GPU it
# asserts on the device (torch._assert_async) without waiting.
CPU_ONLY = {("_check_tensors", "timm_cskd/loss.py")}


def host_syncs_in(monkeypatch, fn, *args) -> list[str]:
    """The host-synchronising calls ``fn(*args)`` would make on a GPU, by name and caller."""
    calls = []

    def counted(name, original):
        def call(*a, **kw):
            caller = sys._getframe(1).f_code
            if (caller.co_name, "/".join(Path(caller.co_filename).parts[-2:])) not in CPU_ONLY:
                calls.append(f"{name} in {caller.co_name} ({caller.co_filename}:{sys._getframe(1).f_lineno})")
            return original(*a, **kw)

        return call

    with monkeypatch.context() as patch:
        for owner, names in HOST_SYNCS.items():
            for name in names:
                patch.setattr(owner, name, counted(name, getattr(owner, name)))
        fn(*args)
    return calls


@pytest.mark.parametrize("normalisation", ["the teacher's", "another"])
@pytest.mark.parametrize("method", ["ce", "cskd"])
def test_a_kd_training_step_never_waits_for_the_device_and_feeds_timms_teacher_input(
    data_dir, tmp_path, teacher_checkpoint, monkeypatch, method, normalisation
):
    flags = ["--method", method, "--kd-model-name", str(teacher_checkpoint)]
    if normalisation == "another":
        flags += ["--mean", "0.2", "0.3", "0.4", "--std", "0.3", "0.25", "0.2"]
    trainer = Trainer(parse_args(tiny_args(data_dir, tmp_path, *flags)))
    trainer.close()
    teacher = trainer.task.teacher
    calls = []
    _record_outputs(teacher.model, calls)
    images = torch.randn(8, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3]).repeat(2)  # anchors and their same-class partners for cskd
    assert host_syncs_in(monkeypatch, trainer._train_step, images, target, 1, True) == []

    # timm's own re-normalisation of the images the teacher saw (the anchors for cskd).
    student_mean, student_std = (
        torch.tensor(trainer.data_config[k]).view(1, 3, 1, 1) for k in ("mean", "std")
    )
    seen = images[: len(calls[0][0])]
    expected = teacher.normalize_input(seen, student_mean, student_std)
    if normalisation == "another":
        assert not torch.equal(expected, seen)
        torch.testing.assert_close(calls[0][0], expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(calls[0][0], seen)


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def exact_kd(teacher_checkpoint):
    """test_train's exact-resume flags (Mixup, loader workers, mid-epoch checkpoints) with a teacher."""
    return ["--kd-model-name", str(teacher_checkpoint), "--mixup", "0.4", "--epochs", "2", "--checkpoint-interval", "2", "-j", "2"]  # fmt: skip


@pytest.mark.slow
def test_kd_run_killed_mid_epoch_then_resumed_is_bit_identical(data_dir, tmp_path, exact_kd):
    expected = uninterrupted_run(data_dir, tmp_path / "a", exact_kd)
    _assert_identical(
        killed_and_resumed_run(data_dir, tmp_path / "b", exact_kd)["state_dict"], expected["state_dict"]
    )
