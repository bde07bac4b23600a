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


def _count_beaten(image_rows: torch.Tensor, texts: torch.Tensor, positive: torch.Tensor, start: int,
                  beaten_text: torch.Tensor) -> torch.Tensor:
    """Per image row, texts scoring >= its pair; adds the rows' votes against each text to beaten_text.

    A function of its own so the (c, N) block and its masks are freed before the next block.
    """
    rows = torch.arange(len(image_rows), device=image_rows.device)
    scores = image_rows @ texts.T  # (c, N) block of image x text similarities
    scores[rows, rows + start] = float("-inf")  # the correct pair never beats itself
    # int32 sums: summing a bool block into int64 would copy it at 8 bytes per element.
    beaten_text += (scores >= positive[None, :]).sum(dim=0, dtype=torch.int32)
    return (scores >= positive[start:start + len(image_rows), None]).sum(dim=1, dtype=torch.int32)


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      chunk_size: int = 256) -> dict[str, float]:
    """Recall@{1,5,10} (percent) and mean/median rank, image->text and text->image.

    Pair i is image i with text i; rows must be L2-normalised; any device works (CPU or GPU). Ranks are 1-based and ties
    count against the correct item (a collapsed model with identical features gets rank N,
    not 1). Similarities are computed in (chunk_size x N) blocks and both directions are
    counted from the same block, so extra memory is O(chunk_size * N), never N x N.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be (N, d) with the same shape")
    if image_features.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair, got N=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_normalised("image_features", image_features)
    _check_normalised("text_features", text_features)

    images = image_features.float()
    texts = text_features.float()
    n = images.shape[0]
    positive = (images * texts).sum(dim=1)  # (N,) score of each correct pair
    beaten_image = torch.empty(n, dtype=torch.int32, device=images.device)  # texts scoring >= the correct one, per image
    beaten_text = torch.zeros(n, dtype=torch.int32, device=images.device)  # images scoring >= the correct one, per text
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        beaten_image[start:stop] = _count_beaten(images[start:stop], texts, positive, start, beaten_text)
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
