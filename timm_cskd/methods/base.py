"""The base of every training method: a timm ``TrainingTask`` that declares what it needs.

A method says which batches it trains on (``batches``: plain shuffled images, the paper's class-pair
anchors with partners, or a partition into same-class pairs), which augmented views of each image
(``views``), whether it changes the model (``adapt_model``: a cosine head, a bias-free classifier),
whether Mixup/CutMix and timm's ``--bce-loss`` make sense for it, and how its weights map onto the plain
timm architecture for export. The trainer builds the sampler, the transforms and the model from those declarations, so adding
a method touches only its module.

Every method computes ``ce`` (its cross-entropy part) and a regulariser, and names the regulariser's terms
(``terms``: CS-KD's ``kl``, BYOT's ``aux_ce``, ``kl`` and ``feature``, ...) as its formula writes them,
unweighted; the trainer logs each (``train_<term>`` in summary.csv). Knowledge distillation from a
teacher (``--kd-model-name``) composes with any of them here, in the base class, as the term ``kd``:

    loss = task_weight * CE + method regulariser + distill_weight * kd,  kd = T^2 * KL(sg p_teacher || p_student)

With ``--bce-loss`` the task term CE is timm's ``BinaryCrossEntropy`` (one sigmoid per class, its
``--bce-*`` options, Mixup/CutMix soft targets) and every distillation term stays a KL between softmax
distributions at its temperature, as timm's own distillation task combines any task loss with a softmax KL.

The teacher (timm's ``DistillationTeacher``) runs in eval mode under ``no_grad`` and the caller's
autocast, on the images the method's main logits came from, re-normalised by an affine map fixed when
the task is built (``timm_cskd.methods.kd_input.input_renormalisation``); it stays out of DDP, EMA, the optimizer
and the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils.model import unwrap_model

from timm_cskd.errors import ConfigError
from timm_cskd.methods.kd_input import input_renormalisation

__all__ = [
    "Hyper",
    "KDConfig",
    "Method",
    "MethodModule",
    "WithFeatures",
    "soft_cross_entropy",
    "kl_to_target",
    "replace_linear_classifier",
]

BATCHES = ("plain", "anchor", "paired")


@dataclass(frozen=True)
class Hyper:
    """A method hyper-parameter: its default (whose type it keeps), what it means, and the numbers it
    may take: ``low`` <= value <= ``high`` (``low_open``: value > ``low``); None leaves a side open."""

    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def allowed(self) -> str:
        """The allowed range in words, e.g. '> 0' or 'in [0, 1]'; '' when any value is."""
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is None:
            return low or ""
        if low is None:
            return f"<= {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def admits(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation from a teacher: timm train.py's names and Hinton's alpha form by default."""

    temperature: float = 4.0
    distill_weight: float = 0.9
    task_weight: float = 0.1


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in float32 against class indices (with label smoothing) or soft targets (Mixup)."""
    if target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def kl_to_target(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target / T) || softmax(logits / T)), batch mean, float32; the target is detached."""
    t = temperature
    log_p = F.log_softmax(logits.float() / t, dim=1)
    q = F.softmax(target_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * t * t


def replace_linear_classifier(
    model: nn.Module, method: str, make_head: Callable[[nn.Linear], nn.Module]
) -> nn.Module:
    """``model`` with its timm classifier, which must be an ``nn.Linear``, swapped for
    ``make_head(classifier)`` in place; ``method`` names the refusing method otherwise.

    The head goes where ``pretrained_cfg["classifier"]`` names it, the path timm itself resolves its
    classifier by. Not ``reset_classifier``, which can only build timm's own Linear, nor
    ``num_features``, which is not the classifier's input width where a model has a pre-logits layer."""
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ConfigError(f"--method {method} needs a Linear classifier, not {type(classifier).__name__}")
    model.set_submodule(model.pretrained_cfg["classifier"], make_head(classifier))
    return model


class MethodModule(nn.Module):
    """A trainable module that wraps the timm model with what the method trains besides it.

    DDP only sees gradients computed inside the forward of the module it wraps, so every trainable
    computation a method needs (features, auxiliary heads) happens in this forward. ``model`` is what
    evaluation, EMA evaluation and export use; everything else is saved as task state.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    # timm's optimizer factory reads these to exclude parameters from weight decay and to group layers
    # for --layer-decay: the wrapper answers for its model, as timm's FeatureDistillationTrainableModule.
    def no_weight_decay(self) -> set[str]:
        model = unwrap_model(self.model)
        return (
            {f"model.{name}" for name in model.no_weight_decay()}
            if hasattr(model, "no_weight_decay")
            else set()
        )

    def group_matcher(self, coarse: bool = False):
        model = unwrap_model(self.model)
        if not hasattr(model, "group_matcher"):
            return {}
        layers = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        extra = max(layers.values(), default=0)

        def matcher(name: str) -> int:
            return layers.get(name.removeprefix("model."), extra) if name.startswith("model.") else extra

        return matcher


class WithFeatures(MethodModule):
    """One forward returning ``(logits, pooled penultimate features)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features


class Method(TrainingTask):
    """Base class: subclasses set the class attributes and implement ``compute``.

    ``compute(input, target)`` returns ``(loss, terms, output, kd_input)``: the method's loss with its CE
    part weighted by ``self.ce_weight`` (KD's task weight, else 1), its detached terms by name (``ce``,
    that weighted CE term, and the unweighted terms of ``terms``), the main logits (with grad) and the
    images they came from (the teacher's input under KD).
    """

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    hparams: ClassVar[dict[str, Hyper]] = {}
    batches: ClassVar[str] = "plain"
    mixup: ClassVar[bool] = True
    mixup_note: ClassVar[str] = ""
    # Whether timm's --bce-loss can stand in for the task term, and why not when it cannot.
    bce_loss: ClassVar[bool] = True
    bce_note: ClassVar[str] = ""
    # The loss terms ``compute`` returns besides ``ce``, named as the formula writes them.
    terms: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def views(cls, hp: dict) -> list[dict]:
        """One dict of ``timm.data.create_transform`` overrides per augmented view of each image; one
        entry (the standard training transform) for most methods."""
        return [{}]

    @classmethod
    def adapt_model(cls, model: nn.Module, hp: dict) -> nn.Module:
        """The method's change to the timm model, applied for training, evaluation and loading."""
        return model

    @classmethod
    def export_state_dict(cls, state_dict: dict, hp: dict) -> dict:
        """The trained weights as the plain timm architecture holds them (raise if they cannot be)."""
        return state_dict

    def __init__(
        self,
        model: nn.Module,
        hp: dict,
        *,
        mixup_fn: Mixup | None = None,
        smoothing: float = 0.0,
        bce: nn.Module | None = None,
        teacher: nn.Module | None = None,
        normalization: tuple | None = None,
        kd: KDConfig | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(device=device, verbose=False)
        self.hp = hp
        self.mixup_fn = mixup_fn
        # Mixup applies the smoothing inside its soft targets; the loss must not smooth them again.
        self.smoothing = 0.0 if mixup_fn is not None else smoothing
        self.bce = bce
        self.trainable_module = self.build_trainable(model)
        self.teacher = teacher
        self.kd = kd if teacher is not None else None
        self.ce_weight = self.kd.task_weight if self.kd is not None else 1.0
        if teacher is not None:
            # The student's inputs arrive normalised with the data config's mean/std: the teacher's
            # re-normalisation starts from those (the model's pretrained_cfg when none is given).
            cfg = unwrap_model(model).pretrained_cfg
            mean, std = normalization or (cfg["mean"], cfg["std"])
            scale, shift = input_renormalisation(teacher, mean, std) or (None, None)
            self.register_buffer("kd_input_scale", scale, persistent=False)
            self.register_buffer("kd_input_shift", shift, persistent=False)

    def build_trainable(self, model: nn.Module) -> nn.Module:
        return model

    # ------------------------------------------------------------------ timm TrainingTask hooks

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def get_clip_parameters(self, exclude_head: bool = False):
        """The trainable parameters to clip; ``exclude_head`` leaves out the model's classifier (timm's agc)."""
        parameters = list(self.get_trainable_module().parameters())
        if not exclude_head:
            return parameters
        head = {id(p) for p in unwrap_model(self.get_eval_model()).get_classifier().parameters()}
        return [p for p in parameters if id(p) not in head]

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> Method:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the (DDP-wrapped, if distributed) trainable module: after DDP, as torch recommends, so
        that compiled graphs split at DDP's buckets and gradient all-reduce overlaps the backward."""
        inner = unwrap_model(self.trainable_module)
        self.trainable_module = torch.compile(
            self.trainable_module, backend=backend, mode=mode, **compile_kwargs
        )
        evaluated = inner.model if isinstance(inner, MethodModule) else inner
        self.eval_model = torch.compile(evaluated, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        resolved = super().get_eval_model(module=module, ema=ema)
        inner = unwrap_model(resolved) if resolved is not None else None
        return inner.model if isinstance(inner, MethodModule) else resolved

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        inner = unwrap_model(module) if module is not None else None
        return {"extra": inner.extra_state_dict()} if isinstance(inner, MethodModule) else {}

    def load_task_state(
        self, state: dict | None, strict: bool = True, module=None, ema: bool = False
    ) -> None:
        inner = unwrap_model(module if module is not None else self.get_trainable_module(ema=ema))
        if not isinstance(inner, MethodModule):
            return
        if not state or "extra" not in state:
            if strict:
                raise RuntimeError(
                    f"the checkpoint holds no task state for method {self.name}'s extra modules"
                )
            return
        current = inner.state_dict()
        current.update(state["extra"])
        inner.load_state_dict(current, strict=strict)

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def module(self) -> nn.Module:
        """The trainable module to call: DDP/compile wrapped, so gradients synchronise."""
        return self.trainable_module

    def ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The method's classification loss: cross-entropy, or timm's BinaryCrossEntropy (--bce-loss)."""
        if self.bce is not None:
            return self.bce(logits.float(), target)
        return soft_cross_entropy(logits, target, self.smoothing)

    def fused_ce_weight(self) -> float:
        """The CE weight a fused CS-KD loss of this method gets: 0 under --bce-loss, where only its softmax
        KL stays and timm's BCE becomes the task term (``with_task_term``)."""
        return 0.0 if self.bce is not None else self.ce_weight

    def with_task_term(
        self, loss: torch.Tensor, fused, logits: torch.Tensor, target: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss``, built on ``scale`` times the fused CS-KD loss ``fused``, and its weighted task term
        (detached): the fused CE, or under --bce-loss timm's BCE on ``logits``, added here."""
        if self.bce is None:
            return loss, scale * self.ce_weight * fused.last_terms[0]
        task = scale * self.ce_weight * self.bce(logits.float(), target)
        return loss + task, task.detach()

    def mix(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """timm's batch Mixup/CutMix of ``x`` (a fresh tensor), soft targets and the area-corrected lambda;
        unchanged inputs, hard targets and lambda 1 without Mixup."""
        if self.mixup_fn is None:
            return x, target, 1.0
        if not self.mixup_fn.mixup_enabled:  # past --mixup-off-epoch: timm keeps its smoothed soft targets
            return x, mixup_target(target, self.mixup_fn.num_classes, 1.0, self.mixup_fn.label_smoothing), 1.0
        if len(x) % 2:
            raise ValueError("Mixup needs an even number of images per batch")
        x = x.clone()
        if self.mixup_fn.mode != "batch":  # per-pair/per-image lambdas: no single lambda to report
            x, soft = self.mixup_fn(x, target)
            return x, soft, float("nan")
        lam = self.mixup_fn._mix_batch(x)
        return x, mixup_target(target, self.mixup_fn.num_classes, lam, self.mixup_fn.label_smoothing), lam

    # ------------------------------------------------------------------ forward

    def compute(self, input, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names of ``forward``'s ``terms``: ``ce``, the method's own, then ``kd`` with a teacher."""
        return ("ce", *self.terms, *(("kd",) if self.teacher is not None else ()))

    def forward(self, input, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` (with grad), ``output`` (the main logits), ``terms`` (detached, by ``term_names``),
        ``ce`` and ``reg`` (``loss - ce``, everything besides the task term)."""
        loss, terms, output, kd_input = self.compute(input, target)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_input = kd_input.detach()
                if self.kd_input_scale is not None:
                    teacher_input = teacher_input * self.kd_input_scale + self.kd_input_shift
                teacher_logits = self.teacher(teacher_input)
            kd = kl_to_target(output, teacher_logits, self.kd.temperature)
            loss = loss + self.kd.distill_weight * kd
            terms = {**terms, "kd": kd.detach()}
        ce = terms["ce"]
        return {"loss": loss, "output": output.detach(), "ce": ce, "reg": loss.detach() - ce, "terms": terms}
