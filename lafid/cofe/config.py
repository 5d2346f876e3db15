"""CoFE training recipes: YAML (yaml.safe_load) validated by pydantic, unknown keys rejected.

Every model part is either a local directory/file (`path`, real weights) or a
`config` mapping (random weights at that size: the tiny CPU recipe). Nothing is
fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lafid.face.pose import BUCKETS
from lafid.recipe import StrictModel, load_yaml_model


class ModelSource(StrictModel):
    """A local model directory (real weights) or an architecture config (random weights)."""

    path: Path | None = Field(None, description="local model directory or weights file")
    config: dict[str, Any] = Field(default_factory=dict, description="architecture config when no path is given")

    @model_validator(mode="after")
    def _exists(self):
        if self.path is not None and not self.path.exists():
            raise ValueError(f"model path does not exist: {self.path}")
        return self


class IdentityConfig(StrictModel):
    backend: Literal["onnx", "iresnet"] = "iresnet"
    path: Path | None = Field(None, description="ArcFace .onnx (backend onnx) or IResNet weights (iresnet)")
    dim: int = Field(512, description="embedding size; must match precomputed shard embeddings when used")
    layers: list[int] = Field([3, 13, 30, 3], description="IResNet blocks per stage (iresnet50 by default)")
    width: int = 64

    @model_validator(mode="after")
    def _needs_model(self):
        if self.backend == "onnx" and (self.path is None or not self.path.exists()):
            raise ValueError(f"identity backend onnx needs an existing .onnx path, got {self.path}")
        if self.path is not None and not self.path.exists():
            raise ValueError(f"identity weights not found: {self.path}")
        return self


class TextConfig(ModelSource):
    """UMT5 encoder + tokenizer directory (Wan's), or a tiny T5 config with the file-free ByT5 tokenizer."""

    max_length: int = 512


class DataConfig(StrictModel):
    shards: list[str] = Field(..., description="folders (searched for clips-*.parquet) or shard files; local paths or URLs (s3://, gs://, file://)")
    exclude: list[str] = Field([], description="bench folders (lafid bench build) whose identities training skips")
    num_frames: int = Field(5, ge=1, description="target frames per clip (Wan: 4k+1)")
    frame_stride: int = Field(2, ge=1, description="source frames between target frames")
    height: int = 64
    width: int = 64
    face_size: int = Field(112, description="side of the reference face crop given to the experts")
    face_margin: float = Field(0.3, ge=0, description="box enlargement on each side, share of the box side")
    bucket_weights: dict[str, float] = Field(default_factory=dict,
                                             description="epoch repeat factor per pose bucket (clip takes its max)")
    id_backend: str = Field("arcface", description="use shard identity embeddings only from this id_backend "
                                                  "(the identity expert's model, e.g. arcface:w600k_r50); "
                                                  "others are recomputed from the face")
    id_model_sha256: str | None = Field(
        None, description="use shard identity embeddings only from rows whose id_model_sha256 is this (the "
                          "identity model file's sha256); filled from identity.path with backend onnx; "
                          "None: id_backend names are compared only")
    id_references: int = Field(1, ge=1, description="ArcFace vectors per sample: the reference face plus up to "
                                                    "n-1 more reference frames across poses, one identity token "
                                                    "each (padded and masked when a clip has fewer)")
    seed: int = 0
    batch_size: int = 1
    num_workers: int = 0
    cache: Path | None = Field(None, description="folder of precomputed latents, text embeddings and expert "
                                                "features (`lafid cache`); training reads it, and decodes no "
                                                "video, when it exists")

    @model_validator(mode="after")
    def _known_buckets(self):
        unknown = set(self.bucket_weights) - set(BUCKETS)
        if unknown:
            raise ValueError(f"unknown pose buckets {sorted(unknown)}; known: {list(BUCKETS)}")
        return self

    @model_validator(mode="after")
    def _wan_shape(self):
        """Wan's VAE compresses time 4x (keeping the first frame) and space 8x, its DiT patches 2x2."""
        if self.num_frames % 4 != 1:
            n = self.num_frames
            near = sorted({max(1, n - (n - 1) % 4), n + (5 - n % 4) % 4})
            raise ValueError(f"num_frames {n}: Wan needs 4k+1 frames (e.g. {' or '.join(map(str, near))})")
        for side in ("height", "width"):
            v = getattr(self, side)
            if v % 16:
                raise ValueError(f"{side} {v}: Wan needs a multiple of 16 (VAE 8x, patch 2) "
                                 f"(e.g. {v - v % 16 or 16} or {v - v % 16 + 16})")
        return self


class CoFEConfig(StrictModel):
    face_tokens: int = Field(4, ge=1, description="tokens each expert is resampled to")
    heads: int = Field(8, description="heads of the shared projections' resampler")
    expert_hidden: int | None = Field(None, description="hidden width of each per-block expert (default dim/4)")
    gate_hidden: int = 256
    gate_inputs: list[Literal["face", "timestep", "hidden"]] = Field(
        ["face"], description="paper default: projected face features only; add timestep/hidden to condition on them")
    injection: Literal["fused", "per_expert"] = Field(
        "fused", description="fused: one face cross-attention on the gated sum of experts; per_expert: one per "
                             "expert, outputs mixed by the gate after attention (per-expert attention maps); fused is "
                             "the default by measurement (docs/cofe.md)")
    id_projection: Literal["resample", "expand"] = Field(
        "expand", description="P_id: one linear map of the ArcFace vector (the mean of the reference faces' "
                              "vectors) to face_tokens distinct tokens (expand), or learned queries attending to "
                              "the vectors (resample); expand is the default by measurement (docs/cofe.md)")
    null_key: bool = Field(False, description="one learned key with a zero value per face attention (an attention "
                                              "sink): a video token can take no face at all")
    balance_weight: float = Field(0.0, ge=0, description="weight of the gate load-balancing term (0 = off)")
    drop_experts: list[Literal["id", "sem", "det"]] = Field(
        [], description="ablation: experts whose gate weight is 0 (and gate input zeroed) in every block; the "
                        "kept experts' weights renormalise")
    gate: Literal["learned", "uniform"] = Field(
        "learned", description="ablation: uniform gives every kept expert the same weight instead of the gate's")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the backbone's attention (0 = off)")
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class TrainConfig(StrictModel):
    output_dir: Path = Path("out/cofe")
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warmup: constant, or linear / cosine decay to min_lr_ratio x lr at `steps`")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    ema_decay: float = Field(0.0, ge=0, lt=1,
                             description="EMA of the trained weights (0 = off); saved as ema.safetensors")
    face_drop: float = Field(0.0, ge=0, le=1, description="share of samples trained without the face "
                                                           "(classifier-free guidance on the face)")
    text_drop: float = Field(0.0, ge=0, le=1, description="share of samples trained with the empty caption")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    flow_shift: float = Field(3.0, description="Wan's sigma shift (3 for 480p, 5 for 720p)")
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    frozen_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the frozen transformer, VAE, text encoder and experts load in (torch_dtype); "
                               "bfloat16 halves their memory and needs mixed_precision: bf16")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer "
                           "state sharded over ranks (accelerate FSDP2), checkpoints sharded per rank")
    save_total_limit: int | None = Field(None, ge=1, description="keep only this many newest checkpoints")

    @model_validator(mode="after")
    def _dtype_needs_autocast(self):
        if self.frozen_dtype == "bfloat16" and self.mixed_precision != "bf16":
            raise ValueError("frozen_dtype bfloat16 needs mixed_precision: bf16 (trained weights stay float32)")
        return self


