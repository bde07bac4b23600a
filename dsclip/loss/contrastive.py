"""Contrastive losses with local-loss + gather-with-grad semantics.

Each rank scores its own image rows against the texts gathered from every rank, with the
gradient flowing back through the gather. After DeepSpeed averages gradients over ranks,
the result equals the gradient of the global-batch loss; this is the only behaviour (no
flag), since it is the only one that scales.

The tiled implementations (`triton`, `torch_tiled`) never hold a (b x B) logits matrix:
one pass over S = scale * I_r @ T.T gives the row log-sum-exp (image->text, complete on
the rank) and a partial column max / sum-exp (text->image) that every rank gathers (2 x B
floats each) and merges. Backward recomputes S tile by tile; the texts' partial gradient
goes back to its owners through the gather's backward (reduce-scatter). Images are never
gathered: each rank's rows get every rank's loss terms locally.

Four small collectives a step (texts, column stats, the ranks' incoming loss gradients,
the texts' gradients), through `dsclip.loss.collectives`: on CPU ranks of one host that is
shared memory (~0.02-0.05 ms each) instead of gloo (~0.3-0.5 ms).
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from torch import nn

from dsclip.errors import UnequalBatchError
from dsclip.loss import collectives
from dsclip.loss.config import LossConfig
from dsclip.loss.self_check import check_against_twin
from dsclip_kernels.contrastive_twin import TwinOps


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; backward sums the gradients of each rank's rows on its owner."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.contiguous()
        gathered = rows.new_empty((_world() * rows.shape[0], *rows.shape[1:]))
        try:
            collectives.all_gather_into_tensor(gathered, rows)
        except collectives.UnequalShards as e:
            row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 1
            raise unequal_batches(rows.shape[0], [n // row_bytes for n in e.shard_bytes]) from None
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        mine = grad.new_empty((grad.shape[0] // _world(), *grad.shape[1:]))
        collectives.reduce_scatter_tensor(mine, grad)
        return mine


def unequal_batches(mine: int, sizes: list[int]) -> UnequalBatchError:
    """The error every rank raises when the ranks' batches differ (`sizes`: per rank, or this
    rank's, the largest and the smallest)."""
    return UnequalBatchError(f"ranks hold batches of different sizes at this step (rank {dist.get_rank()}: {mine}; "
                             f"sizes seen: {sorted(set(sizes))}): the contrastive loss needs equal batches on every "
                             "rank; keep the data's drop_last batches, and give every rank the same data.batch_size")


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to their owners."""
    if _world() == 1:
        return features
    return _GatherRows.apply(features)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first row in the gathered batch (ranks hold equal batches)."""
    return dist.get_rank() * local_batch if dist.is_initialized() else 0


class ReferenceClipLoss(nn.Module):
    """Materialises the (b x B) logits in both directions: simple, and O(b x B) memory."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_features, text_features = image_features.float(), text_features.float()
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
        local = image_features.shape[0]
        labels = torch.arange(local, device=image_features.device) + rank_offset(local)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ReferenceSigLipLoss(nn.Module):
    """open_clip's SigLipLoss for this process group (texts exchanged between neighbours)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_initialized() else 0
        loss = SigLipLoss(rank=rank, world_size=_world())
        return loss(image_features.float(), text_features.float(), logit_scale, logit_bias)


