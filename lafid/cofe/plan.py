"""`lafid train --plan`: per-GPU memory of a CoFE recipe, before anything loads.

Every model of the recipe is built on the meta device (from its `config`, or the
config file of its local `path`: no weights are read), its parameters counted,
and the bytes per GPU computed for a number of GPUs:

- frozen transformer weights in `train.frozen_dtype` (sharded over the GPUs under
  `train.distributed: fsdp`, whole on every GPU under ddp);
- frozen encoders (VAE, text encoder, experts, an i2v image encoder of its own) in the same dtype, whole on every
  GPU; none when training reads a cache (`lafid cache`: the trainer frees them),
  the second total;
- trained weights (CoFE + LoRA) float32, their gradients float32 and AdamW's two
  moments float32 (16 bytes a parameter; sharded under fsdp);
- FSDP's gather buffer: the largest transformer block (with its CoFE layer),
  whole, while it computes;
- activations kept for the backward pass at the recipe's frame count, size and
  batch, an estimate: per block and token, Korthikanti et al. (2022)'s
  `34 h` bytes of a bf16 transformer layer (flash attention, no s^2 term),
  scaled to Wan's block (self-, text and face cross-attention, FFN of
  `ffn_dim`): `(4 + 3 * 11 + 3 + 4 * ffn_dim / h) * h * 2` bytes; with gradient
  checkpointing only each block's input (`2 h` bytes per token) plus one block's
  full set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lafid.cofe.config import CoFERecipe, IdentityConfig, ModelSource, TextConfig

GiB = 2**30


def _config_file(path: Path, sub: str) -> Path:
    root = Path(path)
    for candidate in (root / sub / "config.json", root / "config.json"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no config.json in {root} (or {root / sub})")


def _diffusers_config(cls, source: ModelSource, sub: str) -> dict:
    if source.path is None:
        return dict(source.config)
    return dict(cls.load_config(str(_config_file(source.path, sub).parent)))


def meta_transformer(source: ModelSource) -> nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel.from_config(_diffusers_config(WanTransformer3DModel, source, "transformer"))


def meta_vae(source: ModelSource) -> nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan.from_config(_diffusers_config(AutoencoderKLWan, source, "vae"))


def meta_text(cfg: TextConfig) -> nn.Module:
    from transformers import AutoConfig, T5Config, T5EncoderModel, UMT5EncoderModel

    with torch.device("meta"):
        if cfg.path is None:
            return T5EncoderModel(T5Config(**cfg.config))
        config = AutoConfig.from_pretrained(str(_config_file(cfg.path, "text_encoder").parent), local_files_only=True)
        return UMT5EncoderModel(config)


def identity_params(cfg: IdentityConfig) -> int:
    if cfg.backend == "onnx":  # runs in onnxruntime; its weights are the graph's initializers
        import onnx

        model = onnx.load(str(cfg.path), load_external_data=False)
        return sum(int(torch.Size(list(t.dims)).numel()) for t in model.graph.initializer)
    from lafid.cofe.experts import IResNet

    with torch.device("meta"):
        return count(IResNet(cfg.layers, cfg.width, cfg.dim))


def meta_vision(kind: str, source: ModelSource) -> nn.Module:
    if kind == "clip":
        from transformers import CLIPVisionConfig as Config, CLIPVisionModel as Model
    else:
        from transformers import Dinov2Config as Config, Dinov2Model as Model
    config = Config(**source.config) if source.path is None else \
        Config.from_pretrained(str(source.path), local_files_only=True)
    with torch.device("meta"):
        return Model(config)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Plan:
    recipe: str
    gpus: int
    distributed: str
    dtype: str
    params: dict[str, int]                      # parameter counts by part
    bytes: dict[str, float] = field(default_factory=dict)   # per GPU
    tokens: int = 0

    @property
    def total(self) -> float:
        return sum(self.bytes.values())

    @property
    def cached_total(self) -> float:
        """Per GPU when training reads a cache: the trainer frees the VAE, text encoder and experts."""
        return self.total - sum(self.bytes[k] for k in ("vae", "text", "experts"))

    def table(self, gpu_gib: float | None = None) -> str:
        p = self.params
        lines = [f"recipe {self.recipe}: {self.gpus} GPU(s), {self.distributed}, frozen weights {self.dtype}, "
                 f"{self.tokens:,} video tokens per sample",
                 f"{'part':<34}{'parameters':>16}{'GiB per GPU':>14}"]
        rows = [("transformer (frozen)", p["transformer"], "transformer"),
                ("VAE (frozen)", p["vae"], "vae"), ("text encoder (frozen)", p["text"], "text"),
                ("experts id/sem/det (+ i2v image)", p["identity"] + p["semantic"] + p["detail"] + p["image_encoder"],
                 "experts"),
                ("trained: CoFE + LoRA (fp32)", p["trainable"], "trainable"),
                ("gradients (fp32)", p["trainable"], "gradients"),
                ("AdamW moments (2 x fp32)", 2 * p["trainable"], "optimizer"),
                ("FSDP gather buffer (one block)", p.get("largest_block", 0), "gather"),
                ("activations (estimate)", None, "activations")]
        for name, n, key in rows:
            if key in self.bytes:
                lines.append(f"{name:<34}{'' if n is None else f'{n:,}':>16}{self.bytes[key] / GiB:>14.2f}")
        lines.append(f"{'total':<34}{'':>16}{self.total / GiB:>14.2f}")
        lines.append(f"{'total reading a cache (lafid cache)':<34}{'':>16}{self.cached_total / GiB:>14.2f}")
        if gpu_gib:
            for what, total in (("", self.total), (" reading a cache", self.cached_total)):
                verdict = "fits" if total <= 0.9 * gpu_gib * GiB else "does NOT fit"
                lines.append(f"-> {verdict} a {gpu_gib:g} GiB GPU{what} "
                             f"(keeping 10% for the allocator and CUDA context)")
        return "\n".join(lines)


def count_params(recipe: CoFERecipe) -> dict[str, int]:
    """Parameter counts of every part of the recipe's CoFEModel, built on the meta device."""
    from lafid.cofe.model import build_adapter

    transformer = meta_transformer(recipe.transformer)
    frozen = count(transformer)
    lora = 0
    if recipe.cofe.lora_rank:
        from peft import LoraConfig

        r = recipe.cofe.lora_rank
        with torch.device("meta"):
            transformer.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=recipe.cofe.lora_targets))
        lora = count(transformer) - frozen
    semantic, detail = meta_vision("clip", recipe.semantic), meta_vision("dinov2", recipe.detail)
    image = recipe.image_encoder if recipe.mode == "i2v" else None  # None: the semantic expert's tower
    dims = {"id": recipe.identity.dim, "sem": semantic.config.hidden_size, "det": detail.config.hidden_size}
    with torch.device("meta"):
        adapter = build_adapter(transformer.config, dims, recipe)
    blocks = list(transformer.blocks)
    per_layer = [count(b) + count(layer) for b, layer in zip(blocks, adapter.layers)]
    return {"transformer": frozen, "lora": lora, "adapter": count(adapter), "trainable": count(adapter) + lora,
            "vae": count(meta_vae(recipe.vae)), "text": count(meta_text(recipe.text)),
            "identity": identity_params(recipe.identity), "semantic": count(semantic), "detail": count(detail),
            "image_encoder": 0 if image is None else count(meta_vision("clip", image)),
            "largest_block": max(per_layer, default=0), "blocks": len(blocks),
            "dim": transformer.config.num_attention_heads * transformer.config.attention_head_dim,
            "ffn_dim": transformer.config.ffn_dim, "patch": list(transformer.config.patch_size)}


