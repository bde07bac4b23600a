"""Everything a run trains with, built in order from the recipe: the model (and its freeze mask),
the data, the DeepSpeed engine, the loss, the evaluations, the checkpoint manager and the
metric sinks; restored from a checkpoint when resuming."""
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml
from torch import nn

from dsclip.config import RunConfig, recorded
from dsclip.data.loader import TrainData, build_train_data
from dsclip.eval.tasks import Evaluation, build_evals
from dsclip.loss.contrastive import build_loss
from dsclip.model.adapters import adapted_towers
from dsclip.model.build import ModelBundle
from dsclip.model.freeze import apply_freeze, check_lr, format_summary
from dsclip.report.tracking import Tracker
from dsclip.training.checkpoint import CheckpointManager
from dsclip.training.ds_config import for_run, precision
from dsclip.training.engine import build_engine, build_model_for
from dsclip.training.grad_cache import describe_contrastive_batch
from dsclip.training.resume import RESHARDED, find_resume_point, restore
from dsclip.training.universal import loading_config

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    cfg: RunConfig
    engine: Any  # deepspeed.DeepSpeedEngine around the ContrastiveModel
    data: TrainData
    loss_fn: nn.Module
    evals: list[Evaluation]
    checkpoints: CheckpointManager
    tracker: Tracker
    total_steps: int  # optimizer steps of the whole run
    input_dtype: torch.dtype  # images go to the engine in this dtype
    epoch: int  # the epoch training continues in (0 for a new run)


def build_run(cfg: RunConfig, ds_config: dict[str, Any], resume: Optional[str] = None,
              new_global_batch: bool = False) -> RunParts:
    """Call on every rank once the process group exists (training/bootstrap.py). `new_global_batch`
    lets a resume change the global batch (the schedule stays the saved run's)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    point = find_resume_point(resume, cfg, rank, world, new_global_batch) if resume else None
    ds = for_run(ds_config, cfg, world)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    bundle = build_model_for(cfg.model, ds, load_weights=point is None, adapters=cfg.adapters)
    apply_strategy(cfg, bundle)
    data = build_train_data(cfg.data, bundle, rank, world, cfg.seed, cfg.train.grad_accum_steps)
    total_steps = cfg.train.max_steps or cfg.train.epochs * data.steps_per_epoch // cfg.train.grad_accum_steps
    if point is not None:  # the saved schedule's length, also under a new global batch
        total_steps = point.state.get("total_steps", total_steps)
    if point is not None and point.reshards_onto(world):
        ds = loading_config(ds)
    engine = build_engine(bundle.module, ds, cfg.optim, total_steps)
    log.info("%s", describe_contrastive_batch(cfg.data.batch_size, cfg.train.grad_accum_steps, world,
                                              cfg.train.grad_cache))
    loss_fn = build_loss(cfg.loss)
    evals = build_evals(cfg.eval, bundle, cfg.data.synthetic, cfg.seed, loss_fn)
    epoch = 0
    if point is not None:
        epoch = restore(engine, data, point, cfg.seed, cfg.checkpoints_dir / RESHARDED)
        log.info("resumed %s of %s: step %d from %d ranks onto %d ranks, epoch %d", point.tag, point.root,
                 engine.global_steps, point.world_size, world, epoch)
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded(cfg), sort_keys=False))
    checkpoints = CheckpointManager(cfg.checkpoints_dir, cfg.train.keep_last, cfg.train.best_metric,
                                    cfg.train.best_mode)
    if point is not None and point.root.resolve() == cfg.checkpoints_dir.resolve():
        checkpoints.continue_from(point.tag)
    tracker = Tracker(cfg.logging, cfg.run_dir, recorded(cfg), rank == 0, resume=point is not None)
    return RunParts(cfg, engine, data, loss_fn, evals, checkpoints, tracker, total_steps, precision(ds), epoch)


def apply_strategy(cfg: RunConfig, bundle: ModelBundle) -> None:
    """Freeze before the engine exists, so frozen parameters never get optimizer state."""
    summary = apply_freeze(bundle.module.clip, cfg.freeze, adapted_towers(cfg.adapters))
    log.info("%s", format_summary(summary))
    # from random weights a high lr is right; it wrecks pretrained features (adapters: lr is theirs)
    warning = check_lr(cfg.freeze.strategy, cfg.optim.lr) if cfg.model.pretrained and cfg.adapters.kind == "none" else None
    if warning and dist.get_rank() == 0:
        log.warning("%s", warning)
