"""Captioned synthetic images: coloured shapes on plain backgrounds, rendered in code.

Deterministic (sample i of a seed is always the same image and caption), learnable, and
with a known zero-shot task: the class is the (colour, shape) pair.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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
MAX_CLASSES = len(COLORS) * len(SHAPES)


@dataclass
class SyntheticConfig:
    num_classes: int = 12  # (colour, shape) classes used, at most 24
    train_samples: int = 32768  # images per training epoch
    eval_samples: int = 512  # held-out images for zero-shot evaluation (a disjoint seed range)

    def validate(self) -> None:
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"synthetic.num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")


def class_names(num_classes: int) -> list[str]:
    """Class i is a colour-shape pair; shapes vary fastest so any prefix of 4+ classes has every shape."""
    colors = list(COLORS)
    return [f"{colors[i // len(SHAPES)]} {SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def render_sample(seed: int, index: int, num_classes: int, size: int = 64) -> tuple[Image.Image, str, int]:
    """Image, caption and class label of sample `index` under `seed`."""
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
