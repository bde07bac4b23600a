"""The before/after fine-tuning table: every metric's change, general abilities marked, and a
warning for each general one that dropped more than allowed."""
from dsclip.eval.config import ForgettingConfig
from dsclip.metric_keys import eval_task, is_percentage


def forgetting_report(cfg: ForgettingConfig, before: dict[str, float], after: dict[str, float]) -> tuple[str, list[str]]:
    """Markdown before/after table (general evals marked) and a warning per collapsed general metric."""
    general = [key for key in before if eval_task(key) in cfg.general and key in after and is_percentage(key)]
    return forgetting_table(before, after, general, cfg.max_drop_points)


def forgetting_table(before: dict[str, float], after: dict[str, float], general: list[str],
                     max_drop_points: float) -> tuple[str, list[str]]:
    """Markdown table of metrics before/after fine-tuning, and warnings for forgotten skills.

    Values are percentages (higher is better); deltas are in points. `general` names the
    metrics that measure general ability (e.g. ImageNet zero-shot); each one that dropped
    by more than `max_drop_points` yields a warning. Metrics present on one side only are
    listed with an empty delta.
    """
    if max_drop_points < 0:
        raise ValueError(f"max_drop_points must be >= 0, got {max_drop_points}")
    missing = [name for name in general if name not in before or name not in after]
    if missing:
        raise ValueError(f"general metrics {missing} need a value both before and after fine-tuning; "
                         f"evaluate them in both runs or drop them from the list")

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = ["| metric | before | after | delta (points) |", "|---|---:|---:|---:|"]
    warnings = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        delta = "" if old is None or new is None else f"{new - old:+.2f}"
        label = f"{name} (general)" if name in general else name
        lines.append(f"| {label} | {cell(old)} | {cell(new)} | {delta} |")
        if name in general and old - new > max_drop_points:
            warnings.append(f"{name} dropped {old - new:.2f} points ({old:.2f} -> {new:.2f}), "
                            f"more than the allowed {max_drop_points:.2f}")
    return "\n".join(lines) + "\n", warnings
