"""Evaluation metric math: paired retrieval ranks and zero-shot classifier helpers.

Pure functions of feature tensors; the caller runs the encoders (through the engine, on
every rank) and hands the gathered features here.
"""
import torch
import torch.nn.functional as F

from dsclip.metric_keys import DIRECTIONS, RECALL_KS, rank_stat, recall


def _check_normalised(name: str, features: torch.Tensor) -> None:
    norms = torch.linalg.vector_norm(features, dim=1, dtype=torch.float32)
    worst = (norms - 1).abs().max().item()
    if worst > 1e-2:
        raise ValueError(f"{name} rows must be L2-normalised (a norm is off by {worst:.3g}): "
                         f"pass F.normalize(features, dim=-1)")


def _rank_summary(direction: str, ranks: torch.Tensor) -> dict[str, float]:
    metrics = {recall(direction, k): 100.0 * (ranks <= k).float().mean().item() for k in RECALL_KS}
    ordered = ranks.sort().values.double()
    mid = (len(ordered) - 1) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid] + ordered[mid + 1]) / 2
    metrics[rank_stat(direction, "mean")] = ordered.mean().item()
    metrics[rank_stat(direction, "median")] = median.item()
    return metrics


def _count_beaten(image_rows: torch.Tensor, texts: torch.Tensor, start: int, own_texts: torch.Tensor,
                  own_images: torch.Tensor, positive: torch.Tensor, best_positive: torch.Tensor,
                  beaten_text: torch.Tensor) -> torch.Tensor:
    """Per image row, the other images' texts scoring >= its best caption; adds the rows' votes
    against each text (scoring >= the text's own image) to beaten_text.

    own_texts / own_images: the (text, block row) coordinates of the block's own captions. A
    function of its own so the (c, T) block and its masks are freed before the next block.
    """
    scores = image_rows @ texts.T  # (c, T) block of image x text similarities
    scores[own_images, own_texts] = float("-inf")  # an image's own captions never beat it, nor it them
    # int32 sums: summing a bool block into int64 would copy it at 8 bytes per element.
    beaten_text += (scores >= positive[None, :]).sum(dim=0, dtype=torch.int32)
    return (scores >= best_positive[start:start + len(image_rows), None]).sum(dim=1, dtype=torch.int32)


def _text_owners(text_image: torch.Tensor | None, n_images: int, n_texts: int) -> torch.Tensor:
    if text_image is None:
        if n_texts != n_images:
            raise ValueError(f"{n_images} images and {n_texts} texts: paired retrieval needs one text per image, "
                             "or pass text_image (the image index of each text)")
        return torch.arange(n_images)
    if text_image.shape != (n_texts,):
        raise ValueError(f"text_image must hold one image index per text ({n_texts}), got {tuple(text_image.shape)}")
    if n_texts and (text_image.min() < 0 or text_image.max() >= n_images):
        raise ValueError(f"text_image has an index outside [0, {n_images})")
    counts = torch.bincount(text_image.cpu(), minlength=n_images)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption: every image needs at least one")
    return text_image.long()


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_image: torch.Tensor | None = None, chunk_size: int = 256) -> dict[str, float]:
    """Recall@{1,5,10} (percent) and mean/median rank, image->text and text->image.

    Text t is a caption of image text_image[t] (default: pair i is image i with text i); an image
    may have any number of captions, as in COCO and Flickr30k. As CLIP_benchmark defines them,
    image->text counts a hit when any of the image's captions is among the top k (averaged over
    images), text->image when the text's image is (averaged over texts). Rows must be
    L2-normalised; any device works. Ranks are 1-based and ties count against the correct item
    (a collapsed model with identical features gets the worst rank, not 1). Similarities are
    computed in (chunk_size x T) blocks and both directions are counted from the same block, so
    extra memory is O(chunk_size * T), never N x T.
    """
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be (N, d) with the same shape d")
    if image_features.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair, got N=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    owner = _text_owners(text_image, len(image_features), len(text_features)).to(image_features.device)
    _check_normalised("image_features", image_features)
    _check_normalised("text_features", text_features)

    images, texts = image_features.float(), text_features.float()
    n, device = images.shape[0], images.device
    positive = torch.empty(len(texts), device=device)  # (T,) score of each text with its own image
    for start in range(0, len(texts), chunk_size):
        rows = slice(start, start + chunk_size)
        positive[rows] = (texts[rows] * images[owner[rows]]).sum(dim=1)
    best_positive = torch.full((n,), float("-inf"), device=device).scatter_reduce(0, owner, positive, "amax")
    order = owner.argsort(stable=True)  # texts by image: a block's own captions are one slice of it
    first = torch.searchsorted(owner[order], torch.arange(n + 1, device=device))
    beaten_image = torch.empty(n, dtype=torch.int32, device=device)  # other captions scoring >= the best own one
    beaten_text = torch.zeros(len(texts), dtype=torch.int32, device=device)  # other images scoring >= the own one
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        own_texts = order[first[start]:first[stop]]
        beaten_image[start:stop] = _count_beaten(images[start:stop], texts, start, own_texts, owner[own_texts] - start,
                                                 positive, best_positive, beaten_text)
    image_to_text, text_to_image = DIRECTIONS
    return {**_rank_summary(image_to_text, beaten_image + 1), **_rank_summary(text_to_image, beaten_text + 1)}


def zeroshot_classifier_weights(class_text_features: torch.Tensor) -> torch.Tensor:
    """(n_classes, n_templates, d) prompt features -> (d, n_classes) classifier.

    Each prompt is normalised, the templates of a class are averaged, and the mean is
    renormalised, so `image_features @ weights` gives cosine logits.
    """
    if class_text_features.ndim != 3 or 0 in class_text_features.shape:
        raise ValueError(f"class_text_features must be (n_classes, n_templates, d) with no empty "
                         f"dimension, got {tuple(class_text_features.shape)}")
    prompts = F.normalize(class_text_features.float(), dim=-1)
    return F.normalize(prompts.mean(dim=1), dim=-1).T


def topk_correct(logits: torch.Tensor, labels: torch.Tensor,
                 ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k highest logits, as {k: n}.

    Counts (not fractions) so that shards can be summed across ranks before dividing.
    k above the number of classes is clamped to it (every row counts as correct).
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, n_classes) and labels (N,), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum().item()) for k in ks}


def class_recall_counts(logits: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits per class, images per class), float64 counts to be summed over ranks."""
    top1 = logits.topk(1, dim=1).indices[:, 0]  # the prediction topk_correct counts
    hits = torch.bincount(labels[top1 == labels], minlength=num_classes)
    return hits.double(), torch.bincount(labels, minlength=num_classes).double()


def mean_per_class_recall(hits: torch.Tensor, counts: torch.Tensor) -> float:
    """Top-1 recall averaged over the classes that have images (balanced accuracy), in percent:
    what CLIP_benchmark reports beside top-1 for unbalanced sets."""
    present = counts > 0
    return 100.0 * (hits[present] / counts[present]).mean().item()
