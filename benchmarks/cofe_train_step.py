"""CoFE train-step time and peak memory, uncached vs cached inputs side by side, and the loader's clips/s.

    python benchmarks/cofe_train_step.py [--recipe cofe_tiny] [--shards DIR] [--steps 20]
    python benchmarks/cofe_train_step.py --recipe cofe_wan21_1_3b_480p --steps 5     # on a GPU
    python benchmarks/cofe_train_step.py --recipe cofe_wan21_1_3b_480p --synthetic   # no shards, no video

`--synthetic` times the step as training on `lafid cache` tensors runs it: random
latents, text embeddings and expert features of the recipe's shapes (features from
the experts run once on random faces), the transformer + CoFE forward, backward and
AdamW step under bf16 autocast, with the recipe's gradient checkpointing and without
it. It needs no shards and no decoder, so it runs where only torch and diffusers are
installed; the text encoder is cut to one layer (only its empty-caption embedding is
used once inputs are cached).

Without --shards the sample footage is curated first (demo recipe, in-process).
Each variant runs in its own process; peak memory is that of its timed steps
(CUDA allocated on a GPU; on CPU the main process's peak resident set, reset
before them, DataLoader workers apart): `uncached` decodes video and runs
the VAE, text encoder and experts every step; `cached` first runs `lafid cache`
(timed apart) and then trains on its tensors. Models given by `config` get random
weights (same seed in both variants). The loader must supply clips at least as
fast as a step consumes them (batch_size x grad_accum per step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lafid.cofe.config import load_cofe_recipe


def curated_shards(folder: Path) -> Path:
    from lafid import media
    from lafid.recipe import load_recipe
    from lafid.runner import curate

    curate(load_recipe("demo"), media.make_sample_set(str(folder / "input")), folder / "shards", executor="sequential")
    return folder / "shards"


def loader_rate(data, epochs: int) -> float:
    """Clips/s of one DataLoader running on through `epochs` epochs, as the trainer uses it (worker start included)."""
    from lafid.cofe.data import ClipDataset, collate

    ds = ClipDataset(data)
    ds.spans_epochs = True
    total = sum(ds.epoch_length(e) for e in range(epochs))
    clips, start = 0, time.perf_counter()
    for batch in DataLoader(ds, batch_size=data.batch_size, num_workers=data.num_workers, collate_fn=collate):
        clips += len(batch["clip_id"])
        if clips >= total:
            break
    return clips / (time.perf_counter() - start)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, since the process began


def variant(args) -> dict:
    """One variant in this process: build, (cache,) warm up 2 steps, time `steps` steps."""
    from lafid.cofe.train import Trainer

    r = load_cofe_recipe(args.recipe)
    cache = args.work / "cache" if args.only == "cached" else None
    recipe = r.model_copy(update={
        "data": r.data.model_copy(update={"shards": [str(args.shards)], "cache": cache}),
        "train": r.train.model_copy(update={"output_dir": args.work / args.only, "save_every": 10**9,
                                            "steps": args.steps + 2, "log_every": 10**9})})
    out = {"variant": args.only}
    if cache is not None:
        from lafid.cofe.precompute import build_cache

        made = build_cache(recipe, cache)
        out.update(cache_s=made.seconds, cache_clips=made.clips,
                   cache_mib=sum(f.stat().st_size for f in cache.glob("part-*")) / 2**20)
    trainer = Trainer(recipe)
    trainer.fit(steps=2, progress=False)  # warm-up: first-call allocations, worker start
    reset_peak_memory()  # the peak of the timed steps only (main process; DataLoader workers apart)
    result = trainer.fit(progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # peak memory read before the loader runs
    out.update(step_s=result.seconds / args.steps, peak_mib=peak_memory_mib(), losses=result.losses,
               trainable=sum(p.numel() for p in trainer.core.trainable_state().values()),
               loader=loader_rate(recipe.data, args.loader_epochs),
               clips_per_step=recipe.data.batch_size * recipe.train.grad_accum)
    return out


def synthetic_batch(model, recipe, device: str) -> dict:
    """Cached-input batch of the recipe's shapes: latents, text embeddings, expert features (and i2v inputs)."""
    from lafid.cofe.model import frozen_dtype
    from lafid.face.embed import ARCFACE_SIZE

    d, tc, vae = recipe.data, model.transformer.config, model.vae.config
    n, z = d.batch_size, vae.z_dim
    temporal = getattr(vae, "scale_factor_temporal", None) or 2 ** sum(vae.temperal_downsample)
    spatial = getattr(vae, "scale_factor_spatial", None) or 2 ** len(vae.temperal_downsample)
    shape = (n, z, (d.num_frames - 1) // temporal + 1, d.height // spatial, d.width // spatial)
    dtype = frozen_dtype(recipe) or torch.float32
    g = torch.Generator().manual_seed(0)
    bf16 = recipe.train.mixed_precision == "bf16"
    face = torch.randint(0, 256, (n, d.face_size, d.face_size, 3), dtype=torch.uint8, generator=g)
    id_face = torch.randint(0, 256, (n, ARCFACE_SIZE, ARCFACE_SIZE, 3), dtype=torch.uint8, generator=g)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        feats = model.experts(face.to(device), None, torch.zeros(n, dtype=torch.bool, device=device), id_face.to(device))
    batch = {"latents": torch.randn(shape, generator=g).to(device, dtype),
             "text_embeds": torch.randn(n, recipe.text.max_length, tc.text_dim, generator=g).to(device, dtype),
             "features": {k: v.detach() for k, v in feats.items()}}
    if recipe.mode == "i2v":
        batch["i2v_condition"] = torch.randn((n, tc.in_channels - z, *shape[2:]), generator=g).to(device, dtype)
        first = torch.randint(0, 256, (n, 1, d.height, d.width, 3), dtype=torch.uint8, generator=g)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            image = model.image_embeds(first)  # the CLIP tower's tokens of a first frame, as training computes them
        if image is not None:
            batch["image_embeds"] = image.to(device, dtype)
    return batch


def synthetic(args) -> None:
    """Transformer + CoFE train steps on random cached-input tensors, with and without gradient checkpointing."""
    from lafid.cofe.model import CoFEModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = load_cofe_recipe(args.recipe)
    r = r.model_copy(update={"text": r.text.model_copy(update={"config": {**r.text.config, "num_layers": 1}})})
    start = time.perf_counter()
    torch.manual_seed(r.train.seed)
    model = CoFEModel(r).to(device)
    batch = synthetic_batch(model, r, device)
    model.drop_encoders()
    built = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=r.train.lr)
    generator = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    tokens = batch["latents"][0, 0].numel() // 4  # Wan patchifies 1x2x2
    print(f"recipe {r.name} ({r.data.num_frames}x{r.data.height}x{r.data.width} -> {tokens} video tokens, batch "
          f"{r.data.batch_size}, mode {r.mode}, injection {r.cofe.injection}) on {name}; trainable params "
          f"{sum(p.numel() for p in params):,}; built in {built:.0f} s")
    for checkpointing in (r.train.gradient_checkpointing, not r.train.gradient_checkpointing):
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        else:
            model.transformer.disable_gradient_checkpointing()
        times = []
        try:
            reset_peak_memory()
            for i in range(args.steps + 2):  # 2 warm-up steps
                t0 = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=r.train.mixed_precision == "bf16"):
                    loss = model(batch, generator)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            line = (f"{np.median(times[2:]) * 1e3:10.1f} ms/step (median of {args.steps}), peak "
                    f"{peak_memory_mib() / 1024:.1f} GiB {'CUDA allocated' if device == 'cuda' else 'RSS'}, "
                    f"loss {loss.item():.4f}")
        except torch.OutOfMemoryError as exc:
            line = f"out of memory ({str(exc).splitlines()[0][:120]})"
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        print(f"gradient checkpointing {'on ' if checkpointing else 'off'}: {line}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="cofe_tiny")
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loader-epochs", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true", help="random cached-input tensors: no shards, no decoding")
    ap.add_argument("--only", choices=["uncached", "cached"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.synthetic:
        synthetic(args)
        return
    if args.only:
        print(json.dumps(variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or curated_shards(Path(tmp))
        rows = {}
        for name in ("uncached", "cached"):
            cmd = [sys.executable, __file__, "--recipe", args.recipe, "--shards", str(shards), "--steps",
                   str(args.steps), "--loader-epochs", str(args.loader_epochs), "--only", name, "--work", tmp]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{name} variant failed:\n{run.stderr[-4000:]}")
            rows[name] = json.loads(run.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    r = load_cofe_recipe(args.recipe)
    d = r.data
    print(f"recipe {r.name} ({d.num_frames}x{d.height}x{d.width}, batch {d.batch_size}, frozen {r.train.frozen_dtype}) "
          f"on {device}; trainable params {rows['cached']['trainable']:,}; {args.steps} timed steps")
    mem = "CUDA allocated" if torch.cuda.is_available() else "RSS, main"
    print(f"{'':<28}{'uncached':>14}{'cached':>14}")
    print(f"{'train step (ms)':<28}{rows['uncached']['step_s'] * 1e3:>14.1f}{rows['cached']['step_s'] * 1e3:>14.1f}")
    label = f"peak memory (MiB, {mem})"
    print(f"{label:<28}{rows['uncached']['peak_mib']:>14.1f}{rows['cached']['peak_mib']:>14.1f}")
    for name in ("uncached", "cached"):
        v = rows[name]
        need = v["clips_per_step"] / v["step_s"]
        print(f"loader {name:<9} {v['loader']:8.2f} clips/s vs {need:.2f} consumed -> "
              f"{'keeps up' if v['loader'] >= need else 'STARVES the step'} ({v['loader'] / need:.1f}x)")
    c = rows["cached"]
    print(f"cache: {c['cache_clips']} clips in {c['cache_s']:.1f}s ({c['cache_mib']:.1f} MiB on disk)")


if __name__ == "__main__":
    main()
