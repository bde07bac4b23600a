"""Recipe section `logging:`: how often to log and where metrics go."""
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

Sink = Literal["jsonl", "tensorboard", "wandb"]


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between progress lines and metric records
    report_to: list[Sink] = field(default_factory=lambda: ["jsonl"])  # metric sinks
    wandb_project: str = "dsclip"  # W&B project (report_to: wandb)
    wandb_entity: Optional[str] = None  # W&B team or user; None: the logged-in user's default
    plots: bool = True  # write PNG curves of metrics.jsonl into run_dir/plots at the end

    def validate(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"logging.log_every must be >= 1, got {self.log_every}")
        sinks = get_args(Sink)
        unknown = [sink for sink in self.report_to if sink not in sinks]
        if unknown:
            raise ValueError(f"logging.report_to has unknown sinks {unknown}; choose from {list(sinks)}")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"logging.report_to lists a sink twice: {self.report_to}")
        if self.plots and "jsonl" not in self.report_to:
            raise ValueError("logging.plots=true draws from metrics.jsonl: add 'jsonl' to "
                             "logging.report_to or set logging.plots=false")
        if "wandb" in self.report_to and not self.wandb_project:
            raise ValueError("logging.wandb_project is empty: name a W&B project or drop 'wandb' "
                             "from logging.report_to")
