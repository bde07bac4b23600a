"""Map-style image-text data sets: a CSV/TSV file of (image path, caption) rows, and an image folder with one
subfolder per class whose captions come from class names and prompt templates (FLYP-style fine-tuning).

An unusable sample (missing, empty or undecodable image file, empty caption) is replaced by the next usable index
and counted, so batches keep their size on every rank and a resumed epoch replays the same replacements.
The counts live in shared memory, so increments made in DataLoader worker processes reach the main process.
"""
import csv
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from dsclip.data.config import CsvConfig, FolderConfig
from dsclip.data.decode import ImageDecoder
from dsclip.data.images import ImageTooLarge, open_image

log = logging.getLogger(__name__)

SKIP_KINDS = ("missing_image", "empty_image", "bad_image", "no_caption", "too_large")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Consecutive unusable samples after which __getitem__ gives up: the data set is broken, not noisy.
MAX_REPLACEMENTS = 100


class SkipCounter:
    """Per-kind counts shared by the main process and its DataLoader workers (fork or spawn)."""

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", len(SKIP_KINDS))

    def add(self, kind: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_KINDS.index(kind)] += 1

    def totals(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(SKIP_KINDS, self._counts[:]))


def class_name_from_folder(folder: str) -> str:
    return folder.replace("_", " ").replace("-", " ").strip()


def _load_image(path: str, decode: ImageDecoder) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(prepared image, None) or (None, skip kind); a batch of prepared images is finished by the
    data set's `decode.finish` (dsclip.data.decode)."""
    if not os.path.isfile(path):
        return None, "missing_image"
    if os.path.getsize(path) == 0:
        return None, "empty_image"
    try:
        with open_image(path) as img:
            return decode.prepare(img), None
    except ImageTooLarge as exn:
        log.debug("image %s too large: %s", path, exn)
        return None, "too_large"
    except Exception as exn:  # any decoder or transform failure is a bad sample, never a stopped run
        log.debug("bad image %s: %r", path, exn)
        return None, "bad_image"


def _first_usable(index: int, size: int, load: Callable[[int], tuple[Optional[Any], Optional[str]]],
                  counter: SkipCounter) -> Any:
    """load(index), or of the next indices (wrapping) while it reports a skip kind, each skip counted."""
    for attempt in range(MAX_REPLACEMENTS):
        value, kind = load((index + attempt) % size)
        if value is not None:
            return value
        counter.add(kind)
    raise RuntimeError(f"{MAX_REPLACEMENTS} unusable samples in a row from index {index}: skip counts {counter.totals()}")


class CsvDataset(Dataset):
    """(image, tokens (context_length,)) per CSV/TSV row; images as ImageDecoder.prepare leaves them,
    a collated batch of them finished by `self.decode.finish`."""

    def __init__(self, cfg: CsvConfig, *, transform: Callable, tokenizer: Callable, reduced_decode: bool = True):
        cfg.validate()
        self.decode, self.tokenizer = ImageDecoder(transform, reduced_decode), tokenizer
        self.rows = read_csv_rows(cfg)
        self.counter = SkipCounter()

    def __len__(self) -> int:
        return len(self.rows)

    def skipped(self) -> dict[str, int]:
        return self.counter.totals()

    def _load(self, index: int) -> tuple[Optional[tuple[torch.Tensor, torch.Tensor]], Optional[str]]:
        path, caption = self.rows[index]
        if not caption:
            return None, "no_caption"
        image, kind = _load_image(path, self.decode)
        return (image, self.tokenizer([caption])[0]) if image is not None else None, kind

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _first_usable(index, len(self), self._load, self.counter)


def read_csv_rows(cfg: CsvConfig) -> list[tuple[str, str]]:
    """(absolute image path, stripped caption) per row of the CSV/TSV file."""
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.csv.path: {path} does not exist")
    separator = cfg.separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for name, value in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
            if value not in columns:
                raise ValueError(f"data.csv.{name}={value!r} is not a column of {path}; columns are {columns}")
        rows = [(str(path.parent / r[cfg.image_column]), (r[cfg.caption_column] or "").strip()) for r in reader]
    if not rows:
        raise ValueError(f"data.csv.path: {path} has no data rows")
    return rows


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names, '_'/'-' as spaces) and (image path, label) pairs."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(p for p in root_path.iterdir() if p.is_dir())
    items = [(str(f), label) for label, folder in enumerate(folders) for f in sorted(folder.rglob("*"))
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise ValueError(f"image folder {root} holds no images in class subfolders ({', '.join(IMAGE_EXTENSIONS)})")
    return [class_name_from_folder(f.name) for f in folders], items


class FolderDataset(Dataset):
    """(image, tokens) with captions templates[(index + epoch) % len(templates)] filled with the class name,
    so every image meets every template over successive epochs (call set_epoch); labels=True returns
    (image, class index) instead, for zero-shot evaluation. Images as in CsvDataset."""

    def __init__(self, cfg: FolderConfig, *, transform: Callable, tokenizer: Callable, labels: bool = False,
                 reduced_decode: bool = True):
        cfg.validate()
        self.decode, self.tokenizer = ImageDecoder(transform, reduced_decode), tokenizer
        self.templates, self.labels = cfg.templates, labels
        self.class_names, self.items = list_image_folder(cfg.path)
        self.counter = SkipCounter()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skipped(self) -> dict[str, int]:
        return self.counter.totals()

    def _load(self, index: int) -> tuple[Optional[tuple[torch.Tensor, Any]], Optional[str]]:
        path, label = self.items[index]
        image, kind = _load_image(path, self.decode)
        if image is None:
            return None, kind
        if self.labels:
            return (image, label), None
        caption = self.templates[(index + self.epoch) % len(self.templates)].replace("{}", self.class_names[label])
        return (image, self.tokenizer([caption])[0]), None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return _first_usable(index, len(self), self._load, self.counter)
