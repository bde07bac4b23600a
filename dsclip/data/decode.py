"""Decoding a training image at the size the model needs.

open_clip's training transform starts with RandomResizedCrop to the model's input size; a source
several times larger (a 1024 px photo for a 224 px model) is decoded whole, then mostly thrown
away by the resample. JPEG can decode at 1/2, 1/4 or 1/8 of the size in the DCT domain (PIL's
`draft`), for a fraction of the work. ImageDecoder draws the crop with the transform's own
parameters and random draws, in the original image's coordinates; where the crop is at least 2x
the output on both sides, it decodes at the largest DCT scale that still gives the crop at least
the output's pixels, crops and resizes in one resample of the decoded pixels, then applies the
rest of open_clip's transform unchanged. The images, the crops and their distribution are the
same; only the resample starts from fewer pixels. Anything else (a PNG, a small JPEG, another
transform) is decoded whole and goes through the transform as it is.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import Compose, RandomResizedCrop
from torchvision.transforms.functional import pil_modes_mapping

DCT_FACTORS = (8, 4, 2)  # the reductions libjpeg decodes to


def _dct_factor(crop_width: float, crop_height: float, out_width: int, out_height: int) -> int:
    """The largest reduction that leaves the crop at least the output's size on both sides, or 1."""
    room = min(crop_width / out_width, crop_height / out_height)
    return next((f for f in DCT_FACTORS if room >= f), 1)


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


class ImageDecoder:
    """PIL image (opened, not yet loaded) -> the transform's tensor, decoding large JPEGs reduced
    (module docstring). `reduce=False`, or a transform that does not start with RandomResizedCrop,
    decodes every image whole and applies the transform as it is; with RandomResizedCrop, an image
    decoded whole gets exactly the transform's output (the same crop, resampled by the same call)."""

    def __init__(self, transform: Callable, reduce: bool = True):
        self.transform, self.reduce = transform, reduce
        ops = transform.transforms if isinstance(transform, Compose) else []
        first = ops[0] if ops else None
        self.crop: Optional[RandomResizedCrop] = first if isinstance(first, RandomResizedCrop) else None
        self.rest = Compose(ops[1:]) if self.crop is not None else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.crop is None:
            return self.transform(image.convert("RGB"))
        width, height = image.size
        # The crop the transform's RandomResizedCrop would draw, with its own draws; get_params reads
        # only the size of what it is given: a tensor view of that shape, no pixels.
        top, left, crop_height, crop_width = self.crop.get_params(
            torch.empty(1, 1, 1).expand(1, height, width), self.crop.scale, self.crop.ratio)
        out_height, out_width = self.crop.size
        factor = _dct_factor(crop_width, crop_height, out_width, out_height) if self.reduce else 1
        if factor == 1 or image.format != "JPEG":
            cropped = F.resized_crop(image.convert("RGB"), top, left, crop_height, crop_width, list(self.crop.size),
                                     self.crop.interpolation, antialias=self.crop.antialias)
            return self.rest(cropped)
        image.draft("RGB", (-(-width // factor), -(-height // factor)))  # sets image.size to the decoded size
        scale_x, scale_y = image.size[0] / width, image.size[1] / height
        box = (left * scale_x, top * scale_y, (left + crop_width) * scale_x, (top + crop_height) * scale_y)
        cropped = image.convert("RGB").resize((out_width, out_height), pil_modes_mapping[self.crop.interpolation],
                                              box=box)
        return self.rest(cropped)
