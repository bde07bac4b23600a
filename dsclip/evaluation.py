"""Zero-shot classification through the DeepSpeed engine, sharded over all ranks in lockstep."""
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

SIMPLE_TEMPLATES = ["a photo of a {}.", "a {}.", "a drawing of a {}.", "a picture of a {}."]


@dataclass
class ZeroShotConfig:
    source: Literal["synthetic", "none"] = "synthetic"  # synthetic | none: labelled images to classify
    templates: list[str] = field(default_factory=lambda: list(SIMPLE_TEMPLATES))  # prompts, "{}" = class name
    batch_size: int = 128  # images per forward per rank

    def validate(self) -> None:
        bad = [t for t in self.templates if "{}" not in t]
        if bad or not self.templates:
            raise ValueError(f"eval.zeroshot.templates need at least one entry and a '{{}}' in each; bad: {bad}")


@dataclass
class EvalConfig:
    at_start: bool = True  # evaluate before the first step (the baseline for forgetting)
    every_steps: int = 0  # evaluate every N optimizer steps; 0 = never during training
    at_end: bool = True  # evaluate after the last step
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        self.zeroshot.validate()


class ZeroShotEval:
    """Top-1/top-5 accuracy of prompt-built class embeddings on a labelled image set.

    Every rank encodes the (few) class prompts and its 1/world share of the images, padded
    so all ranks make the same number of forwards: ZeRO-3 gathers parameters collectively.
    """

    def __init__(self, name: str, dataset: Dataset, class_names: list[str], templates: list[str],
                 tokenizer: Callable, batch_size: int):
        self.name, self.dataset, self.batch_size = name, dataset, batch_size
        prompts = [t.format(c) for c in class_names for t in templates]
        self.prompt_tokens = tokenizer(prompts)  # (classes * templates, context)
        self.num_classes, self.num_templates = len(class_names), len(templates)

    @torch.no_grad()
    def run(self, engine) -> dict[str, float]:
        was_training = engine.training
        engine.eval()
        classifier = self._classifier(engine)
        counts = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
        k = min(5, self.num_classes)
        for images, labels, valid in self._batches():
            features = engine(images=images.to(engine.device, _input_dtype(engine)))[0].float().cpu()
            top = (features @ classifier).topk(k, dim=1).indices
            hits = top == labels[:, None]
            counts += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(1) & valid).sum(), valid.sum()]).double()
        if dist.is_initialized():
            dist.all_reduce(counts)  # 3 numbers per eval
        engine.train(was_training)
        top1, top5, total = counts.tolist()
        return {f"eval/{self.name}/top1": top1 / total, f"eval/{self.name}/top{k}": top5 / total}

    def _classifier(self, engine) -> torch.Tensor:
        text = engine(texts=self.prompt_tokens.to(engine.device))[1].float().cpu()
        text = text.view(self.num_classes, self.num_templates, -1).mean(dim=1)
        return torch.nn.functional.normalize(text, dim=-1).T  # (d, classes)

    def _batches(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_rank = math.ceil(len(self.dataset) / world)
        indices = [rank + world * i for i in range(per_rank)]
        for start in range(0, per_rank, self.batch_size):
            chunk = indices[start:start + self.batch_size]
            # Padding slots repeat sample 0 and are masked out of the counts.
            items = [self.dataset[i if i < len(self.dataset) else 0] for i in chunk]
            images = torch.stack([image for image, _ in items])
            labels = torch.tensor([label for _, label in items])
            valid = torch.tensor([i < len(self.dataset) for i in chunk])
            yield images, labels, valid


def _input_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
