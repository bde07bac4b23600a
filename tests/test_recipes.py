"""Every shipped recipe (launch/recipes/*.yaml) is documented, validates, follows the recommended
learning-rate table and trains 2 steps on 2 CPU ranks.

The recipes name real architectures (ViT-B-16, xlm-roberta-base-ViT-B-32, ...) and pretrained
weights, and read data from paths that exist only on a training cluster. No weights can be
downloaded here, so the runs swap in the tiny model (`dsclip-tiny`: 2 vision layers, 1 text
layer, 32 px, patch 8, context 16) with random weights, and synthetic data; everything else in
the recipe (freeze strategy, layer decay, activation checkpointing, loss, schedule) runs as
written. `tiny_overrides` is that swap, with the per-recipe part in `FIT_TO_TINY`.
"""
import math
from pathlib import Path

import pytest
import torch
import yaml

from dsclip.config import flat_keys, load_config, read_recipe, to_dict
from dsclip.model.build import build_model
from dsclip.model.freeze import FULL_WARMUP_STEPS, apply_freeze, recommended_lr_range
from dsclip.model.run_folder import consolidated_state_dict, read_pointer
from dsclip_testutils import REPO, ds_config, launch, read_metrics

RECIPE_DIR = REPO / "launch" / "recipes"
RECIPES = sorted(p.name for p in RECIPE_DIR.glob("*.yaml"))

# Same for every recipe: tiny model, synthetic data, 2 steps, no evaluation, nothing written but
# config.yaml, metrics.jsonl and the final checkpoint.
COMMON_TINY = [
    "model.name=dsclip-tiny",
    "model.context_length=null",  # tiny's own 16 tokens
    "data.kind=synthetic",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.max_steps=2",
    "train.save_every=0",
    "train.export=false",
    "optim.warmup_steps=1",
    "eval.at_start=false",
    "eval.at_end=false",
    "eval.zeroshot=[]",  # the recipes' eval sets live on the cluster
    "eval.retrieval=[]",
    "eval.forgetting.general=[]",
    "logging.log_every=1",
    "logging.report_to=[jsonl]",
    "logging.plots=false",
]

# What each recipe needs beyond COMMON_TINY to fit the tiny model. Tiny's towers have 4 image
# groups (embed, block 0, block 1 + ln_post, proj) and 3 text groups (embed, block 0 + ln_final,
# projection): unlocked counts are cut to leave the embeddings frozen. Every recipe must be listed.
FIT_TO_TINY: dict[str, list[str]] = {
    "conservative.yaml": ["freeze.image.unlocked_groups=3", "freeze.text.unlocked_layers=2"],
    "from_scratch.yaml": [],
    "frozen_image.yaml": [],
    "frozen_text.yaml": [],
    "high_res.yaml": ["model.image_size=64"],  # still a resize of tiny's 32 px grid (4x4 -> 8x8 patches)
    "lit.yaml": [],
    "medical.yaml": [],
    "multilingual.yaml": [],  # tiny's built-in text tower replaces XLM-RoBERTa (needs the HF hub)
    "partial.yaml": ["freeze.image.unlocked_groups=3", "freeze.text.unlocked_layers=2"],
    "production.yaml": [],
    "quick.yaml": ["freeze.text.unlocked_layers=2"],
    "satellite.yaml": [],
    "wiseft_fashion.yaml": [],  # already tiny: the WiSE-FT example's stages
    "wiseft_shapes.yaml": [],
}

# Recipes whose lr is deliberately outside the fine-tuning table, and why.
OUTSIDE_THE_LR_TABLE = {
    "from_scratch.yaml": "random init: open_clip's from-scratch lr",
    "wiseft_shapes.yaml": "trains the tiny model from random weights",
    "wiseft_fashion.yaml": "a tiny example meant to forget its first task, so WiSE-FT has something to trade",
}


def tiny_overrides(recipe: str) -> list[str]:
    """Overrides that run `recipe` with the tiny model and synthetic data (no weights, no data paths)."""
    raw = read_recipe(str(RECIPE_DIR / recipe))
    pretrained = ["model.pretrained=null"] if raw.get("model", {}).get("pretrained") else []
    # WiSE-FT mixes with model.pretrained, which the tiny run does not have.
    wise_ft = ["wise_ft.enabled=false"] if raw.get("wise_ft", {}).get("enabled") else []
    return COMMON_TINY + pretrained + wise_ft + FIT_TO_TINY[recipe]


