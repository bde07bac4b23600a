"""DeepSpeed config merge, optimizer param groups and the LR schedule."""
import json

import open_clip
import pytest
import torch

from dsclip.config import load_config
from dsclip.errors import DeepSpeedConfigError
from dsclip.training.config import OptimConfig, TowerOptimConfig
from dsclip.training.ds_config import check_sections, for_run, load_ds_config, recipe_values, resolve_ds_config
from dsclip.training.optim import lr_factor, param_groups
from dsclip_testutils import REPO


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_resolve_every_auto_from_the_recipe(name):
    cfg = load_config(None, ["data.batch_size=16", "train.grad_accum_steps=2", "optim.lr=1e-4"])
    ds = for_run(shipped(name), cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4
    assert ds["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1}
    assert ds["bf16"]["enabled"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert "auto" not in json.dumps(ds)
    check_sections(ds)


def test_explicit_contradictions_are_all_reported_with_both_places():
    cfg = load_config(None, ["data.batch_size=16"])
    ds = {**shipped("zero3.json"), "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5}
    with pytest.raises(DeepSpeedConfigError) as err:
        resolve_ds_config(ds, recipe_values(cfg, world_size=1))
    message = str(err.value)
    assert "train_micro_batch_size_per_gpu=8 in the DeepSpeed config but data.batch_size=16 in the recipe" in message
    assert "gradient_clipping=0.5 in the DeepSpeed config but train.grad_clip=1.0 in the recipe" in message


def test_explicit_values_equal_to_the_recipe_are_accepted():
    cfg = load_config(None, ["data.batch_size=16"])
    ds = {**shipped("zero3.json"), "train_micro_batch_size_per_gpu": 16}
    assert resolve_ds_config(ds, recipe_values(cfg, world_size=1))["train_micro_batch_size_per_gpu"] == 16


def test_foreign_optimizer_or_scheduler_in_ds_config_is_refused():
    with pytest.raises(DeepSpeedConfigError, match="optimizer.type='Lamb'"):
        check_sections({"optimizer": {"type": "Lamb"}})
    with pytest.raises(DeepSpeedConfigError, match="the schedule comes from the recipe"):
        check_sections({"scheduler": {"type": "WarmupLR"}})


def test_missing_and_malformed_ds_config_files(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"DeepSpeed config not found: .*missing.json \(pass --deepspeed_config"):
        load_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="is not valid JSON"):
        load_ds_config(str(bad))


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1)
    factors = [lr_factor(cfg, s, total_steps=110) for s in range(110)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(cfg, 110, total_steps=110) == pytest.approx(0.1)


def test_const_and_const_cooldown_schedules():
    const = OptimConfig(lr=1.0, schedule="const", warmup_steps=2)
    assert [lr_factor(const, s, 10) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    cool = OptimConfig(lr=1.0, schedule="const-cooldown", warmup_steps=0, cooldown_steps=4)
    assert [lr_factor(cool, s, 10) for s in (5, 6, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25])


def tiny_clip():
    return open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)


def test_param_groups_exclude_1d_params_from_weight_decay_like_open_clip():
    clip = tiny_clip()
    groups = param_groups(clip, OptimConfig(lr=1e-3, weight_decay=0.2))
    names = {id(p): n for n, p in clip.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    assert {"logit_scale", "ln_final.weight", "ln_final.bias", "visual.class_embedding"} <= no_decay
    assert {"token_embedding.weight", "visual.conv1.weight", "text_projection"} <= decay
    assert no_decay | decay == set(names.values())


def test_param_groups_skip_frozen_and_apply_tower_lr_and_layer_decay():
    clip = tiny_clip()
    clip.lock_text_tower(unlocked_layers=0)
    cfg = OptimConfig(lr=1e-3, image=TowerOptimConfig(lr=1e-4, layer_decay=0.5))
    groups = param_groups(clip, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(clip.named_parameters())
    assert id(params["token_embedding.weight"]) not in lr_of  # frozen: no optimizer state
    depth = len(clip.visual.transformer.resblocks)
    assert lr_of[id(params["visual.proj"])] == pytest.approx(1e-4)  # head: decay^0
    assert lr_of[id(params["visual.conv1.weight"])] == pytest.approx(1e-4 * 0.5 ** (depth + 1))
    assert lr_of[id(params["logit_scale"])] == pytest.approx(1e-3)
