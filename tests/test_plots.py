import json

import numpy as np
import pytest
from matplotlib.image import imread

from dsclip.report.plots import plot_metrics, read_metric_series


def write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def training_records():
    records = [{"step": s, "train/loss": 4.0 / (1 + s / 20), "train/lr": min(1.0, s / 10) * 1e-3,
                "train/logit_scale": 14.3 + s / 100, "train/samples_per_s": 100.0} for s in range(0, 200, 2)]
    records += [{"step": s, "eval/zeroshot/top1": 10.0 + s / 5, "eval/retrieval/image_to_text_R@1": s / 4}
                for s in (50, 100, 150, 199)]
    return records


def test_plot_metrics_writes_one_png_per_plotted_metric(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    write_jsonl(jsonl, training_records())
    paths = plot_metrics(jsonl, tmp_path / "plots")
    assert [p.name for p in paths] == ["train_loss.png", "train_lr.png", "train_logit_scale.png",
                                       "eval_retrieval_image_to_text_R_1.png", "eval_zeroshot_top1.png"]
    for path in paths:
        pixels = imread(path)
        assert pixels.shape[:2] == (400, 640)
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20  # not a blank canvas


def test_resumed_steps_keep_the_later_value_and_truncated_tail_is_ignored(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0},
               {"step": 3, "train/loss": 1.0}, {"step": 2, "train/loss": 2.5}, {"step": 3, "train/loss": 1.5}]
    write_jsonl(jsonl, records, tail='{"step": 4, "train/lo')
    series = read_metric_series(jsonl)
    assert series == {"train/loss": [(1, 3.0), (2, 2.5), (3, 1.5)]}
    assert [p.name for p in plot_metrics(jsonl, tmp_path / "plots")] == ["train_loss.png"]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "train/loss": 3.0}\nnot json\n{"step": 2, "train/loss": 2.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not valid JSON"):
        read_metric_series(jsonl)


def test_nan_loss_is_plotted_without_failing(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": NaN}\n')
    assert len(plot_metrics(jsonl, tmp_path / "plots")) == 1
