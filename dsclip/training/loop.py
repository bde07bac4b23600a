"""The fine-tuning loop: optimizer steps over the data, with logging, evaluation, checkpoints and
a clean stop on a preemption signal; at the end the final evaluation, save, export and report.
Building what it runs is training/components.py."""
import logging
import re
import signal
import time
from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist

from dsclip import metric_keys as keys
from dsclip.config import recorded
from dsclip.errors import CollectiveError
from dsclip.loss import collectives
from dsclip.eval.forgetting import forgetting_report
from dsclip.eval.tasks import EvaluationStopped, run_evals
from dsclip.training import memory
from dsclip.training.components import RunParts
from dsclip.ranks import rank0_decides
from dsclip.training.config import TRANSFORMERS
from dsclip.training.export import export_checkpoint
from dsclip.training.grad_cache import TrainableTowers, cached_step
from dsclip.training.temperature import clamp_logit_scale

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption, SLURM's warning before the time limit


LOST_PEER = ("Connection reset by peer", "Connection closed by peer")  # gloo, when a peer's process is gone
PEER_FAILURES = (*LOST_PEER, "Timed out waiting", "NCCL")


def is_peer_failure(error: RuntimeError) -> bool:
    """A collective that failed because another rank died or hangs (not a bug in this rank)."""
    return (isinstance(error, (collectives.CollectiveTimeout, dist.DistError))
            or any(marker in str(error) for marker in PEER_FAILURES))


def peer_failure(error: RuntimeError) -> str:
    """The backend's message in one line, without gloo's source location and advice."""
    line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    line = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\] ", "", line).split(". ")[0]
    if any(marker in line for marker in LOST_PEER):  # gloo names the peer's address, not its rank
        return f"a peer rank's process is gone or its node is down ({line})"
    return line


