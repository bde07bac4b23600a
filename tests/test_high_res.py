"""High-resolution fine-tuning on 2 CPU ranks under ZeRO-3, through the real entry point: weights
saved at the architecture's image size load at a larger one (position embeddings interpolated on
load), train, and export a checkpoint that plain open_clip loads at the new size.

No pretrained CLIP weights can be downloaded here: the "pretrained" file is a randomly
initialised open_clip model saved in open_clip's state-dict layout. The runs keep
`visual.positional_embedding` frozen (`freeze.exclude`) so that the exported table must be
exactly what open_clip's own resize-on-load makes of the file, while everything else trains.
"""
import json

import open_clip
import pytest
import torch
from PIL import Image

from dsclip_testutils import ds_config, launch, read_metrics

POS = "visual.positional_embedding"


def high_res_run(tmp_path, name: str, old_size: int, new_size: int, *overrides: str):
    """Save random `name` weights at `old_size`, fine-tune them at `new_size` for 3 steps; the export folder."""
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.bin"
    torch.save(open_clip.create_model(name, force_image_size=old_size).state_dict(), pretrained)
    sets = [f"model.name={name}", f"model.image_size={new_size}", "train.max_steps=3", "optim.warmup_steps=1",
            "optim.lr=1e-4", "eval.at_start=false", "eval.at_end=false", "logging.log_every=1", "logging.plots=false",
            f"freeze.exclude=[{POS}]", *overrides]
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(tmp_path / "out"),
                     "--pretrained", str(pretrained), *[arg for s in sets for arg in ("--set", s)]])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "out" / "default"
    assert len([r for r in read_metrics(run_dir) if "train/loss" in r]) == 3
    return pretrained, run_dir / "export"


def check_export(pretrained, export, name: str, new_size: int, grid: int) -> None:
    # open_clip's own resize-on-load of the pretrained file: the reference for the frozen table
    reference = open_clip.create_model(name, pretrained=str(pretrained), force_image_size=new_size).state_dict()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    exported = model.state_dict()
    config = json.loads((export / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == new_size
    assert tuple(model.visual.image_size) == (new_size, new_size)
    assert exported[POS].shape[0] == 1 + grid * grid
    assert torch.equal(exported[POS], reference[POS]), "the resized table must be open_clip's resize-on-load exactly"
    unchanged = [k for k, v in exported.items() if k != POS and torch.equal(v, reference[k].reshape(v.shape))]
    assert not unchanged, f"every trainable tensor must have trained: {unchanged}"
    model.eval()
    image = torch.stack([preprocess(Image.new("RGB", (500, 400), (200, 30, 30)))] * 2)
    assert image.shape == (2, 3, new_size, new_size)  # its transform resizes to the new size
    with torch.no_grad():
        features = model.encode_image(image, normalize=True)
    assert features.shape == (2, model.visual.output_dim) and torch.isfinite(features).all()


@pytest.mark.multiprocess
def test_two_rank_zero3_high_res_run_exports_what_plain_open_clip_loads_at_the_new_size(tmp_path):
    """dsclip-tiny 32 -> 48 px: the 4x4 patch grid becomes 6x6."""
    pretrained, export = high_res_run(tmp_path, "dsclip-tiny", 32, 48, "data.batch_size=8")
    check_export(pretrained, export, "dsclip-tiny", 48, 6)


@pytest.mark.slow
def test_vit_b32_224_to_336_on_two_zero3_ranks(tmp_path):
    """The real case: ViT-B-32 from 224 px (7x7 grid) to 336 px (10x10), ~3 minutes on 2 busy cores."""
    pretrained, export = high_res_run(tmp_path, "ViT-B-32", 224, 336, "data.batch_size=2")
    check_export(pretrained, export, "ViT-B-32", 336, 10)
