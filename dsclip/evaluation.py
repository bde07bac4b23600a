"""Evaluation during and after training: zero-shot classification, image-text retrieval and
validation loss, each sharded over all ranks in lockstep and run through the engine (or any
module with the ContrastiveModel call signature).

ZeRO-3 gathers parameters collectively inside every forward, so every rank makes the same
number of forwards: shards are padded to equal length and the padding is masked out.
"""
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from dsclip import synthetic
from dsclip.retrieval import forgetting_table, retrieval_metrics, topk_correct, zeroshot_classifier_weights
from dsclip.templates import SIMPLE_TEMPLATES, TEMPLATE_SETS, check_templates, load_class_prompts

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic images come from a seed range training never uses


@dataclass
class ZeroShotTask:
    name: str = "synthetic"  # metrics are eval/<name>/top1 and eval/<name>/top5
    source: Literal["synthetic", "fashion-mnist", "folder", "webdataset"] = "synthetic"  # labelled images
    path: str = ""  # folder (one subfolder per class), shard pattern with .json labels, or Fashion-MNIST idx folder
    split: Literal["train", "test"] = "test"  # fashion-mnist split
    classes: str = ""  # YAML file with classes (+ templates); default: the source's own class names
    templates: list[str] = field(default_factory=lambda: list(SIMPLE_TEMPLATES))  # prompts, "{}" = class name; or ["imagenet"]
    max_samples: int = 0  # evaluate at most this many images (0 = all)

    def validate(self) -> None:
        if self.source in ("folder", "webdataset") and not self.path:
            raise ValueError(f"eval.zeroshot '{self.name}': source {self.source} needs a path")
        if self.templates not in ([k] for k in TEMPLATE_SETS):
            check_templates(self.templates, f"eval.zeroshot '{self.name}'")


@dataclass
class RetrievalTask:
    name: str = "val"  # metrics are eval/<name>/image_to_text_R@1, ..., eval/<name>/loss
    source: Literal["csv", "webdataset", "synthetic"] = "csv"  # image-caption pairs
    path: str = ""  # CSV/TSV file (columns as data.csv) or shard pattern
    max_samples: int = 0  # evaluate at most this many pairs (0 = all)

    def validate(self) -> None:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"eval.retrieval '{self.name}': source {self.source} needs a path")


@dataclass
class ForgettingConfig:
    general: list[str] = field(default_factory=list)  # names of evals measuring general ability (the rest are task evals)
    max_drop_points: float = 5.0  # warn when a general metric drops by more than this many points


@dataclass
class EvalConfig:
    at_start: bool = True  # evaluate before the first step (the baseline for forgetting)
    every_steps: int = 0  # evaluate every N optimizer steps; 0 = never during training
    at_end: bool = True  # evaluate after the last step
    batch_size: int = 128  # images per forward per rank
    zeroshot: list[ZeroShotTask] = field(default_factory=lambda: [ZeroShotTask()])  # zero-shot classification sets
    retrieval: list[RetrievalTask] = field(default_factory=list)  # image-text retrieval + validation loss sets
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)  # before/after table at the end

    def validate(self) -> None:
        if self.every_steps < 0 or self.batch_size < 1:
            raise ValueError("eval.every_steps must be >= 0 and eval.batch_size >= 1")
        names = [t.name for t in self.zeroshot] + [t.name for t in self.retrieval]
        if len(set(names)) != len(names):
            raise ValueError(f"eval task names must be unique, got {names}")
        unknown = sorted(set(self.forgetting.general) - set(names))
        if unknown:
            raise ValueError(f"eval.forgetting.general names {unknown}, which are not eval tasks ({names})")
        for task in self.zeroshot + self.retrieval:
            task.validate()


# -- data sets --------------------------------------------------------------------------------
class SyntheticLabelled(Dataset):
    """(image, label) from the held-out synthetic seed range."""

    def __init__(self, cfg: synthetic.SyntheticConfig, seed: int, transform: Callable, render_size: int):
        self.cfg, self.seed, self.transform, self.render_size = cfg, seed + EVAL_SEED_OFFSET, transform, render_size
        self.class_names = synthetic.class_names(cfg.num_classes)

    def __len__(self) -> int:
        return self.cfg.eval_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, caption, label = synthetic.render_sample(self.seed, index, self.cfg.num_classes, self.render_size)
        return self.transform(image), label, caption


