"""Fault cases on the files of a run: planted pickles, damaged or missing checkpoint files,
pointers that lead astray, a full disk, a resumed older step, a changed best metric. Every case
is a real dsclip process over a real checkpoint; the errors must be one line naming the file."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dsclip.model.run_folder import consolidated_state_dict, read_pointer
from faultlib import CreatesFile, copy_run, dsclip, plant, reseal, together, train

pytestmark = pytest.mark.multiprocess

# Checkpoints at 4, 5, 8, 10, 12 (5, 10: epoch ends), the last 3 kept; one evaluation, at step 8,
# which `best` then names.
SAVES = ["--set", "train.max_steps=12", "--set", "train.save_every=4", "--set", "train.keep_last=3",
         "--set", "eval.every_steps=8", "--set", "eval.batch_size=64", "--set", "data.synthetic.eval_samples=64",
         "--set", "train.best_metric=eval/synthetic/top1"]
EXPORTED = [*SAVES, "--set", "train.export=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished 12-step runs, made together: `own`, exported, and `other`, of another seed
    (a timeline that diverged from `own`'s)."""
    base = tmp_path_factory.mktemp("base")
    finished = together(lambda: train(base / "own", *EXPORTED), lambda: train(base / "other", *SAVES, "--set", "seed=1"))
    for name, result in zip(("own", "other"), finished):
        assert result.returncode == 0, (name, result.stderr[-3000:])
    return {"own": base / "own", "other": base / "other"}


@pytest.fixture
def run(runs) -> Path:
    return runs["own"]


def checkpoints(out: Path) -> Path:
    return out / "default" / "checkpoints"


def resume(out: Path, *extra: str, fault: str = ""):
    return train(out, *EXPORTED, "--resume", str(checkpoints(out) / "step-8"), *extra, fault=fault)


PLANTED = {  # where the payload goes -> the commands that must refuse it
    "train state rank-0.pt": ("step-8/rank-0.pt", ["resume", "export"]),
    "ZeRO model shard": ("step-12/zero_pp_rank_0_mp_rank_00_model_states.pt", ["export", "pretrained"]),
    "ZeRO optimizer shard": ("step-8/zero_pp_rank_0_mp_rank_00_optim_states.pt", ["resume"]),
}


def refuses(command: str, step_folder: Path, writes_to: Path):
    """Run `command` on the checkpoint folder `step_folder` (resume: step-8; --pretrained: the run's latest)."""
    if command == "resume":
        return resume(step_folder.parents[2])
    if command == "export":
        return dsclip("export", str(step_folder), "--out", str(writes_to))
    return train(writes_to, *SAVES, "--pretrained", str(step_folder.parents[1]))


def test_a_planted_pickle_is_refused_without_trust(run, tmp_path, record):
    cases = []  # (place, file, command, the folder holding the planted file, where the command writes)
    for n, (place, (file, commands)) in enumerate(PLANTED.items()):
        out = copy_run(run, tmp_path / f"copy-{n}")
        plant(checkpoints(out) / file, tmp_path / f"pwned-{n}")
        cases += [(place, file, command, (checkpoints(out) / file).parent, tmp_path / f"{command}-{n}")
                  for command in commands]
    results = together(*(lambda case=case: refuses(*case[2:]) for case in cases))
    for (place, file, command, _, _), finished in zip(cases, results):
        line = finished.error_line(f"{place}, {command}")
        assert finished.returncode == 2 and Path(file).name in line and "--trust-checkpoint" in line, (place, command,
                                                                                                      line)
        record(f"a pickle that creates a file, as {place}", "refused without --trust-checkpoint; the file is "
               "never created", f"refused by {command} ({finished.seconds:.0f} s); no file", seconds=finished.seconds)
    assert not list(tmp_path.glob("pwned-*"))
    # The payloads are real: trusted, each one runs (export reads every file a refusal above named).
    folders = list(dict.fromkeys(case[3] for case in cases))
    trusted = together(*(lambda n=n, folder=folder: dsclip("export", str(folder), "--out", str(tmp_path / f"trusted-{n}"),
                                                           "--trust-checkpoint") for n, folder in enumerate(folders)))
    for n, finished in enumerate(trusted):
        assert (tmp_path / f"pwned-{n}").exists(), (list(PLANTED)[n], finished.stderr[-2000:])