def video_tokens(recipe: CoFERecipe, patch: list[int]) -> int:
    d = recipe.data
    frames = (d.num_frames - 1) // 4 + 1           # Wan VAE: 4x in time, first frame kept
    return (frames // patch[0]) * (d.height // 8 // patch[1]) * (d.width // 8 // patch[2])


def plan(recipe: CoFERecipe, gpus: int = 1) -> Plan:
    """Per-GPU memory of training `recipe` on `gpus` GPUs (see the module doc for what is counted)."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    p = count_params(recipe)
    t = recipe.train
    width = 2 if t.frozen_dtype == "bfloat16" else 4
    shard = gpus if t.distributed == "fsdp" else 1
    tokens = video_tokens(recipe, p["patch"])
    act_width = 2 if t.mixed_precision == "bf16" else 4
    h, per_token = p["dim"], (4 + 3 * 11 + 3 + 4 * p["ffn_dim"] / p["dim"]) * p["dim"] * act_width / 2
    batch = recipe.data.batch_size
    if t.gradient_checkpointing:
        activations = batch * tokens * (p["blocks"] * 2 * h * act_width / 2 + per_token)
    else:
        activations = batch * tokens * p["blocks"] * per_token
    out = Plan(recipe=recipe.name, gpus=gpus, distributed=t.distributed, dtype=t.frozen_dtype, params=p,
               tokens=tokens)
    out.bytes = {
        "transformer": p["transformer"] * width / shard,
        "vae": p["vae"] * width, "text": p["text"] * width,
        "experts": (p["identity"] + p["semantic"] + p["detail"] + p["image_encoder"]) * width,
        "trainable": p["trainable"] * 4 / shard, "gradients": p["trainable"] * 4 / shard,
        "optimizer": p["trainable"] * 8 / shard,
        "activations": float(activations),
    }
    if t.distributed == "fsdp":
        out.bytes["gather"] = p["largest_block"] * width
    return out
