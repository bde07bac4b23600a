"""Checkpoints: exact resume after SIGKILL / SIGTERM, interrupted saves, refusals."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch

from dsclip.commands.export import main as export_main
from dsclip.config import load_config, to_dict
from dsclip.errors import CheckpointError, ConfigError
from dsclip.model.run_folder import is_complete, read_pointer
from dsclip.training.ds_config import load_ds_config
from dsclip.training.loop import Trainer
from dsclip.training.resume import resume_conflicts
from dsclip_testutils import (REPO, ds_config, init_single_rank, launch, make_trainer, node_launcher,
                              read_metrics, runner_launcher, subprocess_env)

# 2 ranks x 8 per rank, 80 samples: 5 steps per epoch, so interruptions land mid-epoch.
RUN = ["--set", "train.max_steps=30", "--set", "optim.warmup_steps=3", "--set", "logging.log_every=1",
       "--set", "data.batch_size=8", "--set", "data.synthetic.train_samples=80", "--set", "train.save_every=4",
       "--set", "eval.at_start=false", "--set", "eval.at_end=false", "--set", "train.export=false"]


def losses_by_step(run_dir) -> dict[int, float]:
    """Per-step loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def start_launcher(out, tmp_path, *extra: str, via_runner: bool = False) -> subprocess.Popen:
    cmd = [*(runner_launcher(2) if via_runner else node_launcher(2)), str(REPO / "dsclip" / "train.py"), "--deepspeed_config", str(ds_config(3, tmp_path)),
           "--output-dir", str(out), *RUN, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=subprocess_env())


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(tmp_path), *RUN])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_by_step(tmp_path / "default")
    assert sorted(losses) == list(range(1, 31))
    return losses


def assert_resume_matches(straight: dict[int, float], run_dir, resumed_from: int, last: int = 30) -> None:
    resumed = losses_by_step(run_dir)
    assert 0 < resumed_from < last and sorted(resumed) == list(range(1, last + 1))
    for step in range(resumed_from + 1, last + 1):
        assert abs(resumed[step] - straight[step]) <= 1e-6, (step, resumed[step], straight[step])


@pytest.mark.multiprocess
def test_resume_after_sigkill_mid_epoch_reproduces_losses(straight_run, tmp_path):
    out = tmp_path / "killed"
    proc = start_launcher(out, tmp_path)
    checkpoint = out / "default" / "checkpoints" / "step-12"
    wait_for(lambda: is_complete(checkpoint), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int(read_pointer(out / "default" / "checkpoints" / "latest").split("-")[1])
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(out), *RUN,
                     "--resume", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed step-{resumed_from}" in result.stdout
    assert_resume_matches(straight_run, out / "default", resumed_from)


@pytest.mark.multiprocess
def test_sigterm_finishes_the_step_saves_and_resume_continues(straight_run, tmp_path):
    out = tmp_path / "preempted"
    proc = start_launcher(out, tmp_path)
    wait_for(lambda: (out / "default" / "metrics.jsonl").is_file()
             and max(losses_by_step(out / "default"), default=0) >= 7, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job gets it
    output, _ = proc.communicate(timeout=120)
    assert "stop signal: saved step" in output, output[-3000:]
    stopped_at = int(read_pointer(out / "default" / "checkpoints" / "latest").split("-")[1])
    assert stopped_at < 30
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(out), *RUN,
                     "--resume", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resume_matches(straight_run, out / "default", stopped_at)


@pytest.mark.multiprocess
def test_sigterm_exits_zero_after_saving(tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "dsclip" / "train.py"), "--deepspeed_config",
                             str(ds_config(3, tmp_path)), "--output-dir", str(tmp_path), *RUN,
                             "--set", "train.max_steps=100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
    wait_for(lambda: (tmp_path / "default" / "metrics.jsonl").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert is_complete(tmp_path / "default" / "checkpoints" / read_pointer(tmp_path / "default" / "checkpoints" / "latest"))


def tiny_trainer(tmp_path, *overrides: str, resume=None) -> Trainer:
    init_single_rank()
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, ["train.max_steps=4", "optim.warmup_steps=1", "data.batch_size=8", "train.save_every=2",
                             "eval.at_start=false", "eval.at_end=false", "train.export=false",
                             f"output_dir={tmp_path}", *overrides])
    return make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path))), resume=resume)


