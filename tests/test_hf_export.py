"""Export to transformers' CLIPModel (dsclip/model/hf_export.py): the folder loads offline with
CLIPModel / CLIPProcessor and computes open_clip's features, its tokenizer (written from open_clip's
BPE vocabulary) tokenizes as open_clip does, and architectures CLIPModel cannot hold are refused
before anything is written. Random weights: no pretrained CLIP can be downloaded here."""
import json

import open_clip
import pytest
import torch
import transformers

from dsclip.errors import TransformersExportError
from dsclip.model.architectures import registered
from dsclip.model.config import ModelConfig
from dsclip.model.hf_export import write_transformers

registered()
ODD_PATCH, WIDE = "dsclip-test-odd-patch", "dsclip-test-wide"
# an odd patch on an odd grid, with QuickGELU: 7 px patches of 49 px images (7 x 7), 3 heads of 32
ODD_CONFIG = {"embed_dim": 48, "quick_gelu": True,
              "vision_cfg": {"image_size": 49, "patch_size": 7, "width": 96, "head_width": 32, "layers": 2,
                             "mlp_ratio": 3.0},
              "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
CAPTIONS = ["a photo of a cat.", "Hello, World!!! (really?) -- yes; no: 'quoted' \"double\"", "déjà vu, café, naïve",
            "日本語のテキスト 中文 한국어", "emoji 🐶 and Ünïcödé", "word " * 100, "  spaces \t and\ttabs\n",
            "It's we'll they'd I'm", "12345 3.14 1e-5", "UPPER lower MiXeD"]


@pytest.fixture(scope="module", autouse=True)
def odd_patch_architecture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{ODD_PATCH}.json").write_text(json.dumps(ODD_CONFIG))
    wide = {**ODD_CONFIG, "vision_cfg": {**ODD_CONFIG["vision_cfg"], "image_size": [49, 63]}}
    (folder / f"{WIDE}.json").write_text(json.dumps(wide))
    open_clip.add_model_config(folder)


def exported(tmp_path, name: str, **model_fields):
    torch.manual_seed(0)
    model = open_clip.create_model(name, nonscalar_logit_scale=True, **model_fields)
    model.eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.5)  # not the initial value: the export must carry the trained one
    folder = write_transformers(model.state_dict(), ModelConfig(name=name), tmp_path / "hf")
    return model, transformers.CLIPModel.from_pretrained(folder).eval(), transformers.CLIPProcessor.from_pretrained(folder)


@pytest.mark.parametrize("name", ["dsclip-tiny", "ViT-B-32", ODD_PATCH])
def test_clipmodel_computes_open_clips_features(tmp_path, name):
    model, hf, processor = exported(tmp_path, name)
    size = model.visual.image_size[0]
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    texts = open_clip.get_tokenizer(name)(CAPTIONS[:4])
    ids = processor(text=CAPTIONS[:4], padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixel_values=images).pooler_output,
                                   model.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(hf.get_text_features(input_ids=ids).pooler_output, model.encode_text(texts),
                                   rtol=0, atol=1e-5)
    assert hf.logit_scale.item() == pytest.approx(3.5)


def test_clipprocessor_tokenizes_as_open_clip(tmp_path):
    """The same ids up to and with the end-of-text token (open_clip pads with 0, CLIPProcessor with
    end-of-text: both ignored behind the causal mask and the end-of-text pooling)."""
    _, _, processor = exported(tmp_path, "dsclip-tiny")
    ours = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # context 77, as the processor of a 77-token model
    processor.tokenizer.model_max_length = 77
    theirs = processor(text=CAPTIONS, truncation=True)["input_ids"]
    for caption, own, ids in zip(CAPTIONS, ours, theirs):
        assert own[:len(ids)].tolist() == ids and not own[len(ids):].any(), caption
    assert len(theirs[CAPTIONS.index("word " * 100)]) == 77  # truncated, its end-of-text kept


