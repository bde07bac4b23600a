"""--pretrained sources load the same weights; bad sources fail with one clear message."""
import json
import os
import subprocess
import sys

import huggingface_hub
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dsclip.model.build import build_model
from dsclip.model.config import ModelConfig
from dsclip.errors import PretrainedError
from dsclip.model.pretrained import load_pretrained, read_source
from dsclip_testutils import REPO


@pytest.fixture(scope="module")
def reference():
    """A tiny CLIP with non-default weights, as open_clip builds it (0-dim logit scale)."""
    torch.manual_seed(123)
    model = open_clip.create_model("dsclip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def loaded_weights(source: str, trust: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(pretrained=source, trust_checkpoint=trust))
    return bundle.module.clip.state_dict()


def assert_same_weights(loaded, reference):
    assert set(loaded) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(loaded[key].reshape(tensor.shape), tensor), key


def write_hf_folder(folder, reference, weights_name="open_clip_model.safetensors"):
    folder.mkdir(parents=True)
    config = {"model_cfg": open_clip.get_model_config("dsclip-tiny"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in reference.items()}, str(folder / weights_name))


def test_every_local_source_kind_loads_the_same_weights(reference, tmp_path, monkeypatch):
    torch.save(reference, tmp_path / "weights.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}, "epoch": 3}, tmp_path / "trainer.bin")
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "weights.safetensors"))
    write_hf_folder(tmp_path / "hf_folder", reference)
    # a Hugging Face cache entry, as `huggingface-cli download org/tiny-clip` leaves it
    snapshot = tmp_path / "hub" / "models--org--tiny-clip" / "snapshots" / "0123abcd"
    write_hf_folder(snapshot, reference)
    (tmp_path / "hub" / "models--org--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for source in ("weights.pt", "trainer.bin", "weights.safetensors", "hf_folder"):
        assert_same_weights(loaded_weights(str(tmp_path / source)), reference)
    assert_same_weights(loaded_weights("hf-hub:org/tiny-clip"), reference)


SCRIPT_A_CLIP = """
import sys, open_clip, torch
open_clip.add_model_config(sys.argv[1])
scripted = open_clip.create_model("dsclip-tiny", jit=True)
scripted.load_state_dict(torch.load(sys.argv[2]), strict=False)  # TorchScript also persists the text mask
torch.jit.save(scripted, sys.argv[3])
"""


@pytest.mark.multiprocess
def test_openai_torchscript_checkpoint_loads(reference, tmp_path):
    # A fresh interpreter: once a ZeRO-3 engine exists in a process, DeepSpeed has patched F.linear
    # with an autograd Function that TorchScript cannot compile.
    torch.save(reference, tmp_path / "reference.pt")
    subprocess.run([sys.executable, "-c", SCRIPT_A_CLIP, str(REPO / "dsclip" / "model" / "configs"),
                    str(tmp_path / "reference.pt"), str(tmp_path / "openai-style.pt")], check=True, timeout=300)
    with pytest.raises(PretrainedError, match=r"openai-style.pt is a TorchScript archive: .* --trust-checkpoint"):
        loaded_weights(str(tmp_path / "openai-style.pt"))
    assert_same_weights(loaded_weights(str(tmp_path / "openai-style.pt"), trust=True), reference)


class Payload:
    """Stands in for a malicious object: unpickling it would call a function of the sender's choice."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_that_runs_code_is_refused_without_opt_in(reference, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**reference, "extra": Payload()}, path)
    with pytest.raises(PretrainedError, match=r"evil.pt holds pickled Python objects .* --trust-checkpoint"):
        read_source("dsclip-tiny", str(path), trust=False)


class TrainingNote:
    """A harmless custom object, as training scripts often pickle beside the weights."""


def test_trusted_pickle_loads_with_opt_in(reference, tmp_path):
    path = tmp_path / "trusted.pt"
    torch.save({**reference, "note": TrainingNote()}, path)
    with pytest.raises(PretrainedError, match="holds pickled Python objects"):
        read_source("dsclip-tiny", str(path), trust=False)
    assert_same_weights(loaded_weights(str(path), trust=True), reference)


def wider_tiny_config() -> dict:
    config = open_clip.get_model_config("dsclip-tiny")
    config["vision_cfg"]["width"] = 96
    return config


def test_wrong_architecture_fails_with_a_clear_message(tmp_path):
    config = wider_tiny_config()
    other = open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])
    torch.save(other.state_dict(), tmp_path / "wider.pt")
    with pytest.raises(PretrainedError, match=r"does not fit this architecture \(size mismatch .*set model.name"):
        loaded_weights(str(tmp_path / "wider.pt"))
    folder = tmp_path / "wider"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    with pytest.raises(PretrainedError, match=r"holds a different architecture than model.name=dsclip-tiny"):
        loaded_weights(str(folder))


def test_missing_file_unknown_tag_and_uncached_tag_fail_clearly(monkeypatch):
    with pytest.raises(PretrainedError, match=r"'/no/such/file.pt' is neither a file, a folder nor an open_clip tag"):
        read_source("dsclip-tiny", "/no/such/file.pt", trust=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    with pytest.raises(PretrainedError, match=r"pretrained tag 'openai' of ViT-B-32 is not in the local cache .* --pretrained /path"):
        read_source("ViT-B-32", "openai", trust=False)
    with pytest.raises(PretrainedError, match=r"hf-hub:org/absent is not in the local Hugging Face cache"):
        read_source("dsclip-tiny", "hf-hub:org/absent", trust=False)


def test_larger_image_size_interpolates_the_position_embedding_on_load(reference, tmp_path):
    torch.save(reference, tmp_path / "weights.pt")
    bundle = build_model(ModelConfig(pretrained=str(tmp_path / "weights.pt"), image_size=48))
    loaded = bundle.module.clip.state_dict()
    assert loaded["visual.positional_embedding"].shape == (1 + 6 * 6, 64)
    assert torch.equal(loaded["visual.positional_embedding"][0], reference["visual.positional_embedding"][0])
    assert torch.equal(loaded["token_embedding.weight"], reference["token_embedding.weight"])


def test_load_reports_missing_and_unexpected_keys(reference, caplog, tmp_path):
    partial = {k: v for k, v in reference.items() if not k.startswith("visual.")}
    partial["not.a.parameter"] = torch.zeros(1)
    clip = open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)
    torch.save(partial, tmp_path / "partial.pt")
    load_pretrained(clip, "dsclip-tiny", str(tmp_path / "partial.pt"))
    assert "parameters not in the file keep the weights the architecture was created with" in caplog.text
    assert "not.a.parameter" in caplog.text
