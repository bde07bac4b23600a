import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsclip.report import tracking
from dsclip.report.config import LoggingConfig
from dsclip.report.tracking import WANDB_RUN_ID_FILE, Tracker
from dsclip_testutils import require_module


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_jsonl_records_and_plots_on_close(tmp_path):
    tracker = Tracker(LoggingConfig(report_to=["jsonl"]), tmp_path, {"lr": 1e-3}, is_main=True)
    tracker.log(10, {"train/loss": 2.5, "train/lr": 1e-3})
    tracker.log(20, {"train/loss": 2.0, "train/lr": 9e-4})
    tracker.log(20, {"eval/zeroshot/top1": 41.0})
    tracker.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 10, "train/loss": 2.5, "train/lr": 1e-3},
                     {"step": 20, "train/loss": 2.0, "train/lr": 9e-4},
                     {"step": 20, "eval/zeroshot/top1": 41.0}]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "eval_zeroshot_top1.png", "train_loss.png", "train_lr.png"]


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = LoggingConfig(report_to=["jsonl", "tensorboard"])
    tracker = Tracker(cfg, run_dir, {}, is_main=False)
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    assert not run_dir.exists()


def test_resume_appends_and_a_new_run_starts_empty(tmp_path):
    cfg = LoggingConfig(report_to=["jsonl"], plots=False)
    for resume, step in [(False, 1), (True, 2)]:
        tracker = Tracker(cfg, tmp_path, {}, is_main=True, resume=resume)
        tracker.log(step, {"train/loss": 1.0})
        tracker.close()
    assert [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    Tracker(cfg, tmp_path, {}, is_main=True).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_scalars_are_readable_and_resume_purges_replayed_steps(tmp_path):
    cfg = LoggingConfig(report_to=["jsonl", "tensorboard"], plots=False)
    tracker = Tracker(cfg, tmp_path, {"model": "tiny"}, is_main=True)
    for step in (1, 2, 3, 4):
        tracker.log(step, {"train/loss": 5.0 - step})
    tracker.close()
    assert scalars(tmp_path, "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    # Resumed from a checkpoint at step 2: steps 3 and 4 are replayed with new values.
    tracker = Tracker(cfg, tmp_path, {"model": "tiny"}, is_main=True, resume=True)
    for step in (3, 4, 5):
        tracker.log(step, {"train/loss": 10.0 + step})
    tracker.close()
    assert scalars(tmp_path, "train/loss") == [(1, 4.0), (2, 3.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_wandb_offline_writes_under_run_dir_and_resumes_its_run_id(tmp_path, monkeypatch):
    wandb = require_module("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["train.py", "--set", "data.webdataset.urls=[https://h/s.tar?X-Amz-Signature=sig0]"])
    cfg = LoggingConfig(report_to=["jsonl", "wandb"], wandb_project="dsclip-test", plots=False)
    tracker = Tracker(cfg, tmp_path, {"train": {"lr": 1e-3}}, is_main=True)
    tracker.log(1, {"train/loss": 2.0})
    tracker.close()
    wandb.teardown()  # the W&B service writes the run file after finish() returns; wait for it
    run_id = (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    recorded = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in recorded and b"data.webdataset.urls=[https://h/s.tar" in recorded  # the argv, redacted:
    assert not [f for f in (tmp_path / "wandb").rglob("*") if f.is_file() and b"sig0" in f.read_bytes()]
    assert sys.argv[-1].endswith("sig0]")  # and given back as it was

    def run_ids():
        # offline-run-<time>-<id>, with "-<n>" appended when two runs start in the same second
        return {run.name.split("-")[3] for run in (tmp_path / "wandb").glob("offline-run-*")}

    tracker = Tracker(cfg, tmp_path, {"train": {"lr": 1e-3}}, is_main=True, resume=True)
    tracker.log(2, {"train/loss": 1.5})
    tracker.close()
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    assert run_ids() == {run_id}

    Tracker(cfg, tmp_path, {}, is_main=True).close()  # not a resume: a new W&B run
    new_id = (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()
    assert new_id != run_id and run_ids() == {run_id, new_id}


def test_wandb_goes_offline_when_the_server_is_unreachable(tmp_path, monkeypatch):
    require_module("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tracking, "wandb_reachable", lambda: False)
    cfg = LoggingConfig(report_to=["jsonl", "wandb"], plots=False)
    tracker = Tracker(cfg, tmp_path, {}, is_main=True)
    tracker.log(1, {"train/loss": 2.0})
    tracker.close()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def test_wandb_requested_but_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'dsclip\[wandb\]'"):
        Tracker(LoggingConfig(report_to=["jsonl", "wandb"]), tmp_path, {}, is_main=True)


@pytest.mark.parametrize("cfg,message", [
    (LoggingConfig(log_every=0), "log_every must be >= 1"),
    (LoggingConfig(report_to=["jsonl", "mlflow"]), "unknown sinks \\['mlflow'\\]"),
    (LoggingConfig(report_to=["jsonl", "jsonl"]), "twice"),
    (LoggingConfig(report_to=["tensorboard"]), "add 'jsonl' to logging.report_to"),
    (LoggingConfig(report_to=["jsonl", "wandb"], wandb_project=""), "wandb_project is empty"),
])
def test_logging_config_rejects_bad_values(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()