def test_image_processor_matches_open_clips_eval_transform(tmp_path):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image
    model, _, processor = exported(tmp_path, "dsclip-tiny")
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    image = Image.new("RGB", (90, 60), (200, 40, 30))
    ours = preprocess(image)
    theirs = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"][0])
    assert theirs.shape == ours.shape == (3, 32, 32)
    assert (theirs - ours).abs().mean() < 0.02  # PIL's and torchvision's resampling differ slightly


@pytest.mark.parametrize("name, lacks", [
    (WIDE, "non-square image size"), ("RN50", "ResNet image tower"), ("dsclip-tiny-minilm", "Hugging Face text tower"),
])
def test_an_architecture_clipmodel_cannot_hold_fails_in_one_line_and_writes_nothing(tmp_path, name, lacks):
    with pytest.raises(TransformersExportError, match=f"CLIPModel has no {lacks}") as error:
        write_transformers({}, ModelConfig(name=name), tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_an_export_replaces_an_earlier_one_but_never_a_folder_of_other_files(tmp_path):
    model = open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)
    state, cfg = model.state_dict(), ModelConfig(name="dsclip-tiny")
    out = write_transformers(state, cfg, tmp_path / "hf")
    with torch.no_grad():
        state["logit_scale"].fill_(2.0)
    write_transformers(state, cfg, out)  # an earlier export: replaced whole
    assert transformers.CLIPModel.from_pretrained(out).logit_scale.item() == pytest.approx(2.0)
    (out / "notes.txt").write_text("mine")
    shared = tmp_path / "models"
    (shared / "other-model").mkdir(parents=True)
    for folder, names in ((out, "notes.txt"), (shared, "other-model")):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(TransformersExportError, match=f"holds other files \\({names}\\)"):
            write_transformers(state, cfg, folder)
        assert sorted(p.name for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "models"]  # no staging folder left


def test_export_transformers_needs_the_export():
    from dsclip.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="train.export_transformers is written with the export"):
        load_config(None, ["train.export=false", "train.export_transformers=true"])


@pytest.mark.multiprocess
def test_a_run_that_cannot_export_to_transformers_is_refused_before_training(tmp_path):
    import subprocess
    import sys

    from dsclip_testutils import REPO, subprocess_env
    result = subprocess.run([sys.executable, "-m", "dsclip.cli", "train", "--output-dir", str(tmp_path),
                             "--set", "model.name=RN50", "--set", "train.export_transformers=true"],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "CLIPModel has no ResNet image tower" in result.stderr
    assert not (tmp_path / "default" / "checkpoints").exists()


@pytest.mark.multiprocess
def test_a_run_exports_to_transformers_at_its_end_and_through_dsclip_export(tmp_path):
    """train.export_transformers writes <run>/export-transformers beside the safetensors export;
    `dsclip export --format transformers|bin` writes the same weights from the checkpoint."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from dsclip_testutils import REPO, ds_config, launch, subprocess_env
    sets = ["train.max_steps=2", "optim.warmup_steps=1", "data.batch_size=8", "eval.at_start=false",
            "eval.at_end=false", "logging.plots=false", "train.export_transformers=true"]
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(tmp_path),
                     *[a for s in sets for a in ("--set", s)]])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "default"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")  # safetensors, by default
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    for fmt in ("transformers", "bin"):
        subprocess.run([sys.executable, "-m", "dsclip.cli", "export", str(run), "--format", fmt, "--out",
                        str(tmp_path / fmt)], cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "bin" / "open_clip_pytorch_model.bin")["visual.proj"],
                       load_file(str(run / "export" / "open_clip_model.safetensors"))["visual.proj"])
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    for folder in (run / "export-transformers", tmp_path / "transformers"):
        hf = transformers.CLIPModel.from_pretrained(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf.get_image_features(pixel_values=images).pooler_output,
                                       model.encode_image(images), rtol=0, atol=1e-5)
