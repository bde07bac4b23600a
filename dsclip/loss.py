"""Contrastive losses with local-loss + gather-with-grad semantics.

Each rank scores its own rows against the features gathered from every rank, with the
gradient flowing back through the gather. After DeepSpeed averages gradients over ranks,
the result equals the gradient of the global-batch loss; this is the only behaviour (no
flag), since it is the only one that scales.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn


@dataclass
class LossConfig:
    kind: Literal["clip"] = "clip"  # softmax contrastive loss (CLIP/InfoNCE)
    impl: Literal["auto", "reference"] = "auto"  # auto: the best implementation for the device


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to their owners."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return features
    return torch.cat(torch.distributed.nn.all_gather(features), dim=0)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first row in the gathered batch (ranks hold equal batches)."""
    return dist.get_rank() * local_batch if dist.is_initialized() else 0


class ReferenceClipLoss(nn.Module):
    """Materialises the (b x B) logits in both directions: simple, and O(b x B) memory."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        local = image_features.shape[0]
        labels = torch.arange(local, device=image_features.device) + rank_offset(local)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module for a config; called after the process group exists."""
    return ReferenceClipLoss()
