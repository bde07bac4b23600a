"""Evaluation during and after training: zero-shot classification, image-text retrieval and
validation loss, each sharded over all ranks in lockstep and run through the engine (or any
module with the ContrastiveModel call signature).

ZeRO-3 gathers parameters collectively inside every forward, so every rank makes the same
number of forwards: shards are padded to equal length and the padding is masked out.
"""
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from dsclip.data.config import SyntheticConfig
from dsclip.data.loader import ModelInputs
from dsclip.errors import DataSetError
from dsclip.eval.config import EvalConfig
from dsclip.eval.datasets import eval_dataset, prompts_for
from dsclip.eval.metrics import (class_recall_counts, mean_per_class_recall, retrieval_metrics, topk_correct,
                                 zeroshot_classifier_weights)
from dsclip.logs import progress
from dsclip.metric_keys import LOSS, MEAN_PER_CLASS_RECALL, TOP1, TOP5, eval_key


Stop = Optional[Callable[[], bool]]  # asked before each batch on every rank (collective); True ends the evaluation


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation: every rank left it at the same batch."""


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@dataclass
class EncodedBatch:
    """One batch of a rank's share, encoded. Texts are the batch's captions in order, several per
    image where a sample has several; text_image[t] is the batch position of text t's image."""
    image_features: torch.Tensor
    text_features: Optional[torch.Tensor]  # None when no tokenizer was given
    text_image: torch.Tensor
    logit_scale: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor  # each image's index in the data set
    valid: torch.Tensor  # False for the padding rows
    unpadded: bool  # no rank's batch holds padding

    def first_captions(self) -> torch.Tensor:
        """Text features of each image's first caption: the pairs the validation loss is taken on."""
        starts = torch.ones_like(self.text_image, dtype=torch.bool)
        starts[1:] = self.text_image[1:] != self.text_image[:-1]
        return self.text_features[starts.nonzero()[:, 0].to(self.text_features.device)]


def _captions(caption: Union[str, list[str]]) -> list[str]:
    return [caption] if isinstance(caption, str) else list(caption)


def encode_shard(model, dataset: Dataset, limit: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                 tokenizer: Optional[Callable] = None, desc: str = "", stop: Stop = None) -> Iterator[EncodedBatch]:
    """This rank's share of `dataset` (index rank::world; items (image, label, caption or list of
    captions)), padded so every rank makes the same forwards; raises EvaluationStopped when `stop()`
    says so before a batch."""
    rank, world = rank_and_world()
    size = min(len(dataset), limit) if limit else len(dataset)
    per_rank = math.ceil(size / world)
    indices = [rank + world * i for i in range(per_rank)]
    starts = range(0, per_rank, batch_size)
    for start in progress(starts, total=len(starts), desc=desc):
        if stop is not None and stop():
            raise EvaluationStopped(desc)
        chunk = indices[start:start + batch_size]
        items = [dataset[i if i < size else 0] for i in chunk]  # padding repeats sample 0
        images = torch.stack([item[0] for item in items]).to(device, dtype)
        captions = [_captions(item[2]) for item in items]
        texts = tokenizer([c for cs in captions for c in cs]).to(device) if tokenizer else None
        image_features, text_features, logit_scale, logit_bias = model(images=images, texts=texts)
        last_index_any_rank = chunk[-1] - rank + world - 1  # the same batch position on the last rank
        on = image_features.device
        yield EncodedBatch(image_features.float(), None if text_features is None else text_features.float(),
                           torch.tensor([i for i, cs in enumerate(captions) for _ in cs], device=on),
                           logit_scale.float(), torch.tensor([item[1] for item in items], device=on),
                           torch.tensor(chunk, device=on), torch.tensor([i < size for i in chunk], device=on),
                           last_index_any_rank < size)


