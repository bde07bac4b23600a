"""Gradient caching (train.grad_cache): one optimizer step over k micro-batches of b samples is the
step over one batch of k x b, exactly, on 2 ZeRO-3 ranks, for both losses and every loss.impl; with
patch dropout the second forward replays the first one's randomness; plain accumulation is
another thing. Trainer runs on 1 and 2 CPU ranks (tens of seconds): not the quick tier."""
import functools
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from dsclip.config import load_config
from dsclip.model.build import build_model
from dsclip.training import grad_cache
from dsclip.training.grad_cache import describe_contrastive_batch
from dsclip_testutils import init_single_rank, make_trainer, run_on_ranks
from test_checkpoint import SHORT_RUN, assert_resume_matches, losses_by_step, register_patch_dropout_model, \
    stop_after, tiny_trainer
from test_e2e_losses import SIGLIP, run, shipped_ds_config

BASE = ["optim.warmup_steps=2", "data.synthetic.train_samples=64", "eval.at_start=false", "eval.at_end=false",
        "train.export=false", "train.save_every=0", "logging.log_every=1", "logging.report_to=[jsonl]"]
BIG = ["data.batch_size=16"]
CACHED = ["data.batch_size=8", "train.grad_accum_steps=2", "train.grad_cache=true"]
PLAIN = ["data.batch_size=8", "train.grad_accum_steps=2"]
KIND = {"clip": [], "siglip": list(SIGLIP)}
IMPLS = ("reference", "torch_tiled", "triton")  # triton: the interpreter on CPU (tests/conftest.py)


def trainer_for(out: Path, *overrides: str):
    cfg = load_config(None, [*BASE, f"output_dir={out}", *overrides])
    return make_trainer(cfg, shipped_ds_config("zero3"))


def first_step(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """The first optimizer step's loss (averaged over ranks) and every trainable parameter's full
    gradient as the optimizer receives it (after DeepSpeed's averaging over ranks)."""
    grads, real_step = {}, trainer.engine.step

    def step():
        if trainer.engine.is_gradient_accumulation_boundary():
            grads.update({name: safe_get_full_grad(p).clone() for name, p in trainer.engine.module.clip.named_parameters()
                          if p.requires_grad})
        real_step()

    trainer.engine.step = step
    loss, *_ = trainer.optimizer_step()
    loss = loss.clone()
    torch.distributed.all_reduce(loss)
    return loss.item() / torch.distributed.get_world_size(), grads


def largest_relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(((got[n] - w).norm() / w.norm().clamp_min(1e-30)).item() for n, w in want.items())


def _compare_on_rank(rank: int, kind: str, out: str) -> dict:
    results = {}
    for impl in IMPLS:
        setting = [*KIND[kind], f"loss.impl={impl}"]
        big_loss, big = first_step(trainer_for(Path(out) / f"{impl}-big", *setting, *BIG))
        cached_loss, cached = first_step(trainer_for(Path(out) / f"{impl}-cached", *setting, *CACHED))
        plain_loss, plain = first_step(trainer_for(Path(out) / f"{impl}-plain", *setting, *PLAIN))
        results[impl] = {"loss": [big_loss, cached_loss, plain_loss],
                         "cached_vs_big": largest_relative_difference(cached, big),
                         "plain_vs_big": largest_relative_difference(plain, big)}
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", sorted(KIND))
def test_a_cached_step_equals_the_step_over_the_whole_batch_on_two_zero3_ranks(kind, tmp_path):
    ranks = run_on_ranks(functools.partial(_compare_on_rank, kind=kind, out=str(tmp_path)), 2, tmp_path)
    for impl in IMPLS:
        for result in ranks:
            big_loss, cached_loss, plain_loss = result[impl]["loss"]
            assert cached_loss == pytest.approx(big_loss, rel=1e-5), (impl, result[impl])
            assert result[impl]["cached_vs_big"] < 1e-5, (impl, result[impl])
            # plain accumulation contrasts within each micro-batch: another loss, another gradient
            # (measured: SigLIP's loss at init 3e-3 apart, its gradients 1.1%; CLIP's further)
            assert abs(plain_loss - big_loss) > 1e-3 and result[impl]["plain_vs_big"] > 5e-3, (impl, result[impl])


@pytest.mark.slow
def test_twenty_cached_steps_follow_the_big_batch_run_and_not_plain_accumulation(tmp_path):
    _, big, _ = run(tmp_path / "big", None, "train.max_steps=20", *BIG)
    _, cached, _ = run(tmp_path / "cached", None, "train.max_steps=20", *CACHED)
    _, plain, _ = run(tmp_path / "plain", None, "train.max_steps=20", *PLAIN)
    assert cached == pytest.approx(big, abs=1e-4, rel=0)
    assert max(abs(p - b) for p, b in zip(plain, big)) > 1e-2


@pytest.mark.multiprocess
def test_the_second_forward_replays_the_first_ones_randomness(tmp_path, monkeypatch):
    """With patch dropout a cached step's gradient equals the gradient of one autograd graph over the
    step's k forwards run in sequence from the same RNG state (a plain copy of the model, no
    DeepSpeed); without the replay the second forward would drop other patches."""
    init_single_rank()
    name = register_patch_dropout_model(tmp_path)
    seen = {}

    def recording_step(engine, loss_fn, batches, towers, to_device, on_micro_step):
        seen.update(rng=torch.get_rng_state(), batches=batches, loss_fn=loss_fn)
        return cached_step(engine, loss_fn, batches, towers, to_device, on_micro_step)

    cached_step = grad_cache.cached_step
    monkeypatch.setattr("dsclip.training.loop.cached_step", recording_step)
    trainer = trainer_for(tmp_path / "run", f"model.name={name}", "loss.impl=torch_tiled", *CACHED)
    initial = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.engine.module.clip.named_parameters()}
    _, cached = first_step(trainer)

    plain = build_model(trainer.cfg.model, load_weights=False).module
    plain.clip.load_state_dict(initial, strict=False)
    plain.train()
    torch.set_rng_state(seen["rng"])
    outputs = [plain(images=images.float(), texts=texts) for images, texts in seen["batches"]]
    loss = seen["loss_fn"](torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2])
    loss.backward()
    reference = {n: p.grad for n, p in plain.clip.named_parameters() if n in cached}
    assert largest_relative_difference(cached, reference) < 1e-5
    # the dropout is real: another RNG state gives other gradients
    plain.zero_grad()
    torch.manual_seed(12345)
    outputs = [plain(images=images.float(), texts=texts) for images, texts in seen["batches"]]
    seen["loss_fn"](torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2]).backward()
    assert largest_relative_difference(cached, {n: p.grad for n, p in plain.clip.named_parameters() if n in cached}) > 1e-3


