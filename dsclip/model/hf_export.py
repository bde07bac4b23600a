"""An open_clip model written as a Hugging Face transformers CLIPModel folder: weights (safetensors),
config, the tokenizer (from open_clip's own BPE vocabulary, no download) and an image processor with
the model's size, mean and std, so that `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained`
load it offline.

CLIPModel holds a ViT image tower and open_clip's built-in text transformer: pre-LayerNorm blocks,
class-token pooling, the text pooled at its end-of-text token, plain projections without bias. Any
open_clip feature outside that (timm / ResNet / HF towers, attentional pooling, layer scale, a
logit bias, non-square images, ...) is refused with one line naming it, before anything is written.
"""
import dataclasses
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transform import PreprocessCfg

from dsclip.errors import TransformersExportError
from dsclip.fileio import sync_folder, sync_tree
from dsclip.model.architectures import sized_config
from dsclip.model.config import ModelConfig

SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names of open_clip's special tokens
OPEN_CLIP_VOCAB = 49408  # the BPE vocabulary open_clip's SimpleTokenizer and CLIPTokenizer share
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's resampling codes, as CLIPImageProcessor takes them
# What write_transformers puts in its folder (transformers 5): an earlier export holds these only.
EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json"}


def _unsupported(model: str, what: str) -> TransformersExportError:
    return TransformersExportError(f"{model} cannot be exported to transformers: CLIPModel has no {what}; keep "
                                   "open_clip's format (dsclip export --format safetensors; in a recipe "
                                   "train.export_transformers: false)")


def _square(value: Any, model: str, what: str) -> int:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if pair[0] != pair[1]:
        raise _unsupported(model, f"non-square {what} ({pair[0]}x{pair[1]})")
    return int(pair[0])


def _common_checks(cfg: Any, model: str, tower: str) -> None:
    custom = [f.name for f in dataclasses.fields(cfg) if f.name in ("qk_norm", "scaled_cosine_attn", "scale_heads",
                                                                    "scale_attn_inner", "scale_attn", "scale_fc")
              and getattr(cfg, f.name)]
    if custom or cfg.block_type not in (None, "default"):
        raise _unsupported(model, f"custom attention block in its {tower} tower ({', '.join(custom) or cfg.block_type})")
    if cfg.ls_init_value is not None:
        raise _unsupported(model, f"layer scale in its {tower} tower")
    if cfg.final_ln_after_pool:
        raise _unsupported(model, f"LayerNorm after pooling in its {tower} tower")
    if cfg.act_kwargs or cfg.norm_kwargs:
        raise _unsupported(model, f"activation / norm settings in its {tower} tower")


def vision_config(config: dict[str, Any], model: str, act: str) -> dict[str, Any]:
    cfg = CLIPVisionCfg(**config["vision_cfg"])
    if cfg.timm_model_name:
        raise _unsupported(model, f"timm image tower ({cfg.timm_model_name})")
    if not isinstance(cfg.layers, int):
        raise _unsupported(model, "ResNet image tower")
    _common_checks(cfg, model, "image")
    for flag, what in ((cfg.attentional_pool, "attentional pooler"), (cfg.no_ln_pre, "ViT without its pre-LayerNorm"),
                       (cfg.pool_type != "tok", f"'{cfg.pool_type}' pooling of image tokens (it pools the class token)"),
                       (cfg.pos_embed_type != "learnable", f"{cfg.pos_embed_type} position embedding")):
        if flag:
            raise _unsupported(model, what)
    heads, rest = divmod(cfg.width, cfg.head_width)
    if rest or (cfg.width * cfg.mlp_ratio) % 1:
        raise _unsupported(model, f"width {cfg.width} split into heads of {cfg.head_width} / MLP ratio {cfg.mlp_ratio}")
    return {"hidden_size": cfg.width, "intermediate_size": int(cfg.width * cfg.mlp_ratio), "num_attention_heads": heads,
            "num_hidden_layers": cfg.layers, "image_size": _square(cfg.image_size, model, "image size"),
            "patch_size": _square(cfg.patch_size, model, "patches"), "hidden_act": act, "layer_norm_eps": 1e-5}


def text_config(config: dict[str, Any], model: str, act: str) -> dict[str, Any]:
    cfg = CLIPTextCfg(**config["text_cfg"])
    if cfg.hf_model_name:
        raise _unsupported(model, f"Hugging Face text tower ({cfg.hf_model_name})")
    if cfg.hf_tokenizer_name or cfg.vocab_size != OPEN_CLIP_VOCAB:
        raise _unsupported(model, f"tokenizer but open_clip's BPE vocabulary ({cfg.hf_tokenizer_name or cfg.vocab_size})")
    _common_checks(cfg, model, "text")
    for flag, what in ((cfg.embed_cls, "text class token"), (cfg.no_causal_mask, "text tower without causal mask"),
                       (cfg.pool_type != "argmax", f"'{cfg.pool_type}' text pooling (it pools the end-of-text token)"),
                       (cfg.proj_bias or cfg.proj_type != "linear", f"{cfg.proj_type} text projection with bias "
                                                                   f"{cfg.proj_bias} (it has one matrix, no bias)")):
        if flag:
            raise _unsupported(model, what)
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": int(cfg.width * cfg.mlp_ratio),
            "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers,
            "max_position_embeddings": cfg.context_length, "hidden_act": act, "layer_norm_eps": 1e-5,
            "bos_token_id": OPEN_CLIP_VOCAB - 2, "eos_token_id": OPEN_CLIP_VOCAB - 1, "pad_token_id": OPEN_CLIP_VOCAB - 1}