def test_every_recipe_has_a_tiny_fit_entry():
    assert RECIPES, f"no recipes in {RECIPE_DIR}"
    assert sorted(FIT_TO_TINY) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_loads_and_validates(recipe):
    cfg = load_config(str(RECIPE_DIR / recipe))
    assert cfg.name == Path(recipe).stem, "outputs go to outputs/<recipe name>"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_documented_at_its_top(recipe):
    lines = (RECIPE_DIR / recipe).read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for part in ("Use when:", "Sets:", "Run:"):
        assert f"# {part}" in text, f"{recipe}: header lacks a '{part}' line"
    assert f"--recipe launch/recipes/{recipe}" in text


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - set(OUTSIDE_THE_LR_TABLE)))
def test_recipe_learning_rates_follow_the_recommended_table(recipe):
    cfg = load_config(str(RECIPE_DIR / recipe))
    low, high = recommended_lr_range(cfg.freeze.strategy)
    for key, lr in (("optim.lr", cfg.optim.lr), ("optim.image.lr", cfg.optim.image.lr),
                    ("optim.text.lr", cfg.optim.text.lr)):
        if lr is not None:
            assert low <= lr <= high, f"{recipe}: {key}={lr:g} outside {low:g}..{high:g} for {cfg.freeze.strategy}"
    if cfg.freeze.strategy == "full":
        assert FULL_WARMUP_STEPS[0] <= cfg.optim.warmup_steps <= FULL_WARMUP_STEPS[1], recipe
    assert cfg.model.pretrained, f"{recipe}: a fine-tune recipe starts from pretrained weights"


def test_from_scratch_recipe_has_no_pretrained_weights():
    cfg = load_config(str(RECIPE_DIR / "from_scratch.yaml"))
    assert cfg.model.pretrained is None and cfg.freeze.strategy == "full"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_with_the_tiny_overrides(recipe):
    overrides = tiny_overrides(recipe)
    cfg = flat_keys(to_dict(load_config(str(RECIPE_DIR / recipe), overrides)))
    original = flat_keys(to_dict(load_config(str(RECIPE_DIR / recipe))))
    wanted = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in overrides)}
    # Every swap reached the config...
    assert {key: cfg[key] for key in wanted} == wanted
    # ...and nothing else moved: the strategy, lrs, layer decay, loss and schedule run as the recipe wrote them.
    changed = {key for key in original.keys() | cfg.keys() if original.get(key) != cfg.get(key)}
    assert changed <= wanted.keys(), sorted(changed - wanted.keys())


def initial_weights(cfg) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The tiny model a run of `cfg` starts from (dsclip/training/components.py seeds, builds and
    freezes it so) and the names the recipe's freeze strategy leaves trainable."""
    torch.manual_seed(cfg.seed)
    clip = build_model(cfg.model).module.clip
    apply_freeze(clip, cfg.freeze)
    return ({name: p.detach().clone() for name, p in clip.named_parameters()},
            {name for name, p in clip.named_parameters() if p.requires_grad})


def run_two_steps(recipe: str, tmp_path: Path) -> None:
    """2 steps of `recipe` on 2 ranks: finite losses, and after them every parameter the recipe
    freezes still holds its initial value while the trainable ones have moved."""
    out = tmp_path / "out"
    args = ["--deepspeed_config", str(ds_config(3, tmp_path)), "--recipe", f"launch/recipes/{recipe}",
            "--output-dir", str(out)]
    for item in tiny_overrides(recipe):
        args += ["--set", item]
    result = launch(args, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = out / Path(recipe).stem
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in records), records
    cfg = load_config(str(RECIPE_DIR / recipe), tiny_overrides(recipe))
    initial, trainable = initial_weights(cfg)
    checkpoints = run_dir / "checkpoints"
    final = consolidated_state_dict(checkpoints, read_pointer(checkpoints / "latest"))
    assert final.keys() >= initial.keys()
    moved = {name for name, value in initial.items() if not torch.equal(final[name], value)}
    assert all(torch.isfinite(final[name]).all() for name in initial)
    frozen = initial.keys() - trainable
    assert not moved & frozen, f"{recipe}: frozen parameters changed: {sorted(moved & frozen)[:5]}"
    # What each strategy promises, independently of dsclip's freeze code (the tiny fits keep the
    # embeddings of a locked tower frozen): LiT locks the whole image tower, full locks nothing.
    strategy = cfg.freeze.strategy
    if strategy in ("frozen_image", "partial", "lit"):
        assert "visual.conv1.weight" in frozen, f"{recipe}: {strategy} trained the image embedding"
    if strategy in ("frozen_text", "partial"):
        assert "token_embedding.weight" in frozen, f"{recipe}: {strategy} trained the text embedding"
    if strategy == "lit":
        assert {name for name in initial if name.startswith("visual.")} <= frozen, recipe
    if strategy == "full" and not cfg.freeze.exclude:
        assert not frozen, f"{recipe}: strategy full froze {sorted(frozen)[:5]}"
    # a trainable matrix gets a gradient or weight decay in every step; a 1-D tensor may get neither
    still = {name for name in trainable - moved if initial[name].ndim >= 2}
    assert not still, f"{recipe}: trainable parameters did not move: {sorted(still)[:5]}"


# Default run: one recipe exercising the most machinery (partial freeze, per-tower layer decay);
# test_multinode.py runs medical.yaml on 2 ranks too. The slow test runs all of them.
@pytest.mark.multiprocess
def test_representative_recipe_runs_two_steps_on_two_ranks(tmp_path):
    run_two_steps("conservative.yaml", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_two_steps_on_two_ranks(recipe, tmp_path):
    run_two_steps(recipe, tmp_path)
