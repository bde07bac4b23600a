"""Position-embedding resize: parity with open_clip's resize-on-load, prefix tokens, non-square grids."""
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP, resize_pos_embed, resize_text_pos_embed as oc_resize_text

from dsclip.model.pos_embed import (fit_pos_embeds, grid_for, resize_text_pos_embed, resize_vision_pos_embed,
                               vision_grid)

VISION = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)


def tiny_clip(image_size=32, context_length=16, custom_text=False) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = CustomTextCLIP if custom_text else CLIP
    return cls(16, dict(VISION, image_size=image_size), dict(TEXT, context_length=context_length))


@pytest.fixture(scope="module")
def vit_b32_state_dict() -> dict:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").state_dict()  # random init, no download


def test_vit_b32_224_to_336_equals_open_clip_resize_on_load(vit_b32_state_dict, caplog):
    model_336 = open_clip.create_model("ViT-B-32", force_image_size=336)
    reference = dict(vit_b32_state_dict)
    resize_pos_embed(reference, model_336)

    with caplog.at_level(logging.INFO, logger="dsclip.model.pos_embed"):
        ours = resize_vision_pos_embed(vit_b32_state_dict, grid_for(model_336))
    assert "grid 7x7 -> 10x10 (1 prefix tokens" in caplog.text
    assert ours["visual.positional_embedding"].shape == (101, 768)
    assert torch.equal(ours["visual.positional_embedding"], reference["visual.positional_embedding"])
    assert torch.equal(fit_pos_embeds(vit_b32_state_dict, model_336)["visual.positional_embedding"],
                       reference["visual.positional_embedding"])
    # pure: the input dict keeps its old tensor
    assert vit_b32_state_dict["visual.positional_embedding"].shape == (50, 768)
    model_336.load_state_dict(ours)


def test_square_to_non_square_grid_equals_open_clip():
    source = tiny_clip(32).state_dict()
    target = tiny_clip((32, 48))
    reference = dict(source)
    resize_pos_embed(reference, target)
    ours = fit_pos_embeds(source, target)
    assert grid_for(target) == (4, 6)
    assert torch.equal(ours["visual.positional_embedding"], reference["visual.positional_embedding"])
    target.load_state_dict(ours)


def test_non_square_old_grid_keeps_rows_and_columns_apart():
    rows, cols, width = 4, 6, 3
    row_values = torch.arange(rows, dtype=torch.float32) ** 2
    grid = row_values[:, None, None].expand(rows, cols, width)  # constant along each row
    prefix = torch.full((1, width), -7.0)
    state = {"visual.positional_embedding": torch.cat([prefix, grid.reshape(rows * cols, width)])}

    out = resize_vision_pos_embed(state, new_grid=(8, 3), old_grid=(rows, cols))["visual.positional_embedding"]
    assert out.shape == (1 + 8 * 3, width)
    assert torch.equal(out[:1], prefix)
    new = out[1:].reshape(8, 3, width)
    assert torch.allclose(new, new[:, :1].expand_as(new), atol=1e-5), "columns must stay constant"
    # oracle: the same interpolation of one (rows, cols) channel image, laid out as an image
    image = row_values[None, None, :, None].expand(1, 1, rows, cols)
    expected = F.interpolate(image, size=(8, 3), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    for channel in range(width):
        assert torch.equal(new[:, :, channel], expected)


def test_prefix_tokens_are_derived_from_the_shape():
    pos = tiny_clip(32).state_dict()["visual.positional_embedding"]  # 1 class token + 4x4
    register = torch.randn(1, pos.shape[1])
    two_prefix = {"visual.positional_embedding": torch.cat([pos[:1], register, pos[1:]])}
    one_prefix = {"visual.positional_embedding": pos}

    out_two = resize_vision_pos_embed(two_prefix, (6, 6))["visual.positional_embedding"]
    out_one = resize_vision_pos_embed(one_prefix, (6, 6))["visual.positional_embedding"]
    assert out_two.shape == (2 + 36, pos.shape[1])
    assert torch.equal(out_two[:2], two_prefix["visual.positional_embedding"][:2])
    assert torch.equal(out_two[2:], out_one[1:])


def test_same_grid_returns_an_equal_copy():
    state = tiny_clip(32).state_dict()
    out = resize_vision_pos_embed(state, (4, 4))
    assert out is not state
    assert out["visual.positional_embedding"] is state["visual.positional_embedding"]


def test_bf16_is_interpolated_in_fp32_and_cast_back():
    state = tiny_clip(32).state_dict()
    bf16 = {"visual.positional_embedding": state["visual.positional_embedding"].bfloat16()}
    out = resize_vision_pos_embed(bf16, (6, 6))["visual.positional_embedding"]
    ref = resize_vision_pos_embed(
        {"visual.positional_embedding": bf16["visual.positional_embedding"].float()}, (6, 6))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref["visual.positional_embedding"].bfloat16())


@pytest.mark.parametrize("custom_text", [False, True])
def test_text_context_length_change_equals_open_clip(custom_text, caplog):
    source = tiny_clip(context_length=16, custom_text=custom_text).state_dict()
    target = tiny_clip(context_length=24, custom_text=custom_text)
    key = "text.positional_embedding" if custom_text else "positional_embedding"
    reference = dict(source)
    oc_resize_text(reference, target)

    with caplog.at_level(logging.INFO, logger="dsclip.model.pos_embed"):
        ours = resize_text_pos_embed(source, 24)
    assert f"resizing {key}: 16 -> 24 positions" in caplog.text
    assert torch.equal(ours[key], reference[key])
    assert torch.equal(fit_pos_embeds(source, target)[key], reference[key])
    assert source[key].shape[0] == 16
    target.load_state_dict(ours)


def test_grid_for_model_and_configs(caplog):
    b32 = open_clip.get_model_config("ViT-B-32")
    assert grid_for(b32) == (7, 7)
    assert grid_for(b32["vision_cfg"], (224, 320)) == (7, 10)
    with caplog.at_level(logging.WARNING, logger="dsclip.model.pos_embed"):
        assert grid_for(b32, 336) == (10, 10)
    assert "not a multiple of patch size" in caplog.text
    assert grid_for(tiny_clip(32)) == (4, 4)
    assert grid_for(tiny_clip(32), 64) == (8, 8)
    assert vision_grid((30, 64), 8) == (3, 8)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="no 'visual.positional_embedding'"):
        resize_vision_pos_embed({}, (4, 4))
    state = {"visual.positional_embedding": torch.zeros(17, 8)}
    with pytest.raises(ValueError, match="fewer than the old grid 5x5"):
        resize_vision_pos_embed(state, (4, 4), old_grid=(5, 5))
    with pytest.raises(ValueError, match="new_grid"):
        resize_vision_pos_embed(state, (0, 4))
    with pytest.raises(ValueError, match="no patch_size"):
        grid_for({"vision_cfg": {"timm_model_name": "x", "image_size": 224}})
    with pytest.raises(ValueError, match="text.positional_embedding"):
        resize_text_pos_embed({}, 8)
