"""Virtual Softmax: a virtual negative class per sample (Chen, Deng and Shen, NeurIPS 2018).

Paper: `Virtual Class Enhanced Discriminative Embedding Learning`
    - https://arxiv.org/abs/1811.12611

    z = W x (a bias-free classifier),  z_virt,i = ||W_{y_i}|| * ||x_i||
    L = CE([z_i, z_virt,i], y_i)  over C + 1 columns

with x_i the pooled penultimate features of sample i. Since z_virt,i >= W_{y_i} . x_i, the true class only
wins over the virtual one as the angle between x_i and W_{y_i} shrinks: the virtual class tightens every
decision boundary. The norms are each sample's own; one port multiplies the norms of the whole batch's
feature and weight matrices instead, one scalar for every row, which is not the paper's virtual logit.

The virtual class exists only in the training loss: evaluation and export see the model's C logits, and
export adds a zero bias so that the plain timm architecture gives the same logits. ``--smoothing`` spreads
its eps over the C real classes, never the virtual one. The logged ``ce`` is the plain CE over the C
logits; ``reg`` is what the virtual class adds to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils.model import unwrap_model

from timm_cskd.methods import register
from timm_cskd.methods.base import Method, WithFeatures, replace_linear_classifier

__all__ = ["VirtualSoftmax", "virtual_softmax_loss"]


def virtual_softmax_loss(
    logits: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """CE over ``[logits, ||W_y|| ||x||]`` in float32, batch mean; label smoothing over the real classes."""
    virtual = weight.float()[target].norm(dim=1) * features.float().norm(dim=1)
    log_p = F.log_softmax(torch.cat([logits.float(), virtual[:, None]], dim=1), dim=1)
    nll = -log_p.gather(1, target[:, None]).squeeze(1)
    return ((1.0 - smoothing) * nll - smoothing * log_p[:, :-1].mean(1)).mean()


@register
class VirtualSoftmax(Method):
    name = "virtual-softmax"
    formula = "CE([W x, ||W_y|| ||x||], y) over C + 1 columns, bias-free classifier, x the pooled features"
    reference = "Chen et al., NeurIPS 2018 (arXiv:1811.12611)"
    mixup = False
    mixup_note = (
        "the virtual logit is built from the weight of each image's one true class, which a mixed image lacks"
    )
    bce_loss = False
    bce_note = (
        "its loss is the softmax cross-entropy over the class logits and one virtual logit, which competes "
        "with the true class only inside a softmax; one sigmoid per class gives it nothing to compete in"
    )

    @classmethod
    def adapt_model(cls, model: nn.Module, hp: dict) -> nn.Module:
        def bias_free(classifier: nn.Linear) -> nn.Linear:
            head = nn.Linear(classifier.in_features, classifier.out_features, bias=False)
            head.weight.data.copy_(classifier.weight.data)
            return head

        return replace_linear_classifier(model, cls.name, bias_free)

    @classmethod
    def export_state_dict(cls, state_dict: dict, hp: dict) -> dict:
        # The hook gets no model, so the classifier is found as the one matrix weight without a bias.
        keys = [
            k
            for k, v in state_dict.items()
            if k.endswith(".weight") and v.ndim == 2 and k.removesuffix("weight") + "bias" not in state_dict
        ]
        if len(keys) != 1:
            raise ValueError(f"cannot tell its bias-free classifier among the weights {keys}")
        weight = state_dict[keys[0]]
        return {**state_dict, keys[0].removesuffix("weight") + "bias": weight.new_zeros(weight.shape[0])}

    def build_trainable(self, model: nn.Module) -> nn.Module:
        return WithFeatures(model)

    def compute(self, input, target):
        logits, features = self.module(input)
        # Read outside the DDP forward, the classifier weight is still the leaf that forward used: autograd
        # sums both of its gradients before the one hook at which DDP reduces it.
        weight = unwrap_model(self.module).model.get_classifier().weight
        loss = self.ce_weight * virtual_softmax_loss(logits, features, weight, target, self.smoothing)
        ce = self.ce_weight * self.ce(logits.detach(), target)
        return loss, {"ce": ce}, logits, input