def test_a_pickle_planted_where_no_manifest_covers_it_is_refused_by_the_loader_itself(run, tmp_path, record):
    """A checkpoint without a manifest (COMPLETE of an older dsclip) skips the sha256 and
    pre-load checks: DeepSpeed's own loads, forced weights-only, must refuse the payload."""
    out = copy_run(run, tmp_path / "copy")
    sentinel = tmp_path / "pwned"
    for step, shard in (("step-8", "optim_states"), ("step-12", "model_states")):
        plant(checkpoints(out) / step / f"zero_pp_rank_0_mp_rank_00_{shard}.pt", sentinel)
        marker = checkpoints(out) / step / "COMPLETE"
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    results = together(lambda: resume(out),
                       lambda: dsclip("export", str(checkpoints(out) / "step-12"), "--out", str(tmp_path / "export")))
    for command, finished in zip(("resume", "export"), results):
        line = finished.error_line(command)
        assert finished.returncode == 2 and "holds pickled Python objects" in line and "--trust-checkpoint" in line, \
            (command, line)
        assert not sentinel.exists(), command
    record("a pickle that creates a file, as a ZeRO shard no manifest covers", "refused without --trust-checkpoint",
           "refused by DeepSpeed's own (forced weights-only) load; no file", seconds=finished.seconds)