class CoFERecipe(StrictModel):
    name: str
    description: str = ""
    mode: Literal["t2v", "i2v"] = Field("t2v", description="t2v: text + face; i2v: Wan's image-to-video conditioning "
                                                          "(first-frame latent + mask channels, CLIP image embedding "
                                                          "when the transformer has image_dim) as well")
    data: DataConfig
    transformer: ModelSource
    vae: ModelSource
    text: TextConfig
    identity: IdentityConfig = IdentityConfig()
    semantic: ModelSource
    detail: ModelSource
    image_encoder: ModelSource | None = Field(
        None, description="i2v with an image_dim transformer (Wan2.1 I2V): the CLIP vision tower of the image "
                          "embedding, a Wan pipeline's image_encoder/ folder (its image_processor/ beside it); "
                          "None: the semantic expert's CLIP, which a pretrained Wan2.1 I2V transformer was not "
                          "trained with unless it is Wan's encoder")
    cofe: CoFEConfig = CoFEConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _identity_hash(self):
        """With an ONNX identity expert, shard embeddings must come from that very file: its sha256
        goes to data.id_model_sha256 (a different one given there is an error)."""
        if self.identity.backend != "onnx":
            return self
        from lafid.face.embed import ArcFaceEncoder, file_sha256

        sha = file_sha256(ArcFaceEncoder.find_model(self.identity.path))  # the file the expert will load
        if self.data.id_model_sha256 not in (None, sha):
            raise ValueError(f"data.id_model_sha256 {self.data.id_model_sha256} is not the sha256 of "
                             f"identity.path {self.identity.path} ({sha})")
        self.data.id_model_sha256 = sha
        return self

    @model_validator(mode="after")
    def _mode_fits_transformer(self):
        cfg = self.transformer.config
        if not cfg:  # a local checkpoint: checked against its config when built
            return self
        z = self.vae.config.get("z_dim", 16)
        want = 2 * z + 4 if self.mode == "i2v" else z
        if cfg.get("in_channels", 16) != want:
            raise ValueError(f"mode {self.mode} with vae z_dim {z} needs transformer in_channels {want}, "
                             f"got {cfg.get('in_channels', 16)}")
        if self.mode == "t2v" and cfg.get("image_dim"):
            raise ValueError("transformer has image_dim (an I2V model): set mode: i2v")
        if cfg.get("image_dim") and self.text.max_length != 512:
            raise ValueError("an I2V transformer with image_dim splits image and text context at 512 text tokens "
                             "(diffusers' Wan attention): set text.max_length: 512")
        return self


def load_cofe_recipe(recipe: str | Path) -> CoFERecipe:
    """A path, or the name of a bundled recipe in pipelines/ ("cofe_tiny"); errors name the key."""
    return load_yaml_model(recipe, CoFERecipe)
