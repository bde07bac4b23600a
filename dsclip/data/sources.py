"""Labelled, captioned image sources read sample by sample: a CSV/TSV file, an image folder with one
subfolder per class, the Fashion-MNIST idx files and the openclipart PNG collection that Debian packages
ship. `dsclip make-shards` writes them as shards (shard_writer.py); evaluation reads them directly."""
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Protocol

import numpy as np
from PIL import Image

from dsclip.data.config import CsvConfig
from dsclip.data.files import list_image_folder, read_csv_rows
from dsclip.data.templates import SIMPLE_TEMPLATES, check_templates
from dsclip.errors import DataSetError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
OPENCLIPART_DIR = "/usr/share/openclipart/png"  # Debian package openclipart-png


@dataclass
class Sample:
    image: Image.Image
    caption: str
    meta: dict[str, Any]  # written as the sample's .json (label and class name for classification sources)
    file: Optional[str] = None  # the image file the sample was read from, whose bytes make-shards may copy


class Source(Protocol):
    name: str  # recorded in the manifest; a re-run into the same folder must name the same source
    class_names: Optional[list[str]]  # label order, for zero-shot evaluation; None for caption-only sources

    def __len__(self) -> int: ...

    def load(self, index: int) -> Optional[Sample]:
        """The sample, or None when it is unusable (unreadable image, empty caption)."""


def _open_rgb(path: str) -> Optional[Image.Image]:
    try:
        with Image.open(path) as img:
            if img.mode in ("RGBA", "LA", "P"):  # clip art: transparent background onto white
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return img.convert("RGB")
    except Exception as exn:  # unreadable, missing or empty file: skipped and counted by the writer
        log.debug("unusable image %s: %r", path, exn)
        return None


class CsvSource:
    """One sample per image, in order of first appearance: the rows of an image are its captions
    (several captions per image, as COCO and Flickr30k have), stored one per line."""

    def __init__(self, cfg: CsvConfig):
        cfg.validate()
        self.name, self.class_names = f"csv:{Path(cfg.path).resolve()}", None
        grouped: dict[str, list[str]] = {}
        for path, caption in read_csv_rows(cfg):
            captions = grouped.setdefault(path, [])
            if caption:
                captions.append(" ".join(caption.split()))  # a line break inside would split the caption
        self.items = list(grouped.items())

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Optional[Sample]:
        path, captions = self.items[index]
        image = _open_rgb(path) if captions else None
        if image is None:
            return None
        meta = {"caption": captions[0]} if len(captions) == 1 else {"captions": captions}
        return Sample(image, "\n".join(captions), {**meta, "path": path}, path)


class FolderSource:
    """One subfolder per class; caption = templates[index % len(templates)] with the class name."""

    def __init__(self, root: str, templates: list[str]):
        check_templates(templates, "make-shards templates")
        self.name, self.templates = f"folder:{Path(root).resolve()}", templates
        self.class_names, self.items = list_image_folder(root)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Optional[Sample]:
        path, label = self.items[index]
        image = _open_rgb(path)
        if image is None:
            return None
        name = self.class_names[label]
        caption = self.templates[index % len(self.templates)].replace("{}", name)
        return Sample(image, caption, {"label": label, "class_name": name, "path": path}, path)


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Payload bytes of a gzipped idx file (images: offset 16, labels: offset 8)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


class FashionMnistSource:
    def __init__(self, root: str, split: Literal["train", "test"], templates: list[str]):
        check_templates(templates, "make-shards templates")
        if split not in ("train", "test"):
            raise DataSetError(f"Fashion-MNIST has the splits train and test, not {split!r}")
        prefix = {"train": "train", "test": "t10k"}[split]
        images, labels = Path(root) / f"{prefix}-images-idx3-ubyte.gz", Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
        for path in (images, labels):
            if not path.is_file():
                raise FileNotFoundError(f"Fashion-MNIST file {path} not found: apt-get install dataset-fashion-mnist")
        self.images = read_idx(images, 16).reshape(-1, 28, 28)
        self.labels = read_idx(labels, 8)
        self.name, self.class_names, self.templates = f"fashion-mnist:{split}", list(FASHION_MNIST_CLASSES), templates

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Optional[Sample]:
        label = int(self.labels[index])
        name = self.class_names[label].lower()
        caption = self.templates[index % len(self.templates)].replace("{}", name)
        image = Image.fromarray(self.images[index]).convert("RGB")
        return Sample(image, caption, {"label": label, "class_name": self.class_names[label]})


class OpenclipartSource:
    """~8k PNGs in nested category folders named like title_author_01.png. The caption joins the file title and
    its category path; the label is the top-level category."""

    def __init__(self, root: str):
        self.name = f"openclipart:{Path(root).resolve()}"
        self.class_names, items = list_image_folder(root)
        self.items = [(path, label, Path(path).relative_to(root)) for path, label in items]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Optional[Sample]:
        path, label, rel = self.items[index]
        image = _open_rgb(path)
        if image is None:
            return None
        title = " ".join(w for w in rel.stem.split("_") if w and not w.isdigit())
        category = " / ".join(p.replace("_", " ") for p in rel.parts[:-1])
        caption = f"clip art of {title}, {category}"
        return Sample(image, caption, {"label": label, "class_name": self.class_names[label], "path": path}, path)


class FirstSamples:
    """The first `limit` samples of a source (a quick subset to try a pipeline on)."""

    def __init__(self, source: Source, limit: int):
        self.source, self.limit = source, min(limit, len(source))
        self.name, self.class_names = f"{source.name}[:{self.limit}]", source.class_names

    def __len__(self) -> int:
        return self.limit

    def load(self, index: int) -> Optional[Sample]:
        return self.source.load(index)


def open_source(src: str, *, split: Literal["train", "test"] = "train", templates: Optional[list[str]] = None,
                image_column: str = "filepath", caption_column: str = "title") -> Source:
    """SRC: a .csv/.tsv file, 'fashion-mnist' (or its idx folder), 'openclipart' (or its png folder), or an image
    folder with one subfolder per class."""
    templates = templates or list(SIMPLE_TEMPLATES)
    if src == "fashion-mnist" or (Path(src).is_dir() and (Path(src) / "train-images-idx3-ubyte.gz").exists()):
        return FashionMnistSource(FASHION_MNIST_DIR if src == "fashion-mnist" else src, split, templates)
    if src == "openclipart":
        if not Path(OPENCLIPART_DIR).is_dir():
            raise FileNotFoundError(f"{OPENCLIPART_DIR} not found: apt-get install openclipart-png")
        return OpenclipartSource(OPENCLIPART_DIR)
    path = Path(src)
    if path.suffix.lower() in (".csv", ".tsv"):
        return CsvSource(CsvConfig(path=src, image_column=image_column, caption_column=caption_column))
    if path.is_dir():
        return FolderSource(src, templates)
    raise FileNotFoundError(f"make-shards source {src!r} is not a .csv/.tsv file, a folder, 'fashion-mnist' or 'openclipart'")
