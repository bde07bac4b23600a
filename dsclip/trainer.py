"""The fine-tuning loop: build every component from a RunConfig, then step, log, evaluate, save."""
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from dsclip.checkpoint import CheckpointError, CheckpointManager, export_model, resolve_checkpoint, resume_conflicts
from dsclip.collectives import use_shared_memory
from dsclip import memory
from dsclip.config import RunConfig, to_dict
from dsclip.data import build_train_data
from dsclip.engine import build_engine, precision, resolve_ds_config, resolve_precision
from dsclip.evaluation import build_evals, forgetting_report, run_evals
from dsclip.freeze import apply_freeze, check_lr, format_summary
from dsclip.loss import build_loss
from dsclip.model import ModelBundle, build_model
from dsclip.tracking import Tracker

log = logging.getLogger("dsclip")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption, SLURM's warning before the time limit


def recipe_values(cfg: RunConfig, world_size: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed config fields the recipe decides: ds path -> (value, recipe key)."""
    return {
        "train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (cfg.train.grad_accum_steps, "train.grad_accum_steps"),
        "train_batch_size": (cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
                             "data.batch_size x train.grad_accum_steps x world size"),
        "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip"),
        "optimizer.params.lr": (cfg.optim.lr, "optim.lr"),
        "optimizer.params.betas": (cfg.optim.betas, "optim.betas"),
        "optimizer.params.eps": (cfg.optim.eps, "optim.eps"),
        "optimizer.params.weight_decay": (cfg.optim.weight_decay, "optim.weight_decay"),
    }


class Trainer:
    """Owns the engine, data, evaluations, checkpoints and metrics of one run."""

    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], resume: Optional[str] = None):
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last,
                                             cfg.train.best_metric, cfg.train.best_mode)
        resume_from = self.check_resume(resume) if resume else None
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        bundle = build_model(cfg.model, load_weights=resume_from is None)
        self.apply_strategy(bundle)
        self.data = build_train_data(cfg.data, bundle, self.rank, self.world_size, cfg.seed)
        self.total_steps = cfg.train.max_steps or (
            cfg.train.epochs * self.data.steps_per_epoch // cfg.train.grad_accum_steps)
        resolved = resolve_precision(resolve_ds_config(ds_config, recipe_values(cfg, self.world_size)))
        self.input_dtype = precision(resolved)
        self.engine = build_engine(bundle.module, resolved, cfg.optim, self.total_steps)
        self.loss_fn = build_loss(cfg.loss)
        self.evals = build_evals(cfg.eval, bundle, cfg.data.synthetic, cfg.seed, self.loss_fn)
        self.epoch, self._batches, self.stop_requested, self.model_state_logged = 0, None, False, False
        if resume_from is not None:
            self.restore(*resume_from)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.tracker = Tracker(cfg.logging, self.run_dir, to_dict(cfg), self.is_main, resume=resume_from is not None)

    def apply_strategy(self, bundle: ModelBundle) -> None:
        """Freeze before the engine exists, so frozen parameters never get optimizer state."""
        summary = apply_freeze(bundle.module.clip, self.cfg.freeze)
        self.print(format_summary(summary))
        warning = check_lr(self.cfg.freeze.strategy, self.cfg.optim.lr) if self.cfg.model.pretrained else None
        if warning:  # from random weights a high lr is right; it only wrecks pretrained features
            self.print(f"WARNING: {warning}")

    def check_resume(self, resume: str) -> tuple[str, dict[str, Any]]:
        """(tag, this rank's saved state), refusing a checkpoint this run cannot continue exactly."""
        root, tag = resolve_checkpoint(resume, self.run_dir / "checkpoints")
        self.checkpoints.root = root
        state = self.checkpoints.read_train_state(tag)
        conflicts = resume_conflicts(state["config"], to_dict(self.cfg), state["world_size"], self.world_size)
        if conflicts:
            raise CheckpointError(f"cannot resume {root / tag}: the run differs in " + "; ".join(conflicts)
                                  + " (restore those settings, or start a new run with --pretrained)")
        return tag, state

    def restore(self, tag: str, state: dict[str, Any]) -> None:
        self.checkpoints.restore(self.engine, tag, state)
        self.epoch = state["epoch"]
        self.data.load_state_dict(state["data"])
        self.checkpoints.root = self.run_dir / "checkpoints"  # new saves go to this run
        self.print(f"resumed {tag}: step {self.engine.global_steps}, epoch {self.epoch}")

    # -- phases -----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        resumed = self.engine.global_steps > 0
        before = self.evaluate() if self.cfg.eval.at_start and not resumed else {}
        self.install_stop_handlers()
        last_log = (time.perf_counter(), self.engine.global_steps)
        loss_sum = torch.zeros(())
        while self.engine.global_steps < self.total_steps:
            images, texts = self.next_batch()
            loss, logit_scale = self.micro_step(images, texts)
            loss_sum += loss
            if not self.engine.is_gradient_accumulation_boundary():
                continue
            lr = max(self.engine.get_lr())  # the lr this step uses; step() moves the schedule on
            self.engine.step()
            step = self.engine.global_steps
            if step % self.cfg.logging.log_every == 0 or step == self.total_steps:
                last_log = self.log_progress(step, loss_sum, logit_scale, lr, last_log)
            loss_sum = torch.zeros(())
            metrics = {}
            if self.cfg.eval.every_steps and step % self.cfg.eval.every_steps == 0 and step < self.total_steps:
                metrics = self.evaluate()
            if self.stop_agreed():
                self.save(metrics)
                self.print(f"stop signal: saved step {step}; resume with --resume latest")
                self.tracker.close()
                return metrics
            periodic = self.cfg.train.save_every and step % self.cfg.train.save_every == 0
            if step < self.total_steps and (periodic or self.data.at_epoch_end()):
                self.save(metrics)
        after = self.evaluate() if self.cfg.eval.at_end else {}
        tag = self.save(after)
        if self.cfg.train.export:
            self.export(tag)
        self.report(before, after)
        self.tracker.close()
        return after

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch; the data position advances with it, across epochs."""
        if self._batches is None:
            self._batches = self.data.epoch_batches(self.epoch)
        batch = next(self._batches, None)
        if batch is None:
            self.epoch += 1
            self._batches = self.data.epoch_batches(self.epoch)
            batch = next(self._batches)
        return batch

    def micro_step(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.engine.device
        image_features, text_features, logit_scale, logit_bias = self.engine(
            images=images.to(device, self.input_dtype), texts=texts.to(device))
        loss = self.loss_fn(image_features.float(), text_features.float(), logit_scale.float(),
                            None if logit_bias is None else logit_bias.float())
        self.engine.backward(loss)
        return loss.detach().cpu(), logit_scale.detach().cpu()

    def evaluate(self) -> dict[str, float]:
        metrics = run_evals(self.evals, self.engine, self.engine.device, self.input_dtype)
        if metrics:
            self.tracker.log(self.engine.global_steps, metrics)
            self.print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def save(self, metrics: dict[str, float]) -> str:
        state = {"epoch": self.epoch, "data": self.data.state_dict(), "config": to_dict(self.cfg)}
        return self.checkpoints.save(self.engine, state, metrics)

    def export(self, tag: str) -> None:
        if self.is_main:
            weights = export_model(self.checkpoints.root, tag, self.cfg.model, self.run_dir / "export")
            self.print(f"exported open_clip weights to {weights}")
        dist.barrier()

    # -- preemption -------------------------------------------------------------------------
    def install_stop_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def stop_agreed(self) -> bool:
        """All ranks stop at the same step if any rank got a stop signal (all-reduce of 1 int)."""
        flag = torch.tensor([int(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- reporting --------------------------------------------------------------------------
    def log_progress(self, step: int, loss_sum: torch.Tensor, logit_scale: torch.Tensor, lr: float,
                     last_log: tuple[float, int]) -> tuple[float, int]:
        loss = loss_sum / self.cfg.train.grad_accum_steps
        dist.all_reduce(loss)  # 1 float: the step's loss averaged over ranks
        loss = loss.item() / self.world_size
        now = time.perf_counter()
        then, then_step = last_log
        samples = (step - then_step) * self.cfg.data.batch_size * self.cfg.train.grad_accum_steps * self.world_size
        rate = samples / max(now - then, 1e-9)
        eta = (now - then) / max(1, step - then_step) * (self.total_steps - step)
        metrics = {"train/loss": loss, "train/lr": lr, "train/logit_scale": logit_scale.item(),
                   "train/samples_per_s": rate, "train/epoch": self.epoch,
                   "data/skipped_samples": sum(self.data.skipped().values()),
                   "mem/peak_rss_mb": memory.peak_rss_bytes() / 2**20}
        if not self.model_state_logged:  # after the first step: AdamW creates its moments lazily
            metrics.update({f"mem/{key}_mb": value / 2**20 for key, value in memory.state_bytes(self.engine).items()})
            self.model_state_logged = True
        self.tracker.log(step, metrics)
        self.print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3g} "
                   f"logit_scale {logit_scale.item():.2f} {rate:.0f} samples/s eta {eta:.0f}s")
        return now, step

    def report(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Headline zero-shot numbers, and the forgetting table when the run evaluated at both ends."""
        for key in after:
            if key in before and key.endswith("/top1"):
                self.print(f"{key}: {before[key]:.2f}% before -> {after[key]:.2f}% after")
        if before and after:
            table, warnings = forgetting_report(self.cfg.eval.forgetting, before, after)
            self.print("before / after fine-tuning (general evals: "
                       f"{', '.join(self.cfg.eval.forgetting.general) or 'none named'})\n" + table)
            if self.is_main:
                (self.run_dir / "forgetting.md").write_text(table + "\n")
            for warning in warnings:
                self.print(f"WARNING: {warning}")

    def print(self, message: str) -> None:
        if self.is_main:
            print(f"[dsclip] {message}", flush=True)


def configure_threads() -> None:
    """One rank per core share: on CPU, ranks' thread pools otherwise fight over the cores."""
    # DeepSpeed's CPU accelerator runs `numactl --hardware` at every ZeRO-3 gradient reduction unless
    # LOCAL_SIZE is set; its launcher sets it, torchrun and `dsclip train` do not.
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def single_process_defaults() -> None:
    """Let `dsclip train` run without a launcher: a world of one rank on a free local port."""
    if "RANK" in os.environ:
        return
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed() -> None:
    """DeepSpeed's process group, the shared-memory names of its CPU all-reduce released; on CPU,
    glibc keeps freed host memory for reuse, and the collectives run on shared memory when all
    ranks are on one host."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(verbose=False)
    dist.barrier()  # every local rank has mapped every peer's buffer
    # DeepSpeed never unlinks these /dev/shm files (~69 MB per rank): each run would leak them.
    # The mappings stay valid after the names go.
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    Path(f"/dev/shm/{name}_{dist.get_rank()}").unlink(missing_ok=True)
    if get_accelerator().device_name() == "cpu":
        memory.keep_freed_host_memory()
        if os.environ.get("DSCLIP_SHM_COLLECTIVES", "1") != "0":
            use_shared_memory()


def quiet_libraries() -> None:
    """DeepSpeed logs every engine detail at INFO and torch warns on each reduce-scatter call."""
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather.*deprecated.*", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def run(cfg: RunConfig, ds_config: dict[str, Any], resume: Optional[str] = None) -> dict[str, float]:
    quiet_libraries()
    single_process_defaults()
    configure_threads()
    init_distributed()
    trainer = Trainer(cfg, ds_config, resume)
    metrics = trainer.train()
    if cfg.wise_ft.enabled and trainer.engine.global_steps >= trainer.total_steps:  # not after a stop signal
        from dsclip.wiseft import run_wise_ft
        finetuned = cfg.run_dir / "export" if cfg.train.export else cfg.run_dir
        run_wise_ft(cfg.wise_ft, cfg, zeroshot=cfg.model.pretrained, finetuned=str(finetuned),
                    out_dir=cfg.run_dir / "wise_ft", device=trainer.engine.device)
    return metrics
