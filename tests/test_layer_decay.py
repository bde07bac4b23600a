"""Layer partition and layer-wise lr decay (EVA-CLIP numbering) on open_clip CLIP models."""
import pytest
from open_clip.model import CLIP, CustomTextCLIP

from dsclip.model.partition import LayerId, LayerPartition, layer_label
from dsclip.training.config import LayerDecayConfig
from dsclip.training.optim import layer_lr_scales, lr_scale
from dsclip_testutils import require_module

VISION = dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16)
TEXT = dict(context_length=8, vocab_size=100, width=32, heads=2, layers=3)


def small_clip() -> CLIP:
    return CLIP(16, VISION, TEXT, nonscalar_logit_scale=True)


@pytest.mark.parametrize("name,expected", [
    ("visual.conv1.weight", ("image", 0)),
    ("visual.class_embedding", ("image", 0)),
    ("visual.positional_embedding", ("image", 0)),
    ("visual.ln_pre.weight", ("image", 0)),
    ("visual.transformer.resblocks.0.attn.in_proj_weight", ("image", 1)),
    ("visual.transformer.resblocks.3.mlp.c_fc.bias", ("image", 4)),
    ("visual.ln_post.bias", ("image", 5)),
    ("visual.proj", ("image", 5)),
    ("token_embedding.weight", ("text", 0)),
    ("positional_embedding", ("text", 0)),
    ("transformer.resblocks.0.ln_1.weight", ("text", 1)),
    ("transformer.resblocks.2.mlp.c_proj.weight", ("text", 3)),
    ("ln_final.weight", ("text", 4)),
    ("text_projection", ("text", 4)),
    ("logit_scale", ("other", 0)),
])
def test_layer_ids_of_a_vit_clip(name, expected):
    partition = LayerPartition(small_clip())
    layer = partition.layer_id(name)
    assert (layer.tower, layer.index) == expected
    assert layer.depth == {"image": 4, "text": 3, "other": 0}[expected[0]]


def test_custom_text_clip_numbers_its_nested_text_tower():
    partition = LayerPartition(CustomTextCLIP(16, VISION, TEXT))
    assert partition.layer_id("text.token_embedding.weight") == LayerId("text", 0, 3)
    assert partition.layer_id("text.transformer.resblocks.1.attn.out_proj.weight") == LayerId("text", 2, 3)
    assert partition.layer_id("text.ln_final.bias") == LayerId("text", 4, 3)
    assert partition.layer_id("text.text_projection") == LayerId("text", 4, 3)


def test_partition_covers_every_parameter_once_in_order():
    model = small_clip()
    partition = LayerPartition(model)
    image, text = partition.layers("image"), partition.layers("text")
    assert [layer_label(partition.layer_id(layer[0])) for layer in image] == [
        "embed", "block 0", "block 1", "block 2", "block 3", "head"]
    listed = [n for layer in image + text for n in layer] + ["logit_scale"]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("groups", range(2, 7))
def test_open_clip_image_lock_groups_are_suffixes_of_the_partition(groups):
    # the partition freeze summaries use; open_clip's N=1 (proj without ln_post) is the one split layer
    model = small_clip()
    model.lock_image_tower(unlocked_groups=groups)
    partition = LayerPartition(model)
    unlocked = {n for n, p in model.named_parameters() if n.startswith("visual.") and p.requires_grad}
    assert unlocked == {n for n in partition.names if partition.tower(n) == "image"
                        and partition.layer_id(n).index >= 4 + 2 - groups}


def test_lr_scales_decay_per_tower_from_the_head():
    model = small_clip()
    scales = layer_lr_scales(model, LayerDecayConfig(image=0.5, text=0.8))
    assert scales["visual.proj"] == scales["visual.ln_post.weight"] == 1.0
    assert scales["visual.transformer.resblocks.3.ln_1.weight"] == 0.5
    assert scales["visual.transformer.resblocks.0.ln_1.weight"] == 0.5 ** 4
    assert scales["visual.conv1.weight"] == 0.5 ** 5
    assert scales["text_projection"] == 1.0
    assert scales["transformer.resblocks.2.attn.in_proj_weight"] == pytest.approx(0.8)
    assert scales["token_embedding.weight"] == pytest.approx(0.8 ** 4)
    assert scales["logit_scale"] == 1.0
    assert lr_scale(LayerId("image", 2, 4), LayerDecayConfig(image=0.9)) == pytest.approx(0.9 ** 3)


def test_lr_scales_skip_frozen_parameters():
    model = small_clip()
    model.lock_image_tower()
    scales = layer_lr_scales(model, LayerDecayConfig(image=0.5, text=0.5))
    assert not any(n.startswith("visual.") for n in scales)
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_resnet_tower_decays_only_when_decay_is_disabled():
    model = CLIP(16, dict(image_size=32, layers=[1, 1, 1, 1], width=16, head_width=16), TEXT)
    scales = layer_lr_scales(model, LayerDecayConfig(image=1.0, text=0.5))
    assert scales["visual.conv1.weight"] == 1.0
    assert scales["token_embedding.weight"] == 0.5 ** 4
    with pytest.raises(ValueError, match="the image tower has no known layer structure"):
        layer_lr_scales(model, LayerDecayConfig(image=0.9))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_decay_outside_zero_one_is_rejected(value):
    with pytest.raises(ValueError, match=f"layer_decay.text={value} must be in"):
        LayerDecayConfig(text=value).validate()


def test_hf_text_tower_layers(tmp_path):
    transformers = require_module("transformers")
    path = tmp_path / "bert"
    transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=40).save_pretrained(path)
    model = CustomTextCLIP(16, VISION, dict(hf_model_name=str(path), hf_model_pretrained=False,
                                            hf_proj_type="linear", hf_pooler_type="cls_pooler"))
    partition = LayerPartition(model)
    assert partition.layer_id("text.transformer.embeddings.word_embeddings.weight") == LayerId("text", 0, 3)
    assert partition.layer_id("text.transformer.encoder.layer.1.output.dense.weight") == LayerId("text", 2, 3)
    assert partition.layer_id("text.transformer.pooler.dense.weight") == LayerId("text", 4, 3)
    assert partition.layer_id("text.proj.weight") == LayerId("text", 4, 3)
    scales = layer_lr_scales(model, LayerDecayConfig(text=0.5))
    assert scales["text.transformer.embeddings.word_embeddings.weight"] == 0.5 ** 4
