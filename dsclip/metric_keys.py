"""Names of the metrics dsclip records: every key is made and read here, nowhere else.

    train/loss, train/lr, train/logit_scale, train/samples_per_s, train/epoch   training progress
    data/skipped_samples                                                       unusable samples skipped
    mem/<state>_mb, mem/peak_rss_mb                                            memory of rank 0
    eval/<task>/<metric>                                                       one evaluation task:
        top1, top5, mean_per_class_recall                                      zero-shot accuracy (%)
        image_to_text_R@k, text_to_image_R@k                                   retrieval recall (%)
        image_to_text_mean_rank, ..._median_rank, loss                         retrieval ranks, val loss
"""
from typing import Optional

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_LOGIT_SCALE = "train/logit_scale"
TRAIN_SAMPLES_PER_S = "train/samples_per_s"
TRAIN_EPOCH = "train/epoch"
SKIPPED_SAMPLES = "data/skipped_samples"
PEAK_RSS_MB = "mem/peak_rss_mb"
PLOTTED_TRAIN = (TRAIN_LOSS, TRAIN_LR, TRAIN_LOGIT_SCALE)  # plotted besides every eval metric

EVAL = "eval"
TOP1, TOP5, LOSS = "top1", "top5", "loss"
MEAN_PER_CLASS_RECALL = "mean_per_class_recall"  # top-1 recall averaged over classes (balanced accuracy)
DIRECTIONS = ("image_to_text", "text_to_image")
RECALL_KS = (1, 5, 10)


def memory_key(state: str) -> str:
    return f"mem/{state}_mb"


def recall(direction: str, k: int) -> str:
    return f"{direction}_R@{k}"


def rank_stat(direction: str, stat: str) -> str:
    """stat: mean or median."""
    return f"{direction}_{stat}_rank"


def eval_key(task: str, metric: str) -> str:
    return f"{EVAL}/{task}/{metric}"


def split_eval_key(key: str) -> Optional[tuple[str, str]]:
    """(task, metric) of an eval key, None for any other key."""
    parts = key.split("/", 2)
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == EVAL else None


def is_eval(key: str) -> bool:
    return split_eval_key(key) is not None


def eval_task(key: str) -> Optional[str]:
    split = split_eval_key(key)
    return split[0] if split else None


def eval_metric(key: str) -> Optional[str]:
    split = split_eval_key(key)
    return split[1] if split else None


def is_percentage(key: str) -> bool:
    """Accuracy or recall, in percent, higher is better: what a before/after comparison weighs."""
    metric = eval_metric(key)
    return metric is not None and (metric in (TOP1, TOP5, MEAN_PER_CLASS_RECALL) or "_R@" in metric)


def headline(metrics: dict[str, float], task: str) -> Optional[float]:
    """One number per eval task: zero-shot top-1, or the mean of the two retrieval R@1."""
    if eval_key(task, TOP1) in metrics:
        return metrics[eval_key(task, TOP1)]
    recalls = [metrics[k] for k in (eval_key(task, recall(d, 1)) for d in DIRECTIONS) if k in metrics]
    return sum(recalls) / len(recalls) if recalls else None