class SourceImages(Dataset):
    """(image, label, caption) from a make-shards Source (Fashion-MNIST, image folder)."""

    def __init__(self, source, transform: Callable):
        self.source, self.transform, self.class_names = source, transform, source.class_names

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        sample = self.source.load(index)
        if sample is None:
            raise ValueError(f"evaluation image {index} of {self.source.name} cannot be read")
        return self.transform(sample.image), sample.meta.get("label", -1), sample.caption


class ShardPairs(Dataset):
    """Samples of WebDataset shards held in memory (evaluation sets are small): image bytes,
    caption and, when the sample's .json has one, its label; class names from manifest.json."""

    def __init__(self, pattern: str, transform: Callable, max_samples: int):
        from dsclip.webdata import expand_urls, read_manifest
        import webdataset as wds
        urls = [u for source in pattern.split("::") for u in expand_urls(source)]
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"evaluation shard {missing[0]} not found")
        self.transform, self.samples = transform, []
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False):
            image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caption = sample.get("txt", b"").decode("utf-8").strip()
            if image is not None:
                self.samples.append((image, meta.get("label", -1), caption))
            if max_samples and len(self.samples) >= max_samples:
                break
        manifest = read_manifest(str(Path(urls[0]).parent)) if "://" not in urls[0] else {}
        self.class_names = manifest.get("class_names") if isinstance(manifest, dict) else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label, caption = self.samples[index]
        with Image.open(io.BytesIO(image)) as img:
            return self.transform(img.convert("RGB")), label, caption


# -- sharded encoding -------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def encode_shard(model, dataset: Dataset, limit: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                 tokenizer: Optional[Callable] = None):
    """This rank's share of `dataset` (index rank::world), padded so every rank makes the same
    forwards. Yields (image features, text features or None, logit scale, labels, valid mask,
    whether the batch holds no padding on any rank) per batch."""
    rank, world = rank_and_world()
    size = min(len(dataset), limit) if limit else len(dataset)
    per_rank = math.ceil(size / world)
    indices = [rank + world * i for i in range(per_rank)]
    for start in range(0, per_rank, batch_size):
        chunk = indices[start:start + batch_size]
        items = [dataset[i if i < size else 0] for i in chunk]  # padding repeats sample 0
        images = torch.stack([item[0] for item in items]).to(device, dtype)
        texts = tokenizer([item[2] for item in items]).to(device) if tokenizer else None
        image_features, text_features, logit_scale, logit_bias = model(images=images, texts=texts)
        last_index_any_rank = chunk[-1] - rank + world - 1  # the same batch position on the last rank
        yield (image_features.float(), None if text_features is None else text_features.float(),
               logit_scale.float(), torch.tensor([item[1] for item in items]),
               torch.tensor([i < size for i in chunk], device=image_features.device), last_index_any_rank < size)


class ZeroShotEval:
    """Top-1/top-5 accuracy of prompt-built class embeddings on a labelled image set."""

    def __init__(self, name: str, dataset: Dataset, class_names: list[str], templates: list[str],
                 tokenizer: Callable, batch_size: int, max_samples: int = 0):
        self.name, self.dataset, self.batch_size, self.max_samples = name, dataset, batch_size, max_samples
        prompts = [t.replace("{}", c) for c in class_names for t in templates]
        self.prompt_tokens = tokenizer(prompts)  # (classes * templates, context)
        self.num_classes, self.num_templates = len(class_names), len(templates)

    def run(self, model, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        text = model(texts=self.prompt_tokens.to(device))[1].float()
        classifier = zeroshot_classifier_weights(text.view(self.num_classes, self.num_templates, -1))
        counts = torch.zeros(3, dtype=torch.float64, device=text.device)  # top-1 hits, top-5 hits, images
        for features, _, _, labels, valid, _ in encode_shard(model, self.dataset, self.max_samples, self.batch_size,
                                                          device, dtype):
            logits, labels = (features @ classifier)[valid], labels.to(valid.device)[valid]
            hits = topk_correct(logits, labels, ks=(1, 5))
            counts += torch.tensor([hits["top1"], hits["top5"], len(labels)], dtype=torch.float64, device=counts.device)
        if dist.is_initialized():
            dist.all_reduce(counts)  # 3 numbers per evaluation
        top1, top5, total = counts.tolist()
        return {f"eval/{self.name}/top1": 100 * top1 / total, f"eval/{self.name}/top5": 100 * top5 / total}


class RetrievalEval:
    """Image->text and text->image recall and ranks over paired captions, plus the validation
    contrastive loss (mean over batches of the loss the trainer optimises)."""

    def __init__(self, name: str, dataset: Dataset, tokenizer: Callable, batch_size: int, max_samples: int,
                 loss_fn: Callable):
        self.name, self.dataset, self.tokenizer = name, dataset, tokenizer
        self.batch_size, self.max_samples, self.loss_fn = batch_size, max_samples, loss_fn

    def run(self, model, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        images, texts, losses = [], [], []
        for image_f, text_f, scale, _, valid, unpadded in encode_shard(
                model, self.dataset, self.max_samples, self.batch_size, device, dtype, self.tokenizer):
            images.append(image_f[valid])
            texts.append(text_f[valid])
            if unpadded:  # the loss is collective and padding would add duplicate pairs
                losses.append(self.loss_fn(image_f, text_f, scale).detach())
        image_features, text_features = gather_rows(torch.cat(images)), gather_rows(torch.cat(texts))
        metrics = retrieval_metrics(image_features, text_features)
        if losses:  # each rank's local loss; their mean over ranks is the global validation loss
            loss = torch.stack(losses).mean()
            if dist.is_initialized():
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            metrics["loss"] = loss.item()
        return {f"eval/{self.name}/{key}": value for key, value in metrics.items()}


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (uneven counts allowed), in rank order: N x d floats, a few MB for eval sets."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)]))
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros(largest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)])


