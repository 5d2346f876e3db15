"""CoFE train-step time and peak memory, uncached vs cached inputs side by side, and the loader's clips/s.

    python benchmarks/cofe_train_step.py [--recipe cofe_tiny] [--shards DIR] [--steps 20]
    python benchmarks/cofe_train_step.py --recipe cofe_wan21_1_3b_480p --steps 5     # on a GPU

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

import torch
from torch.utils.data import DataLoader

from lafid.cofe.config import load_cofe_recipe
from lafid.cofe.data import ClipDataset, collate


def curated_shards(folder: Path) -> Path:
    from lafid import media
    from lafid.recipe import load_recipe
    from lafid.runner import curate

    curate(load_recipe("demo"), media.make_sample_set(str(folder / "input")), folder / "shards", executor="sequential")
    return folder / "shards"


def loader_rate(data, epochs: int) -> float:
    """Clips/s of one DataLoader running on through `epochs` epochs, as the trainer uses it (worker start included)."""
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
        from lafid.cofe.cache import build_cache

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="cofe_tiny")
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loader-epochs", type=int, default=2)
    ap.add_argument("--only", choices=["uncached", "cached"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
