"""The three frozen face experts: identity (ArcFace), semantic (CLIP vision), detail (DINOv2).

Production weights come from local model directories/files the user supplies (no
hub downloads). Without one, an expert is built from its config with random
weights: the same architecture at a tiny size, which is what CPU tests train on.
Identity embeddings precomputed by the curation pipeline are used when present.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lafid.cofe.checkpoint import load_weights
from lafid.cofe.config import IdentityConfig, ModelSource
from lafid.face.embed import ARCFACE_MEAN, ARCFACE_SIZE, ARCFACE_STD, ArcFaceEncoder


class _IBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.down is None else self.down(x))


class IResNet(nn.Module):
    """ArcFace's IResNet (insightface arcface_torch layout), 112x112 RGB in [-1, 1] -> embedding."""

    def __init__(self, layers: list[int], width: int = 64, dim: int = 512):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        stages, cin = [], width
        for n, cout in zip(layers, chans):
            stages += [_IBlock(cin, cout, 2)] + [_IBlock(cout, cout, 1) for _ in range(n - 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.Flatten(), nn.Linear(cin * 7 * 7, dim), nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class IdentityExpert(nn.Module):
    """f_id: one 512-d (or `dim`) ArcFace vector per face, as a single token (one token per face when a
    sample has several, `data.id_references`).

    Backends: `onnx` runs an insightface ArcFace model (w600k_r50.onnx, glintr100.onnx,
    w600k_mbf.onnx) through the curation pipeline's own encoder (`lafid.face.embed`:
    insightface `model_zoo`, same input scaling), so both see a face alike; `iresnet`
    runs the torch port (weights from a .safetensors or state-dict file, random when
    none). Rows that carry a precomputed embedding skip both.
    """

    def __init__(self, cfg: IdentityConfig):
        super().__init__()
        self.dim = cfg.dim
        self.arcface = None
        self.net = None
        if cfg.backend == "onnx":
            self.arcface = ArcFaceEncoder(cfg.path, threads=torch.get_num_threads(), use_gpu=torch.cuda.is_available())
            self.name = self.arcface.name  # "arcface:<model>", as the identity stage writes `id_backend`
            self.sha256 = self.arcface.model_sha256  # as it writes `id_model_sha256`
        else:
            self.net = IResNet(cfg.layers, cfg.width, cfg.dim)
            if cfg.path:
                self.net.load_state_dict(load_weights(cfg.path))
            self.name = f"arcface:{Path(cfg.path).stem}" if cfg.path else "arcface:random-iresnet"
            self.sha256 = None  # a torch port: no ONNX file whose hash shards could carry
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 faces (B, H, W, 3) RGB, ArcFace-aligned -> (B, dim) L2-normalised embeddings."""
        x = faces.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (ARCFACE_SIZE, ARCFACE_SIZE):
            x = F.interpolate(x, size=(ARCFACE_SIZE, ARCFACE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255)  # an image again, as both backends take
        if self.arcface is not None:
            chips = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            emb = torch.from_numpy(self.arcface.embed(list(chips))).to(faces.device)
        else:
            emb = self.net(((x - ARCFACE_MEAN) / ARCFACE_STD).to(next(self.net.parameters()).device))
        return F.normalize(emb.float(), dim=-1)

    def forward(self, faces: torch.Tensor, precomputed: torch.Tensor | None = None,
                has_precomputed: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, dim) tokens; rows flagged in `has_precomputed` take `precomputed` as is, the others are
        encoded.

        Several faces per sample (`data.id_references`): `faces` (B, N, H, W, 3), `precomputed`
        (B, N, dim), `has_precomputed` and `mask` (B, N) -> (B, N, dim), one token per face; a
        padded face (`mask` False) is never encoded and gives a zero token, which the projection masks.
        """
        if faces.dim() == 4:  # one face per sample: N = 1
            faces = faces[:, None]
            precomputed = None if precomputed is None else precomputed[:, None]
            has_precomputed = None if has_precomputed is None else has_precomputed[:, None]
        b, n = faces.shape[:2]
        valid = torch.ones(b * n, dtype=torch.bool, device=faces.device) if mask is None else \
            mask.reshape(-1).to(faces.device)
        use = torch.zeros_like(valid) if precomputed is None or has_precomputed is None else \
            has_precomputed.reshape(-1).to(valid.device) & valid
        emb = torch.zeros(b * n, self.dim, device=faces.device)
        if bool(use.any()):
            emb[use] = precomputed.reshape(b * n, -1)[use].float().to(emb.device)
        need = valid & ~use
        if bool(need.any()):
            emb[need] = self.encode(faces.reshape(b * n, *faces.shape[2:])[need]).to(emb.device)
        return F.normalize(emb, dim=-1).view(b, n, self.dim)


class VisionExpert(nn.Module):
    """Patch tokens (CLS included) of a frozen transformers vision tower: CLIP (semantic) or DINOv2 (detail)."""

    MEAN_STD = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

    def __init__(self, kind: str, cfg: ModelSource):
        super().__init__()
        if kind == "clip":
            from transformers import CLIPVisionConfig as Config, CLIPVisionModel as Model
        else:
            from transformers import Dinov2Config as Config, Dinov2Model as Model
        if cfg.path:
            self.model = Model.from_pretrained(str(cfg.path), local_files_only=True)
        else:
            self.model = Model(Config(**cfg.config))
        self.kind = kind
        self.image_size = self.model.config.image_size
        self.patch_size = self.model.config.patch_size
        self.dim = self.model.config.hidden_size
        mean, std = self.MEAN_STD[kind]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, faces: torch.Tensor, hidden_layer: int | None = None) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> tokens (B, N, dim): the last hidden state, or hidden state
        `hidden_layer` (-2: Wan I2V's CLIP image embedding).

        CLIP sees its native `image_size`. DINOv2 (which interpolates its position
        embeddings) is never given an upsampled image: a crop smaller than its
        `image_size` is fed at its own size, rounded down to whole patches."""
        x = faces.permute(0, 3, 1, 2).float() / 255.0
        side = self.image_size
        if self.kind == "dinov2":
            side = min(side, max(self.patch_size, min(x.shape[-2:]) // self.patch_size * self.patch_size))
        size = (side, side)
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        if hidden_layer is None:
            return self.model(pixel_values=x).last_hidden_state
        return self.model(pixel_values=x, output_hidden_states=True).hidden_states[hidden_layer]


class FaceExperts(nn.Module):
    """The three frozen experts; `forward` gives the feature dict CoFEAdapter.faces expects."""

    def __init__(self, identity: IdentityConfig, semantic: ModelSource, detail: ModelSource):
        super().__init__()
        self.identity = IdentityExpert(identity)
        self.semantic = VisionExpert("clip", semantic)
        self.detail = VisionExpert("dinov2", detail)

    @property
    def dims(self) -> dict[str, int]:
        return {"id": self.identity.dim, "sem": self.semantic.dim, "det": self.detail.dim}

    def forward(self, faces: torch.Tensor, id_embedding: torch.Tensor | None = None,
                has_id: torch.Tensor | None = None, id_faces: torch.Tensor | None = None,
                id_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`id_faces`: the identity expert's own (ArcFace-aligned) faces, (B, N, ...) with `id_mask` (B, N)
        when several per sample; `faces` when not given."""
        return {"id": self.identity(faces if id_faces is None else id_faces, id_embedding, has_id, id_mask),
                "sem": self.semantic(faces), "det": self.detail(faces)}


class ImageEncoder(nn.Module):
    """Wan2.1 I2V's image embedding of a clip's first frame: the penultimate hidden states of a CLIP vision
    tower on the frame as `CLIPImageProcessor` prepares it (shortest side to its size, bicubic, centre
    crop, CLIP normalisation), as diffusers' `WanImageToVideoPipeline.encode_image` does.

    The tower is a pipeline folder's `image_encoder/` (`image_encoder.path`, its `image_processor/`
    beside it), else the semantic expert's CLIP (`name` says which), given the same processing."""

    def __init__(self, tower: nn.Module, processor, name: str):
        super().__init__()
        self.tower, self.processor, self.name = tower, processor, name
        self.dim = tower.config.hidden_size
        self.requires_grad_(False).eval()

    @classmethod
    def build(cls, source: ModelSource | None, semantic: "VisionExpert", image_dim: int) -> "ImageEncoder":
        from transformers import CLIPImageProcessor, CLIPVisionModel

        def processor_at(side: int):
            return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

        if source is None:
            encoder = cls(semantic.model, processor_at(semantic.image_size), "the semantic expert's CLIP")
        elif source.path is None:  # an architecture config: random weights (sizing, tests)
            from transformers import CLIPVisionConfig

            tower = CLIPVisionModel(CLIPVisionConfig(**source.config))
            encoder = cls(tower, processor_at(tower.config.image_size), "image_encoder config")
        else:
            path = Path(source.path)
            tower = CLIPVisionModel.from_pretrained(str(path), local_files_only=True)
            beside = path.parent / "image_processor"
            processor = CLIPImageProcessor.from_pretrained(str(beside if beside.is_dir() else path),
                                                           local_files_only=True)
            encoder = cls(tower, processor, str(path))
        if encoder.dim != image_dim:
            raise ValueError(f"i2v image encoder ({encoder.name}) gives {encoder.dim}-d embeddings but the "
                             f"transformer's image_dim is {image_dim}: Wan2.1 I2V takes its pipeline's "
                             "image_encoder/ (CLIP ViT-H/14, 1280-d); set image_encoder.path")
        return encoder

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> (B, tokens, dim) in the tower's dtype."""
        pixels = self.processor(images=list(images.cpu().numpy()), return_tensors="pt").pixel_values
        param = next(self.tower.parameters())
        return self.tower(pixel_values=pixels.to(param.device, param.dtype),
                          output_hidden_states=True).hidden_states[-2]
