"""Per-rank model-state bytes of DeepSpeed engines (ZeRO-0/2/3 on 2 gloo ranks) and peak RSS."""
import open_clip
import pytest
import torch

from dsclip.training import memory
from dsclip_testutils import run_on_ranks

WORLD = 2
TINY = {  # a small in-test CLIP: every matrix is partitioned, small enough for a fast test
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def _engine_states(rank: int) -> dict:
    import deepspeed

    results = {}
    for stage in (0, 2, 3):
        torch.manual_seed(0)
        model = open_clip.CLIP(**TINY, nonscalar_logit_scale=True)
        numel = sum(p.numel() for p in model.parameters())
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}}
        if stage == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        image_features, text_features, scale = engine(torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2, 8)))
        engine.backward((scale * image_features @ text_features.T).sum())
        engine.step()
        results[stage] = {"numel": numel, "tensors": len(list(model.parameters())), **memory.state_bytes(engine)}
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.logit_scale.grad = torch.ones(())
    plain.step()
    results["plain"] = {"numel": sum(p.numel() for p in model.parameters()), **memory.module_state_bytes(model, plain)}
    return results


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_engine_states, WORLD, tmp_path_factory.mktemp("memory"))


@pytest.mark.multiprocess
def test_zero0_holds_everything_on_every_rank(states):
    for rank in states:
        s, p = rank["0"], rank["0"]["numel"] * 4
        steps = 4 * s["tensors"]  # AdamW's per-tensor step count (fp32 scalar)
        assert (s["params"], s["grads"], s["optimizer"]) == (p, p, 2 * p + steps)


@pytest.mark.multiprocess
def test_zero2_shards_grads_and_optimizer_but_not_params(states):
    for rank in states:
        s, p = rank["2"], rank["2"]["numel"] * 4
        assert s["params"] == p
        assert s["grads"] == pytest.approx(p / WORLD, rel=0.01)  # partitions are padded to an alignment
        assert s["optimizer"] == pytest.approx(3 * p / WORLD, rel=0.01)  # fp32 master copy + two moments


@pytest.mark.multiprocess
def test_zero3_shards_params_grads_and_optimizer(states):
    for rank in states:
        s, p = rank["3"], rank["3"]["numel"] * 4
        assert s["params"] == pytest.approx(p / WORLD, rel=0.01)
        assert s["grads"] == pytest.approx(p / WORLD, rel=0.01)
        # fp32 master partition (DeepSpeed 0.19.8 clones it on CPU) + two moments
        assert s["optimizer"] == pytest.approx(3 * p / WORLD, rel=0.01)


@pytest.mark.multiprocess
def test_plain_module_counts_params_grads_and_adam_moments(states):
    s, p = states[0]["plain"], states[0]["plain"]["numel"] * 4
    # only logit_scale was stepped: its two moments (4 bytes each) and its step count
    assert (s["params"], s["grads"], s["optimizer"]) == (p, p, 12)


def test_peak_rss_rises_past_the_old_peak_with_a_touched_allocation():
    import mmap
    peak_before, rss_before = memory.peak_rss_bytes(), memory.rss_bytes()
    assert peak_before >= rss_before > 0
    extra = 64 * 2 ** 20
    # fresh pages from the OS, not the heap: an earlier in-process run may have had glibc keep
    # freed memory resident (keep_freed_host_memory), which a heap allocation would reuse
    block = torch.frombuffer(mmap.mmap(-1, peak_before - rss_before + extra), dtype=torch.uint8)
    block.fill_(1)  # every page written: resident
    assert memory.peak_rss_bytes() >= peak_before + extra // 2
    assert block[-1] == 1


KEEP_FREED = """
import torch
from dsclip.training import memory
from dsclip.training.bootstrap import freed_host_memory_returned, keep_freed_host_memory
MB = 2 ** 20
def freed_and_still_resident(mb=128):
    before = memory.rss_bytes()
    block = torch.ones(mb * MB // 4)  # above glibc's largest default mmap threshold (32 MB)
    del block
    return (memory.rss_bytes() - before) // MB
default = freed_and_still_resident()
applied = keep_freed_host_memory()
kept = freed_and_still_resident()
with freed_host_memory_returned():
    returned = freed_and_still_resident()
print(default, applied, kept, returned, freed_and_still_resident(256))
"""


@pytest.mark.multiprocess  # spawns processes; kept out of the quick tier
def test_glibc_keeps_freed_host_memory_once_asked_and_returns_it_while_the_model_is_built():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, check=True).stdout
    default_mb, applied, kept_mb, returned_mb, kept_again_mb = out.split()
    assert applied == "True"
    assert int(default_mb) < 16  # by default a freed 128 MB block goes straight back to the OS
    assert int(kept_mb) >= 120  # now it stays for the next step's allocations
    assert int(returned_mb) < 16  # not while the model is built (freed_host_memory_returned)
    assert int(kept_again_mb) >= 120  # and kept again after: 256 MB reuse the kept 128 and keep 128 more