def stop_after(trainer: Trainer, step: int) -> None:
    """Make `trainer` stop at `step` as a SIGTERM would: it saves and returns."""
    original = trainer.optimizer_step

    def step_then_stop():
        result = original()
        trainer.stop.requested = trainer.engine.global_steps >= step
        return result

    trainer.optimizer_step = step_then_stop


# 40 samples of 8: 5 steps an epoch, so step 7 is mid-epoch in the second epoch.
SHORT_RUN = ("train.max_steps=12", "logging.log_every=1", "data.synthetic.train_samples=40", "train.save_every=100")


PATCH_DROPOUT_MODEL = "dsclip-tiny-patch-dropout"


def register_patch_dropout_model(folder) -> str:
    """dsclip-tiny with open_clip's patch dropout (vision_cfg.patch_dropout): every training forward
    draws which patches to keep from torch's global RNG, so a resume that does not restore that RNG
    computes other losses. Registered with open_clip as any user config would be."""
    config = json.loads((REPO / "dsclip" / "model" / "configs" / "dsclip-tiny.json").read_text())
    config["vision_cfg"]["patch_dropout"] = 0.5
    file = folder / f"{PATCH_DROPOUT_MODEL}.json"
    file.write_text(json.dumps(config))
    open_clip.add_model_config(file)
    return PATCH_DROPOUT_MODEL


def test_a_run_resumed_mid_epoch_in_process_reproduces_the_uninterrupted_losses(tmp_path):
    # Patch dropout consumes torch's global RNG every step: without the RNG restore the resumed
    # steps keep other patches and their losses differ (augmentation is seeded per sample and
    # would not show it).
    run = (*SHORT_RUN, f"model.name={register_patch_dropout_model(tmp_path)}")
    straight_trainer = tiny_trainer(tmp_path / "straight", *run)
    assert straight_trainer.engine.module.clip.visual.patch_dropout.prob == 0.5
    straight_trainer.train()
    interrupted = tiny_trainer(tmp_path / "resumed", *run)
    stop_after(interrupted, 7)
    interrupted.train()
    assert read_pointer(tmp_path / "resumed" / "default" / "checkpoints" / "latest") == "step-7"
    tiny_trainer(tmp_path / "resumed", *run, resume="latest").train()
    straight = losses_by_step(tmp_path / "straight" / "default")
    assert_resume_matches(straight, tmp_path / "resumed" / "default", resumed_from=7, last=12)


def save_in_previous_layout(trainer: Trainer, metrics: dict) -> str:
    """A checkpoint as dsclip wrote it before the layered package (commit f7837ad), step for step:
    DeepSpeed's files, rank-0.pt with the train state, COMPLETE, then the `latest` pointer. Kept
    verbatim here: a reader change that stops old checkpoints from resuming or exporting fails."""
    engine, root = trainer.engine, trainer.cfg.run_dir / "checkpoints"
    tag = f"step-{engine.global_steps}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"epoch": trainer.epoch, "data": trainer.data.state_dict(), "config": to_dict(trainer.cfg), "rng": rng,
                "world_size": 1}, root / tag / "rank-0.pt")
    (root / tag / "COMPLETE").write_text(json.dumps({"step": engine.global_steps, **metrics}))
    (root / "latest").write_text(tag)
    return tag


def test_a_checkpoint_in_the_previous_layout_resumes_exactly_and_exports(tmp_path, capsys):
    tiny_trainer(tmp_path / "straight", *SHORT_RUN).train()
    old = tiny_trainer(tmp_path / "old", *SHORT_RUN)
    old.save = lambda metrics: save_in_previous_layout(old, metrics)
    stop_after(old, 7)
    old.train()
    step_7 = tmp_path / "old" / "default" / "checkpoints" / "step-7"
    assert export_main([str(step_7), "--out", str(tmp_path / "export")]) == 2  # numpy's pickled RNG state
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert export_main([str(step_7), "--out", str(tmp_path / "export"), "--trust-checkpoint"]) == 0
    model = open_clip.create_model("local-dir:" + str(tmp_path / "export"))
    assert model.logit_scale.shape == ()
    tiny_trainer(tmp_path / "old", *SHORT_RUN, "model.trust_checkpoint=true", resume="latest").train()
    assert_resume_matches(losses_by_step(tmp_path / "straight" / "default"), tmp_path / "old" / "default",
                          resumed_from=7, last=12)


