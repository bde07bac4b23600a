"""Decoding training images at the size the model needs, and finishing them a batch at a time.

open_clip's training transform is RandomResizedCrop to the model's input size, then RGB
conversion, ToTensor and Normalize. ImageDecoder does the same work, cheaper:

- The crop is drawn first, in the original image's coordinates, with RandomResizedCrop's own
  algorithm and parameters (scale, ratio, ten tries, then the centre crop): the same distribution
  of crops. The draws come from a Python generator seeded from torch's (one draw of torch's
  per image, so torch's seeding still decides them): torchvision's get_params spends a few tensor
  operations per try, more time than decoding a 128 px JPEG.
- A JPEG whose crop is at least 2x the output on both sides is decoded at the largest DCT scale
  (1/2, 1/4, 1/8: libjpeg's scaled decode through PIL's `draft`) that still gives the crop at
  least the output's pixels, and the crop is resampled from those pixels where it lies. A
  1024 px photo for a 224 px model decodes at 1/4 scale.
- With open_clip's own finishing steps, a crop is kept as uint8 pixels and a whole batch is
  converted and normalised at once (the same arithmetic, element by element, as ToTensor then
  Normalize per image).

Other transforms (no RandomResizedCrop first, e.g. the evaluation transform) run as they are.
"""
import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from open_clip.transform import MaybeConvertMode
from PIL import Image
from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
from torchvision.transforms.functional import pil_modes_mapping

DCT_FACTORS = (8, 4, 2)  # the reductions libjpeg decodes to
JPEG_FORMATS = ("JPEG", "MPO")  # PIL's names: a camera's multi-picture file is a JPEG with more images after it
CROP_TRIES = 10  # RandomResizedCrop's tries before it falls back to the centre crop


def _dct_factor(crop_width: float, crop_height: float, out_width: int, out_height: int) -> int:
    """The largest reduction that leaves the crop at least the output's size on both sides, or 1."""
    room = min(crop_width / out_width, crop_height / out_height)
    return next((f for f in DCT_FACTORS if room >= f), 1)


def draw_crop(rng: random.Random, height: int, width: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop drawn as torchvision's RandomResizedCrop.get_params
    draws it: an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, tried ten
    times, else the centre crop at the nearest allowed ratio."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width, crop_height = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    if width / height < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif width / height > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU random state set from `seed` inside the block and put back after it: a sample's
    augmentation depends on the sample alone. Only the CPU generator: torch.manual_seed also seeds
    every accelerator backend lazily and records a stack trace for each (1.5 ms a call here, more
    than decoding a 128 px JPEG); the draws on the CPU are the same."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _batch_normalize(ops: list) -> Optional[Normalize]:
    """The Normalize of open_clip's finishing steps (RGB conversion, ToTensor, Normalize), which a
    batch of uint8 crops can take at once; None for any other steps."""
    kinds = [type(op) for op in ops]
    if len(ops) == 3 and kinds[0] is MaybeConvertMode and issubclass(kinds[1], ToTensor) and kinds[2] is Normalize:
        return ops[2]
    return None


class ImageDecoder:
    """PIL image (opened, not yet loaded) -> `prepare` -> `collate` a batch of them (in a loader
    worker) -> `finish` it (in the training process, on its device) as the transform would have
    made it (module docstring). `reduce=False` decodes every image whole (the crop and its resample
    are the same)."""

    def __init__(self, transform: Callable, reduce: bool = True):
        self.transform, self.reduce = transform, reduce
        ops = transform.transforms if isinstance(transform, Compose) else []
        self.crop: Optional[RandomResizedCrop] = ops[0] if ops and isinstance(ops[0], RandomResizedCrop) else None
        self.rest = Compose(ops[1:]) if self.crop is not None else None
        normalize = _batch_normalize(ops[1:]) if self.crop is not None else None
        self.batch_normalize = normalize is not None
        if normalize is not None:  # as (3, 1, 1) tensors, made once, not per batch
            self.mean = torch.tensor(normalize.mean, dtype=torch.float32)[:, None, None]
            self.std = torch.tensor(normalize.std, dtype=torch.float32)[:, None, None]

    def prepare(self, image: Image.Image) -> Any:
        """One image's part of a batch: its crop as uint8 pixels (H, W, 3), or its tensor where the
        transform's steps are not open_clip's own."""
        if self.crop is None:
            return self.transform(image.convert("RGB"))
        cropped = self.resample(*self.decode(image))
        return torch.from_numpy(np.array(cropped)) if self.batch_normalize else self.rest(cropped)

    @staticmethod
    def collate(prepared: list[Any]) -> torch.Tensor:
        """Prepared images stacked: uint8 crops (b, H, W, 3), a quarter of a float batch's bytes to pass
        out of a loader worker (a new shared-memory block per batch, paid per page), or tensors."""
        return torch.stack(prepared)

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """A collated batch as the model takes it, (b, 3, H, W) float32, on the batch's device: uint8
        crops get ToTensor's and Normalize's arithmetic for the whole batch at once. The training
        loop finishes a batch after moving it to its accelerator: a quarter of the bytes to copy,
        and the arithmetic off the CPU."""
        if not self.batch_normalize:
            return batch
        count, height, width, channels = batch.shape
        images = torch.empty(count, channels, height, width, dtype=torch.float32, device=batch.device)
        images.copy_(batch.permute(0, 3, 1, 2))  # to float and to channels-first at once: a third of the time
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return images.div_(255).sub_(mean).div_(std)

    def decode(self, image: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """The decoded RGB pixels (reduced where the crop allows) and the crop in them as a box (left,
        top, right, bottom): drawn in the original image's coordinates, scaled to the decoded size."""
        width, height = image.size
        rng = random.Random(int(torch.randint(2**62, ())))  # one draw of torch's: its seeding decides the crop
        top, left, crop_height, crop_width = draw_crop(rng, height, width, self.crop.scale, self.crop.ratio)
        out_height, out_width = self.crop.size
        factor = _dct_factor(crop_width, crop_height, out_width, out_height) if self.reduce else 1
        scale_x = scale_y = 1.0
        if factor > 1 and image.format in JPEG_FORMATS:
            # PIL picks the largest reduction whose result is at least the size asked for: ask for
            # the rounded-down size, or a side that is no multiple of the factor gets a smaller one.
            # libjpeg maps source pixels to decoded ones by exactly 1/scale: PIL returns that
            # mapping as the original image's box in decoded pixels.
            drafted = image.draft("RGB", (width // factor, height // factor))
            if drafted is not None:
                _, (_, _, mapped_width, mapped_height) = drafted
                scale_x, scale_y = mapped_width / width, mapped_height / height
        return image.convert("RGB"), (left * scale_x, top * scale_y, (left + crop_width) * scale_x,
                                      (top + crop_height) * scale_y)

    def resample(self, image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
        """The crop `box` of decoded pixels resampled to the output size with the transform's
        filter (antialiased, as torchvision resamples a PIL image); a reduced image's box falls
        between its pixels and is resampled exactly where it lies, not rounded to them."""
        out_height, out_width = self.crop.size
        return image.resize((out_width, out_height), pil_modes_mapping[self.crop.interpolation], box=box)