class StopSignals:
    """Notes a preemption signal instead of dying of it. Install it before the run is built: a
    signal during setup or the first evaluation then stops the run after its first step."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True


class Trainer:
    """Runs one run's parts; every method is called on all ranks in lockstep."""

    def __init__(self, parts: RunParts, stop: StopSignals | None = None):
        self.parts, self.cfg, self.engine, self.data = parts, parts.cfg, parts.engine, parts.data
        self.epoch, self._batches = parts.epoch, None
        self.is_main = dist.get_rank() == 0
        self.stop = stop or StopSignals().install()
        self.model_state_logged = False
        self.towers: TrainableTowers | None = None  # grad_cache: which towers run a second forward
        self.stopped_by_signal = False  # the run ended at a stop signal, not at its last step

    @property
    def total_steps(self) -> int:
        return self.parts.total_steps

    def train(self) -> dict[str, float]:
        """Train to `total_steps` (or a stop signal); returns the last evaluation's metrics. A
        collective that fails or times out (a peer died or hangs) ends this rank with one line."""
        try:
            return self._train()
        except RuntimeError as e:
            if not is_peer_failure(e):
                raise
            raise CollectiveError(f"rank {dist.get_rank()} at step {self.engine.global_steps + 1}: {peer_failure(e)}; "
                                  "the run stops here: resume with --resume latest") from None

    def _train(self) -> dict[str, float]:
        # Every module in training mode from the first step, as open_clip's loop does: a Hugging Face
        # text tower comes out of from_pretrained in eval mode (no dropout) and only an evaluation's
        # model.train(True) switched it on, so its dropout depended on whether eval.at_start ran.
        self.engine.train()
        before = self.evaluate() if self.cfg.eval.at_start and self.engine.global_steps == 0 else {}
        last_log = (time.perf_counter(), self.engine.global_steps)
        while self.engine.global_steps < self.total_steps:
            loss, logit_scale, lr = self.optimizer_step()
            step = self.engine.global_steps
            if step % self.cfg.logging.log_every == 0 or step == self.total_steps:
                last_log = self.log_progress(step, loss, logit_scale, lr, last_log)
            # Checked before a scheduled evaluation and between its batches: launchers and SLURM
            # allow about 30 s from the signal to SIGKILL, and the save comes first.
            stopping, metrics = self.stop_agreed(), {}
            if not stopping and self.eval_due(step):
                metrics = self.evaluate(stoppable=True)
                stopping = metrics is None
            if stopping:
                return self.stopped()
            if self.save_due(step):
                self.save(metrics)
        return self.finish(before)

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over `grad_accum_steps` micro-batches, then the temperature clamped:
        (this rank's mean loss, the logit scale, the lr the step used)."""
        step = self.cached_step() if self.cfg.train.grad_cache else self.accumulated_step()
        clamp_logit_scale(self.engine.module.clip)
        return step

    def accumulated_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step whose micro-batches each contrast within themselves."""
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.engine.device)
        for _ in range(accum):
            loss, logit_scale = self.micro_step(*self.next_batch())
            loss_sum += loss
            lr = max(self.engine.get_lr())  # step() moves the schedule on at the accumulation boundary
            self.engine.step()  # DeepSpeed counts micro-batches here; the optimizer steps on the last
        return loss_sum / accum, logit_scale, lr

    def cached_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step whose `grad_accum_steps` micro-batches form one contrastive batch
        (training/grad_cache.py): (this rank's loss over all of them, the logit scale, the lr)."""
        lrs = []
        batches = [self.next_batch() for _ in range(self.cfg.train.grad_accum_steps)]

        def micro_step_done() -> None:
            lrs.append(max(self.engine.get_lr()))  # step() moves the schedule on at the accumulation boundary
            self.engine.step()

        if self.towers is None:
            self.towers = TrainableTowers.of(self.engine.module.clip)
        loss, logit_scale = cached_step(self.engine, self.parts.loss_fn, batches, self.towers, self.to_device,
                                        micro_step_done)
        return loss, logit_scale, lrs[-1]

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

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch on the engine's device, images finished there (dsclip.data.loader), in the
        training dtype."""
        images, texts = batch
        images = self.data.finish(images.to(self.engine.device))
        return images.to(self.parts.input_dtype), texts.to(self.engine.device)

    def micro_step(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = self.to_device((images, texts))
        image_features, text_features, logit_scale, logit_bias = self.engine(images=images, texts=texts)
        # Features stay in the training dtype: each loss decides its own precision (the Triton
        # kernels use bf16 / fp16 tensor cores, the twin and the reference compute in fp32).
        loss = self.parts.loss_fn(image_features, text_features, logit_scale.float(),
                                  None if logit_bias is None else logit_bias.float())
        self.engine.backward(loss)
        return loss.detach(), logit_scale.detach()  # on the device: read only when logged (no sync per step)

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every) and step % every == 0 and step < self.total_steps

    def save_due(self, step: int) -> bool:
        periodic = self.cfg.train.save_every and step % self.cfg.train.save_every == 0
        return step < self.total_steps and bool(periodic or self.data.at_epoch_end())

    def evaluate(self, stoppable: bool = False) -> Optional[dict[str, float]]:
        """Every evaluation's metrics; None when `stoppable` and a stop signal ended it early."""
        stop = self.stop_agreed if stoppable else None
        try:
            metrics = run_evals(self.parts.evals, self.engine, self.engine.device, self.parts.input_dtype, stop)
        except EvaluationStopped as stopped:
            log.info("stop signal during %s: the evaluation is left unfinished", stopped)
            return None
        if metrics:
            self.parts.tracker.log(self.engine.global_steps, metrics)
            log.info("%s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def save(self, metrics: dict[str, float]) -> str:
        state = {"epoch": self.epoch, "data": self.data.state_dict(), "config": recorded(self.cfg),
                 "total_steps": self.total_steps}
        return self.parts.checkpoints.save(self.engine, state, metrics)

    def finish(self, before: dict[str, float]) -> dict[str, float]:
        """The last evaluation, checkpoint and export, the before/after report, the sinks closed."""
        after = self.evaluate(stoppable=True) if self.cfg.eval.at_end else {}
        if after is None:  # a stop signal during the final evaluation: the save comes first
            return self.stopped()
        tag = self.save(after)
        if self.cfg.train.export:
            self.export(tag)
        self.report(before, after)
        self.parts.tracker.close()
        return after

    def stopped(self) -> dict[str, float]:
        """A stop signal agreed: save this step and end (no evaluation, no export)."""
        self.stopped_by_signal = True
        self.save({})
        log.info("stop signal: saved step %d; resume with --resume latest", self.engine.global_steps)
        self.parts.tracker.close()
        return {}

    def export(self, tag: str) -> None:
        """Rank 0 writes the export; a failure there is raised on every rank."""
        outputs = {"safetensors": self.cfg.export_dir}
        if self.cfg.train.export_transformers:
            outputs[TRANSFORMERS] = self.cfg.transformers_export_dir
        written = rank0_decides(lambda: export_checkpoint(self.parts.checkpoints.root, tag, self.cfg.model, outputs,
                                                          adapters=self.cfg.adapters))
        log.info("exported open_clip weights to %s", written[0])
        if len(written) > 1:
            log.info("exported a transformers CLIPModel folder to %s", written[1])

    # -- preemption -------------------------------------------------------------------------
    def stop_agreed(self) -> bool:
        """All ranks stop at the same step if any rank got a stop signal (all-reduce of 1 int)."""
        flag = torch.tensor([int(self.stop.requested)], device=self.engine.device)
        collectives.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- reporting --------------------------------------------------------------------------
    def log_progress(self, step: int, loss: torch.Tensor, logit_scale: torch.Tensor, lr: float,
                     last_log: tuple[float, int]) -> tuple[float, int]:
        # One all-reduce of 2 floats on the process group's device (NCCL: the GPU): the step's loss
        # averaged over ranks and the unusable samples every rank has skipped so far.
        skipped = sum(self.data.skipped().values())
        totals = torch.stack([loss.float().to(self.engine.device), torch.tensor(float(skipped), device=self.engine.device)])
        collectives.all_reduce(totals)
        loss, skipped = totals[0].item() / dist.get_world_size(), int(totals[1].item())
        now = time.perf_counter()
        then, then_step = last_log
        global_batch = self.cfg.data.batch_size * self.cfg.train.grad_accum_steps * dist.get_world_size()
        rate = (step - then_step) * global_batch / max(now - then, 1e-9)
        eta = (now - then) / max(1, step - then_step) * (self.total_steps - step)
        metrics = {keys.TRAIN_LOSS: loss, keys.TRAIN_LR: lr, keys.TRAIN_LOGIT_SCALE: logit_scale.item(),
                   keys.TRAIN_SAMPLES_PER_S: rate, keys.TRAIN_EPOCH: self.epoch,
                   keys.SKIPPED_SAMPLES: skipped,
                   keys.PEAK_RSS_MB: memory.peak_rss_bytes() / 2**20}
        if not self.model_state_logged:  # after the first step: AdamW creates its moments lazily
            metrics.update({keys.memory_key(k): v / 2**20 for k, v in memory.state_bytes(self.engine).items()})
            self.model_state_logged = True
        self.parts.tracker.log(step, metrics)
        log.info("step %d/%d loss %.4f lr %.3g logit_scale %.2f %.0f samples/s eta %.0fs", step, self.total_steps,
                 loss, lr, logit_scale.item(), rate, eta)
        return now, step

    def report(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Headline zero-shot numbers, samples skipped on all ranks, and the forgetting table when
        the run evaluated at both ends."""
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.data.skipped())
        reasons = sum((Counter(counts) for counts in per_rank), Counter())
        if reasons:
            log.warning("skipped %d unusable samples on all ranks: %s", sum(reasons.values()),
                        ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())))
        for key in after:
            if key in before and keys.eval_metric(key) == keys.TOP1:
                log.info("%s: %.2f%% before -> %.2f%% after", key, before[key], after[key])
        if before and after:
            table, warnings = forgetting_report(self.cfg.eval.forgetting, before, after)
            log.info("before / after fine-tuning (general evals: %s)\n%s",
                     ", ".join(self.cfg.eval.forgetting.general) or "none named", table.rstrip())
            if self.is_main:  # the same table and warnings on every rank: written and warned once
                (self.cfg.run_dir / "forgetting.md").write_text(table + "\n")
                for warning in warnings:
                    log.warning("%s", warning)
