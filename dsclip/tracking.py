"""Metrics sinks: metrics.jsonl on rank 0 (more backends to come)."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between progress lines and metric records
    report_to: list[Literal["jsonl"]] = field(default_factory=lambda: ["jsonl"])  # metric sinks


class Tracker:
    """Writes metric records to every configured sink; a no-op on ranks other than 0."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_config: dict[str, Any], is_main: bool):
        self.is_main = is_main
        self._jsonl = None
        if is_main and "jsonl" in cfg.report_to:
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
