"""Gradient caching (Gao et al. 2021): one optimizer step over `grad_accum_steps` micro-batches
whose samples are all contrasted with each other, with the activation memory of one micro-batch.

1. Every micro-batch runs forward without autograd; only its features are kept (and the RNG
   state it started from).
2. The loss over all the step's features (every rank's, through the loss's own gather) is
   back-propagated to the features and to logit_scale / logit_bias only.
3. Every micro-batch runs forward again with autograd, from the same RNG state (dropout, patch
   dropout and stochastic depth repeat exactly), and back-propagates its slice of the cached
   feature gradients through the DeepSpeed engine; the first one also carries the
   logit_scale / logit_bias gradient, so it is applied once per step.

The gradient equals the one of the loss over the whole step's batch at the cost of one extra
forward. A tower with nothing to train needs no second forward: its no-grad features stand.
"""
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dsclip.model.partition import LayerPartition

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainableTowers:
    image: bool
    text: bool

    @classmethod
    def of(cls, clip: torch.nn.Module) -> "TrainableTowers":
        partition = LayerPartition(clip)
        towers = {partition.tower(name) for name, p in clip.named_parameters() if p.requires_grad}
        return cls(image="image" in towers, text="text" in towers)


@dataclass
class _Cached:
    """The no-grad pass of one micro-batch."""
    images: torch.Tensor
    texts: torch.Tensor
    rng: tuple[torch.Tensor, Optional[torch.Tensor]]
    image_features: torch.Tensor
    text_features: torch.Tensor


def describe_contrastive_batch(batch_size: int, accum: int, world: int, grad_cache: bool) -> str:
    """The start-up line: how many samples each sample is contrasted with, and why."""
    if grad_cache:
        return (f"contrastive batch {batch_size * accum * world} per step (gradient caching: {accum} micro-batches "
                f"of {batch_size} on each of {world} ranks)")
    line = f"contrastive batch {batch_size * world} ({batch_size} per rank x {world} ranks)"
    if accum > 1:
        line += (f"; {accum} of them accumulated per step, each contrasted only within itself "
                 f"(train.grad_cache=true contrasts all {batch_size * accum * world})")
    return line


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _leaf(x: Optional[torch.Tensor], grad: bool) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().requires_grad_(grad)


def cached_step(engine: Any, loss_fn: Callable, batches: list[Batch], towers: TrainableTowers,
                to_device: Callable[[Batch], Batch], on_micro_step: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss and backward of one optimizer step over `batches`. They stay where they are
    (host memory: a step's inputs can outgrow a GPU's) and go through `to_device` for each forward;
    `on_micro_step` is called after each micro-batch's backward (the engine's step). Returns
    (this rank's loss over the whole step, the logit scale)."""
    device = engine.device
    cached = []
    with torch.no_grad():
        for images, texts in batches:
            rng = _rng_state(device)
            image_features, text_features, logit_scale, logit_bias = engine(*to_device((images, texts)))
            cached.append(_Cached(images, texts, rng, image_features, text_features))

    images_all = _leaf(torch.cat([c.image_features for c in cached]), towers.image)
    texts_all = _leaf(torch.cat([c.text_features for c in cached]), towers.text)
    scale, bias = _leaf(logit_scale.float(), True), _leaf(None if logit_bias is None else logit_bias.float(), True)
    loss = loss_fn(images_all, texts_all, scale, bias)
    loss.backward()  # plain autograd: the leaves above only, no model parameter
    image_grads = images_all.grad.split([len(c.images) for c in cached]) if towers.image else None
    text_grads = texts_all.grad.split([len(c.texts) for c in cached]) if towers.text else None

    end_rng = _rng_state(device)
    for i, c in enumerate(cached):
        _set_rng_state(c.rng, device)
        images, texts = to_device((c.images, c.texts))
        image_features, text_features, logit_scale, logit_bias = engine(
            images=images if towers.image else None, texts=texts if towers.text else None)
        surrogate = logit_scale.new_zeros(())
        if towers.image:
            surrogate = surrogate + (image_features.float() * image_grads[i]).sum()
        if towers.text:
            surrogate = surrogate + (text_features.float() * text_grads[i]).sum()
        if i == 0:  # d loss / d scale (and bias) once per step
            surrogate = surrogate + (logit_scale.float() * scale.grad).sum()
            if bias is not None:
                surrogate = surrogate + (logit_bias.float() * bias.grad).sum()
        # the surrogate's gradient is already this micro-batch's share of the step's: no 1/k
        engine.backward(surrogate, scale_wrt_gas=False)
        on_micro_step()
    _set_rng_state(end_rng, device)
    return loss.detach(), logit_scale.detach()
