"""Captioned synthetic images: coloured shapes on plain backgrounds, rendered in code.

Deterministic (sample i of a seed is always the same image and caption), learnable, and with a
known zero-shot task: the class is the (colour, shape) pair. A sample is drawn square at twice
the model's resolution, reduced with an antialiasing bicubic filter and centre-cropped to the
model's size (as open_clip's eval transform does), so training and evaluation images are made the
same way.

Training data is rendered once into a uint8 tensor and its captions (a few hundred distinct
ones) tokenized once, so a step costs an index and a normalisation, not PIL and the tokenizer on
the cores that train. Sets too large to hold (`CACHE_BYTES`) are rendered batch by batch.
"""
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from dsclip.data.config import SYNTHETIC_CLASSES, SyntheticConfig

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (235, 215, 30),
          "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "triangle", "cross", "ring")
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
CAPTION_TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a photo of a {color} {shape}",
    "a {color} {shape}",
    "a drawing of a {color} {shape} on {background}",
    "{color} {shape}",
)
EVAL_SEED_OFFSET = 1_000_003  # held-out images come from a seed range training never uses
CACHE_BYTES = 1 << 30  # rendered training sets up to this size are kept in memory
assert len(COLORS) * len(SHAPES) == SYNTHETIC_CLASSES


def class_names(num_classes: int) -> list[str]:
    """Class i is a colour-shape pair; shapes vary fastest so any prefix of 4+ classes has every shape."""
    colors = list(COLORS)
    return [f"{colors[i // len(SHAPES)]} {SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def all_captions(num_classes: int) -> list[str]:
    """Every caption the first `num_classes` classes can get, in a fixed order."""
    return sorted({template.format(color=color, shape=shape, background=background)
                   for name in class_names(num_classes) for color, shape in [name.split(" ")]
                   for background in BACKGROUNDS for template in CAPTION_TEMPLATES})


def render_sample(seed: int, index: int, num_classes: int, size: int = 64) -> tuple[Image.Image, str, int]:
    """Image (size x size), caption and class label of sample `index` under `seed`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(num_classes))
    color, shape = class_names(num_classes)[label].split(" ")
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    # Large, roughly centred shapes: at 32 px and 8 px patches, outline cues must span patches.
    radius = size * rng.uniform(0.28, 0.4)
    cx, cy = size / 2 + size * rng.uniform(-0.08, 0.08, size=2)
    draw_shape(ImageDraw.Draw(image), shape, (cx, cy), radius, COLORS[color])
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return image, template.format(color=color, shape=shape, background=background), label


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center: tuple[float, float], radius: float,
               fill: tuple[int, int, int]) -> None:
    cx, cy = center
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(radius / 3)))
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(seed: int, indices: Sequence[int], num_classes: int, image_size: tuple[int, int]
           ) -> tuple[torch.Tensor, list[str], list[int]]:
    """uint8 images (n, 3, height, width), captions and labels of samples `indices`."""
    height, width = image_size
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pixels = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    captions, labels = [], []
    for row, index in enumerate(indices):
        image, caption, label = render_sample(seed, int(index), num_classes, 2 * side)
        reduced = np.asarray(image.resize((side, side), Image.BICUBIC))  # reduces with antialiasing
        pixels[row] = reduced[top:top + height, left:left + width]
        captions.append(caption)
        labels.append(label)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, labels


class Normalize:
    """uint8 (n, 3, h, w) -> float32, (x / 255 - mean) / std per channel, as open_clip's transforms."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self.scale).sub_(self.shift)


class SyntheticSet:
    """Samples [0, size) of one seed: images already at the model's size, captions as token rows.

    With `cache`, each sample is rendered the first time it is asked for and kept (uint8);
    `prepare(indices)` renders samples ahead of the steps that use them."""

    def __init__(self, seed: int, size: int, num_classes: int, image_size: tuple[int, int],
                 tokenizer: Callable, normalize: Normalize, cache: bool):
        self.seed, self.size, self.num_classes, self.image_size = seed, size, num_classes, image_size
        captions = all_captions(num_classes)
        self.caption_ids = {caption: i for i, caption in enumerate(captions)}
        self.caption_tokens = tokenizer(captions)  # (distinct captions, context_length)
        self.normalize = normalize
        self.cache = cache
        if cache:  # untouched pages of an empty tensor cost no memory: only rendered samples do
            self.images = torch.empty((size, 3, *image_size), dtype=torch.uint8)
            self.captions = torch.empty(size, dtype=torch.long)
            self.rendered = torch.zeros(size, dtype=torch.bool)

    def _render(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions, _ = render(self.seed, indices, self.num_classes, self.image_size)
        return images, torch.tensor([self.caption_ids[c] for c in captions], dtype=torch.long)

    def prepare(self, indices: torch.Tensor) -> None:
        """Render and keep the samples of `indices` not rendered yet (no-op without the cache)."""
        if not self.cache:
            return
        todo = indices[~self.rendered[indices]].unique()
        if len(todo):
            self.images[todo], self.captions[todo] = self._render(todo.tolist())
            self.rendered[todo] = True

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images (n, 3, h, w), tokens (n, context_length)) of samples `indices`."""
        if self.cache:
            self.prepare(indices)
            images, captions = self.images[indices], self.captions[indices]
        else:
            images, captions = self._render(indices.tolist())
        return self.normalize(images), self.caption_tokens[captions]


def training_set(cfg: SyntheticConfig, seed: int, image_size: tuple[int, int], tokenizer: Callable,
                 normalize: Normalize) -> SyntheticSet:
    """The training samples of `seed`, cached when they fit `CACHE_BYTES`."""
    fits = cfg.train_samples * 3 * image_size[0] * image_size[1] <= CACHE_BYTES
    return SyntheticSet(seed, cfg.train_samples, cfg.num_classes, image_size, tokenizer, normalize, cache=fits)

