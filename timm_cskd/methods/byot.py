"""BYOT, Be Your Own Teacher: self-distillation from the deepest classifier into auxiliary ones.

Paper: `Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation`
    - https://arxiv.org/abs/1905.08094 (Zhang et al., ICCV 2019)

Each of the ``heads`` stages before the last gets an auxiliary classifier: a bottleneck (1x1 conv to C/4,
kxk conv with stride k, 1x1 conv up to C, each with BatchNorm and ReLU; C the width of the model's
pooled features) whose stride k = (last stage's reduction) / (the stage's reduction) brings the stage to
the last stage's resolution in one step (k = 8, 4, 2 for a ResNet's layer1-3; the paper's bottlenecks
match each shallow map to the deepest one's size), then global average pooling and a linear classifier.
With q the logits, F the pooled features and B images:

    L = CE(q_deep)
        + sum_i [(1 - alpha) CE(q_i) + alpha T^2 KL(sg p_deep || p_i) + lambda ||F_i - sg F_deep||^2]

every term a mean over the B images (KL summed over classes, p at temperature T, the squared L2 norm
summed over channels). Nothing distils into the deepest classifier. Mixup/CutMix compose: every head
sees the same mixed image, so CE takes the soft targets and the heads distil that image's deepest prediction.

Defaults alpha 0.3, T 3, lambda 0.03 are the authors' journal code
(ArchipLab-LinfengZhang/pytorch-self-distillation-final, ``--loss_coefficient``, ``--temperature``,
``--feature_loss_coefficient``). That code distils with a soft cross-entropy without T^2 (the gradient of
KL divided by T^2), measures features with ``torch.dist`` (the unsquared norm over the whole batch) after a
linear adaptation layer, and skips the feature term for the shallowest head; here the paper's form.

The stages come from the model's ``feature_info`` and ``forward_intermediates`` (timm's feature API, the
same indices), so any timm model that has them works; the heads live in the trainable module, synchronised
by DDP, saved as task state, and left out of evaluation and export (the exported model is the timm model).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from timm_cskd.errors import ConfigError
from timm_cskd.methods import register
from timm_cskd.methods.base import Hyper, Method, MethodModule, kl_to_target

__all__ = ["BYOT", "BYOTModule"]


def bottleneck(in_chs: int, out_chs: int, stride: int) -> nn.Sequential:
    mid = max(out_chs // 4, 1)
    return nn.Sequential(
        nn.Conv2d(in_chs, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, stride, stride=stride, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_chs, 1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class BYOTModule(MethodModule):
    """The timm model with auxiliary heads on the ``num_heads`` stages before the last.

    ``forward`` returns ``(logits, features, aux_logits, aux_features)``, the auxiliary ones stacked
    shallowest first: ``(heads, B, classes)`` and ``(heads, B, C)``."""

    def __init__(self, model: nn.Module, num_heads: int):
        super().__init__(model)
        info = getattr(model, "feature_info", None)
        if not hasattr(model, "forward_intermediates") or not info:
            raise ConfigError(
                f"--method byot needs a timm model with forward_intermediates and feature_info to attach its "
                f"auxiliary heads; {type(model).__name__} has no such feature API"
            )
        if not 1 <= num_heads < len(info):
            raise ConfigError(
                f"--method byot heads={num_heads}: the model has {len(info)} feature stages, so 1 to "
                f"{len(info) - 1} heads can sit before the last"
            )
        last = len(info) - 1
        self.indices = list(range(last - num_heads, last))
        width = getattr(model, "head_hidden_size", None) or model.num_features
        heads = []
        for i in self.indices:
            stride, rest = divmod(info[last]["reduction"], info[i]["reduction"])
            if rest:
                raise ConfigError(
                    f"--method byot: the reduction {info[i]['reduction']} of stage {info[i]['module']} does "
                    f"not divide the last stage's reduction {info[last]['reduction']}"
                )
            heads.append(
                nn.ModuleDict(
                    {
                        "bottleneck": bottleneck(info[i]["num_chs"], width, stride),
                        "fc": nn.Linear(width, model.num_classes),
                    }
                )
            )
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        final, intermediates = self.model.forward_intermediates(x, indices=self.indices)
        features = self.model.forward_head(final, pre_logits=True)
        logits = self.model.get_classifier()(features)
        aux_features = [head["bottleneck"](t).mean((2, 3)) for head, t in zip(self.heads, intermediates)]
        aux_logits = [head["fc"](f) for head, f in zip(self.heads, aux_features)]
        return logits, features, torch.stack(aux_logits), torch.stack(aux_features)


@register
class BYOT(Method):
    name = "byot"
    formula = (
        "CE(q_deep) + sum_i [(1 - alpha) CE(q_i) + alpha T^2 KL(sg p_deep || p_i) "
        "+ lambda ||F_i - sg F_deep||^2], i the auxiliary heads"
    )
    reference = "Zhang et al., ICCV 2019 (arXiv:1905.08094); a self-distillation baseline of the CS-KD paper"
    hparams = {
        "alpha": Hyper(
            0.3,
            "share of each auxiliary head's loss given to distillation (the authors' code)",
            low=0,
            high=1,
        ),
        "temperature": Hyper(
            3.0, "T of the deep-to-auxiliary distillation (the authors' code)", low=0, low_open=True
        ),
        "lambda": Hyper(
            0.03, "weight of each head's squared feature distance to the deepest (the authors' code)", low=0
        ),
        "heads": Hyper(
            3, "auxiliary heads, on the stages just before the last (3: a ResNet's layer1-3)", low=1
        ),
    }
    mixup = True
    # Summed over the heads: aux_ce the CE(q_i), kl the KL(sg p_deep || p_i) at T, feature the ||F_i - sg F_deep||^2;
    # loss = ce + (1 - alpha) aux_ce + alpha T^2 kl + lambda feature.
    terms = ("aux_ce", "kl", "feature")

    def build_trainable(self, model):
        return BYOTModule(model, self.hp["heads"])

    def compute(self, input, target):
        input, target, _ = self.mix(input, target)
        logits, features, aux_logits, aux_features = self.module(input)
        ce = self.ce_weight * self.ce(logits, target)
        alpha, deep = self.hp["alpha"], features.detach().float()
        loss, aux_ce, kl, feature = ce, 0.0, 0.0, 0.0
        for q, f in zip(aux_logits, aux_features):
            head_ce = self.ce(q, target)
            head_kl = kl_to_target(q, logits, self.hp["temperature"])  # T^2 * KL
            head_feature = (f.float() - deep).pow(2).sum(1).mean()
            loss = loss + (1.0 - alpha) * head_ce
            loss = loss + alpha * head_kl
            loss = loss + self.hp["lambda"] * head_feature
            aux_ce, kl, feature = (
                aux_ce + head_ce.detach(),
                kl + head_kl.detach(),
                feature + head_feature.detach(),
            )
        terms = {
            "ce": ce.detach(),
            "aux_ce": aux_ce,
            "kl": kl / self.hp["temperature"] ** 2,
            "feature": feature,
        }
        return loss, terms, logits, input
