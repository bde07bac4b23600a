"""Evaluation image sets: items are (image tensor, label, caption); label -1 when unknown."""
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from dsclip.data import synthetic
from dsclip.data.clip_benchmark import CLASSNAMES, IMAGE_EXTENSIONS, Member, image_member, index_samples, read_benchmark
from dsclip.data.config import CsvConfig, SyntheticConfig, WebDataConfig
from dsclip.data.images import open_image
from dsclip.data.loader import ModelInputs
from dsclip.data.shards import caption_lines, expand_urls, read_manifest, sample_captions
from dsclip.data.sources import FASHION_MNIST_DIR, CsvSource, FashionMnistSource, FolderSource, Source
from dsclip.data.templates import SIMPLE_TEMPLATES, load_class_prompts
from dsclip.errors import DataSetError
from dsclip.eval.config import RetrievalTask, ZeroShotTask


class SyntheticLabelled(Dataset):
    """The held-out synthetic images, rendered the way training renders them."""

    def __init__(self, cfg: SyntheticConfig, seed: int, model: ModelInputs):
        self.cfg, self.seed, self.image_size = cfg, seed + synthetic.EVAL_SEED_OFFSET, model.image_size
        self.normalize = synthetic.Normalize(model.image_mean, model.image_std)
        self.class_names = synthetic.class_names(cfg.num_classes)

    def __len__(self) -> int:
        return self.cfg.eval_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, str]:
        images, captions, labels = synthetic.render(self.seed, [index], self.cfg.num_classes, self.image_size)
        return self.normalize(images)[0], labels[0], captions[0]


class SourceImages(Dataset):
    """(image, label, captions) from a data source (Fashion-MNIST, image folder, CSV)."""

    def __init__(self, source: Source, transform: Callable):
        self.source, self.transform, self.class_names = source, transform, source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, list[str]]:
        sample = self.source.load(index)
        if sample is None:
            raise ValueError(f"evaluation image {index} of {self.source.name} cannot be read")
        return self.transform(sample.image), sample.meta.get("label", -1), sample.caption.splitlines()


CAPTION_KEYS = WebDataConfig().caption_key.split(";")  # the members training reads captions from


class ShardPairs(Dataset):
    """Samples of WebDataset shards held in memory (evaluation sets are small): image bytes,
    captions (all of them, one per line of the .txt) and, when the sample's .json has one, its
    label; class names from manifest.json."""

    def __init__(self, pattern: str, transform: Callable, max_samples: int):
        urls = [u for source in pattern.split("::") for u in expand_urls(source)]
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"evaluation shard {missing[0]} not found")
        self.transform, self.samples = transform, []
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False):
            image = next((sample[k] for k in IMAGE_EXTENSIONS if k in sample), None)
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if image is not None:
                self.samples.append((image, meta.get("label", -1), sample_captions(sample, CAPTION_KEYS) or [""]))
            if max_samples and len(self.samples) >= max_samples:
                break
        manifest = read_manifest(str(Path(urls[0]).parent)) if "://" not in urls[0] else {}
        self.class_names = manifest.get("class_names")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, str]:
        image, label, caption = self.samples[index]
        with Image.open(io.BytesIO(image)) as img:
            return self.transform(img.convert("RGB")), label, caption


class BenchmarkImages(Dataset):
    """A CLIP_benchmark set (dsclip.data.clip_benchmark): (image, label, "") for classification,
    (image, -1, [captions]) for retrieval. Images are read by offset, one at a time; labels and
    captions are read and checked up front, so a bad set fails on every rank at once, not on the
    one rank whose share holds the bad sample."""

    def __init__(self, task: ZeroShotTask | RetrievalTask, transform: Callable):
        wanted = "classification" if isinstance(task, ZeroShotTask) else "retrieval"
        self.set, self.transform = read_benchmark(task.path, task.split), transform
        if self.set.kind != wanted:
            section, other = ("eval.zeroshot", "eval.retrieval") if wanted == "classification" else \
                ("eval.retrieval", "eval.zeroshot")
            raise DataSetError(f"{section} '{task.name}': {task.path} is a {self.set.kind} set; list it under {other}")
        self.class_names, self.templates = self.set.class_names, self.set.templates
        self.samples = index_samples(self.set.shards)
        self.targets = [self._target(index, sample, wanted) for index, sample in enumerate(self.samples)]

    def _target(self, index: int, sample: dict[str, Member], kind: str) -> int | list[str]:
        """The label or the captions of a sample, or ValueError saying what is wrong with it."""
        field_name = "cls" if kind == "classification" else "txt"
        image = image_member(sample)
        where = f"{self.set.root}: sample {index} ({sorted(sample)})"
        if image is None or field_name not in sample:
            raise DataSetError(f"{where} lacks an image or its {field_name}: is this a CLIP_benchmark {kind} set?")
        image.check_size()
        text = sample[field_name].read().decode("utf-8", errors="replace")
        if kind == "retrieval":
            captions = caption_lines(text)
            if not captions:
                raise DataSetError(f"{where} has no caption in its txt: give each image at least one")
            return captions
        label = text.strip()
        if not label.isdigit() or int(label) >= len(self.class_names):
            raise DataSetError(f"{where} has label {label!r}, not one of the {len(self.class_names)} classes of "
                             f"{CLASSNAMES}")
        return int(label)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, Any]:
        with open_image(io.BytesIO(image_member(self.samples[index]).read())) as img:
            image = self.transform(img.convert("RGB"))
        target = self.targets[index]
        return (image, target, "") if self.set.kind == "classification" else (image, -1, target)


def eval_dataset(task: ZeroShotTask | RetrievalTask, model: ModelInputs, synthetic_cfg: SyntheticConfig,
                 seed: int) -> Dataset:
    """The image set of a zero-shot or retrieval task."""
    if task.source == "synthetic":
        return SyntheticLabelled(synthetic_cfg, seed, model)
    if task.source == "webdataset":
        return ShardPairs(task.path, model.eval_transform, task.max_samples)
    if task.source == "clip_benchmark":
        return BenchmarkImages(task, model.eval_transform)
    if task.source == "fashion-mnist":
        source = FashionMnistSource(task.path or FASHION_MNIST_DIR, task.split, list(SIMPLE_TEMPLATES))
    elif task.source == "folder":
        source = FolderSource(task.path, list(SIMPLE_TEMPLATES))
    else:
        source = CsvSource(CsvConfig(path=task.path))
    return SourceImages(source, model.eval_transform)


def prompts_for(task: ZeroShotTask, dataset: Dataset) -> tuple[list[str], list[str]]:
    """(class names, templates): from the task's class file, else the data set's own names. The
    templates the task names win; left at the default, those of the class file or of the data set
    (a CLIP_benchmark set's) are used."""
    if task.classes:
        prompts = load_class_prompts(task.classes)
        names, own_templates = prompts.classes, prompts.templates
    else:
        names, own_templates = getattr(dataset, "class_names", None), getattr(dataset, "templates", None)
    if not names:
        raise ValueError(f"eval.zeroshot '{task.name}': {task.source} at {task.path!r} names no classes; "
                         "give a class file in eval.zeroshot[].classes")
    if own_templates and task.templates == list(SIMPLE_TEMPLATES):
        return names, own_templates
    return names, task.template_set() or task.templates
