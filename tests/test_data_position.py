"""The data position across layouts: an optimizer step takes the same samples on any number of
ranks, micro-batch and accumulation, and a position saved on one layout continues on another."""
import logging
from collections import Counter
from typing import Iterator

import pytest
import torch

from dsclip.data.loader import EpochSampler, IndexedEpochs, position_in_samples
from dsclip.errors import CheckpointError
from dsclip.model.safe_files import load_file
from dsclip.training.universal import check_supported, module_states_file, restore_buffers, saved_zero_stage

SIZE, SEED = 88, 3  # 88 = 5 global batches of 16 and a ragged 8
LAYOUTS = [(2, 8, 1), (1, 16, 1), (4, 4, 1), (2, 4, 2)]  # ranks, micro-batch, accumulation: 16 a step


class SampleIds(IndexedEpochs):
    """A rank's batches of sample ids."""

    def __init__(self, rank: int, layout: tuple[int, int, int]):
        world, batch, accum = layout
        super().__init__(EpochSampler(SIZE, batch, rank, world, SEED, accum))

    def _batches(self, epoch: int) -> Iterator[torch.Tensor]:
        indices, size = self.sampler.indices(), self.sampler.batch_size
        yield from (indices[start:start + size] for start in range(0, len(indices), size))


def steps_of(layout, epoch: int = 1, position: dict | None = None) -> list[Counter]:
    """The samples each optimizer step of `epoch` takes over all ranks, from `position` on."""
    world, _, accum = layout
    per_rank = []
    for rank in range(world):
        ids = SampleIds(rank, layout)
        ids.load_state_dict(position or {"epoch": epoch, "samples": 0})
        per_rank.append(list(ids.epoch_batches(epoch)))
    micro_batches = len(per_rank[0])
    assert micro_batches % accum == 0 and all(len(batches) == micro_batches for batches in per_rank)
    return [Counter(i for batches in per_rank for batch in batches[step * accum:(step + 1) * accum]
                    for i in batch.tolist()) for step in range(micro_batches // accum)]


def test_a_step_takes_the_same_samples_on_every_layout_and_an_epoch_each_sample_once():
    reference = steps_of(LAYOUTS[0])
    assert len(reference) == SIZE // 16 and all(sum(step.values()) == 16 for step in reference)
    assert sum(reference, Counter()).most_common(1)[0][1] == 1
    for layout in LAYOUTS[1:]:
        assert steps_of(layout) == reference, layout


@pytest.mark.parametrize("saved", LAYOUTS)
@pytest.mark.parametrize("resumed", LAYOUTS)
def test_a_position_saved_on_one_layout_continues_on_another(saved, resumed):
    world, _, accum = saved
    ids = SampleIds(0, saved)
    batches = ids.epoch_batches(1)
    for _ in range(2 * accum):  # two optimizer steps into epoch 1
        next(batches)
    assert steps_of(resumed, position=ids.state_dict()) == steps_of(saved)[2:]


def test_a_new_global_batch_skips_the_rest_of_a_step_it_cannot_start_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="dsclip"):
        steps = steps_of((2, 8, 2), position={"epoch": 1, "samples": 48})  # 48 = 1.5 steps of 32
    assert "the next 16 are skipped" in caplog.text
    everything = steps_of((2, 8, 2))
    assert steps == everything[2:]
    beyond = SampleIds(0, (2, 8, 2))
    beyond.load_state_dict({"epoch": 1, "samples": 10_000})
    assert beyond.at_epoch_end() and list(beyond.epoch_batches(1)) == []


def test_a_position_saved_in_micro_batches_before_2026_12_counts_the_saved_layouts_samples():
    assert position_in_samples({"epoch": 2, "batch": 3}, 16) == {"epoch": 2, "samples": 48}
    assert position_in_samples({"epoch": 2, "samples": 48}, 8) == {"epoch": 2, "samples": 48}


def test_zero_1_and_2_checkpoints_re_cut_onto_one_rank_only_and_no_stage_changes():
    check_supported(saved_stage=3, engine_stage=3, saved_world=2, world=4)
    check_supported(saved_stage=2, engine_stage=2, saved_world=2, world=1)
    with pytest.raises(CheckpointError, match="ZeRO-1/2 checkpoint resumes on 1 rank or on the 2 it was saved on, "
                                              "not on 4"):
        check_supported(saved_stage=2, engine_stage=1, saved_world=2, world=4)
    with pytest.raises(CheckpointError, match="saved under ZeRO-1/2, this run uses ZeRO-3: resume with the DeepSpeed"):
        check_supported(saved_stage=2, engine_stage=3, saved_world=2, world=4)
    with pytest.raises(CheckpointError, match="ZeRO-0 checkpoint resumes only on the 2 rank"):
        check_supported(saved_stage=0, engine_stage=0, saved_world=2, world=1)


def test_the_saved_zero_stage_and_model_states_file_come_from_the_checkpoints_files(tmp_path):
    assert saved_zero_stage(tmp_path) == 0
    (tmp_path / "mp_rank_00_model_states.pt").touch()
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").touch()
    assert saved_zero_stage(tmp_path) == 2 and module_states_file(tmp_path).name == "mp_rank_00_model_states.pt"
    (tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt").touch()
    assert saved_zero_stage(tmp_path) == 3
    assert module_states_file(tmp_path).name == "zero_pp_rank_0_mp_rank_00_model_states.pt"


def test_buffers_come_back_from_the_saved_module_state(tmp_path):
    """A universal load reads no module state; BatchNorm statistics (ResNet / timm towers) would
    come back fresh without restore_buffers."""
    trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    trained(torch.randn(16, 3) * 5 + 2)  # moves the running statistics
    torch.save({"module": trained.state_dict()}, tmp_path / "mp_rank_00_model_states.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    restore_buffers(fresh, load_file(module_states_file(tmp_path), trust=False)["module"])
    for (name, buffer), (_, saved) in zip(fresh.named_buffers(), trained.named_buffers()):
        assert torch.equal(buffer, saved), name
    assert not torch.equal(fresh[0].weight, trained[0].weight)  # parameters are the engine's business
