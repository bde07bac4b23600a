"""Training runs on real shard data: Fashion-MNIST through make-shards, and bad samples."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsclip.config import load_config
from dsclip.training.ds_config import load_ds_config
from dsclip_testutils import REPO, ds_config, init_single_rank, make_trainer, read_metrics, require_data, subprocess_env
from generated_data import jpeg, write_shards

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.multiprocess
def test_fashion_mnist_shards_fine_tune_well_above_chance(tmp_path):
    require_data(FASHION_MNIST, "dataset-fashion-mnist")
    shards = tmp_path / "fashion"
    made = subprocess.run([sys.executable, "-m", "dsclip.cli", "make-shards", "fashion-mnist", "--out", str(shards),
                           "--limit", "3200", "--per-shard", "800"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert made.returncode == 0, made.stderr[-2000:]
    assert "wrote 4 shards, 3200 samples" in made.stdout
    init_single_rank()
    cfg = load_config(None, [
        "data.kind=webdataset", f'data.webdataset.urls=["{shards}/shard-{{000000..000003}}.tar"]',
        "data.batch_size=32", "optim.warmup_steps=10", "train.export=false", f"output_dir={tmp_path}",
        "eval.zeroshot=[{name: fashion, source: fashion-mnist, split: test, max_samples: 500}]"])
    make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path)))).train()
    evals = [r for r in read_metrics(tmp_path / "default") if "eval/fashion/top1" in r]
    assert evals[0]["eval/fashion/top1"] < 20, "chance is 10%"
    assert evals[-1]["eval/fashion/top1"] >= 35, evals


def test_a_run_over_a_corrupt_jpeg_and_an_empty_caption_completes_and_reports_two_skipped(tmp_path):
    # 42 samples, 2 unusable: exactly 5 batches of 8, so no top-up pass re-reads (and re-counts) a bad one
    urls = write_shards(tmp_path / "shards", n_shards=2, per_shard=21, bad={3: {"jpg": jpeg(3)[:40]}, 25: {"txt": ""}})
    init_single_rank()
    cfg = load_config(None, ["data.kind=webdataset", f'data.webdataset.urls=["{urls}"]', "data.batch_size=8",
                             "data.webdataset.shuffle_buffer=0", "optim.warmup_steps=1", "train.export=false",
                             "eval.at_start=false", "eval.at_end=false", "logging.log_every=1",
                             f"output_dir={tmp_path}"])
    trainer = make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path))))
    trainer.train()
    records = read_metrics(tmp_path / "default")
    assert records[-1]["data/skipped_samples"] == 2
    assert trainer.data.skipped()["bad_image"] == 1 and trainer.data.skipped()["no_caption"] == 1
    # Batches leave the loader as uint8 crops and reach the engine finished: normalised, channels first.
    crops, texts = next(trainer.data.epoch_batches(1))
    images, _ = trainer.to_device((crops, texts))
    assert crops.dtype == torch.uint8 and images.shape == (8, 3, *crops.shape[1:3])
    assert images.is_floating_point() and images.abs().max() < 3 and torch.equal(images, trainer.data.finish(crops))


@pytest.mark.multiprocess
def test_a_missing_shard_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "dsclip" / "train.py"), "--set", "data.kind=webdataset",
                             "--set", f'data.webdataset.urls=["{tmp_path}/absent-{{0..3}}.tar"]',
                             "--output-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=subprocess_env())
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dsclip: error:")]
    assert len(errors) == 1 and "absent-0.tar" in errors[0], result.stderr[-2000:]
