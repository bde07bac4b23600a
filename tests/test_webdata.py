"""WebDataset loader: exactly-once epochs across ranks and workers, weighted mixing, bad data, errors, resume."""
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dsclip.data.config import WebDataConfig
from dsclip.data.shards import build_webdataset_loader
from dsclip.errors import DataStallError
from generated_data import jpeg, write_shards


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255


def id_tokens(captions: list[str]) -> torch.Tensor:
    """Stands in for a tokenizer: the sample id, so tests can see which samples a batch holds."""
    return torch.tensor([[int(c.split()[-1])] for c in captions], dtype=torch.long)


def loader(cfg: WebDataConfig, **kw):
    kw.setdefault("batch_size", 4)
    return build_webdataset_loader(cfg, transform=to_tensor, tokenizer=id_tokens, **kw)


def ids_of(batches) -> list[int]:
    return [int(t) for _, tokens in batches for t in tokens[:, 0]]


def _rank_main(rank: int, world: int, port: int, urls: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # ranks started by deepspeed/torchrun fork their loader workers; mp.spawn children would spawn them (slow imports)
    mp.set_start_method("fork", force=True)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dl = loader(WebDataConfig(urls=[urls]), world_size=world, rank=rank, num_workers=2, seed=3)
    batches = list(dl)
    assert all(images.shape == (4, 3, 8, 8) for images, _ in batches)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"ids": ids_of(batches), "steps": len(dl), "batches": len(batches)})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.multiprocess  # spawns processes; kept out of the quick tier
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    urls = write_shards(tmp_path / "d", n_shards=8, per_shard=12)
    out = tmp_path / "keys.json"
    mp.spawn(_rank_main, args=(2, 29511, urls, str(out)), nprocs=2)
    ranks = json.loads(out.read_text())
    assert [r["batches"] for r in ranks] == [r["steps"] for r in ranks] == [12, 12]
    seen = ranks[0]["ids"] + ranks[1]["ids"]
    assert sorted(seen) == list(range(96))
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])


def test_uneven_shards_give_equal_steps_on_every_rank(tmp_path):
    urls = write_shards(tmp_path / "d", n_shards=5, per_shard=8)
    counts = [len(list(loader(WebDataConfig(urls=[urls]), world_size=2, rank=r))) for r in range(2)]
    # rank 0 holds 3 shards (6 batches), rank 1 holds 2 (4 batches): both stop at 4
    assert counts == [4, 4]


def test_resampled_mix_follows_weights(tmp_path):
    general = write_shards(tmp_path / "general", n_shards=4, per_shard=50)
    domain = write_shards(tmp_path / "domain", n_shards=4, per_shard=50, first_id=100_000)
    cfg = WebDataConfig(urls=[general, domain], weights=[0.8, 0.2], resampled=True, train_num_samples=4000, shuffle_buffer=100)
    dl = loader(cfg, batch_size=50, seed=1)
    ids = ids_of(dl)
    assert len(dl) == 80 and len(ids) == 4000
    share = sum(i < 100_000 for i in ids) / len(ids)
    assert abs(share - 0.8) < 0.03, share


