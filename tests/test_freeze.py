"""Freeze strategies: parity with open_clip's lock functions, strategy table, globs, idempotence, summary."""
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from dsclip.model.config import FreezeConfig, ImageFreezeConfig, TextFreezeConfig
from dsclip_testutils import require_module
from dsclip.model.freeze import apply_freeze, check_lr, format_summary, recommended_lr_range, summarize_freeze

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "dsclip" / "model" / "configs"
VISION = dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16)
TEXT = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=3)


def small_clip() -> torch.nn.Module:
    return CLIP(16, VISION, TEXT, nonscalar_logit_scale=True)


def small_custom_text_clip() -> torch.nn.Module:
    return CustomTextCLIP(16, VISION, TEXT, nonscalar_logit_scale=True)


def dsclip_tiny() -> torch.nn.Module:
    open_clip.add_model_config(MODEL_CONFIGS)
    return open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)


BUILDERS = {"small": small_clip, "custom_text": small_custom_text_clip, "dsclip_tiny": dsclip_tiny}


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("groups", [0, 1, 2])
def test_frozen_image_equals_open_clip_lock_image_tower(builder, groups):
    ours, reference = BUILDERS[builder](), BUILDERS[builder]()
    apply_freeze(ours, FreezeConfig("frozen_image", image=ImageFreezeConfig(unlocked_groups=groups)))
    reference.lock_image_tower(unlocked_groups=groups)
    assert trainable(ours) == trainable(reference)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_frozen_text_equals_open_clip_lock_text_tower(builder, layers):
    ours, reference = BUILDERS[builder](), BUILDERS[builder]()
    apply_freeze(ours, FreezeConfig("frozen_text", text=TextFreezeConfig(unlocked_layers=layers)))
    reference.lock_text_tower(unlocked_layers=layers, freeze_layer_norm=True)
    assert trainable(ours) == trainable(reference)


@pytest.mark.parametrize("groups,layers", [(1, 1), (2, 3), (6, 5)])
def test_partial_equals_both_open_clip_locks(groups, layers):
    ours, reference = small_clip(), small_clip()
    apply_freeze(ours, FreezeConfig("partial", image=ImageFreezeConfig(groups), text=TextFreezeConfig(layers)))
    reference.lock_image_tower(unlocked_groups=groups)
    reference.lock_text_tower(unlocked_layers=layers)
    assert trainable(ours) == trainable(reference)


def test_strategy_table_on_a_small_vit_clip():
    model = small_clip()
    everything = names(model)
    visual = {n for n in everything if n.startswith("visual.")}
    text = everything - visual - {"logit_scale"}
    expected = [
        (FreezeConfig("full"), everything),
        (FreezeConfig("lit"), text | {"logit_scale"}),
        (FreezeConfig("frozen_image"), text | {"logit_scale"}),
        (FreezeConfig("frozen_text"), visual | {"logit_scale"}),
        (FreezeConfig("partial", image=ImageFreezeConfig(1), text=TextFreezeConfig(1)),
         {"visual.proj", "text_projection", "logit_scale"}),
        (FreezeConfig("partial", image=ImageFreezeConfig(2), text=TextFreezeConfig(2)),
         {"visual.proj", "text_projection", "logit_scale"}
         | {n for n in everything if n.startswith(("visual.transformer.resblocks.3.", "visual.ln_post.",
                                                   "transformer.resblocks.2.", "ln_final."))}),
    ]
    for cfg, want in expected:
        summary = apply_freeze(model, cfg)
        assert trainable(model) == want, cfg.strategy
        assert set(summary.trainable_names) == want


def test_freeze_layer_norm_false_keeps_text_layer_norms_trainable():
    ours, reference = small_clip(), small_clip()
    apply_freeze(ours, FreezeConfig("frozen_text", text=TextFreezeConfig(1, freeze_layer_norm=False)))
    reference.lock_text_tower(unlocked_layers=1)
    text_norms = {n for n in names(ours) if n.startswith("ln_final.") or ".ln_1." in n or ".ln_2." in n}
    text_norms = {n for n in text_norms if not n.startswith("visual.")}
    assert len(text_norms) == 2 + 3 * 4
    assert trainable(ours) == trainable(reference) | text_norms


