"""LoRA adapters (adapters: kind lora) and patch dropout (model.patch_dropout).

In one process: the adapted attention computes what torch's attention computes at the merged
weights, the adapted model starts as its base model and merges back into plain open_clip, adapter
files round-trip (and peft's loader reads every key), freezing composes with the strategies, and bad
targets fail clearly. On 2 ZeRO-3 ranks (multiprocess tier): training touches adapters only, the
merged export equals the adapted model, resume continues exactly, the adapter folder reloads.

No pretrained CLIP weights can be downloaded here: the "pretrained" file is a randomly initialised
open_clip model saved in open_clip's state-dict layout."""
import copy
import json

import open_clip
import pytest
import torch
from torch import nn

from dsclip.config import load_config
from dsclip.errors import ConfigError, PretrainedError
from dsclip.model.adapters import (SCALING_KEY, LoraSelfAttention, add_adapters, base_name, is_adapter_key,
                                   load_adapters, merged_state_dict, read_adapters, write_adapters)
from dsclip.model.architectures import registered
from dsclip.model.build import build_model
from dsclip.model.config import AdapterConfig, FreezeConfig, ModelConfig
from dsclip.model.freeze import apply_freeze

registered()
LORA = AdapterConfig(kind="lora", rank=4)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    texts = open_clip.get_tokenizer("dsclip-tiny")(["a red circle", "a blue square on a gray background", "z"])
    return torch.randn(3, 3, 32, 32), texts


def features(model: nn.Module) -> torch.Tensor:
    images, texts = inputs()
    model.eval()
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(texts)], dim=1)


