"""Resuming on another number of ranks, micro-batch or accumulation (the same global batch): a
2-rank run's mid-epoch checkpoint resumed on 1 rank, on 4 ranks and on 2 ranks with half the
micro-batch and twice the accumulation continues as an uninterrupted run at that layout does."""
import functools
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch

from dsclip.config import load_config
from dsclip.model.architectures import registered
from dsclip.model.config import ModelConfig
from dsclip.model.run_folder import consolidated_state_dict
from dsclip.training.ds_config import load_ds_config
from dsclip_testutils import ds_config, make_trainer, read_metrics, run_on_ranks

pytestmark = pytest.mark.multiprocess

STEPS, RESUMED_FROM = 10, 6  # 80 samples / 16 a step: 5 steps an epoch, step 6 is the first of epoch 1
RUN = ("train.max_steps=10", "optim.warmup_steps=2", "logging.log_every=1", "data.synthetic.train_samples=80",
       "train.save_every=3", "train.keep_last=5", "eval.at_start=false", "eval.at_end=false", "train.export=false",
       # a frozen image tower (its weights must come back bit for bit), per-tower lr and layer decay over the text
       # tower (every group keeps its own lr), gradient caching (an accumulated step contrasts all 16 samples)
       "freeze.strategy=frozen_image", "optim.text.lr=1e-3", "optim.text.layer_decay=0.7", "train.grad_cache=true")
SAVED_LAYOUT = (2, 8, 1)
LAYOUTS = {"1 rank": (1, 16, 1), "4 ranks": (4, 4, 1), "2 ranks, half micro-batch": (2, 4, 2)}
MOMENTS = ("exp_avg", "exp_avg_sq")
MODEL = ModelConfig().name


def full_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's Adam moments, gathered whole (a collective: all ranks call it)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    return {name: {key: safe_get_full_optimizer_state(param, key).clone() for key in MOMENTS}
            for name, param in engine.module.named_parameters() if param.requires_grad}


def train_on_rank(rank: int, out: str, layout: tuple[int, int, int], pretrained: str, resume: str = "",
                  stage: int = 3) -> dict:
    """One rank of a run at `layout`: the sample ids each step drew, the optimizer's param groups
    and (rank 0) its moments right after the resume or at the saved step into out/moments.pt."""
    _, batch, accum = layout
    cfg = load_config(None, [*RUN, f"output_dir={out}", f"data.batch_size={batch}",
                             f"train.grad_accum_steps={accum}", f"model.pretrained={pretrained}"])
    trainer = make_trainer(cfg, load_ds_config(str(Path(out) / f"zero{stage}.json")), resume or None)
    seen, draw = [], trainer.data.samples.batch

    def recorded_draw(indices: torch.Tensor):
        seen.append([trainer.engine.global_steps + 1, indices.tolist()])
        return draw(indices)

    trainer.data.samples.batch = recorded_draw
    groups = []

    def keep_state() -> None:
        groups.extend([group["lr"], group["weight_decay"]] for group in trainer.engine.optimizer.param_groups)
        # DeepSpeed 0.19.8's ZeRO-1/2 optimizer cannot hand out the moments of a parameter that lies
        # wholly in another rank's partition (safe_get_full_optimizer_state fails there): ZeRO-3 only.
        moments = full_moments(trainer.engine) if stage == 3 else {}
        if rank == 0:
            torch.save(moments, Path(out) / "moments.pt")

    if resume:
        keep_state()
    else:
        save = trainer.save

        def save_and_keep(metrics):
            if trainer.engine.global_steps == RESUMED_FROM:
                keep_state()
            return save(metrics)

        trainer.save = save_and_keep
    trainer.train()
    return {"seen": seen, "groups": groups}


