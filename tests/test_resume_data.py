"""Exact resume mid-epoch on file data read by DataLoader workers: WebDataset shards and a CSV list,
each with data.num_workers=2, through the Trainer and open_clip's random training augmentation."""
import pytest

from dsclip.errors import CheckpointError
from dsclip.model.run_folder import read_pointer
from test_checkpoint import assert_resume_matches, losses_by_step, stop_after, tiny_trainer
from generated_data import write_pairs_csv, write_shards

# 48 samples of 8: 6 steps an epoch (a checkpoint at its end), so step 8 is mid-epoch in the second.
RUN = ("train.max_steps=11", "logging.log_every=1", "train.save_every=100", "data.num_workers=2")
STOP_AT = 8
# Each run starts DataLoader worker processes every epoch: ~25 s a case on 2 cores, too slow for the quick tier.
pytestmark = pytest.mark.multiprocess


def shard_source(folder) -> tuple[str, ...]:
    urls = write_shards(folder, n_shards=4, per_shard=12)  # 8x8 random-pixel JPEGs: crops differ visibly
    return "data.kind=webdataset", f'data.webdataset.urls=["{urls}"]', "data.webdataset.shuffle_buffer=16"


def csv_source(folder) -> tuple[str, ...]:
    return "data.kind=csv", f"data.csv.path={write_pairs_csv(folder / 'pairs.csv', 48)}"


SOURCES = {"webdataset": shard_source, "csv": csv_source}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_a_run_resumed_mid_epoch_on_file_data_with_two_workers_reproduces_the_losses(tmp_path, kind):
    """Each sample's random crop must not depend on which worker decodes it or on what that worker
    decoded before: the resumed run starts its workers mid-epoch."""
    run = (*RUN, *SOURCES[kind](tmp_path / "data"))
    tiny_trainer(tmp_path / "straight", *run).train()
    interrupted = tiny_trainer(tmp_path / "resumed", *run)
    stop_after(interrupted, STOP_AT)
    interrupted.train()
    assert read_pointer(tmp_path / "resumed" / "default" / "checkpoints" / "latest") == f"step-{STOP_AT}"
    tiny_trainer(tmp_path / "resumed", *run, resume="latest").train()
    straight = losses_by_step(tmp_path / "straight" / "default")
    assert_resume_matches(straight, tmp_path / "resumed" / "default", resumed_from=STOP_AT, last=11)


def test_resuming_webdataset_input_with_other_data_workers_is_refused(tmp_path):
    """The config check refuses it before the loader's own check (dsclip/data/shards.py) is reached."""
    run = (*RUN, "train.max_steps=2", *shard_source(tmp_path / "data"))
    tiny_trainer(tmp_path, *run).train()
    with pytest.raises(CheckpointError, match=r"cannot resume .*step-2: the run differs in data.num_workers: 2 -> 1 "):
        tiny_trainer(tmp_path, *run, "data.num_workers=1", resume="latest")