def trained_like(model: nn.Module) -> nn.Module:
    """The adapters moved off their zero start, as training would."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal float", "bool"])
def test_lora_attention_computes_torch_attention_at_the_merged_weights(batch_first, mask):
    torch.manual_seed(0)
    torch_attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    adapted = trained_like(LoraSelfAttention.adapting(copy.deepcopy(torch_attention), rank=3, alpha=6, dropout=0.0))
    from peft import LoraConfig, inject_adapter_in_model  # out_proj is peft's, as add_adapters makes it
    holder = nn.Module()
    holder.attn = adapted
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["attn.out_proj"]), holder)
    trained_like(holder)
    merged = merged_state_dict({**holder.state_dict(), SCALING_KEY: torch.tensor([2.0])})
    torch_attention.load_state_dict({k[len("attn."):]: v for k, v in merged.items()})
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    masks = {"none": None, "causal float": torch.full((5, 5), float("-inf")).triu(1),
             "bool": torch.ones(5, 5, dtype=torch.bool).triu(1)}
    with torch.no_grad():
        ours = holder.attn(x, x, x, need_weights=False, attn_mask=masks[mask])[0]
        theirs = torch_attention(x, x, x, need_weights=False, attn_mask=masks[mask])[0]
        other = torch.randn_like(x)  # cross-attention: keys and values from another sequence
        cross = holder.attn(x, other, other, need_weights=False)[0]
        cross_theirs = torch_attention(x, other, other, need_weights=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(cross, cross_theirs, rtol=0, atol=1e-5)


def test_adapted_model_starts_as_its_base_and_merges_back_into_plain_open_clip():
    base = tiny()
    adapted = copy.deepcopy(base)
    assert add_adapters(adapted, LORA) == (3, 6)  # attentions, c_fc + c_proj: 2 image blocks, 1 text block
    torch.testing.assert_close(features(adapted), features(base), rtol=0, atol=1e-6)
    assert isinstance(adapted.visual.transformer.resblocks[0].attn, LoraSelfAttention)
    trained_like(adapted)
    state = adapted.state_dict()
    plain = tiny()
    plain.load_state_dict(merged_state_dict(state))  # strict: exactly open_clip's names
    torch.testing.assert_close(features(plain), features(adapted), rtol=0, atol=1e-5)
    assert not torch.allclose(features(plain), features(base), atol=1e-3)
    unchanged = {k for k, v in merged_state_dict(state).items() if torch.equal(v, base.state_dict()[k])}
    assert unchanged == {k for k in base.state_dict() if not k.endswith(("attn.in_proj_weight", "out_proj.weight",
                                                                          "c_fc.weight", "c_proj.weight"))}


def test_adapter_folder_round_trips_merges_at_load_and_peft_reads_every_key(tmp_path):
    base = tiny()
    adapted = trained_like(add_adapters_to(copy.deepcopy(base)))
    write_adapters(adapted.state_dict(), "dsclip-tiny", tmp_path / "adapters")
    reread = read_adapters(tmp_path / "adapters")
    again = add_adapters_to(copy.deepcopy(base))
    load_adapters(again, reread, "test")
    torch.testing.assert_close(features(again), features(adapted), rtol=0, atol=0)
    merged = tiny()
    merged.load_state_dict(merged_state_dict({**base.state_dict(), **reread}))
    torch.testing.assert_close(features(merged), features(adapted), rtol=0, atol=1e-5)

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    with_peft = inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "adapters")), copy.deepcopy(base))
    result = set_peft_model_state_dict(with_peft, load_file(str(tmp_path / "adapters" / "adapter_model.safetensors")))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]

    out_proj_only = trained_like(add_adapters_to(copy.deepcopy(base), AdapterConfig(kind="lora", targets=[
        "*.attn.out_proj"])))  # a Linear on its own: peft keys without the attention layer's base_layer
    write_adapters(out_proj_only.state_dict(), "dsclip-tiny", tmp_path / "out_proj")
    with_peft = inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "out_proj")), copy.deepcopy(base))
    result = set_peft_model_state_dict(with_peft, load_file(str(tmp_path / "out_proj" / "adapter_model.safetensors")))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    (tmp_path / "adapters" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PretrainedError, match="dsclip reads plain LoRA"):
        read_adapters(tmp_path / "adapters")
    other_rank = add_adapters_to(copy.deepcopy(base), AdapterConfig(kind="lora", rank=2))
    with pytest.raises(PretrainedError, match="do not fit this model's .*set adapters.rank"):
        load_adapters(other_rank, reread, "test")


def add_adapters_to(model: nn.Module, cfg: AdapterConfig = LORA) -> nn.Module:
    add_adapters(model, cfg)
    return model


def trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_adapters_freeze_their_towers_and_compose_with_lit():
    both = add_adapters_to(tiny())
    apply_freeze(both, FreezeConfig(), adapted=("image", "text"))
    assert trainable(both) == {n for n, _ in both.named_parameters() if is_adapter_key(n)}
    image_only = add_adapters_to(tiny(), AdapterConfig(kind="lora", towers="image"))
    summary = apply_freeze(image_only, FreezeConfig(strategy="lit"), adapted=("image",))
    image_names = {n for n in trainable(image_only) if n.startswith("visual.")}
    assert image_names and all(is_adapter_key(n) for n in image_names)  # LiT's locked tower trains its adapters
    text = next(t for t in summary.towers if t.tower == "text")
    assert text.trainable == text.total  # the text tower trains whole, as under LiT
    assert "logit_scale" in trainable(image_only)


def test_bad_targets_and_settings_fail_clearly():
    with pytest.raises(ConfigError, match="pattern '\\*.nothing' selects no attention or Linear module"):
        add_adapters(tiny(), AdapterConfig(kind="lora", targets=["*.nothing"]))
    with pytest.raises(ConfigError, match="out_proj is adapted with the attention itself"):
        add_adapters(tiny(), AdapterConfig(kind="lora", targets=["*.resblocks.*.attn", "*.attn.out_proj"]))
    with pytest.raises(ConfigError, match="selects visual.ln_post, a LayerNorm"):
        add_adapters(tiny(), AdapterConfig(kind="lora", targets=["visual.ln_post"]))
    with pytest.raises(ConfigError, match="selects no module of the text tower"):  # it would train nothing
        add_adapters(tiny(), AdapterConfig(kind="lora", targets=["visual.*.attn"]))
    with pytest.raises(ConfigError, match="adapters.rank=0 must be >= 1"):
        load_config(None, ["adapters.kind=lora", "adapters.rank=0"])
    with pytest.raises(ConfigError, match="model.patch_dropout=1.0 must be in"):
        load_config(None, ["model.patch_dropout=1.0"])


def test_wise_ft_mixes_a_base_with_its_adapters(tmp_path):
    from dsclip.ensemble.mixing import load_endpoints
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    adapted = trained_like(add_adapters_to(copy.deepcopy(base)))
    write_adapters(adapted.state_dict(), "dsclip-tiny", tmp_path / "adapters")
    start, end = load_endpoints(tiny(), "dsclip-tiny", str(tmp_path / "base.pt"), str(tmp_path / "base.pt"),
                                adapters=(None, tmp_path / "adapters"))
    merged = merged_state_dict(adapted.state_dict())
    assert all(torch.equal(start[k], v) for k, v in base.state_dict().items())
    assert all(torch.allclose(end[k], v, atol=1e-6) for k, v in merged.items())


def test_merged_adapters_need_base_weights(tmp_path):
    with pytest.raises(ConfigError, match="adapters.weights=.* needs model.pretrained"):
        build_model(ModelConfig(), adapters=AdapterConfig(weights=str(tmp_path)))
    with pytest.raises(PretrainedError, match="is not an adapter folder"):
        read_adapters(tmp_path)


def test_patch_dropout_shortens_training_forwards_only():
    clip = build_model(ModelConfig(patch_dropout=0.5)).module.clip  # dsclip-tiny: 32 px / 8 px patches = 16
    lengths = []
    clip.visual.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    images = torch.randn(2, 3, 32, 32)
    clip.train()
    clip.encode_image(images)
    clip.eval()
    with torch.no_grad():
        clip.encode_image(images)
    assert lengths == [1 + 8, 1 + 16]  # class token + the kept patches; evaluation sees all


def test_adapters_on_a_model_built_partitioned_start_as_on_one_built_whole(tmp_path):
    """zero.Init partitions the base; peft's and dsclip's adapters are added beside it, whole."""
    import deepspeed

    from dsclip_testutils import init_single_rank
    init_single_rank()
    torch.save(tiny().state_dict(), tmp_path / "base.pt")
    cfg = ModelConfig(pretrained=str(tmp_path / "base.pt"))
    zero3 = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    torch.manual_seed(0)
    whole = build_model(cfg, adapters=LORA).module.clip
    torch.manual_seed(0)
    partitioned = build_model(cfg, partitioned_by=zero3, adapters=LORA).module.clip
    for (name, param), (_, other) in zip(whole.named_parameters(), partitioned.named_parameters()):
        with deepspeed.zero.GatheredParameters([other]):
            assert torch.equal(param, other.data), name


def test_base_names_are_open_clips():
    adapted = add_adapters_to(tiny())
    names = {base_name(n) for n in adapted.state_dict() if not is_adapter_key(n)}
    assert names == set(tiny().state_dict())


def _lora_run(rank: int, out: str, resume: str = "") -> dict:
    from dsclip.training.ds_config import load_ds_config
    from dsclip_testutils import make_trainer
    cfg = load_config(None, ["train.max_steps=4", "optim.warmup_steps=1", "optim.lr=2e-3", "data.batch_size=8",
                             "eval.at_start=false", "eval.at_end=false", "logging.log_every=1", "logging.plots=false",
                             "train.save_every=2", "adapters.kind=lora", "adapters.rank=4", f"output_dir={out}",
                             f"model.pretrained={out}/base.pt", f"name={'resumed' if resume else 'lora'}"])
    trainer = make_trainer(cfg, load_ds_config(f"{out}/zero3.json"), resume or None)
    engine = trainer.engine
    stepped = {id(p) for group in engine.optimizer.fp16_groups for p in group}  # what ZeRO-3's optimizer steps
    stepped_names = sorted(n for n, p in engine.module.named_parameters() if id(p) in stepped)
    images, texts = inputs()
    engine.eval()
    with torch.no_grad():  # through the engine: ZeRO-3 gathers the partitioned base for the forward
        image_features, text_features, _, _ = engine(images, texts)
    engine.train()
    base = open_clip.create_model("dsclip-tiny", nonscalar_logit_scale=True)
    base.load_state_dict(torch.load(f"{out}/base.pt"))
    at_start = (torch.cat([image_features, text_features], dim=1) - features_normalized(base)).abs().max().item()
    trainer.train()
    return {"stepped": stepped_names, "adapters": sorted(n for n, _ in engine.module.named_parameters()
                                                         if is_adapter_key(n)), "at_start": at_start}


def features_normalized(model: nn.Module) -> torch.Tensor:
    images, texts = inputs()
    model.eval()
    with torch.no_grad():
        return torch.cat([model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)], 1)


@pytest.mark.multiprocess
def test_two_zero3_ranks_train_adapters_only_export_merged_and_resume(tmp_path):
    import functools

    from dsclip.model.run_folder import consolidated_state_dict
    from dsclip_testutils import ds_config, read_metrics, run_on_ranks
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    ds_config(3, tmp_path)
    ranks = run_on_ranks(functools.partial(_lora_run, out=str(tmp_path)), 2, tmp_path)
    assert ranks[0]["stepped"] == ranks[0]["adapters"] and ranks[0]["adapters"]  # only adapters have optimizer state
    assert max(r["at_start"] for r in ranks) < 1e-5  # the adapted model starts as its base model

    run = tmp_path / "lora"
    saved = consolidated_state_dict(run / "checkpoints", "step-4")
    base_part = {base_name(k): v for k, v in saved.items() if not is_adapter_key(k)}
    assert base_part.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_part.items()), "base weights must not move"

    adapted = build_model(ModelConfig(pretrained=str(tmp_path / "base.pt")),
                          adapters=AdapterConfig(kind="lora", rank=4, weights=str(run / "export" / "adapters")))
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    torch.testing.assert_close(features(exported), features(adapted.module.clip), rtol=0, atol=1e-5)
    assert not torch.allclose(features(exported), features(base), atol=1e-3)
    merged_at_load = build_model(ModelConfig(pretrained=str(tmp_path / "base.pt")),
                                 adapters=AdapterConfig(weights=str(run / "export" / "adapters")))
    torch.testing.assert_close(features(merged_at_load.module.clip), features(exported), rtol=0, atol=1e-5)

    run_on_ranks(functools.partial(_lora_run, out=str(tmp_path), resume=str(run / "checkpoints" / "step-2")), 2,
                 tmp_path)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}
    resumed = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "resumed") if "train/loss" in r}
    assert resumed == pytest.approx({3: losses[3], 4: losses[4]}, abs=1e-5)


@pytest.mark.multiprocess
def test_lora_composes_with_zero2_bf16_checkpointing_layer_decay_and_patch_dropout(tmp_path):
    """LoRA on the image tower of a LiT-style run (text tower whole, with layer decay), ZeRO-2 in bf16,
    gradient checkpointing and patch dropout: it trains, only the image adapters and the text tower
    move, and the export merges."""
    from dsclip.model.run_folder import consolidated_state_dict
    from dsclip_testutils import ds_config, launch, read_metrics
    base = tiny()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    config = json.loads(ds_config(2, tmp_path).read_text())
    config["bf16"] = {"enabled": True}
    (tmp_path / "zero2_bf16.json").write_text(json.dumps(config))
    sets = ["train.max_steps=3", "optim.warmup_steps=1", "optim.lr=1e-3", "data.batch_size=8", "eval.at_start=false",
            "eval.at_end=false", "logging.log_every=1", "logging.plots=false", "adapters.kind=lora",
            "adapters.towers=image", "freeze.strategy=lit", "optim.text.layer_decay=0.8",
            "model.grad_checkpointing=true", "model.patch_dropout=0.5"]
    result = launch(["--deepspeed_config", str(tmp_path / "zero2_bf16.json"), "--output-dir", str(tmp_path / "out"),
                     "--pretrained", str(tmp_path / "base.pt"), *[a for s in sets for a in ("--set", s)]])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "out" / "default"
    assert len([r for r in read_metrics(run) if "train/loss" in r]) == 3
    saved = consolidated_state_dict(run / "checkpoints", "step-3")
    image_base = {k: v for k, v in saved.items() if k.startswith("visual.") and not is_adapter_key(k)}
    bf16 = torch.bfloat16  # the frozen weights are held in the engine's dtype
    assert all(torch.equal(v.to(bf16), base.state_dict()[base_name(k)].to(bf16)) for k, v in image_base.items())
    assert not torch.equal(saved["token_embedding.weight"], base.state_dict()["token_embedding.weight"])
    assert any(k.startswith("visual.") and is_adapter_key(k) for k in saved)
    assert not any(k.startswith("transformer.") and is_adapter_key(k) for k in saved)
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    assert torch.isfinite(features(exported)).all()
