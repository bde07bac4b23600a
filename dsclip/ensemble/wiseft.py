"""WiSE-FT: robust fine-tuning by weight-space ensembling (Wortsman et al., 2022).

theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, for every floating-point
tensor of two checkpoints of one architecture (ensemble/mixing.py). Each alpha is evaluated on the
recipe's evals (task evals, and the general ones named in `eval.forgetting.general`); the result is
a markdown + JSON table, a PNG plot and the chosen alpha's weights as an open_clip model.

Memory: the two endpoint state dicts and the one model being evaluated, whatever the number of
alphas. Each alpha is written into that model's tensors in place, one tensor at a time.
"""
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsclip.config import RunConfig
from dsclip.ensemble.config import WiseFtConfig
from dsclip.ensemble.mixing import load_endpoints, mix_into
from dsclip.eval.config import EvalConfig
from dsclip.eval.tasks import build_evals, rank_and_world, run_evals
from dsclip.logs import progress
from dsclip.loss.contrastive import build_loss
from dsclip.metric_keys import headline
from dsclip.model.build import build_model
from dsclip.model.weights import write_open_clip
from dsclip.report.plots import plot_sweep

log = logging.getLogger(__name__)


# -- scoring and reports ----------------------------------------------------------------------------
def mean_headline(metrics: dict[str, float], tasks: list[str]) -> Optional[float]:
    values = [v for v in (headline(metrics, t) for t in tasks) if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class SweepRow:
    alpha: float
    metrics: dict[str, float]
    task: Optional[float]  # mean headline metric of the task evals
    general: Optional[float]  # mean headline metric of the general evals

    @property
    def balance(self) -> float:
        """Mean of the task and general scores (those present): what the default choice maximises."""
        scores = [s for s in (self.task, self.general) if s is not None]
        return sum(scores) / len(scores) if scores else float("nan")


def choose_alpha(rows: list[SweepRow], save_alpha: Optional[float]) -> SweepRow:
    """The row of `save_alpha`, else the best balance (ties: the smaller alpha, nearer zero-shot)."""
    if save_alpha is not None:
        return next(row for row in rows if row.alpha == save_alpha)
    return max(sorted(rows, key=lambda r: r.alpha), key=lambda r: (-math.inf if math.isnan(r.balance) else r.balance))


def markdown_table(rows: list[SweepRow], task_names: list[str], general_names: list[str], chosen: float) -> str:
    def cell(value: Optional[float]) -> str:
        return "" if value is None else f"{value:.2f}"

    names = task_names + general_names
    header = ["alpha"] + [f"{n} (general)" if n in general_names else n for n in names] + ["task", "general", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    for row in rows:
        cells = [f"{row.alpha:g}"] + [cell(headline(row.metrics, n)) for n in names]
        cells += [cell(row.task), cell(row.general), "saved" if row.alpha == chosen else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    rows: list[SweepRow]
    chosen: SweepRow
    weights: Optional[Path]  # the chosen alpha's open_clip weights (written by rank 0)
    report: Path  # folder with wise_ft.md, wise_ft.json, wise_ft.png


def sweep(module: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alphas: list[float],
          evaluate: Callable[[], dict[str, float]], task_names: list[str], general_names: list[str],
          on_row: Callable[[SweepRow], None] = lambda row: None) -> list[SweepRow]:
    """Evaluate the mix at every alpha (in the given order), reusing `module`'s storage."""
    rows = []
    for alpha in progress(alphas, total=len(alphas), desc="wise-ft"):
        mix_into(module, start, end, alpha)
        metrics = evaluate()
        rows.append(SweepRow(alpha, metrics, mean_headline(metrics, task_names), mean_headline(metrics, general_names)))
        on_row(rows[-1])
    return rows


def split_tasks(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(task eval names, general eval names) in recipe order."""
    names = cfg.task_names()
    if not names:
        raise ValueError("WiSE-FT needs evaluations: list eval.zeroshot or eval.retrieval tasks in the recipe")
    return [n for n in names if n not in cfg.forgetting.general], [n for n in names if n in cfg.forgetting.general]


def run_wise_ft(cfg: WiseFtConfig, run_cfg: RunConfig, zeroshot: str, finetuned: str, out_dir: Path,
                weights_out: Optional[Path] = None, device: Optional[torch.device] = None,
                adapters: tuple[Optional[Path], Optional[Path]] = (None, None)) -> SweepResult:
    """Sweep `cfg.alphas` between two checkpoints of `run_cfg.model`'s architecture, evaluating
    `run_cfg.eval`; rank 0 writes the report to `out_dir` and the chosen weights to `weights_out`
    (default out_dir/export). `adapters`: LoRA folders merged into the zero-shot and fine-tuned end.

    Without torch.distributed this runs in one process. Under a process group every rank must
    call it (evaluation is sharded over the ranks in lockstep); each rank holds a full model.
    """
    cfg.validate()
    task_names, general_names = split_tasks(run_cfg.eval)
    rank, _ = rank_and_world()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = dataclasses.replace(run_cfg.model, pretrained=None, grad_checkpointing=False,
                                    activation_offload=False)
    bundle = build_model(model_cfg)
    clip = bundle.module.clip
    start, end = load_endpoints(clip, model_cfg.name, zeroshot, finetuned, run_cfg.model.trust_checkpoint, adapters)
    bundle.module.to(device)
    evals = build_evals(run_cfg.eval, bundle, run_cfg.data.synthetic, run_cfg.seed, build_loss(run_cfg.loss))

    def report(row: SweepRow) -> None:
        shown = " ".join(f"{n}={headline(row.metrics, n):.2f}" for n in task_names + general_names)
        log.info("wise-ft alpha %g: %s", row.alpha, shown)

    rows = sweep(clip, start, end, cfg.alphas,
                 lambda: run_evals(evals, bundle.module, device, torch.float32), task_names, general_names, report)
    chosen = choose_alpha(rows, cfg.save_alpha)
    weights = None
    if rank == 0:
        mix_into(clip, start, end, chosen.alpha)
        weights = write_open_clip({k: v.cpu() for k, v in clip.state_dict().items()}, model_cfg,
                                  weights_out or out_dir / "export")
        write_report(rows, chosen, task_names, general_names, out_dir,
                     {"zeroshot": zeroshot, "finetuned": finetuned, "weights": str(weights)})
        log.info("wise-ft: saved alpha %g to %s; table, JSON and plot in %s", chosen.alpha, weights, out_dir)
    if dist.is_initialized():
        dist.barrier()  # the weights exist before any rank moves on
    return SweepResult(rows, chosen, weights, out_dir)


def write_report(rows: list[SweepRow], chosen: SweepRow, task_names: list[str], general_names: list[str],
                 out_dir: Path, sources: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, task_names, general_names, chosen.alpha)
    (out_dir / "wise_ft.md").write_text(table)
    record = {**sources, "task_evals": task_names, "general_evals": general_names, "chosen_alpha": chosen.alpha,
              "rows": [dataclasses.asdict(row) for row in rows]}
    (out_dir / "wise_ft.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_sweep(rows, task_names, general_names, out_dir / "wise_ft.png")
    log.info("wise-ft sweep:\n%s", table.rstrip())
