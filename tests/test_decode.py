"""Reduced-size JPEG decode: the crop open_clip's training transform takes, from fewer decoded pixels."""
import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dsclip.data.decode import ImageDecoder, draw_crop

TRANSFORM = open_clip.image_transform(64, is_train=True)  # RandomResizedCrop(64, scale 0.9-1), then per-pixel steps
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
# The stated bound: the same crop, decoded reduced and decoded whole, differs by this many levels
# (of 255) per pixel, averaged over a crop; the mean over seeds stays well under it.
MAX_MEAN_LEVELS = 5.0
MAX_MEAN_OVER_SEEDS = 1.5


def photo(size: int | tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A photo-like image (width, height): smooth colour regions plus grain."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(width * 10000 + height)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((width, height),
                                                                                                 Image.BICUBIC))
    pixels = (smooth.astype(np.int16) + rng.integers(-12, 12, smooth.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def finished(decoder: ImageDecoder, data: bytes) -> torch.Tensor:
    """One image through the decoder as the loaders take it: prepared, collated, finished."""
    return decoder.finish(decoder.collate([decoder.prepare(Image.open(io.BytesIO(data)))]))[0]


def decoded(data: bytes, seed: int, reduce: bool) -> torch.Tensor:
    torch.manual_seed(seed)
    return finished(ImageDecoder(TRANSFORM, reduce), data)


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalised crops, in levels of 255."""
    return ((a - b) * STD).abs().mean().item() * 255


@pytest.mark.parametrize("size,factor", [((256, 256), 2), ((512, 512), 4), ((1024, 1024), 8), ((1001, 1001), 8),
                                         ((1000, 667), 8), ((333, 700), 4)])
def test_a_large_jpeg_decodes_reduced_to_the_same_crop(size, factor):
    """Sides that are no multiple of the factor included: libjpeg rounds the decoded size up."""
    data = photo(size)
    with Image.open(io.BytesIO(data)) as image:
        torch.manual_seed(0)
        ImageDecoder(TRANSFORM).prepare(image)
        assert image.size == tuple(-(-side // factor) for side in size)  # crops of 0.82-1 x each side
    differences = [levels(decoded(data, seed, reduce=False), decoded(data, seed, reduce=True)) for seed in range(10)]
    assert max(differences) < MAX_MEAN_LEVELS and np.mean(differences) < MAX_MEAN_OVER_SEEDS, differences
    if size[0] == size[1]:  # (on a long side, 0.9 of the area at ratio <= 4/3 often falls back to the centre crop)
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
def test_small_jpegs_and_other_formats_decode_whole(data):
    for seed in range(5):
        assert torch.equal(decoded(data, seed, reduce=True), decoded(data, seed, reduce=False))


def test_a_batch_is_normalised_as_totensor_and_normalize_would_each_image():
    decoder = ImageDecoder(TRANSFORM)
    crops = [decoder.resample(*decoder.decode(Image.open(io.BytesIO(photo(size))))) for size in (100, 300, 700)]
    batch = decoder.finish(decoder.collate([torch.from_numpy(np.array(crop)) for crop in crops]))
    assert torch.equal(batch, torch.stack([decoder.rest(crop) for crop in crops]))  # bit for bit


def test_the_evaluation_transform_runs_as_it_is():
    data = photo(512)
    evaluation = open_clip.image_transform(64, is_train=False)
    assert torch.equal(finished(ImageDecoder(evaluation), data),
                       evaluation(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("height,width", [(128, 128), (667, 1000), (1000, 300)])
def test_crops_are_drawn_as_random_resized_crop_draws_them(height, width):
    """The same algorithm on another generator: the same distribution of crop sizes and places."""
    ours = torch.tensor([draw_crop(random.Random(seed), height, width, TRANSFORM.transforms[0].scale,
                                   TRANSFORM.transforms[0].ratio) for seed in range(3000)], dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.tensor([TRANSFORM.transforms[0].get_params(torch.empty(1, height, width), (0.9, 1.0), (3 / 4, 4 / 3))
                           for _ in range(3000)], dtype=torch.float64)
    for column, name in enumerate(("top", "left", "height", "width")):
        scale = max(theirs[:, column].std().item(), 1.0)
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.1 * scale, name
        assert abs(ours[:, column].std() - theirs[:, column].std()) < 0.1 * scale, name
    fallback = (ours[:, 2] == ours[:, 2].mode().values) & (ours[:, 3] == ours[:, 3].mode().values)
    assert abs(fallback.double().mean() - ((theirs[:, 2] == theirs[:, 2].mode().values) &
                                           (theirs[:, 3] == theirs[:, 3].mode().values)).double().mean()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the training loop finishes batches on the GPU")
def test_a_batch_finished_on_the_gpu_is_the_batch_finished_on_the_cpu():
    decoder = ImageDecoder(TRANSFORM)
    crops = decoder.collate([decoder.prepare(Image.open(io.BytesIO(photo(size)))) for size in (100, 300, 700)])
    on_gpu = decoder.finish(crops.cuda())
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), decoder.finish(crops), atol=1e-6, rtol=0)
