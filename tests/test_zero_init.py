"""Building the model already partitioned (model.zero_init, deepspeed.zero.Init): the same initial
weights as a model built whole, pretrained weights (resized to a new image size) copied in one
parameter at a time, the same parameter groups, and on 2 ZeRO-3 ranks the same training and export.

No pretrained CLIP weights can be downloaded here: the "pretrained" file is a randomly initialised
open_clip model saved in open_clip's state-dict layout."""
import open_clip
import pytest
import torch

from dsclip.config import load_config
from dsclip.errors import ConfigError
from dsclip.model.build import build_model, builds_partitioned, create_clip, parameter_count
from dsclip.model.config import ModelConfig
from dsclip.model.zero_init import partitioned_build
from dsclip.training.config import OptimConfig
from dsclip.training.optim import param_groups
from dsclip_testutils import ds_config, init_single_rank, launch, read_metrics, run_on_ranks

ZERO3 = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective under ZeRO-3: all ranks call it)."""
    import deepspeed
    out = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.data.clone()
    return out


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def whole_and_partitioned(cfg: ModelConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    whole = create_clip(cfg)
    torch.manual_seed(0)
    with partitioned_build(ZERO3):
        partitioned = create_clip(cfg)
    return whole, partitioned


def test_a_model_built_partitioned_starts_from_the_weights_it_has_built_whole():
    """open_clip's text tower and torch's attention initialise their children's weights from the
    parent's __init__, after zero.Init has partitioned the children: without dsclip's gather, ten
    tensors of dsclip-tiny keep PyTorch's default init (the token embedding at std 1)."""
    init_single_rank()
    whole, partitioned = whole_and_partitioned(ModelConfig())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in partitioned.parameters())
    assert not differing(dict(whole.named_parameters()), gathered(partitioned))
    # weight decay follows the whole shape, not the 1-D shard
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in param_groups(whole, OptimConfig())]
    assert groups == [(g["lr"], g["weight_decay"], len(g["params"])) for g in param_groups(partitioned, OptimConfig())]


def test_pretrained_weights_fill_the_partitioned_model_with_position_embeddings_resized(tmp_path):
    init_single_rank()
    torch.manual_seed(1)
    torch.save(open_clip.create_model("dsclip-tiny").state_dict(), tmp_path / "pretrained.pt")  # 32 px
    cfg = ModelConfig(pretrained=str(tmp_path / "pretrained.pt"), image_size=48)
    whole = build_model(cfg).module.clip
    partitioned = build_model(cfg, partitioned_by=ZERO3).module.clip
    loaded = gathered(partitioned)
    assert loaded["visual.positional_embedding"].shape[0] == 1 + 6 * 6
    assert not differing(dict(whole.named_parameters()), loaded)


def test_parameter_count_allocates_nothing_and_decides_zero_init():
    assert parameter_count(ModelConfig(name="ViT-bigG-14")) == 2_539_567_105
    vit_b = ModelConfig(name="ViT-B-32")
    assert parameter_count(vit_b) == sum(p.numel() for p in open_clip.create_model("ViT-B-32").parameters())
    assert builds_partitioned(ModelConfig(name="ViT-bigG-14"), zero_stage=3)
    assert not builds_partitioned(ModelConfig(name="ViT-bigG-14"), zero_stage=2)
    assert not builds_partitioned(vit_b, zero_stage=3)  # below the threshold
    assert builds_partitioned(ModelConfig(zero_init=True), zero_stage=3)
    assert not builds_partitioned(ModelConfig(name="ViT-bigG-14", zero_init=False), zero_stage=3)
    with pytest.raises(ConfigError, match="model.zero_init=true needs ZeRO stage 3, but the DeepSpeed config has "
                                          "stage 2"):
        builds_partitioned(ModelConfig(zero_init=True), zero_stage=2)
    with pytest.raises(ConfigError, match="Hugging Face text tower loads its own weights"):
        load_config(None, ["model.name=dsclip-tiny-minilm", "model.zero_init=true"])


def _init_on_rank(rank: int) -> dict:
    whole, partitioned = whole_and_partitioned(ModelConfig())
    return {"differing": differing(dict(whole.named_parameters()), gathered(partitioned))}


@pytest.mark.multiprocess
def test_two_ranks_build_partitioned_from_the_same_initial_weights(tmp_path):
    assert run_on_ranks(_init_on_rank, 2, tmp_path) == [{"differing": []}] * 2


def zero3_run(tmp_path, name: str, pretrained, zero_init: bool, *extra: str, nproc: int = 2):
    sets = ["train.max_steps=4", "optim.warmup_steps=1", "optim.lr=1e-3", "data.batch_size=8", "model.image_size=48",
            "freeze.strategy=frozen_image", "eval.at_start=false", "eval.at_end=false", "logging.log_every=1",
            "logging.plots=false", "train.save_every=2", f"model.zero_init={str(zero_init).lower()}"]
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(tmp_path / "out"),
                     "--name", name, "--pretrained", str(pretrained), *[arg for s in sets for arg in ("--set", s)],
                     *extra], nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    partitioned_line = f"model built partitioned over {nproc} ranks (deepspeed.zero.Init)"
    assert (partitioned_line in result.stderr + result.stdout) == zero_init
    run_dir = tmp_path / "out" / name
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    return losses, model.state_dict()


@pytest.mark.multiprocess
def test_two_zero3_ranks_train_resume_and_export_the_same_with_and_without_zero_init(tmp_path):
    """A 32 px file into a 48 px model (position embedding resized while partitioned), image tower
    frozen: the same losses and the same exported weights, and the frozen tower is the file's; the
    partitioned run's step-2 checkpoint resumed on 1 rank goes on with the same losses."""
    torch.manual_seed(2)
    pretrained = tmp_path / "pretrained.pt"
    torch.save(open_clip.create_model("dsclip-tiny").state_dict(), pretrained)
    losses, export = zero3_run(tmp_path, "whole", pretrained, zero_init=False)
    partitioned_losses, partitioned_export = zero3_run(tmp_path, "partitioned", pretrained, zero_init=True)
    assert sorted(losses) == [1, 2, 3, 4]
    assert partitioned_losses == pytest.approx(losses, abs=1e-6)
    for name, tensor in export.items():
        torch.testing.assert_close(partitioned_export[name], tensor, rtol=0, atol=1e-6, msg=name)
    resized = open_clip.create_model("dsclip-tiny", pretrained=str(pretrained), force_image_size=48).state_dict()
    image_tower = [name for name in resized if name.startswith("visual.")]
    assert image_tower and all(torch.equal(partitioned_export[name], resized[name]) for name in image_tower)

    step_2 = tmp_path / "out" / "partitioned" / "checkpoints" / "step-2"
    resumed_losses, resumed_export = zero3_run(tmp_path, "resumed", pretrained, True, "--resume", str(step_2),
                                               "--set", "data.batch_size=16", nproc=1)
    assert resumed_losses == pytest.approx({3: losses[3], 4: losses[4]}, abs=1e-5)
    assert all(torch.equal(resumed_export[name], resized[name]) for name in image_tower)
