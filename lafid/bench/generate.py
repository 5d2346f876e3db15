"""`lafid generate`: one video per bench case from a Wan model with the trained CoFE modules attached.

The model is rebuilt as training built it (`lafid.cofe.model.CoFEModel` from the CoFE recipe,
seeded like the trainer, so parts made from a `config` get the same random weights), its
trained weights (CoFE, LoRA; the EMA when the checkpoint has one) are loaded
(`lafid.cofe.checkpoint.checkpoint_weights`), and `sample` runs Wan's flow-matching sampling on its
transformer, VAE and text encoder, as diffusers' `WanPipeline` does (tested equal), with
text and face classifier-free guidance (`guided_velocity`); a `mode: i2v` recipe samples
image-to-video from a first frame. `--model-dir` names a local diffusers Wan pipeline folder
(`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`)
whose parts replace the recipe's. The case's reference image gives the experts their faces
(`lafid.cofe.api.reference_faces`: SCRFD box and landmarks, cut as the training loader cuts them); prompts
are embedded as in training. Videos are written to a temporary name and renamed, so a
rerun skips every case already written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from lafid.bench.build import REF_MARGIN, load_cases
from lafid.storage import write_text_atomic

SETTINGS = "generate.json"
I2V_CLASSES = ("WanImageToVideoPipeline",)  # a --model-dir of this class needs a mode: i2v recipe


@dataclass
class GenerateSettings:
    num_frames: int = 17
    height: int = 480
    width: int = 832
    steps: int = 30
    guidance: float = 5.0
    seed: int = 0
    fps: float = 16.0
    negative_prompt: str = ""
    face_guidance: float | None = None  # None: the face in every branch, text guidance only (`guided_velocity`)
    ema: bool = True  # the checkpoint's EMA weights when it has them
    device: str | None = None  # None: the GPU when there is one, else the CPU


def _recipe(recipe: str | Path, model_dir: str | Path | None):
    from lafid.cofe.config import ModelSource, load_cofe_recipe

    r = load_cofe_recipe(recipe)
    if model_dir is None:
        return r
    root = Path(model_dir)
    index = root / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{root}: no model_index.json; --model-dir takes a local diffusers Wan pipeline folder")
    kind = json.loads(index.read_text()).get("_class_name", "")
    if (kind in I2V_CLASSES) != (r.mode == "i2v"):
        raise ValueError(f"{root} is a {kind} but recipe {recipe} has mode {r.mode}: image-to-video pipelines "
                         "go with mode: i2v recipes, text-to-video ones with mode: t2v")
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root}: no {part}/ folder")
    encoder = {"image_encoder": ModelSource(path=root / "image_encoder")} if (root / "image_encoder").is_dir() else {}
    return r.model_copy(update={
        **encoder,
        "transformer": r.transformer.model_copy(update={"path": root / "transformer", "config": {}}),
        "vae": r.vae.model_copy(update={"path": root / "vae", "config": {}}),
        "text": r.text.model_copy(update={"path": root, "config": {}}),
    })


def load_model(recipe: str | Path, checkpoint: str | Path, model_dir: str | Path | None = None, ema: bool = True):
    """(CoFEModel with the checkpoint's weights, EMA ones unless `ema` is False (`checkpoint_weights`),
    in eval mode; its recipe; the weights file read)."""
    import torch

    from lafid.cofe.checkpoint import checkpoint_weights
    from lafid.cofe.model import CoFEModel

    weights, weights_file = checkpoint_weights(checkpoint, ema)
    r = _recipe(recipe, model_dir)
    torch.manual_seed(r.train.seed)  # as the trainer does: config-built parts get the weights training saw
    model = CoFEModel(r)
    if r.mode == "i2v" and model.transformer.config.in_channels != 2 * model.vae.config.z_dim + 4:
        raise ValueError(f"recipe {recipe} has mode i2v but its transformer takes "
                         f"{model.transformer.config.in_channels} channels, not an image-to-video transformer")
    expected = set(model.trainable_state())
    missing, unknown = expected - set(weights), set(weights) - expected
    if missing or unknown:
        raise ValueError(f"{weights_file} does not fit recipe {recipe}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unknown)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model.eval().requires_grad_(False), r, weights_file


def scheduler_for(r, model_dir: str | Path | None):
    from diffusers import UniPCMultistepScheduler

    if model_dir is not None and (Path(model_dir) / "scheduler").is_dir():
        return UniPCMultistepScheduler.from_pretrained(str(Path(model_dir) / "scheduler"), local_files_only=True)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=r.train.flow_shift)


def reference_batch(image: np.ndarray, face_size: int, margin: float, detector=None) -> dict:
    """The experts' inputs from a bench reference image (`lafid.cofe.api.reference_faces`), as a batch of one;
    `detected` says whether a face was found: without one, bench references are cut with the face box
    centred at 1/REF_MARGIN of the side."""
    import torch

    from lafid.cofe.api import NoFace, reference_faces

    try:
        face, id_face = reference_faces(image, face_size, margin, detector)
        detected = True
    except NoFace:
        half = 0.5 / REF_MARGIN
        face, id_face = reference_faces(image, face_size, margin, box=(0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half))
        detected = False
    return {"face": torch.from_numpy(face)[None], "id_face": torch.from_numpy(id_face)[None],
            "id_embedding": None, "has_id": torch.tensor([False]), "detected": detected}


def guided_velocity(model, latents, t, text, negative, features: dict, s: GenerateSettings,
                    condition=None, image=None):
    """Velocity with classifier-free guidance. Without `face_guidance`, the face conditions every
    branch and the text alone is guided: u(f, neg) + g_t (u(f, text) - u(f, neg)). With it, the
    two conditions are composed as in multi-condition CFG, the face over the face-dropped branch
    (`train.face_drop`): u(0, neg) + g_t (u(0, text) - u(0, neg)) + g_f (u(f, text) - u(0, text));
    g_f = 0 is the no-face model, text-guided. A scale <= 1 for the text skips its negative pass."""
    run = lambda txt, f: model.denoise(latents, t, txt, f, condition, image)  # noqa: E731
    branch = features if s.face_guidance is None else None  # the branch the text guidance acts on
    cond = run(text, branch)
    v = cond
    if s.guidance > 1:
        neg = run(negative, branch)
        v = neg + s.guidance * (cond - neg)
    if s.face_guidance is None:
        return v
    return v + s.face_guidance * (run(text, features) - cond)


def sample(model, scheduler, text, negative, features: dict, s: GenerateSettings, first: np.ndarray | None = None):
    """Wan flow-matching sampling with CoFE faces (what diffusers' WanPipeline / WanImageToVideoPipeline
    run, with `guided_velocity` as the guidance); `first`: the i2v first frame (H, W, 3) uint8,
    conditioned as training conditions it (`CoFEModel.i2v_condition` / `image_embeds`). Returns uint8
    frames (T, H, W, 3)."""
    import torch

    vae = model.vae.config
    condition = image = None
    if first is None:
        temporal, spatial = 2 ** sum(vae.temperal_downsample), 2 ** len(vae.temperal_downsample)
        shape = (1, vae.z_dim, (s.num_frames - 1) // temporal + 1, s.height // spatial, s.width // spatial)
    else:
        frames = torch.from_numpy(np.ascontiguousarray(first))[None, None].expand(1, s.num_frames, *first.shape)
        condition = model.i2v_condition(frames)
        image = model.image_embeds(frames)
        shape = (1, vae.z_dim, condition.shape[2], *condition.shape[-2:])
    dtype, device = model.transformer.dtype, model.transformer.device
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(s.seed)).to(device)
    image = None if image is None else image.to(dtype)
    text, negative = text.to(dtype), negative.to(dtype)
    scheduler.set_timesteps(s.steps, device=device)
    for t in scheduler.timesteps:
        v = guided_velocity(model, latents.to(dtype), t.expand(1), text, negative, features, s, condition, image)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1).to(device)
    video = model.vae.decode((latents * std + mean).to(model.vae.dtype), return_dict=False)[0]  # (1, 3, T, H, W)
    return ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_encoder_note(model, trained) -> str | None:
    """Says when generation embeds the i2v first frame with another tower than training did (`trained`:
    the training recipe; None when the same weights)."""
    import torch

    encoder = model.image_encoder
    if encoder is None or trained.image_encoder == model.recipe.image_encoder:
        return None
    if trained.image_encoder is None:  # training used the semantic expert's CLIP: compare the weights
        a, b = model.experts.semantic.model.state_dict(), encoder.tower.state_dict()
        if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
            return None
        return (f"training embedded i2v first frames with the semantic expert's CLIP; generation uses "
                f"{encoder.name}, other weights: the trained CoFE saw other image embeddings")
    return (f"training embedded i2v first frames with {trained.image_encoder.path}; generation uses "
            f"{encoder.name}: unless both hold the same weights, the trained CoFE saw other image embeddings")


def generate(bench: str | Path, out: str | Path, recipe: str | Path, checkpoint: str | Path,
             model_dir: str | Path | None = None, settings: GenerateSettings | None = None,
             on_case: Callable[[str, str], None] | None = None) -> dict:
    """Write OUT/<case_id>.mp4 for every case not written yet; returns counts."""
    import torch

    from lafid.cofe.data import fit
    from lafid.media import write_video

    s = settings or GenerateSettings()
    bench, out = Path(bench), Path(out)
    cases = load_cases(bench)
    todo = [c for c in cases if not (out / f"{c['case_id']}.mp4").exists()]
    out.mkdir(parents=True, exist_ok=True)
    if not todo:
        return {"cases": len(cases), "written": 0, "skipped": len(cases), "notes": []}
    model, r, weights = load_model(recipe, checkpoint, model_dir, s.ema)
    model.to(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes = []
    if s.face_guidance is not None and not r.train.face_drop:
        notes.append("--face-guidance with a recipe trained without face dropout (train.face_drop 0): the "
                     "face-free branch is the backbone (+ LoRA) that training never fitted")
    from lafid.cofe.config import load_cofe_recipe

    notes += filter(None, [image_encoder_note(model, load_cofe_recipe(recipe))])
    write_text_atomic(json.dumps({"bench": str(bench.resolve()), "recipe": str(recipe), "checkpoint": str(checkpoint),
                                  "weights": str(weights), "model_dir": None if model_dir is None else str(model_dir),
                                  **s.__dict__, "notes": notes}, indent=2) + "\n", out / SETTINGS)
    scheduler = scheduler_for(r, model_dir)
    from lafid.cofe.api import reference_detector

    detector = reference_detector()
    negative = model.text([s.negative_prompt])
    if r.mode == "i2v" and not all(c.get("first_image") for c in todo):
        raise ValueError(f"{bench} was built without the targets' first frames (first_image), which i2v "
                         f"generation starts from: rebuild it with `lafid bench build`")
    for c in todo:
        batch = reference_batch(read_rgb(bench / c["ref_image"]), r.data.face_size, r.data.face_margin, detector)
        text = model.text([c["prompt"] or ""])
        first = fit(read_rgb(bench / c["first_image"]), s.width, s.height) if r.mode == "i2v" else None
        with torch.no_grad():
            try:
                frames = list(sample(model, scheduler, text, negative, model.face_features(batch), s, first))
            finally:
                model.adapter.set_faces(None)
        final = out / f"{c['case_id']}.mp4"
        tmp = final.with_name(f".{final.name}.tmp.mp4")
        write_video(str(tmp), frames, s.fps)
        os.replace(tmp, final)
        if on_case:
            on_case(c["case_id"], "written" if batch["detected"] else "written (no face found in the reference)")
    return {"cases": len(cases), "written": len(todo), "skipped": len(cases) - len(todo), "notes": notes}