def _merge_column_lse(col_max: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """Column log-sum-exp over all ranks' image rows from each rank's partial max / sum-exp."""
    if _world() > 1:
        stats = torch.stack([col_max, col_sum])
        every = stats.new_empty((_world() * 2, stats.shape[1]))
        collectives.all_gather_into_tensor(every, stats)  # one gather, not a max and a sum all-reduce
        maxes, sums = every.view(_world(), 2, -1).unbind(1)
        col_max = maxes.amax(0)
        col_sum = (sums * (maxes - col_max).exp()).sum(0)
    return col_max + col_sum.log()


def _all_ranks(x: torch.Tensor) -> torch.Tensor:
    """Every rank's value of a scalar, in rank order (n floats)."""
    x = x.detach().reshape(1).float()
    if _world() == 1:
        return x
    every = x.new_empty(_world())
    collectives.all_gather_into_tensor(every, x)
    return every


def _feature_grads(raw_image: Optional[torch.Tensor], raw_texts: Optional[torch.Tensor], image: torch.Tensor,
                   texts: torch.Tensor, scale: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """Scale the kernels' raw gradients (None where a side was not needed); d loss / d scale =
    sum(raw_image * I) = sum(raw_texts * T) needs no logits."""
    s = scale.float().reshape(())
    product = (raw_image * image.float()) if raw_image is not None else (raw_texts * texts.float())
    d_scale = product.sum().reshape(scale.shape).to(scale.dtype)
    d_image = None if raw_image is None else (s * raw_image).to(image.dtype)
    d_texts = None if raw_texts is None else (s * raw_texts).to(texts.dtype)
    return d_image, d_texts, d_scale


class _TiledClipLoss(torch.autograd.Function):
    """This rank's CLIP loss (mean of its b image rows and its b texts, halved) from tiles."""

    @staticmethod
    def forward(ctx, image, texts, scale, ops, offset):
        b = image.shape[0]
        row_lse, col_max, col_sum = ops.clip_stats(image, texts, scale)
        col_lse = _merge_column_lse(col_max, col_sum)
        positives = scale.float().reshape(()) * (image.float() * texts[offset:offset + b].float()).sum(1)
        loss = ((row_lse - positives).mean() + (col_lse[offset:offset + b] - positives).mean()) / 2
        ctx.save_for_backward(image, texts, scale, row_lse, col_lse)
        ctx.ops, ctx.offset = ops, offset
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, row_lse, col_lse = ctx.saved_tensors
        b = image.shape[0]
        # Row i's image->text term is this rank's loss; column j's text->image term is the
        # loss of the rank owning text j, weighted by that rank's incoming gradient.
        col_coef = _all_ranks(grad).repeat_interleave(b) / (2 * b)
        row_coef = grad.float() / (2 * b)
        raw_image, raw_texts = ctx.ops.clip_grads(image, texts, scale, row_lse, col_lse, row_coef, col_coef,
                                                  ctx.offset, *ctx.needs_input_grad[:2])
        return *_feature_grads(raw_image, raw_texts, image, texts, scale), None, None


class _TiledSigLipLoss(torch.autograd.Function):
    """This rank's SigLIP loss: sum over its rows and all texts of -log sigmoid(z * logits), / b."""

    @staticmethod
    def forward(ctx, image, texts, scale, bias, ops, offset):
        loss = ops.siglip_row_loss(image, texts, scale, bias, offset).sum() / image.shape[0]
        ctx.save_for_backward(image, texts, scale, bias)
        ctx.ops, ctx.offset = ops, offset
        return loss

    @staticmethod
    def backward(ctx, grad):
        image, texts, scale, bias = ctx.saved_tensors
        coef = grad.float() / image.shape[0]
        raw_image, raw_texts, raw_bias = ctx.ops.siglip_grads(image, texts, scale, bias, coef, ctx.offset,
                                                              *ctx.needs_input_grad[:2])
        d_bias = raw_bias.reshape(bias.shape).to(bias.dtype)
        return *_feature_grads(raw_image, raw_texts, image, texts, scale), d_bias, None, None


class TiledContrastiveLoss(nn.Module):
    """CLIP or SigLIP loss without a logits matrix: Triton kernels or the PyTorch twin."""

    def __init__(self, kind: str, impl: str, chunk_rows: int):
        super().__init__()
        self.kind, self.impl = kind, impl
        self.twin = TwinOps(chunk_rows)
        self.triton = None

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = image_features.shape[0]
        if text_features.shape[0] != b:
            raise ValueError(f"image and text features need the same batch; got {b} and {text_features.shape[0]}")
        self._check_equal_batches(image_features)
        ops = self._ops(image_features)
        if not self._uses_triton(image_features):  # the twin computes in fp32: gather fp32, as the reference does
            image_features, text_features = image_features.float(), text_features.float()
        # the Triton kernels take the training dtype (tensor cores under bf16 / fp16) and accumulate in fp32
        texts = gather_with_grad(text_features)  # with the batch check: an empty rank fails on every rank
        if b == 0:
            raise ValueError("empty batch: the contrastive loss needs at least one image-text pair per rank")
        offset = rank_offset(b)
        if self.kind == "clip":  # a logit bias shifts every logit alike: softmax ignores it
            return _TiledClipLoss.apply(image_features, texts, logit_scale, ops, offset)
        if logit_bias is None:
            logit_bias = torch.zeros((), device=image_features.device)
        return _TiledSigLipLoss.apply(image_features, texts, logit_scale, logit_bias, ops, offset)

    def _uses_triton(self, features: torch.Tensor) -> bool:
        return self.impl == "triton" or (self.impl == "auto" and features.is_cuda)

    def _ops(self, features: torch.Tensor):
        if self._uses_triton(features):
            if self.triton is None:
                from dsclip_kernels.contrastive import TritonOps  # imports triton only when it is used
                self.triton = TritonOps()
            if features.is_cuda:  # compiled for this GPU: check it once before trusting it
                check_against_twin(self.triton, features.device, features.dtype, features.shape[1])
            return self.triton
        return self.twin

    def _check_equal_batches(self, features: torch.Tensor) -> None:
        """Ranks must hold equal local batches, on every step: a check skipped on one rank (e.g.
        for a size it saw before) while another makes it leaves the ranks in different
        collectives. The shared-memory exchange checks the sizes inside the feature gather;
        elsewhere it costs one 2-int all-reduce and a host sync."""
        b = features.shape[0]
        if _world() == 1 or collectives.gather_checks_sizes(features):
            return
        sizes = torch.tensor([b, -b], device=features.device)
        collectives.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if sizes[0].item() != b or -sizes[1].item() != b:
            raise unequal_batches(b, [b, int(sizes[0]), int(-sizes[1])])


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module for a config; called after the process group exists."""
    cfg.validate()
    if cfg.impl == "reference":
        return ReferenceClipLoss() if cfg.kind == "clip" else ReferenceSigLipLoss()
    return TiledContrastiveLoss(cfg.kind, cfg.impl, cfg.chunk_rows)