def test_a_save_that_fails_half_way_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    original = trainer.engine.save_checkpoint

    def crash_at_step_4(save_dir, tag=None, **kwargs):
        if tag == "step-4":
            (tmp_path / "default" / "checkpoints" / tag).mkdir(parents=True)
            (tmp_path / "default" / "checkpoints" / tag / "half_written.pt").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(save_dir, tag=tag, **kwargs)

    monkeypatch.setattr(trainer.engine, "save_checkpoint", crash_at_step_4)
    with pytest.raises(CheckpointError, match="step-4 failed on rank 0: No space left on device; .*latest still "
                       "names the previous complete checkpoint"):
        trainer.train()
    checkpoints = tmp_path / "default" / "checkpoints"
    assert read_pointer(checkpoints / "latest") == "step-2"
    assert not is_complete(checkpoints / "step-4")
    with pytest.raises(CheckpointError, match="step-4 is incomplete"):
        tiny_trainer(tmp_path, resume=str(checkpoints / "step-4"))
    resumed = tiny_trainer(tmp_path, resume="latest")
    assert resumed.engine.global_steps == 2


def test_a_full_disk_as_torch_reports_it_is_one_line_and_keeps_latest(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos'), not as an OSError."""
    trainer = tiny_trainer(tmp_path)
    original = trainer.engine.save_checkpoint

    def full_at_step_4(save_dir, tag=None, **kwargs):
        if tag == "step-4":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6784 vs 6680")
        return original(save_dir, tag=tag, **kwargs)

    monkeypatch.setattr(trainer.engine, "save_checkpoint", full_at_step_4)
    with pytest.raises(CheckpointError, match="step-4 failed on rank 0: RuntimeError: .*unexpected pos"):
        trainer.train()
    assert read_pointer(tmp_path / "default" / "checkpoints" / "latest") == "step-2"


def test_each_rank_owns_the_checkpoint_files_it_writes():
    from dsclip.training.checkpoint import owned_by
    assert [owned_by(name) for name in ("zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                        "bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt", "rank-7.pt",
                                        "mp_rank_00_model_states.pt", "COMPLETE")] == [3, 5, 7, 0, 0]


def test_resume_refuses_what_changes_the_computation_and_accepts_logging_changes(tmp_path):
    tiny_trainer(tmp_path).train()
    with pytest.raises(CheckpointError, match=r"differs in model.image_size: None -> 48"):
        tiny_trainer(tmp_path, "model.image_size=48", resume="latest")
    resumed = tiny_trainer(tmp_path, "logging.log_every=1", "eval.every_steps=1", resume="latest")
    assert resumed.engine.global_steps == 4


def test_resume_conflicts_name_fields_and_a_changed_global_batch():
    saved = to_dict(load_config(None, ["data.batch_size=8"]))
    current = to_dict(load_config(None, ["freeze.strategy=lit", "logging.log_every=3", "data.batch_size=8"]))
    conflicts = resume_conflicts(saved, current, saved_world=2, world=4)
    assert conflicts[0] == "freeze.strategy: 'full' -> 'lit'"
    assert conflicts[1].startswith("global batch 16 (2 ranks x 8) -> 32 (4 ranks x 8): the learning schedule")
    assert "--new-global-batch" in conflicts[1] and len(conflicts) == 2
    assert resume_conflicts(saved, current, saved_world=2, world=4, new_global_batch=True) == conflicts[:1]


def test_resume_accepts_another_layout_of_the_same_global_batch_except_for_shards():
    saved = to_dict(load_config(None, ["data.batch_size=8"]))
    for world, overrides in ((1, ["data.batch_size=16"]), (4, ["data.batch_size=4"]),
                             (2, ["data.batch_size=4", "train.grad_accum_steps=2"])):
        assert resume_conflicts(saved, to_dict(load_config(None, overrides)), saved_world=2, world=world) == []
    shards = ["data.kind=webdataset", 'data.webdataset.urls=["/data/train-{000..009}.tar"]']
    saved = to_dict(load_config(None, ["data.batch_size=8", *shards]))
    conflicts = resume_conflicts(saved, to_dict(load_config(None, ["data.batch_size=16", *shards])), 2, 1)
    assert len(conflicts) == 1 and "WebDataset shards are dealt to ranks" in conflicts[0]
    assert "resume on 2 ranks with data.batch_size=8 and train.grad_accum_steps=1" in conflicts[0]


def test_resume_latest_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*nothing to resume"):
        tiny_trainer(tmp_path, resume="latest")


def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.max_steps=8", "train.save_every=1", "eval.every_steps=2",
                           "train.best_metric=eval/synthetic/top1", "eval.batch_size=64",
                           "data.synthetic.eval_samples=64")
    trainer.train()
    checkpoints = tmp_path / "default" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    best = read_pointer(checkpoints / "best")
    assert read_pointer(checkpoints / "latest") == "step-8"
    assert set(kept) == {"step-7", "step-8", best}
    assert [json.loads((checkpoints / t / "COMPLETE").read_text())["seq"] for t in ("step-7", "step-8")] == [7, 8]


