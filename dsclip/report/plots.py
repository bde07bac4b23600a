"""PNG plots: the metric curves of a run's metrics.jsonl (one figure per metric) and a WiSE-FT sweep."""
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

# Figure + the Agg canvas render without pyplot, so plotting never changes the process's
# global matplotlib backend (a notebook that imports dsclip keeps its own).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsclip.metric_keys import PLOTTED_TRAIN, headline, is_eval

MARKER_MAX_POINTS = 50  # sparser series (e.g. evals every few hundred steps) get a marker per point


def read_metric_series(jsonl_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} sorted by step.

    A step logged twice (a resumed run replays the steps after its last checkpoint) keeps
    the later record. A truncated last line (a crash mid-write) is ignored.
    """
    lines = Path(jsonl_path).read_text().splitlines()
    by_step: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{jsonl_path}:{number} is not valid JSON; fix or delete that line")
        step = record.get("step")
        if not isinstance(step, int):
            raise ValueError(f"{jsonl_path}:{number} has no integer 'step' field")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_step.items()}


def _file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def _plot_one(metric: str, points: list[tuple[int, float]], path: Path) -> None:
    steps = [step for step, _ in points]
    values = [value for _, value in points]
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, values, marker="o" if len(points) <= MARKER_MAX_POINTS else None, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel(metric.rsplit("/", 1)[-1])
    axes.set_title(metric)
    axes.grid(alpha=0.3)
    if not all(math.isfinite(v) for v in values):
        axes.text(0.01, 0.98, "non-finite values not drawn", transform=axes.transAxes, va="top", color="red")
    figure.tight_layout()
    figure.savefig(path)


def plot_metrics(jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write one PNG per plotted metric (train loss, lr, logit scale, every eval/* metric).

    Returns the written paths, train metrics first, then eval metrics by name.
    """
    series = read_metric_series(Path(jsonl_path))
    names = [name for name in PLOTTED_TRAIN if name in series]
    names += sorted(name for name in series if is_eval(name))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out_dir / _file_name(name)
        _plot_one(name, series[name], path)
        written.append(path)
    return written


def plot_sweep(rows: Sequence[Any], task_names: list[str], general_names: list[str], path: Path) -> None:
    """Left: each eval's headline metric vs alpha (general evals dashed). Right: task vs general
    score, one point per alpha (the WiSE-FT curve). `rows` are WiSE-FT sweep rows (alpha, metrics,
    task, general)."""
    alphas = [row.alpha for row in rows]
    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for name in task_names + general_names:
        values = [headline(row.metrics, name) for row in rows]
        label = f"{name} (general)" if name in general_names else f"{name} (task)"
        left.plot(alphas, values, marker="o", linestyle="--" if name in general_names else "-", label=label)
    left.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    left.set_ylabel("top-1 / R@1 (%)")
    left.set_title("metric vs alpha")
    left.grid(alpha=0.3)
    left.legend()
    if task_names and general_names:
        ends = [min(rows, key=lambda r: r.alpha), max(rows, key=lambda r: r.alpha)]
        right.plot([r.general for r in ends], [r.task for r in ends], color="gray", linestyle=":",
                   label="straight line between the ends")
        right.plot([row.general for row in rows], [row.task for row in rows], marker="o", label="WiSE-FT")
        right.margins(0.08)
        right.legend()
        for row in rows:
            right.annotate(f"{row.alpha:g}", (row.general, row.task), textcoords="offset points", xytext=(4, 4))
        right.set_xlabel(f"general: {', '.join(general_names)} (%)")
        right.set_ylabel(f"task: {', '.join(task_names)} (%)")
        right.set_title("task vs general, labelled by alpha")
        right.grid(alpha=0.3)
    else:
        right.axis("off")
        right.text(0.5, 0.5, "name general evals in eval.forgetting.general\nfor the task vs general curve",
                   ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path)