def run(out: Path, layout: tuple[int, int, int], pretrained: Path, resume: str = "", stage: int = 3) -> dict:
    out.mkdir(parents=True)
    ds_config(stage, out)
    worker = functools.partial(train_on_rank, out=str(out), layout=layout, pretrained=str(pretrained), resume=resume,
                               stage=stage)
    ranks = run_on_ranks(worker, layout[0], out)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(out / "default") if "train/loss" in r}
    seen = [(step, ids) for rank in ranks for step, ids in rank["seen"]]
    return {"losses": losses, "seen": seen, "groups": ranks[0]["groups"], "dir": out,
            "moments": torch.load(out / "moments.pt") if (out / "moments.pt").exists() else None}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Weights unlike a fresh model's: a resume that lost the frozen tower would show its initialisation."""
    registered()
    torch.manual_seed(123)
    file = tmp_path_factory.mktemp("pretrained") / "weights.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), file)
    return file


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pretrained):
    return run(tmp_path_factory.mktemp("saved") / "run", SAVED_LAYOUT, pretrained)


def samples_of_steps(seen, steps) -> Counter:
    return Counter(i for step, ids in seen if step in steps for i in ids)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_a_checkpoint_resumed_on_another_layout_continues_as_an_uninterrupted_run_there(saved, pretrained, layout,
                                                                                       tmp_path):
    checkpoint = saved["dir"] / "default" / "checkpoints" / f"step-{RESUMED_FROM}"
    uninterrupted = run(tmp_path / "uninterrupted", LAYOUTS[layout], pretrained)
    resumed = run(tmp_path / "resumed", LAYOUTS[layout], pretrained, resume=str(checkpoint))

    assert sorted(resumed["losses"]) == list(range(RESUMED_FROM + 1, STEPS + 1))
    for step, loss in resumed["losses"].items():
        assert abs(loss - uninterrupted["losses"][step]) <= 1e-5, (step, loss, uninterrupted["losses"][step])

    for name, moments in saved["moments"].items():
        for key in MOMENTS:
            torch.testing.assert_close(resumed["moments"][name][key], moments[key], rtol=0, atol=1e-7, msg=name)

    # Epoch 1 is steps 6-10: the saved run drew step 6, the resumed run the rest; each sample once.
    epoch = samples_of_steps(saved["seen"], {RESUMED_FROM}) + samples_of_steps(resumed["seen"], range(7, 11))
    assert epoch == Counter(range(80)) == samples_of_steps(saved["seen"], range(1, 6))
    for step in range(RESUMED_FROM + 1, STEPS + 1):
        assert samples_of_steps(resumed["seen"], {step}) == samples_of_steps(uninterrupted["seen"], {step})
    assert min(step for step, _ in resumed["seen"]) == RESUMED_FROM + 1

    assert_groups_and_frozen_tower_kept(saved, resumed, pretrained)
    resharded = resumed["dir"] / "default" / "checkpoints" / "resharded"  # the converted copy, on another world size
    assert not resharded.exists() or not any(resharded.iterdir())


def assert_groups_and_frozen_tower_kept(saved: dict, resumed: dict, pretrained: Path) -> None:
    lrs = [lr for lr, _ in saved["groups"]]
    assert len(set(lrs)) >= 3, "the recipe should make groups with different learning rates"
    assert resumed["groups"] == saved["groups"]
    image = {k: v for k, v in torch.load(pretrained).items() if k.startswith("visual.")}
    after = consolidated_state_dict(resumed["dir"] / "default" / "checkpoints", f"step-{STEPS}")
    assert image and all(torch.equal(after[k], v) for k, v in image.items())


def test_a_zero2_checkpoint_resumes_on_another_world_size(pretrained, tmp_path):
    """ZeRO-2 shards its optimizer state only; the same conversion re-cuts it. The saved run itself
    is the reference: the layout changes nothing in what is computed (the test above), and wrong
    moments or step counts would show in the losses from the second resumed step on."""
    saved = run(tmp_path / "saved", SAVED_LAYOUT, pretrained, stage=2)
    checkpoint = saved["dir"] / "default" / "checkpoints" / f"step-{RESUMED_FROM}"
    resumed = run(tmp_path / "resumed", LAYOUTS["1 rank"], pretrained, resume=str(checkpoint), stage=2)
    assert sorted(resumed["losses"]) == list(range(RESUMED_FROM + 1, STEPS + 1))
    for step, loss in resumed["losses"].items():
        assert abs(loss - saved["losses"][step]) <= 1e-5, (step, loss, saved["losses"][step])
    assert_groups_and_frozen_tower_kept(saved, resumed, pretrained)

