"""Wan DiT + frozen VAE, text encoder and face experts + trainable CoFE (and optional LoRA).

`CoFEModel.forward` is Wan's flow-matching objective: x_t = (1 - s) x0 + s eps with a
shifted uniform s, target velocity eps - x0, timestep 1000 s. Batches may carry
precomputed `latents` / `text_embeds` (and, in i2v mode, `i2v_condition` /
`image_embeds`), which skip the VAE / text encoder / image tower.

In `mode: i2v` the transformer also gets Wan's image-to-video conditioning, built
as diffusers' `WanImageToVideoPipeline` builds it: the VAE latent of the clip's
first frame followed by zero frames, behind 4 mask channels that mark the given
frame, concatenated to the noisy latents on the channel axis (16 + 4 + 16 = 36
channels for Wan); and, when the transformer has `image_dim` (Wan2.1 I2V), the
penultimate hidden states of a CLIP vision tower on that frame (`ImageEncoder`:
the pipeline's image_encoder/ or the semantic expert's CLIP, processed as diffusers does).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lafid.cofe.config import CoFERecipe, TextConfig, ModelSource
from lafid.cofe.experts import FaceExperts, ImageEncoder
from lafid.cofe.fusion import CoFEAdapter


def frozen_dtype(recipe: CoFERecipe) -> torch.dtype | None:
    """dtype the frozen models load in (`train.frozen_dtype`); None: as built (float32)."""
    return torch.bfloat16 if recipe.train.frozen_dtype == "bfloat16" else None


def build_transformer(cfg: ModelSource, dtype: torch.dtype | None = None):
    from diffusers import WanTransformer3DModel

    if cfg.path:  # torch_dtype: read straight into `dtype`, never a float32 copy first
        return WanTransformer3DModel.from_pretrained(str(cfg.path), local_files_only=True, torch_dtype=dtype)
    return _cast(WanTransformer3DModel.from_config(cfg.config), dtype)


def build_vae(cfg: ModelSource, dtype: torch.dtype | None = None):
    from diffusers import AutoencoderKLWan

    if cfg.path:
        return AutoencoderKLWan.from_pretrained(str(cfg.path), local_files_only=True, torch_dtype=dtype)
    return _cast(AutoencoderKLWan.from_config(cfg.config), dtype)


def _cast(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """`model` in `dtype` but for the modules diffusers keeps in float32 (`_keep_in_fp32_modules`: norms,
    time embedding, RoPE), as `from_pretrained(torch_dtype=...)` loads them."""
    if dtype is None:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model


def build_adapter(transformer_config, expert_dims: dict[str, int], recipe: CoFERecipe) -> CoFEAdapter:
    c = recipe.cofe
    dim = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    return CoFEAdapter(dim, transformer_config.num_layers, expert_dims, face_tokens=c.face_tokens, heads=c.heads,
                       expert_hidden=c.expert_hidden, gate_hidden=c.gate_hidden, gate_inputs=c.gate_inputs,
                       injection=c.injection, id_projection=c.id_projection, null_key=c.null_key,
                       dropped=c.drop_experts, uniform_gate=c.gate == "uniform")


def image_encoder(recipe: CoFERecipe, experts: FaceExperts, image_dim: int | None,
                  dtype: torch.dtype | None = None) -> ImageEncoder | None:
    """The i2v image encoder (`ImageEncoder.build`) when the transformer takes an image embedding; warns
    when a pretrained transformer gets the semantic expert's CLIP instead of its pipeline's encoder."""
    if recipe.mode != "i2v" or not image_dim:
        return None
    if recipe.image_encoder is None and recipe.transformer.path:
        import warnings

        warnings.warn("i2v image embedding from the semantic expert's CLIP, not the Wan pipeline's image_encoder/ "
                      "the pretrained transformer was trained with: set image_encoder.path (lafid generate "
                      "--model-dir takes it from the pipeline folder)", stacklevel=2)
    encoder = ImageEncoder.build(recipe.image_encoder, experts.semantic, image_dim)
    return encoder if dtype is None else encoder.to(dtype)


class TextEncoder(nn.Module):
    """Wan's UMT5 encoder from a local dir (tokenizer/ + text_encoder/ subfolders, or both in one),
    or a tiny T5 encoder from config with the byte-level ByT5 tokenizer (it needs no vocabulary file)."""

    def __init__(self, cfg: TextConfig, dtype: torch.dtype | None = None):
        super().__init__()
        from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel, UMT5EncoderModel

        self.max_length = cfg.max_length
        if cfg.path:
            root = Path(cfg.path)
            sub = lambda name: str(root / name if (root / name).is_dir() else root)  # noqa: E731
            self.tokenizer = AutoTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True)
            self.model = UMT5EncoderModel.from_pretrained(sub("text_encoder"), local_files_only=True, dtype=dtype)
        else:
            self.tokenizer = ByT5Tokenizer()
            self.model = T5EncoderModel(T5Config(**cfg.config))
        if dtype is not None:
            self.model.to(dtype)
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
        dtype = frozen_dtype(recipe)  # bf16 frozen parts; CoFE (and LoRA) weights are made float32 below
        self.transformer = build_transformer(recipe.transformer, dtype).requires_grad_(False)
        self.vae = build_vae(recipe.vae, dtype).requires_grad_(False).eval()
        self.text = TextEncoder(recipe.text, dtype)
        self.experts = FaceExperts(recipe.identity, recipe.semantic, recipe.detail)
        wanted = recipe.data.id_backend
        if ":" in wanted and wanted != self.experts.identity.name:
            raise ValueError(f"data.id_backend {wanted!r} is not the identity expert's model "
                             f"({self.experts.identity.name}): shard embeddings of one would stand in for the other")
        sha = self.experts.identity.sha256
        if sha is not None and recipe.data.id_model_sha256 not in (None, sha):
            raise ValueError(f"data.id_model_sha256 {recipe.data.id_model_sha256} is not the identity expert's "
                             f"model file ({sha})")
        if dtype is not None:
            self.experts.to(dtype)
        self.image_encoder = image_encoder(recipe, self.experts, self.transformer.config.image_dim, dtype)
        if recipe.cofe.lora_rank:
            from peft import LoraConfig

            r = recipe.cofe.lora_rank
            self.transformer.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=recipe.cofe.lora_targets))
        if dtype is not None:  # LoRA weights train in float32 (bf16 would round small AdamW updates away)
            for p in self.transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        self.adapter = build_adapter(self.transformer.config, self.experts.dims, recipe).attach(self.transformer)
        if recipe.train.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything training changes (CoFE + LoRA), by name: what checkpoints hold."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> "CoFEModel":
        """Frozen parts stay in inference mode (IResNet BatchNorm, dropout) while CoFE trains."""
        super().train(mode)
        for frozen in (self.vae, self.text, self.experts, self.image_encoder):
            if frozen is not None:  # None: freed by drop_encoders
                frozen.eval()
        return self

    @torch.no_grad()
    def drop_encoders(self) -> None:
        """Free the frozen VAE, text encoder and experts: every input comes precomputed (`lafid cache`).
        The empty caption's embedding (text dropout) is kept."""
        self.register_buffer("empty_embedding", self.text([""]), persistent=False)
        self.vae = self.text = self.experts = self.image_encoder = None

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) -> normalised Wan latents (B, C, T', H', W')."""
        x = frames.permute(0, 4, 1, 2, 3).to(self.vae.device, self.vae.dtype) / 127.5 - 1.0
        z = self.vae.encode(x).latent_dist.mode()
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    @torch.no_grad()
    def i2v_condition(self, frames: torch.Tensor) -> torch.Tensor:
        """Wan I2V's extra channels for uint8 clips (B, T, H, W, 3): 4 mask channels (first frame given)
        + the latents of [first frame, zeros...], as `WanImageToVideoPipeline.prepare_latents` builds them."""
        n, t = frames.shape[:2]
        first = frames[:, :1].permute(0, 4, 1, 2, 3).to(self.vae.device, self.vae.dtype) / 127.5 - 1.0
        # the pipeline's zero frames are zeros after its [-1, 1] preprocessing (mid grey)
        pixels = torch.cat([first, first.new_zeros(n, 3, t - 1, *first.shape[-2:])], dim=2)
        z = self.vae.encode(pixels).latent_dist.mode()
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        z = (z - mean) / std
        temporal = getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample)
        mask = torch.zeros(n, 1, t, *z.shape[-2:], device=z.device, dtype=z.dtype)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(n, -1, temporal, *z.shape[-2:]).transpose(1, 2)
        return torch.cat([mask, z], dim=1)

    @torch.no_grad()
    def image_embeds(self, frames: torch.Tensor) -> torch.Tensor | None:
        """CLIP image embedding of each uint8 clip's first frame (`ImageEncoder`, as Wan2.1 I2V uses it);
        None when the transformer takes no image embedding."""
        if self.image_encoder is None:
            return None
        return self.image_encoder(frames[:, 0]).to(self.transformer.device)

    def face_features(self, batch: dict) -> dict[str, torch.Tensor]:
        device = self.transformer.device
        if "features" in batch:  # cached expert features (`lafid cache`)
            return {k: v.to(device) for k, v in batch["features"].items()}
        emb = batch.get("id_embedding")
        emb = None if emb is None else emb.to(device)
        mask = batch.get("id_mask")  # several reference faces per sample (`data.id_references`)
        return self.experts(batch["face"].to(device), emb, batch["has_id"].to(device), batch["id_face"].to(device),
                            None if mask is None else mask.to(device))

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                features: dict[str, torch.Tensor] | None, condition: torch.Tensor | None = None,
                image: torch.Tensor | None = None, keep_face: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity prediction; `features=None` runs the backbone alone; `condition` / `image`: i2v inputs."""
        self.adapter.set_faces(features, keep_face)
        x = noisy if condition is None else torch.cat([noisy, condition.to(noisy.dtype)], dim=1)
        return self.transformer(x, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]

    def empty_text(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Embedding of the empty caption (text dropout), (n, L, D)."""
        empty = self.empty_embedding if self.text is None else self.text([""])
        return empty.to(like.device, like.dtype).expand(n, -1, -1)

    def forward(self, batch: dict, generator: torch.Generator | list[torch.Generator],
                keep_face: torch.Tensor | None = None, keep_text: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of a batch (forward, so DDP wrappers see the call).

        Timesteps, noise and condition dropout are drawn from `generator`, or from one
        generator per sample (the trainer's: a sample's draws then do not depend on its
        batch). Condition dropout: `keep_face` / `keep_text` (B,) bool, or drawn at
        `train.face_drop` / `train.text_drop` when those rates are set.
        """
        device = self.transformer.device
        t = self.recipe.train
        x0 = batch["latents"].to(device) if "latents" in batch else self.encode_video(batch["frames"])
        text = batch["text_embeds"].to(device) if "text_embeds" in batch else self.text(batch["caption"])
        n = x0.shape[0]
        gens = generator if isinstance(generator, list) else [generator] * n

        def draw(fn, shape=()):  # one draw per sample, each from its generator
            return torch.stack([fn(shape, generator=g) for g in gens])

        s = draw(torch.rand)
        shift = t.flow_shift
        s = (shift * s / (1 + (shift - 1) * s)).to(device)
        noise = draw(torch.randn, x0.shape[1:]).to(device, x0.dtype)
        if keep_face is None and t.face_drop > 0:
            keep_face = draw(torch.rand) >= t.face_drop
        if keep_text is None and t.text_drop > 0:
            keep_text = draw(torch.rand) >= t.text_drop
        if keep_text is not None and not bool(keep_text.all()):
            text = torch.where(keep_text.to(device)[:, None, None], text, self.empty_text(n, text))
        condition = image = None
        if self.recipe.mode == "i2v":
            condition = batch["i2v_condition"].to(device) if "i2v_condition" in batch else \
                self.i2v_condition(batch["frames"])
            image = batch["image_embeds"].to(device) if "image_embeds" in batch else self.image_embeds(batch["frames"])
        sv = s.view(n, 1, 1, 1, 1).to(x0.dtype)
        noisy = (1 - sv) * x0 + sv * noise
        keep = None if keep_face is None else keep_face.to(device)
        pred = self.denoise(noisy, s * 1000, text.to(x0.dtype), self.face_features(batch), condition,
                            None if image is None else image.to(x0.dtype), keep)
        loss = F.mse_loss(pred.float(), (noise - x0).float())
        if self.recipe.cofe.balance_weight > 0:
            loss = loss + self.recipe.cofe.balance_weight * self.adapter.balance_loss()
        return loss