class ZeroShotEval:
    """Top-1/top-5 accuracy and mean per-class recall of prompt-built class embeddings on a
    labelled image set."""

    def __init__(self, name: str, dataset: Dataset, class_names: list[str], templates: list[str],
                 tokenizer: Callable, batch_size: int, max_samples: int = 0):
        self.name, self.dataset, self.batch_size, self.max_samples = name, dataset, batch_size, max_samples
        prompts = [t.replace("{}", c) for c in class_names for t in templates]
        self.prompt_tokens = tokenizer(prompts)  # (classes * templates, context)
        self.num_classes, self.num_templates = len(class_names), len(templates)

    def run(self, model, device: torch.device, dtype: torch.dtype, stop: Stop = None) -> dict[str, float]:
        text = model(texts=self.prompt_tokens.to(device))[1].float()
        classifier = zeroshot_classifier_weights(text.view(self.num_classes, self.num_templates, -1))
        unlabelled = torch.zeros(1, dtype=torch.float64, device=text.device)
        top5 = torch.zeros(1, dtype=torch.float64, device=text.device)
        class_hits = torch.zeros(self.num_classes, dtype=torch.float64, device=text.device)
        class_counts = torch.zeros_like(class_hits)
        for batch in encode_shard(model, self.dataset, self.max_samples, self.batch_size, device, dtype,
                                  desc=f"eval {self.name}", stop=stop):
            labelled = batch.valid & (batch.labels >= 0) & (batch.labels < self.num_classes)
            unlabelled += (batch.valid & ~labelled).sum()
            logits, labels = (batch.image_features @ classifier)[labelled], batch.labels[labelled]
            top5 += topk_correct(logits, labels, ks=(5,))[5]
            hits, counts = class_recall_counts(logits, labels, self.num_classes)
            class_hits += hits
            class_counts += counts
        totals = torch.cat([unlabelled, top5, class_hits, class_counts])
        if dist.is_initialized():
            dist.all_reduce(totals)  # 2 + 2 x classes numbers per evaluation
        if totals[0] > 0:  # raised on every rank, after the all-reduce: no rank is left waiting
            raise DataSetError(f"eval.zeroshot '{self.name}': {int(totals[0])} images without a label in "
                             f"0..{self.num_classes - 1}: its labels and the class list do not match")
        top5, class_hits, class_counts = totals[1], totals[2:2 + self.num_classes], totals[2 + self.num_classes:]
        total = class_counts.sum().item()
        return {eval_key(self.name, TOP1): 100 * class_hits.sum().item() / total,
                eval_key(self.name, TOP5): 100 * top5.item() / total,
                eval_key(self.name, MEAN_PER_CLASS_RECALL): mean_per_class_recall(class_hits, class_counts)}


class RetrievalEval:
    """Image->text and text->image recall and ranks over captioned images (any number of captions
    per image), plus the validation contrastive loss (mean over batches of the loss the trainer
    optimises, each image paired with its first caption)."""

    def __init__(self, name: str, dataset: Dataset, tokenizer: Callable, batch_size: int, max_samples: int,
                 loss_fn: Callable):
        self.name, self.dataset, self.tokenizer = name, dataset, tokenizer
        self.batch_size, self.max_samples, self.loss_fn = batch_size, max_samples, loss_fn

    def run(self, model, device: torch.device, dtype: torch.dtype, stop: Stop = None) -> dict[str, float]:
        images, image_ids, texts, text_ids, losses = [], [], [], [], []
        for batch in encode_shard(model, self.dataset, self.max_samples, self.batch_size, device, dtype,
                                  self.tokenizer, desc=f"eval {self.name}", stop=stop):
            images.append(batch.image_features[batch.valid])
            image_ids.append(batch.indices[batch.valid])
            text_valid = batch.valid[batch.text_image]
            texts.append(batch.text_features[text_valid])
            text_ids.append(batch.indices[batch.text_image][text_valid])
            if batch.unpadded:  # the loss is collective and padding would add duplicate pairs
                losses.append(self.loss_fn(batch.image_features, batch.first_captions(), batch.logit_scale).detach())
        # Every image of the set is on exactly one rank: sorted by data set index, row i is image i.
        image_ids = gather_rows(torch.cat(image_ids)[:, None])[:, 0]
        order = image_ids.argsort()
        metrics = retrieval_metrics(gather_rows(torch.cat(images))[order], gather_rows(torch.cat(texts)),
                                    text_image=gather_rows(torch.cat(text_ids)[:, None])[:, 0])
        if losses:  # each rank's local loss; their mean over ranks is the global validation loss
            loss = torch.stack(losses).mean()
            if dist.is_initialized():
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            metrics[LOSS] = loss.item()
        return {eval_key(self.name, key): value for key, value in metrics.items()}


Evaluation = Union[ZeroShotEval, RetrievalEval]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (uneven counts allowed), in rank order: N x d floats, a few MB for eval sets."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros(largest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)])


def build_evals(cfg: EvalConfig, model: ModelInputs, synthetic_cfg: SyntheticConfig, seed: int,
                loss_fn: Callable) -> list[Evaluation]:
    evals: list[Evaluation] = []
    for task in cfg.zeroshot:
        dataset = eval_dataset(task, model, synthetic_cfg, seed)
        names, templates = prompts_for(task, dataset)
        evals.append(ZeroShotEval(task.name, dataset, names, templates, model.tokenizer, cfg.batch_size,
                                  task.max_samples))
    for task in cfg.retrieval:
        dataset = eval_dataset(task, model, synthetic_cfg, seed)
        evals.append(RetrievalEval(task.name, dataset, model.tokenizer, cfg.batch_size, task.max_samples, loss_fn))
    return evals


@torch.no_grad()
def run_evals(evals: list[Evaluation], model, device: torch.device, dtype: torch.dtype,
              stop: Stop = None) -> dict[str, float]:
    """Every evaluation, on every rank, with the model in eval mode (EvaluationStopped: see encode_shard)."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        for evaluation in evals:
            metrics.update(evaluation.run(model, device, dtype, stop))
    finally:
        model.train(was_training)
    return metrics