def clip_config(model: ModelConfig) -> dict[str, Any]:
    """transformers' CLIPConfig fields for `model` (its image size and context length included), or
    TransformersExportError naming what CLIPModel lacks."""
    config = sized_config(model.name, model.image_size, model.context_length)
    if model.init_logit_bias is not None or "init_logit_bias" in config:
        raise _unsupported(model.name, "logit bias (a SigLIP model; its towers are not SiglipModel's either)")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    embed = config["embed_dim"]
    return {"vision_config": {**vision_config(config, model.name, act), "projection_dim": embed},
            "text_config": {**text_config(config, model.name, act), "projection_dim": embed}, "projection_dim": embed}


def to_transformers(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP / CustomTextCLIP state dict under CLIPModel's names."""
    text = "text." if "text.token_embedding.weight" in state else ""
    out: dict[str, torch.Tensor] = {}

    def copy(source: str, target: str) -> None:
        for part in ("weight", "bias"):
            if f"{source}.{part}" in state:
                out[f"{target}.{part}"] = state[f"{source}.{part}"]

    def blocks(source: str, target: str, depth: int) -> None:
        for i in range(depth):
            block, layer = f"{source}.{i}", f"{target}.{i}"
            for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), state[f"{block}.attn.in_proj_weight"].chunk(3),
                                          state[f"{block}.attn.in_proj_bias"].chunk(3)):
                out[f"{layer}.self_attn.{name}.weight"], out[f"{layer}.self_attn.{name}.bias"] = weight, bias
            for source_name, target_name in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                copy(f"{block}.{source_name}", f"{layer}.{target_name}")

    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    copy("visual.ln_pre", "vision_model.pre_layrnorm")  # transformers' own spelling
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", config["vision_config"]["num_hidden_layers"])
    copy("visual.ln_post", "vision_model.post_layernorm")
    out["visual_projection.weight"] = state["visual.proj"].T
    out["text_model.embeddings.token_embedding.weight"] = state[f"{text}token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state[f"{text}positional_embedding"]
    blocks(f"{text}transformer.resblocks", "text_model.encoder.layers", config["text_config"]["num_hidden_layers"])
    copy(f"{text}ln_final", "text_model.final_layer_norm")
    out["text_projection.weight"] = state[f"{text}text_projection"].T
    out["logit_scale"] = state["logit_scale"].reshape(())
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_tokenizer(folder: Path, context_length: int) -> None:
    """CLIPTokenizer files made from open_clip's BPE vocabulary (the same 49408 tokens and merges)."""
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:1 + OPEN_CLIP_VOCAB - 2 * 256 - 2]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    sources = folder / "bpe"
    sources.mkdir()
    (sources / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (sources / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(sources / "vocab.json"), merges=str(sources / "merges.txt"),
                              model_max_length=context_length)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(sources)


def image_processor(config: dict[str, Any], model: ModelConfig):
    """CLIPImageProcessor doing open_clip's evaluation transform: resize the shorter side, centre crop."""
    from transformers import CLIPImageProcessor

    preprocess = PreprocessCfg(**{**dataclasses.asdict(PreprocessCfg()), **config.get("preprocess_cfg", {})})
    if preprocess.resize_mode != "shortest" or preprocess.interpolation not in RESAMPLE:
        raise _unsupported(model.name, f"image resizing like open_clip's {preprocess.resize_mode} / "
                                       f"{preprocess.interpolation} transform")
    size = config["vision_cfg"]["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=RESAMPLE[preprocess.interpolation], image_mean=list(preprocess.mean),
                              image_std=list(preprocess.std))


def _replaceable(out: Path, model: str) -> None:
    """`out` may be replaced whole only when it is missing, empty, or an earlier export of this kind
    (a CLIPModel config.json and nothing foreign beside it): an export never deletes a user's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TransformersExportError(f"cannot write {model}'s transformers export to {out}: it is a file; "
                                      "give a folder path (--out)")
    names = {p.name for p in out.iterdir()}
    config = out / "config.json"
    earlier = config.is_file() and json.loads(config.read_text() or "{}").get("model_type") == "clip"
    if names and not (earlier and names <= EXPORT_FILES):
        foreign = ", ".join(sorted(names - EXPORT_FILES)) or "no CLIPModel config.json"
        raise TransformersExportError(f"{out} holds other files ({foreign}); the transformers export replaces its "
                                      "folder whole: give an empty or new folder (--out)")


def write_transformers(state: dict[str, torch.Tensor], model: ModelConfig, out: Path) -> Path:
    """A folder `out` that CLIPModel and CLIPProcessor load, from open_clip weights `state`; built
    beside it, then renamed over an earlier export (never over other files), so it is never left
    half-written. Returns the folder."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPProcessor, CLIPTokenizer

    fields = clip_config(model)  # refusals first: nothing is written for a model CLIPModel cannot hold
    _replaceable(out, model.name)
    config = sized_config(model.name, model.image_size, model.context_length)
    processor = image_processor(config, model)
    tensors = to_transformers(state, fields)
    staging, old = out.with_name(f".{out.name}.staging"), out.with_name(f".{out.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        CLIPConfig(**fields, logit_scale_init_value=float(tensors["logit_scale"])).save_pretrained(staging)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer(staging, fields["text_config"]["max_position_embeddings"])
        CLIPProcessor(image_processor=processor, tokenizer=CLIPTokenizer.from_pretrained(staging)).save_pretrained(staging)
        sync_tree(staging)
        if out.exists():
            out.rename(old)
        try:
            staging.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # the earlier export stays where it was
            raise
        sync_folder(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