def test_keep_last_below_two_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="keep_last must be >= 2"):
        tiny_trainer(tmp_path, "train.keep_last=1")


def test_export_command_writes_safetensors_in_the_chosen_dtype(tmp_path, capsys):
    from safetensors.torch import load_file
    tiny_trainer(tmp_path).train()
    exports = {}
    for dtype in ("fp32", "bf16", "fp16"):
        exports[dtype] = tmp_path / "exported" / f"{dtype}.safetensors"
        assert export_main([str(tmp_path / "default"), "--out", str(exports[dtype]), "--dtype", dtype]) == 0
        assert exports[dtype].with_suffix(".json").is_file()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    texts = open_clip.get_tokenizer("dsclip-tiny")(["a red circle", "a blue ring on black", "green cross", "a ring"])
    embeddings = {}
    for dtype, torch_dtype, precision in (("fp32", torch.float32, "fp32"), ("bf16", torch.bfloat16, "pure_bf16"),
                                          ("fp16", torch.float16, "pure_fp16")):
        weights = load_file(str(exports[dtype]))
        assert {name: t.dtype for name, t in weights.items() if t.dtype != torch_dtype} == {}, dtype
        # Plain open_clip, in that precision: the file must fill every parameter of the architecture.
        model = open_clip.create_model("dsclip-tiny", pretrained=str(exports[dtype]), precision=precision)
        model.eval()
        assert model.state_dict().keys() <= weights.keys() and all(
            torch.equal(model.state_dict()[name], weights[name]) for name in model.state_dict()), dtype
        with torch.no_grad():
            embeddings[dtype] = (model.encode_image(images.to(torch_dtype), normalize=True).float(),
                                 model.encode_text(texts, normalize=True).float())
    # Unit vectors of 64 numbers: bf16 keeps 8 bits of mantissa, fp16 11.
    for dtype, tolerance in (("bf16", 3e-2), ("fp16", 4e-3)):
        for low, exact in zip(embeddings[dtype], embeddings["fp32"]):
            assert (low - exact).abs().max() <= tolerance, (dtype, (low - exact).abs().max().item())
    capsys.readouterr()
    assert export_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsclip: error: checkpoint") and "not found" in err and err.count("\n") == 1


def test_an_export_in_one_format_replaces_an_earlier_one_in_the_other(tmp_path):
    """open_clip's local-dir: loads the safetensors file first: a later .bin export beside an earlier
    safetensors one must not leave the old weights to be loaded."""
    from dsclip.model.config import ModelConfig
    from dsclip.model.weights import write_open_clip
    model = open_clip.create_model("dsclip-tiny")
    write_open_clip(model.state_dict(), ModelConfig(), tmp_path)
    changed = {k: v + 1 if k == "visual.proj" else v for k, v in model.state_dict().items()}
    write_open_clip(changed, ModelConfig(), tmp_path, safetensors=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    loaded = open_clip.create_model(f"local-dir:{tmp_path}")
    assert torch.equal(loaded.visual.proj, changed["visual.proj"])


@pytest.mark.parametrize("fmt,out,fix", [("bin", "m.safetensors", "a .bin file or a .pt file or a .pth file"),
                                         ("safetensors", "m.bin", "a .safetensors file"),
                                         ("transformers", "m.safetensors", "a folder")])
def test_an_export_file_name_that_contradicts_the_format_is_refused(tmp_path, fmt, out, fix, capsys):
    assert export_main([str(tmp_path), "--format", fmt, "--out", str(tmp_path / out)]) != 0
    assert f"--format is {fmt}: give {fix}" in capsys.readouterr().err