def test_a_pickled_pretrained_file_and_a_torchscript_file_are_refused(tmp_path, record):
    sentinel = tmp_path / "pwned"
    torch.save({"payload": CreatesFile(sentinel)}, tmp_path / "weights.bin")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    files = {"weights.bin": "--pretrained .bin", "scripted.pt": "TorchScript file"}
    results = together(*(lambda name=name: train(tmp_path / name.replace(".", "-"), "--pretrained", str(tmp_path / name))
                         for name in files))
    for (name, what), finished in zip(files.items(), results):
        line = finished.error_line(name)
        assert finished.returncode == 2 and name in line and "--trust-checkpoint" in line, line
        record(f"a pickle that creates a file, as {what}", "refused without --trust-checkpoint",
               "refused; no file", seconds=finished.seconds)
    assert not sentinel.exists()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # fault -> (how, the file the error must name, the message)
    "bit-flipped optimizer shard": (lambda c: flip_a_byte(c / "step-8/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt", "changed since it was saved"),
    "truncated model shard": (lambda c: truncate(c / "step-8/zero_pp_rank_0_mp_rank_00_model_states.pt"),
                              "zero_pp_rank_0_mp_rank_00_model_states.pt", "changed since it was saved"),
    "missing optimizer file": (lambda c: (c / "step-8/zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
                               "zero_pp_rank_0_mp_rank_00_optim_states.pt", "is missing"),
    "`latest` pointing outside": (lambda c: (c / "latest").write_text("../../../etc"), "latest",
                                  "not a step-N checkpoint"),
    "`latest` pointing to nothing": (lambda c: (c / "latest").write_text("step-99"), "step-99", "not found"),
}


def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(run, tmp_path, record):
    def resume_damaged(n: int, fault: str):
        out = copy_run(run, tmp_path / f"copy-{n}")
        DAMAGE[fault][0](checkpoints(out))
        spec = "latest" if "latest" in fault else str(checkpoints(out) / "step-8")
        return train(out, *EXPORTED, "--resume", spec)

    results = together(*(lambda n=n, fault=fault: resume_damaged(n, fault) for n, fault in enumerate(DAMAGE)))
    for (fault, (_, name, message)), finished in zip(DAMAGE.items(), results):
        line = finished.error_line(fault)
        assert finished.returncode == 2 and name in line and message in line, (fault, line)
        assert "step " not in finished.stdout, fault  # nothing trained: the error came before the engine loaded anything
        record(fault, "one-line error naming the file; nothing loaded half-way", f"exit 2: ...{message}...",
               seconds=finished.seconds)


def test_resuming_an_older_step_sets_the_later_timeline_aside(runs, tmp_path, record):
    """A run that went on past step-8 and diverged (here: step-12 of another seed) is resumed from
    step-8: the later folder is set aside, step-12 is saved anew and the export is this timeline's."""
    run = runs["own"]
    out = copy_run(run, tmp_path / "copy")
    (checkpoints(out) / "step-12").rename(tmp_path / "own-step-12")
    copy_run(checkpoints(runs["other"]) / "step-12", checkpoints(out) / "step-12")
    finished = resume(out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "moved to" in finished.stdout + finished.stderr
    root = checkpoints(out)
    assert read_pointer(root / "latest") == "step-12"
    assert sorted(p.name for p in root.glob("set-aside-*/*")) == ["step-10", "step-12"]  # 10: an epoch end
    resumed = consolidated_state_dict(root, "step-12")
    own = load_file(str(run / "default" / "export" / "open_clip_model.safetensors"))
    exported = load_file(str(out / "default" / "export" / "open_clip_model.safetensors"))
    diverged = consolidated_state_dict(next(root.glob("set-aside-*")), "step-12")
    for name, weight in exported.items():
        assert torch.allclose(weight.reshape(-1), own[name].reshape(-1), atol=1e-6), name
        assert torch.equal(weight.reshape(-1), resumed[name].reshape(-1)), name
    assert not torch.allclose(exported["visual.conv1.weight"], diverged["visual.conv1.weight"])
    record("resume of an older step of a longer run", "the later folders are set aside, the run continues, the "
           "final export is the new timeline's", "set aside; export matches the uninterrupted run",
           seconds=finished.seconds)


def test_a_changed_best_metric_on_resume_restarts_best_with_a_warning(run, tmp_path, record):
    out = copy_run(run, tmp_path / "copy")
    root = checkpoints(out)
    assert read_pointer(root / "best") == "step-8"  # its only evaluation
    finished = train(out, *EXPORTED, "--set", "eval.every_steps=2", "--set", "train.best_mode=min",
                     "--resume", str(root / "step-8"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert ("best pointed at step-8, chosen by ['eval/synthetic/top1', 'max']; restarting the best checkpoint by "
            "eval/synthetic/top1 (min)") in finished.stdout + finished.stderr
    best = json.loads((root / read_pointer(root / "best") / "COMPLETE").read_text())
    assert best["best_by"] == ["eval/synthetic/top1", "min"]
    record("`train.best_mode` changed on resume", "`best` restarts with a warning", "warned; best re-chosen",
           seconds=finished.seconds)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, record):
    out = tmp_path / "out"
    finished = train(out, *SAVES, fault="enospc:step-8")
    line = finished.error_line()
    assert finished.returncode == 2 and "No space left on device" in line and "step-8" in line, line
    root = checkpoints(out)
    assert read_pointer(root / "latest") == "step-5"  # an epoch end
    resumed = train(out, *SAVES, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_pointer(root / "latest") == "step-12"
    record("disk full during a save (ENOSPC injected)", "one-line error, previous checkpoint intact, exit non-zero",
           f"exit {finished.returncode}; latest stayed step-5; resume completed", seconds=finished.seconds)


def test_reseal_helper_really_reseals(run, tmp_path):
    """The planted-pickle cases rely on reseal(): a changed file with a resealed manifest passes
    the sha256 check (so the refusal above comes from the unpickler, not the manifest)."""
    from dsclip.model.run_folder import verify_checkpoint
    out = copy_run(run, tmp_path / "copy")
    file = checkpoints(out) / "step-8" / "rank-0.pt"
    file.write_bytes(file.read_bytes() + b"\0")
    assert verify_checkpoint(checkpoints(out), "step-8", trust=True)
    reseal(file)
    assert verify_checkpoint(checkpoints(out), "step-8", trust=True) == []
    assert os.path.getsize(file) > 0
