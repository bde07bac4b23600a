"""Reduced-size JPEG decode: the crop open_clip's training transform takes, from fewer decoded pixels."""
import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dsclip.data.decode import ImageDecoder

TRANSFORM = open_clip.image_transform(64, is_train=True)  # RandomResizedCrop(64, scale 0.9-1), then per-pixel steps
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
# The stated bound: the same crop, decoded reduced and decoded whole, differs by this many levels
# (of 255) per pixel, averaged over a crop; the mean over seeds stays well under it.
MAX_MEAN_LEVELS = 5.0
MAX_MEAN_OVER_SEEDS = 1.5


def photo(size: int, fmt: str = "JPEG") -> bytes:
    """A photo-like image: smooth colour regions plus grain."""
    rng = np.random.default_rng(size)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((size, size),
                                                                                                 Image.BICUBIC))
    pixels = (smooth.astype(np.int16) + rng.integers(-12, 12, smooth.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decoded(data: bytes, seed: int, reduce: bool) -> torch.Tensor:
    torch.manual_seed(seed)
    return ImageDecoder(TRANSFORM, reduce)(Image.open(io.BytesIO(data)))


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalised crops, in levels of 255."""
    return ((a - b) * STD).abs().mean().item() * 255


@pytest.mark.parametrize("size,factor", [(256, 2), (512, 4), (1024, 8)])
def test_a_large_jpeg_decodes_reduced_to_the_same_crop(size, factor):
    data = photo(size)
    with Image.open(io.BytesIO(data)) as image:
        torch.manual_seed(0)
        ImageDecoder(TRANSFORM)(image)
        assert image.size == (size // factor, size // factor)  # 0.9-1.0 of the area: crops of ~0.82-1 x size
    differences = [levels(decoded(data, seed, reduce=False), decoded(data, seed, reduce=True)) for seed in range(10)]
    assert max(differences) < MAX_MEAN_LEVELS and np.mean(differences) < MAX_MEAN_OVER_SEEDS, differences
    # A different crop would differ by far more: the bound can tell crops apart.
    assert levels(decoded(data, 0, reduce=False), decoded(data, 1, reduce=True)) > 3 * MAX_MEAN_OVER_SEEDS


def test_the_random_draws_after_a_reduced_decode_are_those_of_a_whole_one():
    data = photo(512)
    after = {}
    for reduce in (False, True):
        decoded(data, 7, reduce)
        after[reduce] = torch.rand(3)
    assert torch.equal(after[False], after[True])


@pytest.mark.parametrize("data", [photo(96), photo(512, "PNG")], ids=["small-jpeg", "png"])
def test_small_jpegs_and_other_formats_decode_whole_exactly_as_the_transform(data):
    for seed in range(5):
        torch.manual_seed(seed)
        expected = TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
        assert torch.equal(decoded(data, seed, reduce=True), expected)


def test_other_transforms_and_reduce_false_decode_whole():
    data = photo(512)
    evaluation = open_clip.image_transform(64, is_train=False)
    assert torch.equal(ImageDecoder(evaluation)(Image.open(io.BytesIO(data))),
                       evaluation(Image.open(io.BytesIO(data)).convert("RGB")))
    torch.manual_seed(3)
    expected = TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(decoded(data, 3, reduce=False), expected)
