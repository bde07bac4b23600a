"""Loading checkpoint files as untrusted: what is allowed, what is refused, and the manifest."""
import os

import pytest
import torch

from dsclip.errors import CheckpointError
from dsclip.model.safe_files import FORCE_FULL_LOAD, FORCE_WEIGHTS_ONLY, check_files, load_file, seal, \
    weights_only_loads


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_deepspeeds_loss_scalers_load_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    torch.save({"dynamic": DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1,
                                                       consecutive_hysteresis=False), "static": LossScaler(128.0)}, tmp_path / "s.pt")
    loaded = load_file(tmp_path / "s.pt", trust=False)
    assert loaded["dynamic"].cur_scale == 2**16 and loaded["static"].cur_scale == 128.0


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    torch.save({"weights": torch.ones(2), "payload": CreatesFile(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt holds pickled Python objects .* --trust-checkpoint"):
        load_file(tmp_path / "evil.pt", trust=False)
    with weights_only_loads(trust=False), pytest.raises(Exception, match="GLOBAL io.open"):
        torch.load(tmp_path / "evil.pt", weights_only=False)  # as DeepSpeed calls it
    assert not (tmp_path / "pwned").exists()


def test_the_forced_weights_only_switch_wins_over_a_users_opposite_one_and_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv(FORCE_FULL_LOAD, "1")
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pt")
    with weights_only_loads(trust=False):
        assert torch.load(tmp_path / "w.pt", weights_only=False)["w"].item() == 1.0
    assert os.environ[FORCE_FULL_LOAD] == "1" and FORCE_WEIGHTS_ONLY not in os.environ


def test_the_manifest_catches_changed_missing_and_outside_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"def")
    manifest = seal([tmp_path / "a.bin", tmp_path / "b.bin"])
    assert check_files(tmp_path, manifest, sorted(manifest), trust=False) == []
    (tmp_path / "a.bin").write_bytes(b"abd")
    (tmp_path / "b.bin").unlink()
    manifest["../outside"] = manifest["a.bin"]
    problems = check_files(tmp_path, manifest, sorted(manifest), trust=False)
    assert len(problems) == 3
    assert "not a file of its folder" in problems[0] and "sha256 mismatch" in problems[1] and "missing" in problems[2]
