"""Zero-shot prompt templates and per-dataset class-name files.

A template holds exactly one `{}` where the class name goes. A class file is YAML:

    classes: [t-shirt, trouser, pullover]
    templates: simple            # a built-in set name, or a list of templates (default: simple)
"""
from dataclasses import dataclass
from pathlib import Path

import yaml

# CLIP-style photo templates: image quality, rendering style, size and framing variations.
IMAGENET_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a blurry photo of a {}.",
    "a sharp photo of a {}.",
    "a dark photo of a {}.",
    "a bright photo of a {}.",
    "a low resolution photo of a {}.",
    "a high resolution photo of a {}.",
    "a pixelated photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a grainy photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}, seen from far away.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "a photo of my {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a photo of a weird {}.",
    "a black and white photo of a {}.",
    "a snapshot of a {}.",
    "an outdoor photo of a {}.",
    "an indoor photo of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a painting of a {}.",
    "a cartoon {}.",
    "a rendering of a {}.",
    "a 3d render of a {}.",
    "a sculpture of a {}.",
    "an embroidered {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a plastic {}.",
    "origami {}.",
    "graffiti of a {}.",
    "art of a {}.",
    "a video game image of a {}.",
    "itap of a {}.",
    "a {} in a video game.",
    "there is a {} in the scene.",
    "this is a picture of a {}.",
]

SIMPLE_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "{}",
]

TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def check_templates(templates: list[str], source: str) -> None:
    """Raise ValueError unless `templates` is a non-empty list of strings with exactly one `{}`."""
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{source}: templates must be a non-empty list of strings")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"{source}: template {template!r} must contain exactly one '{{}}' "
                             f"where the class name goes, e.g. 'a photo of a {{}}.'")


@dataclass
class ClassPrompts:
    classes: list[str]  # class names, in label order
    templates: list[str]  # prompt templates, each with one "{}"

    def prompts(self) -> list[list[str]]:
        """(n_classes, n_templates) prompt strings, class-major."""
        return [[template.replace("{}", name) for template in self.templates] for name in self.classes]


def load_class_prompts(path: str | Path) -> ClassPrompts:
    """Read a `classes:` / `templates:` YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class file {path} does not exist: write a YAML file with "
                         f"'classes: [...]' and optionally 'templates: [...]'")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'classes' and 'templates', got {type(data).__name__}")
    unknown = sorted(data.keys() - {"classes", "templates"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed keys are 'classes' and 'templates'")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of class-name strings "
                         f"(quote names YAML reads as numbers or booleans, e.g. '7' or 'no')")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate class names {duplicates}; each label needs a distinct name")
    templates = data.get("templates", "simple")
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"{path}: unknown template set {templates!r}; use one of "
                             f"{sorted(TEMPLATE_SETS)} or a list of templates")
        templates = TEMPLATE_SETS[templates]
    check_templates(templates, str(path))
    return ClassPrompts(classes=list(classes), templates=list(templates))