def test_the_start_up_line_names_the_contrastive_batch():
    assert describe_contrastive_batch(256, 16, 8, grad_cache=True) == (
        "contrastive batch 32768 per step (gradient caching: 16 micro-batches of 256 on each of 8 ranks)")
    assert describe_contrastive_batch(256, 1, 8, grad_cache=False) == "contrastive batch 2048 (256 per rank x 8 ranks)"
    assert "train.grad_cache=true contrasts all 32768" in describe_contrastive_batch(256, 16, 8, grad_cache=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("setting", [["freeze.strategy=lit"], ["freeze.strategy=frozen_text"],
                                     ["model.grad_checkpointing=true", "model.image_size=48"]],
                         ids=["lit", "frozen_text", "checkpointing_high_res"])
def test_a_cached_step_is_exact_with_frozen_towers_and_activation_checkpointing(setting, tmp_path):
    init_single_rank()
    big_loss, big = first_step(trainer_for(tmp_path / "big", *setting, *BIG))
    cached_trainer = trainer_for(tmp_path / "cached", *setting, *CACHED)
    cached_loss, cached = first_step(cached_trainer)
    assert cached_loss == pytest.approx(big_loss, rel=1e-5)
    assert largest_relative_difference(cached, big) < 1e-5
    frozen = setting[0].removeprefix("freeze.strategy=")
    assert (cached_trainer.towers.image, cached_trainer.towers.text) == {
        "lit": (False, True), "frozen_text": (True, False)}.get(frozen, (True, True))


@pytest.mark.multiprocess
def test_a_cached_run_resumed_mid_epoch_reproduces_the_uninterrupted_losses(tmp_path):
    # patch dropout: the resumed run must also restore the RNG the replayed forwards draw from
    run = (*SHORT_RUN, f"model.name={register_patch_dropout_model(tmp_path)}", "data.batch_size=4",
           "train.grad_accum_steps=2", "train.grad_cache=true")
    tiny_trainer(tmp_path / "straight", *run).train()
    interrupted = tiny_trainer(tmp_path / "resumed", *run)
    stop_after(interrupted, 7)
    interrupted.train()
    tiny_trainer(tmp_path / "resumed", *run, resume="latest").train()
    straight = losses_by_step(tmp_path / "straight" / "default")
    assert_resume_matches(straight, tmp_path / "resumed" / "default", resumed_from=7, last=12)
