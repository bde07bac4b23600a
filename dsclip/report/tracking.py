"""Metric sinks on rank 0: metrics.jsonl, TensorBoard, Weights & Biases, and PNG plots at close.

Console progress lines go through the `dsclip` logger (the training loop's); this module only records metrics.
"""
import json
import logging
import os
import secrets
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dsclip.credentials import redact
from dsclip.report.config import LoggingConfig
from dsclip.report.plots import plot_metrics

logger = logging.getLogger(__name__)

WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def wandb_reachable(timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the W&B server (WANDB_BASE_URL or api.wandb.ai) opens."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_config: dict[str, Any], resume: bool):
    try:
        import wandb
    except ImportError as error:
        raise ImportError("logging.report_to includes 'wandb' but wandb is not installed: "
                          "pip install 'dsclip[wandb]'") from error
    id_file = run_dir / WANDB_RUN_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(8)  # W&B ids: lowercase letters and digits
        id_file.write_text(run_id + "\n")
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if wandb_reachable() else "offline"
        if mode == "offline":
            logger.warning("W&B server unreachable: logging offline under %s/wandb "
                           "(upload later with `wandb sync`)", run_dir)
    with _redacted_argv():
        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_dir.name,
                          id=run_id, resume="allow", dir=str(run_dir), config=run_config, mode=mode)


@contextmanager
def _redacted_argv():
    """W&B uploads sys.argv with a run's metadata and has no setting to edit it, so a credential
    given on the command line (`--set data.webdataset.urls=[...token...]`) would leave with it:
    wandb.init, which reads it, sees the arguments redacted."""
    argv = sys.argv
    sys.argv = [redact(arg) for arg in argv]
    try:
        yield
    finally:
        sys.argv = argv


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("logging.report_to includes 'tensorboard' but tensorboard is not installed: "
                          "pip install 'dsclip[tensorboard]'") from error
    return SummaryWriter


class Tracker:
    """Writes metric records to every configured sink; a no-op on ranks other than 0.

    With resume=True, metrics.jsonl is appended to, the W&B run id stored in run_dir is
    reused, and TensorBoard discards events from the first resumed step on (the steps
    replayed since the last checkpoint). Without it, metrics.jsonl starts empty and W&B
    starts a new run.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_config: dict[str, Any], is_main: bool,
                 resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._resume = resume
        self._run_config = run_config
        self._jsonl = None
        self._tensorboard_class = None
        self._tensorboard = None
        self._wandb = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in cfg.report_to:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a" if resume else "w")
        if "tensorboard" in cfg.report_to:
            self._tensorboard_class = _tensorboard_writer_class()
        if "wandb" in cfg.report_to:
            self._wandb = _start_wandb(cfg, self.run_dir, run_config, resume)

    def _open_tensorboard(self, first_step: int) -> None:
        # Opened at the first record so a resumed run can purge the replayed steps.
        self._tensorboard = self._tensorboard_class(
            log_dir=str(self.run_dir / "tensorboard"), purge_step=first_step if self._resume else None)
        self._tensorboard.add_text("config", "```\n" + json.dumps(self._run_config, indent=2, default=str)
                                   + "\n```", global_step=first_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        values = {name: float(value) for name, value in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()
        if self._tensorboard_class is not None:
            if self._tensorboard is None:
                self._open_tensorboard(step)
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        """Flush and close every sink, then draw the plots (rank 0 only)."""
        if not self.is_main:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.cfg.plots:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