def test_corrupt_jpeg_and_empty_caption_are_skipped_and_counted(tmp_path, caplog):
    bad = {2: {"jpg": jpeg(2)[:40]}, 5: {"txt": ""}}
    urls = write_shards(tmp_path / "d", n_shards=1, per_shard=10, bad=bad)
    dl = loader(WebDataConfig(urls=[urls], shuffle_buffer=0), num_workers=1)
    with caplog.at_level(logging.WARNING, logger="dsclip.data.shards"):
        ids = ids_of(dl)
    assert sorted(ids) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert dl.skipped() == {"bad_image": 1, "empty_image": 0, "no_image": 0, "no_caption": 1, "bad_shard": 0,
                            "too_large": 0}
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warnings == ["rank 0 epoch 0: skipped 2 unusable samples (bad_image=1, no_caption=1)"]


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares width x height pixels (a decompression bomb's header)."""
    import io
    import struct
    import zlib
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_a_decompression_bomb_and_an_oversized_member_are_skipped_unread_and_counted(tmp_path):
    bad = {2: {"jpg": png_declaring(20_000, 20_000)}, 3: {"jpg": png_declaring(10_000, 10_000)},  # PIL: error, warning
           5: {"jpg": jpeg(5) + b"\0" * 3000}}
    urls = write_shards(tmp_path / "d", n_shards=1, per_shard=11, bad=bad)  # 8 usable: 2 batches, as planned
    dl = loader(WebDataConfig(urls=[urls], shuffle_buffer=0, max_member_mb=2500 / 2**20), num_workers=0)
    assert sorted(ids_of(dl)) == [0, 1, 4, 6, 7, 8, 9, 10]
    assert dl.skipped()["too_large"] == 3


def test_a_pipe_shard_that_fails_once_is_read_again_and_gives_each_sample_once(tmp_path, caplog):
    write_shards(tmp_path / "d", n_shards=1, per_shard=8)
    shard, flag = tmp_path / "d" / "00000.tar", tmp_path / "failed-once"
    command = f"pipe:bash -c 'if [ -e {flag} ]; then cat {shard}; else touch {flag}; exit 3; fi'"
    dl = loader(WebDataConfig(urls=[command], train_num_samples=8, shuffle_buffer=0), num_workers=0)
    with caplog.at_level(logging.WARNING, logger="dsclip.data.shards"):
        assert sorted(ids_of(dl)) == list(range(8))
    assert any("reading it again in 1 s (retry 1 of 3)" in r.getMessage() for r in caplog.records)


def test_a_pipe_shard_cut_off_mid_sample_is_read_again_without_losing_or_repeating_a_sample(tmp_path):
    write_shards(tmp_path / "d", n_shards=1, per_shard=8)
    shard, flag = tmp_path / "d" / "00000.tar", tmp_path / "failed-once"
    cut = shard.stat().st_size // 2 + 100  # inside a sample's members: the first read ends with half a sample
    command = (f"pipe:bash -c 'if [ -e {flag} ]; then cat {shard}; else touch {flag}; head -c {cut} {shard}; "
               "exit 3; fi'")
    dl = loader(WebDataConfig(urls=[command], train_num_samples=8, shuffle_buffer=0), batch_size=1, num_workers=0)
    assert sorted(ids_of(dl)) == list(range(8)) and not any(dl.skipped().values())


def test_a_pipe_shard_that_keeps_failing_names_the_shard_after_the_retries(tmp_path, monkeypatch):
    monkeypatch.setattr("dsclip.data.shards.RETRY_BASE_S", 0.01)
    dl = loader(WebDataConfig(urls=["pipe:exit 7"], train_num_samples=8, shard_retries=2), num_workers=0)
    with pytest.raises(OSError, match=r"pipe:exit 7.*after 3 attempts; data.webdataset.shard_retries=2"):
        list(dl)


def test_empty_image_file_and_empty_shard_are_skipped(tmp_path):
    urls = write_shards(tmp_path / "d", n_shards=2, per_shard=8, bad={3: {"jpg": b""}})
    (tmp_path / "d" / "00001.tar").write_bytes(b"")
    (tmp_path / "d" / "manifest.json").unlink()
    dl = loader(WebDataConfig(urls=[urls], train_num_samples=8), batch_size=1, train=False)
    # 7 good samples, topped up to the planned 8 batches by a second pass that stops after sample 0
    assert ids_of(dl) == [0, 1, 2, 4, 5, 6, 7, 0]
    assert dl.skipped() == {"bad_image": 0, "empty_image": 1, "no_image": 0, "no_caption": 0, "bad_shard": 1,
                            "too_large": 0}


def test_rank_short_of_batches_tops_up_to_the_planned_steps(tmp_path, caplog):
    bad = {i: {"jpg": b"not a jpeg"} for i in range(4)}
    urls = write_shards(tmp_path / "d", n_shards=1, per_shard=12, bad=bad)
    dl = loader(WebDataConfig(urls=[urls]), num_workers=1)
    with caplog.at_level(logging.WARNING, logger="dsclip.data.shards"):
        ids = ids_of(dl)
    assert len(dl) == 3 and len(ids) == 12 and set(ids) == set(range(4, 12))
    assert any("topping up" in r.getMessage() for r in caplog.records)


def test_missing_shard_is_one_clear_error(tmp_path):
    urls = write_shards(tmp_path / "d", n_shards=3, per_shard=4)
    (tmp_path / "d" / "00001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="00001.tar"):
        loader(WebDataConfig(urls=[urls]))


def test_pipe_urls_read_shards_and_a_failing_pipe_names_the_shard(tmp_path):
    write_shards(tmp_path / "d", n_shards=2, per_shard=4)
    good = f"pipe:cat {tmp_path}/d/{{00000..00001}}.tar"
    assert sorted(ids_of(loader(WebDataConfig(urls=[good], train_num_samples=8)))) == list(range(8))
    broken = f"pipe:cat {tmp_path}/d/missing.tar"
    with pytest.raises(OSError, match="missing.tar"):
        list(loader(WebDataConfig(urls=[broken], train_num_samples=8, shard_retries=0)))


@pytest.mark.multiprocess  # spawns processes; kept out of the quick tier
def test_stalled_loader_fails_after_timeout(tmp_path):
    write_shards(tmp_path / "d", n_shards=1, per_shard=4)
    cfg = WebDataConfig(urls=[f"pipe:sleep 8; cat {tmp_path}/d/00000.tar"], train_num_samples=4, timeout_s=1)
    start = time.monotonic()
    with pytest.raises(DataStallError, match="no batch from the data loader workers in 1s"):
        list(loader(cfg, num_workers=1))
    assert time.monotonic() - start < 8


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_mid_epoch_reproduces_the_remaining_batches(tmp_path, resampled):
    urls = write_shards(tmp_path / "d", n_shards=4, per_shard=10, bad={13: {"txt": ""}})
    cfg = WebDataConfig(urls=[urls], resampled=resampled, train_num_samples=40, shuffle_buffer=7)
    make = lambda: loader(cfg, num_workers=2, seed=5)  # noqa: E731
    reference = make()
    reference.set_epoch(1)
    expected = ids_of(reference)
    first = make()
    first.set_epoch(1)
    head = []
    for images, tokens in first:
        head.append((images, tokens))
        if len(head) == 3:
            break
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert ids_of(head) + ids_of(resumed) == expected
    assert resumed.skipped() == reference.skipped()


def test_open_clip_transform_and_tokenizer_give_model_shapes(tmp_path):
    import open_clip

    open_clip.add_model_config(Path(__file__).resolve().parents[1] / "dsclip" / "model" / "configs")
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms("dsclip-tiny")
    tokenizer = open_clip.get_tokenizer("dsclip-tiny")
    urls = write_shards(tmp_path / "d", n_shards=2, per_shard=4)
    for transform, train in [(preprocess_train, True), (preprocess_val, False)]:
        dl = build_webdataset_loader(WebDataConfig(urls=[urls]), transform=transform, tokenizer=tokenizer, batch_size=4, train=train)
        images, tokens = next(iter(dl))
        if train:  # uint8 crops out of the workers, finished on the model's device
            assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8
        images = dl.finish(images)
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert tokens.shape == (4, 16) and tokens.dtype == torch.long


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="weights only apply when resampled"):
        WebDataConfig(urls=["a.tar", "b.tar"], weights=[0.8, 0.2]).validate()
    with pytest.raises(ValueError, match="train_num_samples must be > 0"):
        WebDataConfig(urls=["a.tar"], resampled=True).validate()
    with pytest.raises(ValueError, match="urls is empty"):
        WebDataConfig().validate()


def caption_tokens(captions: list[str]) -> torch.Tensor:
    """Stands in for a tokenizer on 'sample <id> caption <j>': (id, j) per caption."""
    return torch.tensor([[int(c.split()[1]), int(c.split()[3])] for c in captions], dtype=torch.long)


def picks(batches) -> list[tuple[int, int]]:
    return [tuple(row) for _, tokens in batches for row in tokens.tolist()]


def caption_loader(cfg: WebDataConfig, seed: int, num_workers: int = 0):
    return build_webdataset_loader(cfg, transform=to_tensor, tokenizer=caption_tokens, batch_size=4, seed=seed,
                                   num_workers=num_workers)


def test_a_sample_with_several_captions_gives_one_per_visit_seeded_and_every_one_over_epochs(tmp_path):
    cfg = WebDataConfig(urls=[write_shards(tmp_path / "d", n_shards=2, per_shard=12, captions=3)], shuffle_buffer=5)
    first, again, other = caption_loader(cfg, seed=1), caption_loader(cfg, seed=1), caption_loader(cfg, seed=2)
    epoch = picks(first)
    assert sorted(i for i, _ in epoch) == list(range(24)), "one visit per sample and epoch"
    assert epoch == picks(again), "the same seed picks the same captions"
    assert [j for _, j in sorted(epoch)] != [j for _, j in sorted(picks(other))], "another seed picks others"
    seen: dict[int, set[int]] = {}
    for _ in range(30):  # first.__iter__ moves to the next epoch
        for sample, caption in picks(first):
            seen.setdefault(sample, set()).add(caption)
    assert all(captions == {0, 1, 2} for captions in seen.values()), seen


def test_caption_picks_resume_exactly_mid_epoch_with_workers(tmp_path):
    cfg = WebDataConfig(urls=[write_shards(tmp_path / "d", n_shards=4, per_shard=10, captions=5)], shuffle_buffer=7)
    reference = caption_loader(cfg, seed=5, num_workers=2)
    reference.set_epoch(2)
    expected = picks(reference)
    first = caption_loader(cfg, seed=5, num_workers=2)
    first.set_epoch(2)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 3:
            break
    resumed = caption_loader(cfg, seed=5, num_workers=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.set_epoch(2)
    assert picks(head) + picks(resumed) == expected
    assert len({j for _, j in expected}) == 5


def test_captions_come_from_the_json_list_when_there_is_no_txt(tmp_path):
    import webdataset as wds
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "0.tar")) as sink:
        for sid in range(8):
            sink.write({"__key__": f"{sid:04d}", "jpg": jpeg(sid),
                        "json": {"captions": [f"sample {sid} caption {j}" for j in range(2)]}})
    cfg = WebDataConfig(urls=[str(tmp_path / "d" / "0.tar")], train_num_samples=8)
    assert sorted(i for i, _ in picks(caption_loader(cfg, seed=0))) == list(range(8))