def test_include_and_exclude_globs_with_exclude_winning():
    model = small_clip()
    cfg = FreezeConfig("frozen_image", include=["visual.ln_post.*", "visual.transformer.resblocks.3.*"],
                       exclude=["logit_scale", "visual.transformer.resblocks.3.mlp.*"])
    apply_freeze(model, cfg)
    got = trainable(model)
    assert {"visual.ln_post.weight", "visual.ln_post.bias", "visual.transformer.resblocks.3.ln_1.weight"} <= got
    assert "logit_scale" not in got
    assert not any(n.startswith("visual.transformer.resblocks.3.mlp.") for n in got)
    assert not any(n.startswith(("visual.conv1", "visual.proj", "visual.transformer.resblocks.2.")) for n in got)
    assert "token_embedding.weight" in got


def test_glob_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="freeze.include pattern 'visual.ln_pst.*' matches no parameter"):
        apply_freeze(small_clip(), FreezeConfig("full", include=["visual.ln_pst.*"]))


def test_apply_freeze_is_idempotent_and_forgets_the_previous_mask():
    partial = FreezeConfig("partial", image=ImageFreezeConfig(2), text=TextFreezeConfig(1), exclude=["logit_scale"])
    model = small_clip()
    apply_freeze(model, partial)
    once = trainable(model)
    apply_freeze(model, partial)
    assert trainable(model) == once

    apply_freeze(model, FreezeConfig("lit"))
    fresh = small_clip()
    apply_freeze(fresh, FreezeConfig("lit"))
    assert trainable(model) == trainable(fresh)


