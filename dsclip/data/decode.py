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
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision.transforms import Compose, RandomResizedCrop
from torchvision.transforms.functional import pil_modes_mapping

DCT_FACTORS = (8, 4, 2)  # the reductions libjpeg decodes to


def _dct_factor(crop_width: float, crop_height: float, out_width: int, out_height: int) -> int:
    """The largest reduction that leaves the crop at least the output's size on both sides, or 1."""
    room = min(crop_width / out_width, crop_height / out_height)
    return next((f for f in DCT_FACTORS if room >= f), 1)


class ImageDecoder:
    """PIL image (opened, not yet loaded) -> the transform's tensor, decoding large JPEGs reduced
    (module docstring). `reduce=False`, or a transform that does not start with RandomResizedCrop,
    decodes every image whole."""

    def __init__(self, transform: Callable, reduce: bool = True):
        self.transform = transform
        ops = transform.transforms if isinstance(transform, Compose) else []
        first = ops[0] if ops else None
        self.crop: Optional[RandomResizedCrop] = first if reduce and isinstance(first, RandomResizedCrop) else None
        self.rest = Compose(ops[1:]) if self.crop is not None else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.crop is None or image.format != "JPEG":
            return self.transform(image.convert("RGB"))
        state = torch.get_rng_state()
        factor, box = self._reduction(image)
        if factor == 1:  # the transform runs whole and draws the same crop again
            torch.set_rng_state(state)
            return self.transform(image.convert("RGB"))
        width, height = image.size
        image.draft("RGB", (-(-width // factor), -(-height // factor)))  # sets image.size to the decoded size
        scale_x, scale_y = image.size[0] / width, image.size[1] / height
        left, top, right, bottom = box
        out_height, out_width = self.crop.size
        cropped = image.convert("RGB").resize((out_width, out_height), pil_modes_mapping[self.crop.interpolation],
                                              box=(left * scale_x, top * scale_y, right * scale_x, bottom * scale_y))
        return self.rest(cropped)

    def _reduction(self, image: Image.Image) -> tuple[int, tuple[int, int, int, int]]:
        """(DCT factor, crop box in original pixels): the crop the transform's own RandomResizedCrop
        would draw, with the same random draws."""
        width, height = image.size
        # get_params reads only the size of what it is given: a tensor view of that shape, no pixels.
        top, left, crop_height, crop_width = self.crop.get_params(
            torch.empty(1, 1, 1).expand(1, height, width), self.crop.scale, self.crop.ratio)
        out_height, out_width = self.crop.size
        return _dct_factor(crop_width, crop_height, out_width, out_height), (left, top, left + crop_width,
                                                                            top + crop_height)
