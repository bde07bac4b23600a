"""make-shards: write WebDataset shards (jpg/png + txt + json per sample) and a manifest.json from a CSV/TSV file,
an image folder, the Fashion-MNIST idx files or the openclipart PNG collection that Debian packages ship.

Shard i holds source samples [i * per_shard, (i + 1) * per_shard) minus unusable ones, so a re-run skips every
shard whose final file exists: each shard is written under a temporary name and renamed once complete, and the
manifest is rewritten after every shard.
"""
import gzip
import io
import json
import logging
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Protocol

import numpy as np
import webdataset as wds
from PIL import Image

from dsclip.tabular import CsvConfig, list_image_folder, read_csv_rows
from dsclip.templates import SIMPLE_TEMPLATES, check_templates

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
OPENCLIPART_DIR = "/usr/share/openclipart/png"  # Debian package openclipart-png
MANIFEST = "manifest.json"


@dataclass
class Sample:
    image: Image.Image
    caption: str
    meta: dict[str, Any]  # written as the sample's .json (label and class name for classification sources)


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
    def __init__(self, cfg: CsvConfig):
        cfg.validate()
        self.name, self.class_names = f"csv:{Path(cfg.path).resolve()}", None
        self.rows = read_csv_rows(cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> Optional[Sample]:
        path, caption = self.rows[index]
        image = _open_rgb(path) if caption else None
        return Sample(image, caption, {"caption": caption, "path": path}) if image is not None else None


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
        return Sample(image, caption, {"label": label, "class_name": name, "path": path})


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Payload bytes of a gzipped idx file (images: offset 16, labels: offset 8)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


class FashionMnistSource:
    def __init__(self, root: str, split: Literal["train", "test"], templates: list[str]):
        check_templates(templates, "make-shards templates")
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
        return Sample(image, caption, {"label": label, "class_name": self.class_names[label], "path": path})


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


def _encode(image: Image.Image, image_size: int, image_format: str) -> bytes:
    if image_size > 0:
        scale = image_size / min(image.size)  # shorter side to image_size; the train transform crops later
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95) if image_format == "jpg" else image.save(buf, format="PNG")
    return buf.getvalue()


def _count_keys(path: Path) -> int:
    """Samples in a finished shard (for a shard the manifest does not list yet)."""
    with tarfile.open(path) as tar:
        return len({Path(n).name.split(".", 1)[0] for n in tar.getnames()})


def _load_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.exists():
        return {**settings, "shards": [], "total": 0, "skipped": 0, "complete": False}
    manifest = json.loads(path.read_text())
    differ = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
    if differ:
        raise ValueError(f"{out} holds shards written with other settings {differ} (existing, requested): "
                         "write to a new --out folder or delete it")
    return manifest


def write_shards(source: Source, out_dir: str, *, per_shard: int = 1000, image_size: int = 0,
                 image_format: Literal["jpg", "png"] = "jpg", progress: bool = True) -> dict[str, Any]:
    """Write shard-000000.tar ... and manifest.json into out_dir; returns the manifest.

    manifest.json: {"source", "per_shard", "image_size", "image_format", "class_names", "shards": [{"name",
    "samples"}], "total", "skipped", "complete"}. dsclip.webdata reads per-shard counts from it.
    """
    if per_shard < 1 or image_size < 0 or image_format not in ("jpg", "png"):
        raise ValueError(f"make-shards: per_shard={per_shard} must be >= 1, image_size={image_size} >= 0, "
                         f"image_format={image_format!r} one of jpg/png")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": source.name, "samples_in_source": len(source), "per_shard": per_shard,
                "image_size": image_size, "image_format": image_format, "class_names": source.class_names}
    manifest = _load_manifest(out, settings)
    done = {s["name"]: s for s in manifest["shards"]}
    n_shards = (len(source) + per_shard - 1) // per_shard
    start, written = time.monotonic(), 0
    for shard in range(n_shards):
        name = f"shard-{shard:06d}.tar"
        if (out / name).exists():
            done.setdefault(name, {"name": name, "samples": _count_keys(out / name), "skipped": 0})
            continue
        tmp = out / f".{name}.tmp"
        samples = skipped = 0
        with wds.TarWriter(str(tmp)) as writer:
            for index in range(shard * per_shard, min(len(source), (shard + 1) * per_shard)):
                sample = source.load(index)
                if sample is None:
                    skipped += 1
                    continue
                writer.write({"__key__": f"{index:09d}", image_format: _encode(sample.image, image_size, image_format),
                              "txt": sample.caption, "json": sample.meta})
                samples += 1
        os.replace(tmp, out / name)
        done[name] = {"name": name, "samples": samples, "skipped": skipped}
        written += samples + skipped
        _save_manifest(out, manifest, done, complete=False)
        if progress:
            rate = written / max(time.monotonic() - start, 1e-9)
            print(f"\rmake-shards: {len(done)}/{n_shards} shards, {rate:.0f} samples/s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return _save_manifest(out, manifest, done, complete=True)


def _save_manifest(out: Path, manifest: dict[str, Any], done: dict[str, dict], complete: bool) -> dict[str, Any]:
    shards = [done[k] for k in sorted(done)]
    manifest.update(shards=shards, total=sum(s["samples"] for s in shards), skipped=sum(s["skipped"] for s in shards),
                    complete=complete)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest
