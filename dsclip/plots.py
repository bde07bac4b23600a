"""PNG plots of the metric curves in a run's metrics.jsonl (one figure per metric)."""
import json
import math
import re
from pathlib import Path

# Figure + the Agg canvas render without pyplot, so plotting never changes the process's
# global matplotlib backend (a notebook that imports dsclip keeps its own).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TRAIN_METRICS = ("train/loss", "train/lr", "train/logit_scale")
EVAL_PREFIX = "eval/"
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
    names = [name for name in TRAIN_METRICS if name in series]
    names += sorted(name for name in series if name.startswith(EVAL_PREFIX))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out_dir / _file_name(name)
        _plot_one(name, series[name], path)
        written.append(path)
    return written