@pytest.mark.parametrize("cfg,message", [
    (FreezeConfig("partial", image=ImageFreezeConfig(1)), "partial needs"),
    (FreezeConfig("lit", image=ImageFreezeConfig(2)), "LiT locks the whole image tower"),
    (FreezeConfig("full", text=TextFreezeConfig(2)), "freeze.text options have no effect"),
    (FreezeConfig("frozen_text", image=ImageFreezeConfig(freeze_bn_stats=True)), "freeze.image options"),
    (FreezeConfig("frozen_image", image=ImageFreezeConfig(-1)), "unlocked_groups=-1"),
    (FreezeConfig("everything"), "freeze.strategy='everything' is unknown"),
    (FreezeConfig("full", exclude=[""]), "empty pattern"),
])
def test_invalid_configs_are_rejected(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_more_groups_than_the_tower_has_is_an_error():
    with pytest.raises(ValueError, match="unlocked_groups=7 but the image tower has only 6 groups"):
        apply_freeze(small_clip(), FreezeConfig("frozen_image", image=ImageFreezeConfig(7)))
    with pytest.raises(ValueError, match="unlocked_layers=6 but the text tower has only 5 groups"):
        apply_freeze(small_clip(), FreezeConfig("frozen_text", text=TextFreezeConfig(6)))


def test_summary_counts_and_unlocked_layers():
    model = small_clip()
    cfg = FreezeConfig("partial", image=ImageFreezeConfig(3), text=TextFreezeConfig(1))
    summary = apply_freeze(model, cfg)
    towers = {t.tower: t for t in summary.towers}
    assert sum(t.total for t in summary.towers) == sum(p.numel() for p in model.parameters())
    assert towers["image"].trainable == sum(p.numel() for n, p in model.named_parameters()
                                            if n.startswith("visual.") and p.requires_grad)
    assert towers["image"].unlocked() == "blocks 2-3, head"
    assert towers["text"].unlocked() == "head (part)"  # text_projection only, ln_final stays locked
    assert towers["other"].unlocked() == "all"
    table = format_summary(summary)
    assert table.splitlines()[0] == "freeze strategy: partial"
    assert "blocks 2-3, head" in table and "total" in table
    apply_freeze(model, FreezeConfig("lit"))
    assert {t.tower: t.unlocked() for t in summarize_freeze(model).towers} == {
        "image": "none", "text": "all", "other": "all"}


def test_summary_counts_full_size_of_zero3_partitioned_parameters():
    model = small_clip()
    model.visual.proj.ds_shape = torch.Size([100, 100])  # what deepspeed.zero.Init attaches to a sharded parameter
    image = next(t for t in summarize_freeze(model).towers if t.tower == "image")
    assert image.total == sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual.")) \
        - model.visual.proj.numel() + 10_000


def test_resnet_image_tower_locks_through_open_clip_with_bn_stats():
    model = CLIP(16, dict(image_size=32, layers=[1, 1, 1, 1], width=16, head_width=16), TEXT)
    summary = apply_freeze(model, FreezeConfig("lit", image=ImageFreezeConfig(freeze_bn_stats=True)))
    assert not any(n.startswith("visual.") for n in trainable(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
    image = next(t for t in summary.towers if t.tower == "image")
    assert image.layers == [] and image.unlocked() == "none"


def test_recommended_lr_and_full_fine_tune_warning():
    assert recommended_lr_range("full") == (1e-5, 1e-4)
    assert recommended_lr_range("partial") == (5e-5, 5e-4)
    assert recommended_lr_range("lit") == recommended_lr_range("frozen_image") == (1e-4, 1e-3)
    assert check_lr("full", 1e-4) is None
    assert check_lr("lit", 5e-4) is None
    warning = check_lr("full", 3e-4)
    assert warning is not None and "lr=0.0003" in warning and "1000-5000 warmup" in warning
    with pytest.raises(ValueError, match="unknown"):
        recommended_lr_range("nope")


# --- HF text towers (open_clip CustomTextCLIP with a transformers encoder) ---

def hf_clip(tmp_path: Path, model_type: str) -> torch.nn.Module:
    transformers = require_module("transformers")
    config_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[model_type]
    path = tmp_path / model_type
    config_cls(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=40).save_pretrained(path)
    pooler = "cls_pooler" if model_type == "bert" else "mean_pooler"  # bert: the HF pooler has weights
    text_cfg = dict(hf_model_name=str(path), hf_model_pretrained=False, hf_proj_type="linear",
                    hf_pooler_type=pooler)
    torch.manual_seed(0)
    return CustomTextCLIP(16, VISION, text_cfg)


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("freeze_layer_norm", [True, False])
def test_hf_text_lock_equals_open_clip_hf_lock(tmp_path, layers, freeze_layer_norm):
    ours, reference = hf_clip(tmp_path, "roberta"), hf_clip(tmp_path, "roberta")
    apply_freeze(ours, FreezeConfig("frozen_text", text=TextFreezeConfig(layers, freeze_layer_norm)))
    reference.lock_text_tower(unlocked_layers=layers, freeze_layer_norm=freeze_layer_norm)
    assert trainable(ours) == trainable(reference)


def test_hf_bert_text_lock_where_open_clip_fails(tmp_path):
    model, reference = hf_clip(tmp_path, "bert"), hf_clip(tmp_path, "bert")
    apply_freeze(model, FreezeConfig("frozen_text"))
    reference.lock_text_tower(unlocked_layers=0)
    assert trainable(model) == trainable(reference)

    with pytest.raises(KeyError):  # open_clip's HFTextEncoder.lock has no layer table for bert
        reference.lock_text_tower(unlocked_layers=1)
    summary = apply_freeze(model, FreezeConfig("frozen_text", text=TextFreezeConfig(1)))
    text = {n for n in trainable(model) if n.startswith("text.")}
    assert text == {n for n in names(model)
                    if n.startswith(("text.transformer.encoder.layer.2.", "text.transformer.pooler.", "text.proj."))}
    assert next(t for t in summary.towers if t.tower == "text").unlocked() == "block 2, head"