# -- building ---------------------------------------------------------------------------------
def eval_dataset(task, transform: Callable, synthetic_cfg: synthetic.SyntheticConfig, seed: int,
                 render_size: int) -> Dataset:
    """The image set of a zero-shot or retrieval task: items are (image, label, caption)."""
    if task.source == "synthetic":
        return SyntheticLabelled(synthetic_cfg, seed, transform, render_size)
    if task.source == "webdataset":
        return ShardPairs(task.path, transform, task.max_samples)
    from dsclip.shards import CsvSource, FashionMnistSource, FolderSource
    from dsclip.tabular import CsvConfig
    if task.source == "fashion-mnist":
        source = FashionMnistSource(task.path or FASHION_MNIST_DIR, task.split, list(SIMPLE_TEMPLATES))
    elif task.source == "folder":
        source = FolderSource(task.path, list(SIMPLE_TEMPLATES))
    else:
        source = CsvSource(CsvConfig(path=task.path))
    return SourceImages(source, transform)


def prompts_for(task: ZeroShotTask, dataset: Dataset) -> tuple[list[str], list[str]]:
    """(class names, templates): from the task's class file, else the data set's own names."""
    templates = TEMPLATE_SETS[task.templates[0]] if task.templates in ([k] for k in TEMPLATE_SETS) else task.templates
    if task.classes:
        prompts = load_class_prompts(task.classes)
        return prompts.classes, prompts.templates if task.templates == list(SIMPLE_TEMPLATES) else templates
    names = getattr(dataset, "class_names", None)
    if not names:
        raise ValueError(f"eval.zeroshot '{task.name}': {task.source} at {task.path!r} names no classes; "
                         "give a class file in eval.zeroshot[].classes")
    return names, templates


def build_evals(cfg: EvalConfig, bundle, synthetic_cfg: synthetic.SyntheticConfig, seed: int,
                loss_fn: Callable) -> list:
    render_size = 2 * max(bundle.image_size)
    evals: list = []
    for task in cfg.zeroshot:
        dataset = eval_dataset(task, bundle.eval_transform, synthetic_cfg, seed, render_size)
        names, templates = prompts_for(task, dataset)
        evals.append(ZeroShotEval(task.name, dataset, names, templates, bundle.tokenizer, cfg.batch_size,
                                  task.max_samples))
    for task in cfg.retrieval:
        dataset = eval_dataset(task, bundle.eval_transform, synthetic_cfg, seed, render_size)
        evals.append(RetrievalEval(task.name, dataset, bundle.tokenizer, cfg.batch_size, task.max_samples, loss_fn))
    return evals


@torch.no_grad()
def run_evals(evals: list, model, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Every evaluation, on every rank, with the model in eval mode."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    for evaluation in evals:
        metrics.update(evaluation.run(model, device, dtype))
    model.train(was_training)
    return metrics


def forgetting_report(cfg: ForgettingConfig, before: dict[str, float], after: dict[str, float]) -> tuple[str, list[str]]:
    """Markdown before/after table (general evals marked) and a warning per collapsed general metric."""
    general = [key for key in before if key.split("/")[1] in cfg.general and key in after
               and not key.endswith("/loss") and "rank" not in key]
    return forgetting_table(before, after, general, cfg.max_drop_points)
