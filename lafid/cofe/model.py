"""Wan2.1 DiT + frozen VAE, text encoder and face experts + trainable CoFE (and optional LoRA).

`CoFEModel.forward` is Wan's flow-matching objective: x_t = (1 - s) x0 + s eps with a
shifted uniform s, target velocity eps - x0, timestep 1000 s. Batches may carry
precomputed `latents` / `text_embeds`, which skip the VAE / text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lafid.cofe.config import CoFERecipe, TextConfig, ModelSource
from lafid.cofe.experts import FaceExperts
from lafid.cofe.fusion import CoFEAdapter


def build_transformer(cfg: ModelSource):
    from diffusers import WanTransformer3DModel

    if cfg.path:
        return WanTransformer3DModel.from_pretrained(str(cfg.path), local_files_only=True)
    return WanTransformer3DModel.from_config(cfg.config)


def build_vae(cfg: ModelSource):
    from diffusers import AutoencoderKLWan

    if cfg.path:
        return AutoencoderKLWan.from_pretrained(str(cfg.path), local_files_only=True)
    return AutoencoderKLWan.from_config(cfg.config)


def build_adapter(transformer_config, expert_dims: dict[str, int], recipe: CoFERecipe) -> CoFEAdapter:
    c = recipe.cofe
    dim = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    return CoFEAdapter(dim, transformer_config.num_layers, expert_dims, face_tokens=c.face_tokens, heads=c.heads,
                       expert_hidden=c.expert_hidden, gate_hidden=c.gate_hidden, gate_inputs=c.gate_inputs)


class TextEncoder(nn.Module):
    """Wan's UMT5 encoder from a local dir (tokenizer/ + text_encoder/ subfolders, or both in one),
    or a tiny T5 encoder from config with the byte-level ByT5 tokenizer (it needs no vocabulary file)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel, UMT5EncoderModel

        self.max_length = cfg.max_length
        if cfg.path:
            root = Path(cfg.path)
            sub = lambda name: str(root / name if (root / name).is_dir() else root)  # noqa: E731
            self.tokenizer = AutoTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(sub("text_encoder"), local_files_only=True)
        else:
            self.tokenizer = ByT5Tokenizer()
            self.model = T5EncoderModel(T5Config(**cfg.config))
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length, dim), zero past each caption's end as in Wan's pipeline."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").to(self.model.device)
        hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        return hidden * tok.attention_mask.unsqueeze(-1).to(hidden.dtype)


class CoFEModel(nn.Module):
    def __init__(self, recipe: CoFERecipe):
        super().__init__()
        self.recipe = recipe
        self.transformer = build_transformer(recipe.transformer).requires_grad_(False)
        self.vae = build_vae(recipe.vae).requires_grad_(False).eval()
        self.text = TextEncoder(recipe.text)
        self.experts = FaceExperts(recipe.identity, recipe.semantic, recipe.detail)
        if recipe.cofe.lora_rank:
            from peft import LoraConfig

            r = recipe.cofe.lora_rank
            self.transformer.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=recipe.cofe.lora_targets))
        self.adapter = build_adapter(self.transformer.config, self.experts.dims, recipe).attach(self.transformer)
        if recipe.train.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything training changes (CoFE + LoRA), by name: what checkpoints hold."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> "CoFEModel":
        """Frozen parts stay in inference mode (IResNet BatchNorm, dropout) while CoFE trains."""
        super().train(mode)
        for frozen in (self.vae, self.text, self.experts):
            frozen.eval()
        return self

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> normalised Wan latents (B, C, T', H', W')."""
        x = frames.permute(0, 4, 1, 2, 3).to(self.vae.device, self.vae.dtype) / 127.5 - 1.0
        z = self.vae.encode(x).latent_dist.mode()
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    def face_features(self, batch: dict) -> dict[str, torch.Tensor]:
        device = self.transformer.device
        emb = batch.get("id_embedding")
        emb = None if emb is None else emb.to(device)
        return self.experts(batch["face"].to(device), emb, batch["has_id"].to(device), batch["id_face"].to(device))

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                features: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Velocity prediction; `features=None` runs the backbone alone."""
        self.adapter.set_faces(features)
        return self.transformer(noisy, timestep, text, return_dict=False)[0]

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of a batch (forward, so DDP wrappers see the call)."""
        device = self.transformer.device
        x0 = batch["latents"].to(device) if "latents" in batch else self.encode_video(batch["frames"])
        text = batch["text_embeds"].to(device) if "text_embeds" in batch else self.text(batch["caption"])
        n = x0.shape[0]
        s = torch.rand(n, generator=generator)
        shift = self.recipe.train.flow_shift
        s = (shift * s / (1 + (shift - 1) * s)).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
        sv = s.view(n, 1, 1, 1, 1).to(x0.dtype)
        noisy = (1 - sv) * x0 + sv * noise
        pred = self.denoise(noisy, s * 1000, text.to(x0.dtype), self.face_features(batch))
        return F.mse_loss(pred.float(), (noise - x0).float())
