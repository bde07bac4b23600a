"""Gradient caching (Gao et al. 2021): one optimizer step over `grad_accum_steps` micro-batches
whose samples are all contrasted with each other, with the activation memory of one micro-batch.

1. Every micro-batch runs each tower forward without autograd; only the features are kept, and
   the RNG state each tower started from.
2. The loss over all the step's features (every rank's, through the loss's own gather) is
   back-propagated to the features and to logit_scale / logit_bias only.
3. Every micro-batch runs each trainable tower forward again with autograd, from that tower's
   saved RNG state (dropout, patch dropout and stochastic depth repeat exactly, also when the
   other tower is frozen and not run again), and back-propagates its slice of the cached
   feature gradients through the DeepSpeed engine, with 1/k of the logit_scale / logit_bias
   gradient (every micro-batch carries a share: under ZeRO-3 with optimizer offload only the
   last micro-batch's gradients reach the optimizer for a parameter it touches).

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


def _tower_pass(engine: Any, images: Optional[torch.Tensor], texts: Optional[torch.Tensor]) -> tuple:
    """(features of the one tower given input, logit_scale, logit_bias)."""
    image_features, text_features, logit_scale, logit_bias = engine(images=images, texts=texts)
    return (image_features if images is not None else text_features), logit_scale, logit_bias


def _loss_leaves(features: list[torch.Tensor], grad: bool) -> torch.Tensor:
    x = torch.cat(features)
    # fp16 gradients of about 1 / (2 x rows) would flush to zero without the engine's loss
    # scale, which this plain backward lacks: fp16 features enter the loss in fp32
    return _leaf(x.float() if x.dtype == torch.float16 else x, grad)


def cached_step(engine: Any, loss_fn: Callable, batches: list[Batch], towers: TrainableTowers,
                to_device: Callable[[Batch], Batch], on_micro_step: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss and backward of one optimizer step over `batches`. They stay where they are
    (host memory: a step's inputs can outgrow a GPU's) and go through `to_device` for each forward;
    `on_micro_step` is called after each micro-batch's backward (the engine's step). Returns
    (this rank's loss over the whole step, the logit scale)."""
    device, k = engine.device, len(batches)
    rng: list[tuple] = []  # per micro-batch: the image tower's and the text tower's start states
    image_features, text_features = [], []
    with torch.no_grad():
        for batch in batches:
            images, texts = to_device(batch)
            image_rng = _rng_state(device)
            image_features.append(_tower_pass(engine, images, None)[0])
            text_rng = _rng_state(device)
            features, logit_scale, logit_bias = _tower_pass(engine, None, texts)
            text_features.append(features)
            rng.append((image_rng, text_rng))
    sizes = [len(f) for f in image_features]
    images_all, texts_all = _loss_leaves(image_features, towers.image), _loss_leaves(text_features, towers.text)
    del image_features, text_features
    scale, bias = _leaf(logit_scale.float(), True), _leaf(None if logit_bias is None else logit_bias.float(), True)
    loss = loss_fn(images_all, texts_all, scale, bias)
    loss.backward()  # plain autograd: the leaves above only, no model parameter
    image_grads = images_all.grad.split(sizes) if towers.image else None
    text_grads = texts_all.grad.split(sizes) if towers.text else None
    del images_all, texts_all

    end_rng = _rng_state(device)
    for i, batch in enumerate(batches):
        images, texts = to_device(batch)
        surrogate = 0.0
        for trainable, inputs, grads, state in ((towers.image, (images, None), image_grads, rng[i][0]),
                                                (towers.text, (None, texts), text_grads, rng[i][1])):
            if trainable:
                _set_rng_state(state, device)
                features, logit_scale, logit_bias = _tower_pass(engine, *inputs)
                surrogate = surrogate + (features.float() * grads[i]).sum()
        if not (towers.image or towers.text):  # only logit_scale / logit_bias train
            _, logit_scale, logit_bias = _tower_pass(engine, None, texts)
        # d loss / d scale (and bias): a 1/k share in every micro-batch
        surrogate = surrogate + (logit_scale.float() * scale.grad).sum() / k
        if bias is not None:
            surrogate = surrogate + (logit_bias.float() * bias.grad).sum() / k
        # the surrogate's gradient is already this micro-batch's share of the step's: no 1/k
        engine.backward(surrogate, scale_wrt_gas=False)
        on_micro_step()
    _set_rng_state(end_rng, device)
    return loss.detach(), logit_scale.detach()
