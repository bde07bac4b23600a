"""Recipe section `eval:`: which evaluations run, when, and which measure general ability."""
from dataclasses import dataclass, field
from typing import Literal

from dsclip.data.templates import SIMPLE_TEMPLATES, TEMPLATE_SETS, check_templates


@dataclass
class ZeroShotTask:
    name: str = "synthetic"  # metrics are eval/<name>/top1, top5 and mean_per_class_recall
    source: Literal["synthetic", "fashion-mnist", "folder", "webdataset", "clip_benchmark"] = "synthetic"  # labelled images
    path: str = ""  # folder (one subfolder per class), shard pattern with .json labels, Fashion-MNIST idx folder, or a CLIP_benchmark set's folder
    split: str = "test"  # fashion-mnist: train or test; clip_benchmark: the split folder
    classes: str = ""  # YAML file with classes (+ templates); default: the source's own class names
    templates: list[str] = field(default_factory=lambda: list(SIMPLE_TEMPLATES))  # prompts, "{}" = class name; or ["imagenet"]; default with clip_benchmark: the set's own
    max_samples: int = 0  # evaluate at most this many images (0 = all)

    def validate(self) -> None:
        if self.source in ("folder", "webdataset", "clip_benchmark") and not self.path:
            raise ValueError(f"eval.zeroshot '{self.name}': source {self.source} needs a path")
        if self.source == "fashion-mnist" and self.split not in ("train", "test"):
            raise ValueError(f"eval.zeroshot '{self.name}': fashion-mnist splits are train and test, got {self.split!r}")
        if self.template_set() is None:
            check_templates(self.templates, f"eval.zeroshot '{self.name}'")

    def template_set(self) -> list[str] | None:
        """The built-in set the templates name (["imagenet"], ["simple"]), else None."""
        return TEMPLATE_SETS[self.templates[0]] if len(self.templates) == 1 and self.templates[0] in TEMPLATE_SETS \
            else None


@dataclass
class RetrievalTask:
    name: str = "val"  # metrics are eval/<name>/image_to_text_R@1, ..., eval/<name>/loss
    source: Literal["csv", "webdataset", "synthetic", "clip_benchmark"] = "csv"  # captioned images
    path: str = ""  # CSV/TSV file (columns as data.csv), shard pattern, or a CLIP_benchmark set's folder (any number of captions per image)
    split: str = "test"  # clip_benchmark: the split folder
    max_samples: int = 0  # evaluate at most this many images (0 = all)

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
        names = self.task_names()
        if len(set(names)) != len(names):
            raise ValueError(f"eval task names must be unique, got {names}")
        unknown = sorted(set(self.forgetting.general) - set(names))
        if unknown:
            raise ValueError(f"eval.forgetting.general names {unknown}, which are not eval tasks ({names})")
        for task in self.zeroshot + self.retrieval:
            task.validate()

    def task_names(self) -> list[str]:
        """Every eval's name, zero-shot first, in recipe order."""
        return [t.name for t in self.zeroshot] + [t.name for t in self.retrieval]
